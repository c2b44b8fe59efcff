"""Rotary embeddings for training and packed prefill: the q and k heads of one fused QKV
projection rotated at packed position ids in one launch, differentiable (the backward is the
transposed rotation, one launch too, written straight into the gradient of the projection).
(Decoding's RoPE, fused with the KV-cache write, is ops.rope_kv_write.)
"""

from __future__ import annotations

import torch

from . import _backend, _checks

FAST = ("triton",)
_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


def _impl(backend: str, name: str):
    return _backend.implementation(backend, "rope", name)


@torch.library.custom_op("janus_fast::rope_qkv", mutates_args=())
def _rope_qkv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
              num_kv_heads: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(t.contiguous() for t in _impl(backend, "rope_qkv")(qkv, positions, cos, sin, num_heads,
                                                                     num_kv_heads))


@_rope_qkv.register_fake
def _(qkv, positions, cos, sin, num_heads, num_kv_heads, backend):
    t, d = qkv.shape[0], qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    return qkv.new_empty((t, num_heads, d)), qkv.new_empty((t, num_kv_heads, d)), qkv.new_empty((t, num_kv_heads, d))


@torch.library.custom_op("janus_fast::rope_qkv_backward", mutates_args=())
def _rope_qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, positions: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, backend: str) -> torch.Tensor:
    return _impl(backend, "rope_qkv_backward")(dq.contiguous(), dk.contiguous(), dv.contiguous(), positions, cos, sin)


@_rope_qkv_backward.register_fake
def _(dq, dk, dv, positions, cos, sin, backend):
    return dq.new_empty((dq.shape[0], (dq.shape[1] + 2 * dk.shape[1]) * dq.shape[2]))


def _setup(ctx, inputs, output):
    _, positions, cos, sin, _, _, ctx.backend = inputs
    ctx.save_for_backward(positions, cos, sin)
    ctx.shapes = tuple(o.shape for o in output)
    ctx.set_materialize_grads(False)


def _grad(ctx, dq, dk, dv):
    if dq is None and dk is None and dv is None:
        return (None,) * 7
    positions, cos, sin = ctx.saved_tensors
    like = next(g for g in (dq, dk, dv) if g is not None)
    dq, dk, dv = (g if g is not None else like.new_zeros(shape) for g, shape in zip((dq, dk, dv), ctx.shapes))
    return _rope_qkv_backward(dq, dk, dv, positions, cos, sin, ctx.backend), None, None, None, None, None, None


_rope_qkv.register_autograd(_grad, setup_context=_setup)


def rope_qkv(qkv, positions, cos, sin, *, num_heads: int, num_kv_heads: int, backend: str = "auto"):
    """Rotate-half RoPE of the q and k heads of one fused projection qkv [T, (Hq + 2·Hkv)·D] (its
    row: Hq query heads, then Hkv key heads, then Hkv value heads; rows may be strided) at
    positions[t] (int32/int64 [T], a row of the cos/sin tables [S, D], e.g. rope_cos_sin of
    0..S-1), in fp32 and rounded once. -> (q [T, Hq, D], k [T, Hkv, D] rotated, v [T, Hkv, D]
    copied), contiguous. Differentiable in qkv: the gradient is one [T, (Hq + 2·Hkv)·D] tensor.
    Positions are range-checked unless value checks are off (ops.no_value_checks)."""
    _checks.tensor("qkv", qkv, ndim=2, dtypes=_DTYPES)
    hq = _checks.whole_number("num_heads", num_heads, low=1)
    hkv = _checks.whole_number("num_kv_heads", num_kv_heads, low=1)
    width = qkv.shape[1]
    if width % (hq + 2 * hkv):
        raise ValueError(f"qkv's width {width} is not a multiple of num_heads + 2 * num_kv_heads = {hq + 2 * hkv}")
    d = width // (hq + 2 * hkv)
    if d % 2 or not 2 <= d <= 256:
        raise ValueError(f"head_dim must be even and in [2, 256], got {d}")
    _checks.last_dim_contiguous("qkv", qkv)
    _checks.tensor("positions", positions, ndim=1, dtypes=(torch.int32, torch.int64), device=qkv.device)
    _checks.same("tokens of qkv and positions", qkv=qkv.shape[0], positions=positions.shape[0])
    _checks.rope_tables(cos, sin, d, qkv.device, _DTYPES)
    _checks.index_range("positions", positions, cos.shape[0])
    chosen = _backend.resolve_float("rope_qkv", backend, qkv, FAST)
    return _rope_qkv(qkv, positions, cos, sin, hq, hkv, chosen)
