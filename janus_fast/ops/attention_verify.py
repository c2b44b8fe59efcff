"""Verify attention: a window of query tokens per sequence against a KV cache (speculative
decoding's verification pass), inference only."""

from __future__ import annotations

import torch

from . import _backend, _checks, reference
from .attention import _check_qkv

FAST = ("triton",)


@torch.library.custom_op("janus_fast::verify_attention", mutates_args=())
def _verify(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
            softmax_scale: float, backend: str) -> torch.Tensor:
    if backend == "reference":
        return reference.verify_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale)
    return _backend.triton_kernels("attention_verify").verify_attention(q, k_cache, v_cache, cache_seqlens,
                                                                          softmax_scale)


@_verify.register_fake
def _(q, k_cache, v_cache, cache_seqlens, softmax_scale, backend):
    return q.new_empty(q.shape)


def verify_attention(q, k_cache, v_cache, cache_seqlens, *, softmax_scale: float | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """W new query tokens per sequence against its KV cache, which already holds their keys and
    values: the last W of its cache_seqlens[b] positions.

    q [B, W, Hq, D], k_cache/v_cache [B, S_max, Hkv, D], cache_seqlens int32 [B] in [0, S_max]
    (counting the window). Query j sees the keys at positions < cache_seqlens[b] - (W - 1 - j):
    everything before the window and the window up to itself (causal, bottom-right aligned); one
    that sees no key gets 0. W = 1 is `decode_attention`. -> [B, W, Hq, D]. Non-finite values as
    in flash_attention: keys a query cannot see are never read into its result.
    """
    _checks.tensor("q", q, ndim=4)
    _checks.tensor("k_cache", k_cache, ndim=4)
    _check_qkv(q, k_cache, v_cache, backend, ndim=4)
    _checks.same("batch sizes of q and k_cache", q=q.shape[0], k_cache=k_cache.shape[0])
    _checks.tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
    _checks.same("batch sizes of q and cache_seqlens", q=q.shape[0], cache_seqlens=cache_seqlens.shape[0])
    _checks.index_range("cache_seqlens", cache_seqlens, k_cache.shape[1] + 1)
    scale = _checks.softmax_scale(softmax_scale, q.shape[-1])
    chosen = _backend.resolve("verify_attention", backend, q.device, FAST,
                              fast_inputs=q.dtype in _checks.FLOAT_DTYPES)
    return _verify(q, k_cache, v_cache, cache_seqlens, scale, chosen)
