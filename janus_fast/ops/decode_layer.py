"""RoPE fused with the KV-cache write (plain or quantized), the decode step's piece of a Llama
layer (inference only). With ops.rms_norm (fused with the residual add), one QKV GEMM,
decode_attention, the o GEMM, one gate/up GEMM, ops.silu_mul and the down GEMM it makes a decode
layer of nine dispatched ops.

The public function validates its inputs, resolves the backend and calls a torch.library custom
op (with a fake implementation, so torch.compile and CUDA graphs see an opaque op).
"""

from __future__ import annotations

import torch

from . import _backend, _checks, quant

FAST = ("triton",)
_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


def _resolve(op: str, backend: str, t: torch.Tensor) -> str:
    return _backend.resolve_float(op, backend, t, FAST)


@torch.library.custom_op("janus_fast::rope_kv_write", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def _rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   backend: str, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> torch.Tensor:
    return _backend.implementation(backend, "decode_layer", "rope_kv_write")(q, k, v, cos, sin, positions, k_cache,
                                                                          v_cache, k_scale, v_scale)


@_rope_kv_write.register_fake
def _(q, k, v, cos, sin, positions, k_cache, v_cache, backend, k_scale=None, v_scale=None):
    return q.new_empty(q.shape)


def rope_kv_write(q, k, v, cos, sin, positions, k_cache, v_cache, *, k_scale=None, v_scale=None,
                  backend: str = "auto"):
    """New tokens of a KV cache: rotate-half RoPE of q [M, Hq, D] and k [M, Hkv, D] at position
    positions[m] (int32, a row of the cos/sin tables [S, D]); writes the rotated k and v into
    k_cache/v_cache [B, S_max, Hkv, D] at row m // (M // B), slot positions[m] (in place) and
    returns the rotated q [M, Hq, D]. M = B is one decode token per row; M a multiple of B gives
    each row M // B consecutive tokens (a speculative window). q/k/v may be column views of one
    fused projection (heads and dims contiguous). Rotation in fp32, rounded once. Positions are
    not range-checked on the device in graphs: the caller keeps them below min(S, S_max). A
    quantized cache (int8 / float8_e4m3fn, see ops.quant) comes with k_scale/v_scale fp32
    [B, S_max, Hkv]: each written head is quantized with its own scale (reference.quantize_rows),
    stored at the same slot."""
    dtypes = _DTYPES
    _checks.tensor("q", q, ndim=3, dtypes=dtypes)
    for name, t in (("k", k), ("v", v)):
        _checks.tensor(name, t, ndim=3, dtypes=(q.dtype,), device=q.device)
    _checks.same("k and v shapes", k=tuple(k.shape), v=tuple(v.shape))
    b, hq, d = q.shape
    _checks.same("batch sizes of q and k", q=b, k=k.shape[0])
    _checks.same("head_dim of q and k", q=d, k=k.shape[2])
    if d % 2 or not 2 <= d <= 256:
        raise ValueError(f"head_dim must be even and in [2, 256], got {d}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1 or t.stride(1) != d:
            raise ValueError(f"{name} must have contiguous heads and dims (strides (*, {d}, 1)), got {t.stride()}")
    _checks.rope_tables(cos, sin, d, q.device, dtypes)
    _checks.tensor("positions", positions, ndim=1, dtypes=(torch.int32,), device=q.device)
    _checks.same("batch sizes of q and positions", q=b, positions=positions.shape[0])
    if k_scale is None and v_scale is None:
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            _checks.tensor(name, t, ndim=4, dtypes=(q.dtype,), device=q.device)
    else:
        quant.check_quantized_cache(k_cache, v_cache, k_scale, v_scale, q.device)
    _checks.same("k_cache and v_cache shapes", k_cache=tuple(k_cache.shape), v_cache=tuple(v_cache.shape))
    _checks.same("k_cache and v_cache strides", k_cache=k_cache.stride(), v_cache=v_cache.stride())
    rows = k_cache.shape[0]
    if (b % rows if rows else b) or tuple(k_cache.shape[2:]) != tuple(k.shape[1:]):
        raise ValueError(f"k_cache must be [B, S_max, {k.shape[1]}, {d}] with B dividing the {b} tokens, "
                         f"got {tuple(k_cache.shape)}")
    if k_cache.stride(3) != 1 or k_cache.stride(2) != d:
        raise ValueError(f"k_cache must be contiguous in its last two dimensions, got strides {k_cache.stride()}")
    _checks.index_range("positions", positions, min(cos.shape[0], k_cache.shape[1]))
    return _rope_kv_write(q, k, v, cos, sin, positions, k_cache, v_cache, _resolve("rope_kv_write", backend, q),
                          k_scale, v_scale)
