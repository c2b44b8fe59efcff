"""Attention: dense (flash_attention), packed (varlen_attention) and KV-cache decode.

Each public function validates its inputs, resolves the backend and calls a torch.library
custom op whose outputs are contiguous; the differentiable ones carry a registered backward, so torch.compile and CUDA
graphs see opaque ops with fake (meta) implementations.
"""

from __future__ import annotations

import math

import torch

from . import _backend, _checks, attention_auto, quant, reference

FAST = ("triton",)
_REFERENCE_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _impl(backend: str, name: str, kernel_name: str):
    if backend == "reference":
        return getattr(reference, name)
    return getattr(_backend.triton_kernels("attention"), kernel_name)


# --------------------------------------------------------------------------- dense


@torch.library.custom_op("janus_fast::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   softmax_scale: float, backend: str,
                   deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    # `deterministic` only matters to the backward; it is an input so that autograd sees it
    if q.numel() == 0 or k.shape[1] == 0:
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), -math.inf, dtype=_lse_dtype(q), device=q.device)
        return q.new_zeros(q.shape), lse
    return _impl(backend, "attention", "attention_forward")(q, k, v, causal, softmax_scale)


@_attention_fwd.register_fake
def _(q, k, v, causal, softmax_scale, backend, deterministic=False):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=_lse_dtype(q))


@torch.library.custom_op("janus_fast::attention_bwd", mutates_args=())
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float,
                   backend: str, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.numel() == 0 or k.shape[1] == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    if backend == "reference":
        return reference.attention_backward(dout.contiguous(), q, k, v, out, lse, causal, softmax_scale)
    return _impl(backend, "attention_backward", "attention_backward")(
        dout.contiguous(), q, k, v, out, lse, causal, softmax_scale, deterministic)


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, softmax_scale, backend, deterministic=False):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, ctx.causal, ctx.softmax_scale, ctx.backend, ctx.deterministic = inputs
    ctx.save_for_backward(q, k, v, *output)


def _attention_grad(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, ctx.causal, ctx.softmax_scale, ctx.backend,
                                ctx.deterministic)
    return dq, dk, dv, None, None, None, None


_attention_fwd.register_autograd(_attention_grad, setup_context=_attention_setup)


def _check_qkv(q, k, v, backend: str, ndim: int, kv_dtypes=None) -> None:
    """kv_dtypes: what k and v may hold instead of q's dtype (a quantized cache)."""
    dtypes = _REFERENCE_DTYPES if backend in ("reference", "auto") else _checks.FLOAT_DTYPES
    _checks.tensor("q", q, ndim=ndim, dtypes=dtypes)
    _checks.tensor("k", k, ndim=ndim, dtypes=kv_dtypes or dtypes, device=q.device)
    _checks.tensor("v", v, ndim=ndim, dtypes=kv_dtypes or dtypes, device=q.device)
    if kv_dtypes is None:
        _checks.same("q, k and v dtypes", q=q.dtype, k=k.dtype, v=v.dtype)
    _checks.same("k and v shapes", k=tuple(k.shape), v=tuple(v.shape))
    _checks.same("head_dim of q and k", q=q.shape[-1], k=k.shape[-1])
    if not 1 <= q.shape[-1] <= 256:
        raise ValueError(f"head_dim must be in [1, 256], got {q.shape[-1]}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"the query head count ({hq}) must be a multiple of the kv head count ({hkv})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.last_dim_contiguous(name, t)


def flash_attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None,
                    backend: str = "auto", deterministic: bool = False) -> torch.Tensor:
    """softmax(q kᵀ · softmax_scale) v, differentiable.

    q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] with Hq a multiple of Hkv (GQA/MQA) -> [B, Sq, Hq, D].
    causal with Sq != Sk is bottom-right aligned (query i sees keys j <= i + Sk - Sq); a query
    that sees no key gets 0. softmax_scale defaults to D ** -0.5.
    Non-finite values (every backend): a NaN in a query row or in a key it sees makes that output
    row NaN, a non-finite value it sees makes that element non-finite; keys a query cannot see
    (causally masked, another packed sequence, past cache_seqlens) are never read into its result.
    deterministic=True makes the Triton backward bit-reproducible (two passes, dK/dV then dQ, no
    atomics); the default fuses them and adds dQ with fp32 atomics, so its last bits vary from
    run to run.
    backend="auto" on a GPU runs ours (with a backward: fused or two-pass) or torch's SDPA (flash /
    cuDNN / efficient), whichever the first call of its kind measured faster here, where SDPA
    honours these contracts
    (janus_fast/ops/attention_auto.py; JANUS_FAST_ATTENTION=triton|sdpa forces one).
    """
    _check_qkv(q, k, v, backend, ndim=4)
    _checks.same("batch sizes of q and k", q=q.shape[0], k=k.shape[0])
    scale = _checks.softmax_scale(softmax_scale, q.shape[-1])
    chosen = _backend.resolve("flash_attention", backend, q.device, FAST,
                              fast_inputs=q.dtype in _checks.FLOAT_DTYPES)
    if backend == "auto" and chosen == "triton":  # measured against torch's SDPA on this GPU
        backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        chosen = attention_auto.choose(q, k, v, bool(causal), scale, backward, bool(deterministic))
        if chosen == attention_auto.OURS_TWO_PASS:  # measured faster than our fused backward here
            chosen, deterministic = "triton", True
        elif chosen != "triton":
            return attention_auto.sdpa_attention(q, k, v, bool(causal), scale, chosen)
    return _attention_fwd(q, k, v, bool(causal), scale, chosen, bool(deterministic))[0]


# --------------------------------------------------------------------------- varlen


@torch.library.custom_op("janus_fast::varlen_attention_fwd", mutates_args=())
def _varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                softmax_scale: float, backend: str, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "reference":
        return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale)
    return _impl(backend, "varlen_attention", "varlen_attention_forward")(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale)


@_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, backend,
      deterministic=False):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))


@torch.library.custom_op("janus_fast::varlen_attention_bwd", mutates_args=())
def _varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                softmax_scale: float, backend: str,
                deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dout = dout.contiguous()
    if backend == "reference":
        return reference.varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q,
                                                   cu_seqlens_k, causal, softmax_scale)
    return _impl(backend, "varlen_attention_backward", "varlen_attention_backward")(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
        softmax_scale, deterministic)


@_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
      softmax_scale, backend, deterministic=False):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.causal, ctx.softmax_scale, ctx.backend, ctx.deterministic = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k, *output)


def _varlen_grad(ctx, dout, _dlse):
    q, k, v, cu_q, cu_k, out, lse = ctx.saved_tensors
    dq, dk, dv = _varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k,
                             ctx.causal, ctx.softmax_scale, ctx.backend, ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_varlen_fwd.register_autograd(_varlen_grad, setup_context=_varlen_setup)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                     causal: bool = False, softmax_scale: float | None = None,
                     backend: str = "auto", deterministic: bool = False) -> torch.Tensor:
    """Attention over packed sequences, differentiable.

    q [total_q, Hq, D], k/v [total_k, Hkv, D]; sequence i is q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]
    against k/v[cu_seqlens_k[i]:cu_seqlens_k[i+1]] (int32, starting at 0, non-decreasing; empty
    sequences allowed). max_seqlen_* bound the lengths. Causal is bottom-right aligned within each
    sequence. deterministic as in flash_attention. -> [total_q, Hq, D].
    """
    _check_qkv(q, k, v, backend, ndim=3)
    _checks.whole_number("max_seqlen_q", max_seqlen_q)
    _checks.whole_number("max_seqlen_k", max_seqlen_k)
    _checks.cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device)
    _checks.cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device)
    _checks.same("cu_seqlens lengths", cu_seqlens_q=cu_seqlens_q.numel(), cu_seqlens_k=cu_seqlens_k.numel())
    scale = _checks.softmax_scale(softmax_scale, q.shape[-1])
    chosen = _backend.resolve("varlen_attention", backend, q.device, FAST,
                              fast_inputs=q.dtype in _checks.FLOAT_DTYPES)
    return _varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       bool(causal), scale, chosen, bool(deterministic))[0]


# --------------------------------------------------------------------------- decode


@torch.library.custom_op("janus_fast::decode_attention", mutates_args=())
def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
            softmax_scale: float, backend: str, k_scale: torch.Tensor | None = None,
            v_scale: torch.Tensor | None = None) -> torch.Tensor:
    return _impl(backend, "decode_attention", "decode_attention")(q, k_cache, v_cache, cache_seqlens, softmax_scale,
                                                                  k_scale, v_scale)


@_decode.register_fake
def _(q, k_cache, v_cache, cache_seqlens, softmax_scale, backend, k_scale=None, v_scale=None):
    return q.new_empty(q.shape)


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, softmax_scale: float | None = None,
                     k_scale=None, v_scale=None, backend: str = "auto") -> torch.Tensor:
    """One new query token per sequence against its KV cache (inference only).

    q [B, Hq, D], k_cache/v_cache [B, S_max, Hkv, D], cache_seqlens int32 [B] in [0, S_max]:
    positions >= cache_seqlens[b] are ignored; a length of 0 gives 0. -> [B, Hq, D].
    A quantized cache (int8 / float8_e4m3fn, see ops.quant) comes with k_scale/v_scale fp32
    [B, S_max, Hkv]: it is read as k_cache · k_scale[..., None] (and v likewise).
    """
    _checks.tensor("q", q, ndim=3)
    _checks.tensor("k_cache", k_cache, ndim=4)
    quantized = k_scale is not None or v_scale is not None
    if quantized:
        quant.check_quantized_cache(k_cache, v_cache, k_scale, v_scale, q.device)
    _check_qkv(q[:, None], k_cache, v_cache, backend, ndim=4, kv_dtypes=quant.QUANTIZED_DTYPES if quantized else None)
    _checks.same("batch sizes of q and k_cache", q=q.shape[0], k_cache=k_cache.shape[0])
    _checks.tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
    _checks.same("batch sizes of q and cache_seqlens", q=q.shape[0], cache_seqlens=cache_seqlens.shape[0])
    _checks.index_range("cache_seqlens", cache_seqlens, k_cache.shape[1] + 1)
    scale = _checks.softmax_scale(softmax_scale, q.shape[-1])
    chosen = _backend.resolve("decode_attention", backend, q.device, FAST,
                              fast_inputs=q.dtype in _checks.FLOAT_DTYPES)
    return _decode(q, k_cache, v_cache, cache_seqlens, scale, chosen, k_scale, v_scale)
