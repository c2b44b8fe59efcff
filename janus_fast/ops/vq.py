"""VQ codebook ops: nearest-code search (vq_quantize) and code lookup (vq_lookup)."""

from __future__ import annotations

from typing import Optional

import torch

from . import _backend, _checks, reference

FAST = ("cuda", "triton")
_REFERENCE_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


def _impl(backend: str, name: str):
    if backend == "reference":
        return getattr(reference, name)
    if backend == "cuda":
        return _backend.cuda_op(name)
    return getattr(_backend.triton_kernels("vq"), name)


_PREPARED_MAX = 4
_prepared: dict = {}


def prepared_codebook(codebook: torch.Tensor, l2_norm: bool, backend: str) -> tuple:
    """The fast backends' prepared codebook (-2 x normalised rows, padded, and the squared
    norms), made once and reused while the codebook is unchanged: the key is the storage
    address, shape, dtype and the version counter, which every in-place write bumps (detach()
    shares it, so the model's codebook.detach() hits). The entry holds the codebook itself, so its
    memory cannot be reused by another tensor while cached. A handful of entries, oldest out."""
    def prepare():
        fn = _impl(backend, "vq_prepare_codebook" if backend == "cuda" else "prepare_codebook")
        return tuple(fn(codebook, bool(l2_norm)))

    if codebook.is_inference():  # no version counter to watch: prepared on every call
        return prepare()
    key = (backend, codebook.device, codebook.data_ptr(), tuple(codebook.shape), codebook.dtype, bool(l2_norm))
    entry = _prepared.get(key)
    if entry is not None and entry[1] == codebook._version:
        return entry[2]
    prepared = prepare()
    _prepared.pop(key, None)
    if len(_prepared) >= _PREPARED_MAX:
        _prepared.pop(next(iter(_prepared)))
    _prepared[key] = (codebook, codebook._version, prepared)
    return prepared


@torch.library.custom_op("janus_fast::vq_quantize", mutates_args=())
def _vq_quantize(z: torch.Tensor, codebook: torch.Tensor, l2_norm: bool, backend: str) -> torch.Tensor:
    if backend == "reference":
        return reference.vq_quantize(z, codebook, l2_norm)
    return _impl(backend, "vq_quantize")(z, *prepared_codebook(codebook, l2_norm, backend), l2_norm)


@_vq_quantize.register_fake
def _(z, codebook, l2_norm, backend):
    return z.new_empty((z.shape[0],), dtype=torch.int64)


@torch.library.custom_op("janus_fast::vq_lookup", mutates_args=())
def _vq_lookup(indices: torch.Tensor, codebook: torch.Tensor, l2_norm: bool,
               shape: Optional[list[int]], backend: str) -> torch.Tensor:
    return _impl(backend, "vq_lookup")(indices, codebook, l2_norm, shape)


@_vq_lookup.register_fake
def _(indices, codebook, l2_norm, shape, backend):
    size = tuple(shape) if shape is not None else (*indices.shape, codebook.shape[1])
    return codebook.new_empty(size)


def _check_codebook(codebook, backend: str, device) -> None:
    dtypes = _REFERENCE_DTYPES if backend in ("reference", "auto") else _checks.FLOAT_DTYPES
    _checks.tensor("codebook", codebook, ndim=2, dtypes=dtypes, device=device)
    if codebook.shape[0] == 0 or codebook.shape[1] == 0:
        raise ValueError(f"codebook must be a non-empty [K, D] tensor, got shape {tuple(codebook.shape)}")
    if not codebook.is_contiguous():
        raise ValueError("codebook must be contiguous; call .contiguous() first")


def vq_quantize(z, codebook, *, l2_norm: bool = True, return_rows: bool = False, backend: str = "auto"):
    """Nearest codebook row for each latent: z [N, D], codebook [K, D] -> int64 [N].

    Squared L2 distance, after L2-normalising z rows and codebook rows when l2_norm (x / max(||x||,
    1e-12), F.normalize: a zero row stays zero, so a zero latent is at distance ||c||^2 from
    every code and takes the first code of smallest norm); ties go to the lowest index. The fast
    backends compute the expanded distance ||c||^2 - 2 z.c in fp32 without an N x K matrix; they
    can differ from the reference only where two codes' distances agree to ~1e-6 (rounding).
    return_rows=True also returns the selected (normalised) rows [N, D] in the codebook's dtype,
    as vq_lookup gives them (for a straight-through estimator).
    A latent row with any non-finite entry gets index -1 (and a NaN row with return_rows), on
    every backend, without a host sync.
    """
    _checks.tensor("z", z, ndim=2)
    _check_codebook(codebook, backend, z.device)
    _checks.tensor("z", z, dtypes=(codebook.dtype,))
    _checks.same("latent width of z and codebook", z=z.shape[1], codebook=codebook.shape[1])
    _checks.last_dim_contiguous("z", z)
    fast_inputs = codebook.dtype in _checks.FLOAT_DTYPES and codebook.shape[1] <= 64
    chosen = _backend.resolve("vq_quantize", backend, z.device, FAST, fast_inputs=fast_inputs)
    if chosen != "reference" and codebook.shape[1] > 64:
        raise ValueError(f"the {chosen} vq_quantize supports D <= 64, got {codebook.shape[1]}")
    indices = _vq_quantize(z, codebook, bool(l2_norm), chosen)
    if not return_rows:
        return indices
    lookup = _backend.resolve("vq_lookup", backend, z.device, FAST, fast_inputs=fast_inputs)
    return indices, _vq_lookup(indices, codebook, bool(l2_norm), None, lookup)


def vq_lookup(indices, codebook, *, l2_norm: bool = True, shape=None, check_indices: bool | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Codebook rows for `indices` (L2-normalised when l2_norm) in the codebook's dtype.

    indices: integer tensor of any shape, values in [0, K) -> [*indices.shape, D]; with
    shape=(B, D, H, W) and B*H*W == indices.numel() the channels-first [B, D, H, W] tensor,
    contiguous (index b*H*W + h*W + w lands at [b, :, h, w]).

    Out-of-range indices: with check_indices (the default on CPU tensors, where it is free) an
    index outside [0, K) raises ValueError before any launch, unless `no_value_checks()` or a
    graph capture / torch.compile trace switches value checks off. On CUDA the default is no
    check, because reading the indices would sync the host: the kernels write a NaN row for
    each bad index instead (never reading outside the codebook), so `out.isnan()` flags it on
    the device. check_indices=True on CUDA tensors runs the (syncing) check.
    """
    _checks.tensor("indices", indices, dtypes=(torch.int32, torch.int64))
    _check_codebook(codebook, backend, indices.device)
    if shape is not None:
        shape = [int(s) for s in shape]
        if len(shape) != 4 or min(shape) < 0:
            raise ValueError(f"shape must be (B, D, H, W) with non-negative sizes, got {shape}")
        b, d, h, w = shape
        _checks.same("shape's D and the codebook width", shape=d, codebook=codebook.shape[1])
        _checks.same("B*H*W and the number of indices", shape=b * h * w, indices=indices.numel())
    if check_indices is None:
        check_indices = indices.device.type != "cuda"
    if check_indices:
        _checks.index_range("indices", indices, codebook.shape[0])
    chosen = _backend.resolve("vq_lookup", backend, indices.device, FAST,
                              fast_inputs=codebook.dtype in _checks.FLOAT_DTYPES)
    return _vq_lookup(indices.contiguous(), codebook, bool(l2_norm), shape, chosen)
