"""Attention backward kernels.

Default (fused, 5 GEMMs per tile like FA2/FA3): one program keeps a block of K and V resident and
streams the query blocks of its kv head's group; it computes S^T = K Q^T, dV += P^T dO,
dP^T = V dO^T, dK += dS^T Q and dQ += dS K, the last added to an fp32 accumulator with atomics
and converted to the input dtype by a final elementwise kernel. The delta kernel runs first and
also clears that accumulator. Atomics make dQ's summation order vary run to run.

Deterministic (deterministic=True): dK/dV with keys resident and dQ with queries resident, in two
kernels without atomics (7 GEMMs, P recomputed twice), bit-reproducible.

Maths in kernels/attention.py.
"""
import triton
import triton.language as tl

from .attention_common import (
    _causal_ranges,
    _heavy_first,
    _load_tile,
    _query_head,
    _seq_bounds,
    _store_tile,
)
from .attention_configs import BWD_DKDV, BWD_DQ, BWD_FUSED, autotune


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, DQ_ACC, CU_Q,
    stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh, stride_lb, stride_lh,
    stride_ab, stride_am, stride_ah,
    seqlen_q, n_heads_q,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
    ZERO_DQ: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id in fp32 (the rowsum term of the softmax gradient); with
    ZERO_DQ also clears the same rows of the fp32 dQ accumulator of the fused backward, which
    saves a memset launch."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads_q
    h = pid_bh % n_heads_q
    start_q, len_q, _, _ = _seq_bounds(CU_Q, CU_Q, b, seqlen_q, seqlen_q, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = (start_q + offs_m).to(tl.int64)
    o = _load_tile(O + b64 * stride_ob + rows[:, None] * stride_om + h * stride_oh + offs_d[None, :],
                   offs_m, len_q, offs_d, HEAD_D, BLOCK_D, True).to(tl.float32)
    do = _load_tile(DO + b64 * stride_dob + rows[:, None] * stride_dom + h * stride_doh + offs_d[None, :],
                    offs_m, len_q, offs_d, HEAD_D, BLOCK_D, True).to(tl.float32)
    tl.store(DELTA + b64 * stride_lb + h * stride_lh + start_q + offs_m, tl.sum(o * do, 1), mask=offs_m < len_q)
    if ZERO_DQ:
        _store_tile(DQ_ACC + b64 * stride_ab + rows[:, None] * stride_am + h * stride_ah + offs_d[None, :],
                    tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), offs_m, len_q, offs_d, HEAD_D, BLOCK_D)


@triton.jit
def _load_row_stats(LSE, DELTA, base, offs_m, len_q):
    """lse in log2 units (+inf for rows with no visible key, so their P is exactly 0) and delta."""
    ok = offs_m < len_q
    lse = tl.load(LSE + base + offs_m, mask=ok, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + base + offs_m, mask=ok, other=0.0)
    return lse, delta


@triton.jit
def _bwd_kv_inner(dk, dv, k, v, q_base, do_base, acc_base, stride_qm, stride_dom, stride_am, LSE, DELTA, stat_base,
                  offs_n, offs_d, lo, hi, len_q, causal_off, qk_scale,
                  HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
                  ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dK (unscaled) and dV of a key block over query blocks [lo, hi), transposed form;
    with ATOMIC_DQ also add each query block's dQ = dS K (unscaled) to the fp32 accumulator."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, len_q, offs_d,
                       HEAD_D, BLOCK_D, True)
        do = _load_tile(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], offs_m, len_q, offs_d,
                        HEAD_D, BLOCK_D, True)
        lse, delta = _load_row_stats(LSE, DELTA, stat_base, offs_m, len_q)
        # Rows past len_q load q = dO = 0 and lse = delta = 0, so they add exactly 0.
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale - lse[None, :])
        if MASK:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_off, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += tl.dot(ds_t, q, input_precision=DOT_PREC)
        if ATOMIC_DQ:
            _atomic_add_tile(acc_base + offs_m[:, None] * stride_am + offs_d[None, :],
                             tl.dot(tl.trans(ds_t), k, input_precision=DOT_PREC), offs_m, len_q, offs_d,
                             HEAD_D, BLOCK_D)
    return dk, dv


@triton.jit
def _atomic_add_tile(ptrs, x, rows, n_rows, offs_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 atomic add of a [rows, BLOCK_D] tile where rows < n_rows and d < HEAD_D (relaxed
    ordering: the sum is only read by the next kernel)."""
    if HEAD_D == BLOCK_D:
        tl.atomic_add(ptrs, x, mask=rows[:, None] < n_rows, sem="relaxed")
    else:
        tl.atomic_add(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_D), sem="relaxed")


@triton.jit
def _bwd_kv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_ab, stride_am, stride_ah,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_heads_kv, group, qk_scale, sm_scale,
    tune_q, tune_k, tune_bh,  # autotuning key only (attention_configs.tune_buckets)
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of BLOCK_N keys of one kv head, summed over the group's query heads; with
    ATOMIC_DQ also their dQ contributions, added to DQ_ACC (fp32, unscaled) by atomics: 5 GEMMs
    per query block (4 without)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads_kv
    hk = pid_bh % n_heads_kv
    start_q, len_q, start_k, len_k = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= len_k:
        return
    b64 = b.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    krow = (start_k + offs_n).to(tl.int64)
    k = _load_tile(K + b64 * stride_kb + krow[:, None] * stride_kn + hk * stride_kh + offs_d[None, :],
                   offs_n, len_k, offs_d, HEAD_D, BLOCK_D, True)
    v = _load_tile(V + b64 * stride_vb + krow[:, None] * stride_vn + hk * stride_vh + offs_d[None, :],
                   offs_n, len_k, offs_d, HEAD_D, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    causal_off = len_k - len_q
    q_end = tl.cdiv(len_q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # first query that sees key n0 is n0 - off; every key of the block is seen from n0+BLOCK_N-1-off on
        lo = tl.maximum(n0 - causal_off, 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - causal_off, 0), BLOCK_M) * BLOCK_M, q_end)
        lo = tl.minimum(lo, full)
    else:
        lo = 0
        full = 0
    q_start = b64 * stride_qb + start_q.to(tl.int64) * stride_qm
    do_start = b64 * stride_dob + start_q.to(tl.int64) * stride_dom
    acc_start = b64 * stride_ab + start_q.to(tl.int64) * stride_am
    for g in range(group):
        h = hk * group + g
        q_base = Q + q_start + h * stride_qh
        do_base = DO + do_start + h * stride_doh
        acc_base = DQ_ACC + acc_start + h * stride_ah
        stat_base = b64 * stride_lb + h * stride_lh + start_q
        if ATOMIC_DQ:  # one loop, the causal mask a select: a second loop copy spills on sm_90
            dk, dv = _bwd_kv_inner(dk, dv, k, v, q_base, do_base, acc_base, stride_qm, stride_dom, stride_am, LSE,
                                   DELTA, stat_base, offs_n, offs_d, lo, q_end, len_q, causal_off, qk_scale,
                                   HEAD_D, BLOCK_D, BLOCK_M, CAUSAL, True, DOT_PREC)
        else:
            dk, dv = _bwd_kv_inner(dk, dv, k, v, q_base, do_base, acc_base, stride_qm, stride_dom, stride_am, LSE,
                                   DELTA, stat_base, offs_n, offs_d, lo, full, len_q, causal_off, qk_scale,
                                   HEAD_D, BLOCK_D, BLOCK_M, True, False, DOT_PREC)
            dk, dv = _bwd_kv_inner(dk, dv, k, v, q_base, do_base, acc_base, stride_qm, stride_dom, stride_am, LSE,
                                   DELTA, stat_base, offs_n, offs_d, full, q_end, len_q, causal_off, qk_scale,
                                   HEAD_D, BLOCK_D, BLOCK_M, False, False, DOT_PREC)
    dk_ptrs = DK + b64 * stride_dkb + krow[:, None] * stride_dkn + hk * stride_dkh + offs_d[None, :]
    dv_ptrs = DV + b64 * stride_dvb + krow[:, None] * stride_dvn + hk * stride_dvh + offs_d[None, :]
    _store_tile(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), offs_n, len_k, offs_d, HEAD_D, BLOCK_D)
    _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), offs_n, len_k, offs_d, HEAD_D, BLOCK_D)


# One kernel, two tile tables: the fused backward (ATOMIC_DQ=True) holds more live tiles, and
# its benchmark runs must not leave their dQ in the accumulator.
_attn_bwd_fused_kernel = autotune(BWD_FUSED, reset_to_zero=["DQ_ACC"])(_bwd_kv_kernel)
_attn_bwd_dkdv_kernel = autotune(BWD_DKDV)(_bwd_kv_kernel)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                  lo, hi, len_k, causal_off, qk_scale,
                  HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                  MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dQ (unscaled) of a query block over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base + cols[:, None] * stride_kn + offs_d[None, :], cols, len_k, offs_d, HEAD_D, BLOCK_D, MASK)
        v = _load_tile(v_base + cols[:, None] * stride_vn + offs_d[None, :], cols, len_k, offs_d, HEAD_D, BLOCK_D, MASK)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale - lse[:, None])
        if MASK:
            ok = cols[None, :] < len_k
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + causal_off)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@autotune(BWD_DQ)
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_heads_q, group, qk_scale, sm_scale,
    tune_q, tune_k, tune_bh,  # autotuning key only (attention_configs.tune_buckets)
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of BLOCK_M query rows of one (batch, head); recomputes P from lse instead of atomics."""
    pid_m = _heavy_first(CAUSAL)
    b64, h, hk, start_q, len_q, start_k, len_k = _query_head(tl.program_id(1), CU_Q, CU_K, n_heads_q, group,
                                                              seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qrow = (start_q + offs_m).to(tl.int64)
    q = _load_tile(Q + b64 * stride_qb + qrow[:, None] * stride_qm + h * stride_qh + offs_d[None, :],
                   offs_m, len_q, offs_d, HEAD_D, BLOCK_D, True)
    do = _load_tile(DO + b64 * stride_dob + qrow[:, None] * stride_dom + h * stride_doh + offs_d[None, :],
                    offs_m, len_q, offs_d, HEAD_D, BLOCK_D, True)
    lse, delta = _load_row_stats(LSE, DELTA, b64 * stride_lb + h * stride_lh + start_q, offs_m, len_q)
    k_base = K + b64 * stride_kb + start_k.to(tl.int64) * stride_kn + hk * stride_kh
    v_base = V + b64 * stride_vb + start_k.to(tl.int64) * stride_vn + hk * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    causal_off = len_k - len_q
    full, end = _causal_ranges(m0, len_q, len_k, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                       0, full, len_k, causal_off, qk_scale, HEAD_D, BLOCK_D, BLOCK_N, CAUSAL, False, DOT_PREC)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                       full, end, len_k, causal_off, qk_scale, HEAD_D, BLOCK_D, BLOCK_N, CAUSAL, True, DOT_PREC)
    _store_tile(DQ + b64 * stride_dqb + qrow[:, None] * stride_dqm + h * stride_dqh + offs_d[None, :],
                (dq * sm_scale).to(DQ.dtype.element_ty), offs_m, len_q, offs_d, HEAD_D, BLOCK_D)



@triton.jit
def _bwd_dq_convert_kernel(DQ_ACC, DQ, n, sm_scale, BLOCK: tl.constexpr):
    """dq = sm_scale * dq_acc in dq's dtype (both contiguous, n elements)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(DQ + offs, (tl.load(DQ_ACC + offs, mask=ok) * sm_scale).to(DQ.dtype.element_ty), mask=ok)
