"""Attention forward (FlashAttention-2 with pointer loads): one program per (query block, batch x head).

Online softmax in fp32 over key blocks; see kernels/attention.py for the maths and layouts.
"""
import triton
import triton.language as tl

from .attention_common import (
    _causal_ranges,
    _causal_safe_values,
    _heavy_first,
    _load_tile,
    _query_head,
    _store_tile,
)
from .attention_configs import FWD, autotune


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d,
               lo, hi, len_k, causal_off, qk_scale,
               HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over key blocks [lo, hi). MASK=False blocks are fully visible and in bounds."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base + cols[:, None] * stride_kn + offs_d[None, :], cols, len_k, offs_d, HEAD_D, BLOCK_D, MASK)
        v = _load_tile(v_base + cols[:, None] * stride_vn + offs_d[None, :], cols, len_k, offs_d, HEAD_D, BLOCK_D, MASK)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASK:
            ok = cols[None, :] < len_k
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + causal_off)
            qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASK:
            # a row that has seen no visible key yet keeps m = -inf; subtract 0 instead (no NaN)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        if CAUSAL and MASK:
            v, seen_bad = _causal_safe_values(v, cols, offs_m, causal_off)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            acc = tl.where(seen_bad, float("nan"), acc)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@autotune(FWD)
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_heads_q, group, qk_scale,
    tune_q, tune_k, tune_bh,  # autotuning key only (attention_configs.tune_buckets)
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = softmax(s Q K^T) V and lse for BLOCK_M query rows of one (batch, head); fp32 accumulators."""
    pid_m = _heavy_first(CAUSAL)
    b64, h, hk, start_q, len_q, start_k, len_k = _query_head(tl.program_id(1), CU_Q, CU_K, n_heads_q, group,
                                                              seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    q_base = Q + b64 * stride_qb + start_q.to(tl.int64) * stride_qm + h * stride_qh
    k_base = K + b64 * stride_kb + start_k.to(tl.int64) * stride_kn + hk * stride_kh
    v_base = V + b64 * stride_vb + start_k.to(tl.int64) * stride_vn + hk * stride_vh
    o_base = O + b64 * stride_ob + start_q.to(tl.int64) * stride_om + h * stride_oh
    lse_base = LSE + b64 * stride_lb + h * stride_lh + start_q

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, len_q, offs_d, HEAD_D, BLOCK_D, True)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    causal_off = len_k - len_q
    full, end = _causal_ranges(m0, len_q, len_k, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n,
                               offs_d, 0, full, len_k, causal_off, qk_scale,
                               HEAD_D, BLOCK_D, BLOCK_N, CAUSAL, False, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n,
                               offs_d, full, end, len_k, causal_off, qk_scale,
                               HEAD_D, BLOCK_D, BLOCK_N, CAUSAL, True, DOT_PREC)

    empty = l_i == 0.0  # no visible key: out = 0, lse = -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    _store_tile(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(O.dtype.element_ty), offs_m, len_q,
                offs_d, HEAD_D, BLOCK_D)
    tl.store(lse_base + offs_m, lse, mask=offs_m < len_q)

