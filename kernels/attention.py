"""Triton attention: fused forward/backward (dense and packed varlen) and flash-decoding.

Maths (per batch b, query head h, kv head g = h // (Hq // Hkv), scale s):
    S = s * Q K^T            (causal: key j visible to query i iff j <= i + Sk - Sq, bottom-right aligned)
    lse_i = log sum_j exp(S_ij)          (natural log; -inf for a row with no visible key)
    O = softmax(S) V                     (a row with no visible key gives 0)
Backward, with P = exp(S - lse) and delta_i = sum_d dO_id O_id:
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = s dS K,   dK = s dS^T Q
dK/dV of a kv head are summed over the query heads of its group.

All softmax statistics and all accumulators are fp32; the matmul inputs stay in the input dtype
(bf16/fp16 use tensor cores; fp32 is computed with ieee dots, for the interpreter and as an oracle).
Scores are pre-multiplied by s*log2(e) so the kernels use exp2; lse is converted back to natural log.

One set of kernels serves dense and varlen: a dense tensor [B, S, H, D] is addressed with its batch
stride and sequence starts at 0; a packed tensor [total, H, D] has batch stride 0 and takes each
sequence's start and length from cu_seqlens. Programs past a sequence's end exit at once.

Layouts follow the ops contract (janus_fast/ops/reference.py): dense q [B, Sq, Hq, D],
k/v [B, Sk, Hkv, D], lse [B, Hq, Sq]; varlen q [total_q, Hq, D], lse [Hq, total_q];
decode q [B, Hq, D], caches [B, S_max, Hkv, D]. Any strides with stride(-1) == 1 are accepted.
Outputs are allocated with torch.empty: every element is written by a kernel.

Non-finite inputs (the ops contract): NaN in a visible score or value propagates as in SDPA's
math path; keys a row cannot see never reach its result: keys past a sequence's end are loaded
as 0 and causally hidden scores are replaced by -inf; hidden values in a diagonal block are
zeroed before the P V product (see _causal_safe_values).
"""
import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634  # the kernels spell out log2(e) and ln(2) literally


# --------------------------------------------------------------------------------------------
# Configs, per (architecture, tile width); see _autotune. A single survivor skips benchmarking
# (the interpreter always lands there). Chosen by compiling candidates for sm_80/sm_90 (fp16,
# causal) and keeping those without register spills that fit shared memory (A100 163 KiB,
# H100 227 KiB); "wide" tiles (head_dim > 128 at 2 bytes, or fp32) get smaller blocks.
# --------------------------------------------------------------------------------------------

def _configs(table):
    """{(arch, width): [(BLOCK_M, BLOCK_N, num_warps, num_stages), ...]} -> the same keys with Configs."""
    return {tag: [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in rows]
            for tag, rows in table.items()}


# (BLOCK_M, BLOCK_N, num_warps, num_stages)
_FWD_CONFIGS = _configs({
    ("sm90", "narrow"): [(128, 128, 8, 3), (128, 64, 8, 4), (128, 64, 8, 3), (64, 64, 4, 3)],
    ("sm90", "wide"): [(64, 32, 4, 3), (64, 32, 4, 2)],
    ("sm80", "narrow"): [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
    ("sm80", "wide"): [(128, 64, 8, 2), (64, 32, 4, 2)],
    ("interp", "narrow"): [(32, 16, 4, 1)],
    ("interp", "wide"): [(32, 16, 4, 1)],
})
# dK/dV kernel: BLOCK_N keys stay resident, BLOCK_M query rows stream.
_BWD_DKDV_CONFIGS = _configs({
    ("sm90", "narrow"): [(16, 128, 8, 3), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3)],
    ("sm90", "wide"): [(32, 64, 8, 2), (16, 128, 8, 3)],
    ("sm80", "narrow"): [(16, 128, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2)],
    ("sm80", "wide"): [(32, 64, 8, 2), (16, 128, 8, 2)],
    ("interp", "narrow"): [(16, 32, 4, 1)],
    ("interp", "wide"): [(16, 32, 4, 1)],
})
# dQ kernel: BLOCK_M query rows stay resident, BLOCK_N keys stream.
_BWD_DQ_CONFIGS = _configs({
    ("sm90", "narrow"): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)],
    ("sm90", "wide"): [(64, 32, 4, 2), (64, 32, 4, 3)],
    ("sm80", "narrow"): [(128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
    ("sm80", "wide"): [(64, 32, 4, 2)],
    ("interp", "narrow"): [(32, 16, 4, 1)],
    ("interp", "wide"): [(32, 16, 4, 1)],
})


@functools.lru_cache(maxsize=None)
def _arch(device_index):
    if triton.knobs.runtime.interpret:
        return "interp"
    major, _ = torch.cuda.get_device_capability(device_index)
    return "sm90" if major >= 9 else "sm80"


def _tag(q, block_d):
    width = "wide" if block_d * q.element_size() > 256 else "narrow"
    return _arch(q.device.index if q.is_cuda else -1), width


def _autotune(table):
    """triton.autotune over all of `table`, pruned at the first call of each key to the configs of
    this GPU's architecture and tile width (by identity: equal configs may sit under two tags).
    The winner is cached on disk, so later processes skip the benchmark."""
    def prune(configs, nargs, **kwargs):
        args = {**nargs, **kwargs}
        mine = {id(c) for c in table[_tag(args["Q"], args["BLOCK_D"])]}
        return [c for c in configs if id(c) in mine]

    union = [c for rows in table.values() for c in rows]
    return triton.autotune(configs=union, key=["HEAD_D", "CAUSAL", "IS_VARLEN"],
                           prune_configs_by={"early_config_prune": prune}, cache_results=True)


# --------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------

@triton.jit
def _seq_bounds(cu_q, cu_k, b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(start_q, len_q, start_k, len_k) of sequence b: packed offsets or 0/full lengths."""
    if IS_VARLEN:
        start_q = tl.load(cu_q + b)
        len_q = tl.load(cu_q + b + 1) - start_q
        start_k = tl.load(cu_k + b)
        len_k = tl.load(cu_k + b + 1) - start_k
    else:
        start_q = 0
        len_q = seqlen_q
        start_k = 0
        len_k = seqlen_k
    return start_q, len_q, start_k, len_k


@triton.jit
def _causal_ranges(m0, len_q, len_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key-block ranges for query rows [m0, m0+BLOCK_M): [0, full) needs no mask, [full, end) does.

    Causal rows see keys j <= i + len_k - len_q; blocks past the last visible key are skipped.
    """
    full_k = len_k // BLOCK_N * BLOCK_N
    if CAUSAL:
        off = len_k - len_q
        end = tl.minimum(len_k, tl.maximum(m0 + BLOCK_M + off, 0))
        # a key block is visible to every row when its last key <= m0 + off
        full = tl.minimum(tl.maximum(m0 + off + 1, 0) // BLOCK_N * BLOCK_N, full_k)
    else:
        end = len_k
        full = full_k
    return full, end


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, zero outside rows < n_rows (if CHECK_ROWS) and d < HEAD_D.

    Masks are only emitted where needed: a mask that varies along d blocks vectorised loads.
    """
    if CHECK_ROWS:
        if HEAD_D == BLOCK_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_D), other=0.0)
    else:
        if HEAD_D == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_D, other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, offs_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a [rows, BLOCK_D] tile where rows < n_rows and d < HEAD_D."""
    if HEAD_D == BLOCK_D:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_D))


@triton.jit
def _heavy_first(CAUSAL: tl.constexpr):
    """Query-block index of this program. Causal blocks further down see more keys: launch them
    first so the short ones fill the tail of the last wave."""
    if CAUSAL:
        return tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        return tl.program_id(0)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

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
            v, seen_bad = _causal_safe_values(v, cols, offs_m, causal_off, BLOCK_N)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            acc = tl.where(seen_bad, float("nan"), acc)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _causal_safe_values(v, cols, offs_m, causal_off, BLOCK_N: tl.constexpr):
    """(v with non-finite entries zeroed, [BLOCK_M, BLOCK_D] mask of elements that see one).

    In a diagonal block a key j is invisible to some rows (j > i + off): P = 0 there, but the
    dot's 0 * NaN would still poison them, so non-finite values are taken out of the product.
    Rows see a prefix of the keys, so element (i, d) saw a non-finite value iff the first
    non-finite row of column d is visible to row i; those elements become NaN (contract 1).
    Keys past len_k were loaded as 0 and never count."""
    finite = tl.abs(v.to(tl.float32)) < float("inf")  # False for NaN and +-inf
    first_bad = tl.min(tl.where(finite, 2147483647, cols[:, None]), 0)
    seen_bad = first_bad[None, :] <= offs_m[:, None] + causal_off
    return tl.where(finite, v, 0.0), seen_bad


@_autotune(_FWD_CONFIGS)
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_heads_q, group, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = softmax(s Q K^T) V and lse for BLOCK_M query rows of one (batch, head); fp32 accumulators."""
    pid_m = _heavy_first(CAUSAL)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads_q
    h = pid_bh % n_heads_q
    hk = h // group
    start_q, len_q, start_k, len_k = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    b64 = b.to(tl.int64)
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


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------

@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, CU_Q,
    stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh, stride_lb, stride_lh,
    seqlen_q, n_heads_q,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id in fp32 (the rowsum term of the softmax gradient)."""
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


@triton.jit
def _load_row_stats(LSE, DELTA, base, offs_m, len_q):
    """lse in log2 units (+inf for rows with no visible key, so their P is exactly 0) and delta."""
    ok = offs_m < len_q
    lse = tl.load(LSE + base + offs_m, mask=ok, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + base + offs_m, mask=ok, other=0.0)
    return lse, delta


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, stride_qm, stride_dom, LSE, DELTA, stat_base,
                    offs_n, offs_d, lo, hi, len_q, causal_off, qk_scale,
                    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """Accumulate dK (unscaled) and dV of a key block over query blocks [lo, hi), transposed form."""
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
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@_autotune(_BWD_DKDV_CONFIGS)
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_heads_kv, group, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of BLOCK_N keys of one kv head: sums over the group's query heads, no atomics."""
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
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + q_start + h * stride_qh
        do_base = DO + do_start + h * stride_doh
        stat_base = b64 * stride_lb + h * stride_lh + start_q
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, stride_qm, stride_dom, LSE, DELTA, stat_base,
                                 offs_n, offs_d, lo, full, len_q, causal_off, qk_scale,
                                 HEAD_D, BLOCK_D, BLOCK_M, True, DOT_PREC)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, stride_qm, stride_dom, LSE, DELTA, stat_base,
                                 offs_n, offs_d, full, q_end, len_q, causal_off, qk_scale,
                                 HEAD_D, BLOCK_D, BLOCK_M, False, DOT_PREC)
    dk_ptrs = DK + b64 * stride_dkb + krow[:, None] * stride_dkn + hk * stride_dkh + offs_d[None, :]
    dv_ptrs = DV + b64 * stride_dvb + krow[:, None] * stride_dvn + hk * stride_dvh + offs_d[None, :]
    _store_tile(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), offs_n, len_k, offs_d, HEAD_D, BLOCK_D)
    _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), offs_n, len_k, offs_d, HEAD_D, BLOCK_D)


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


@_autotune(_BWD_DQ_CONFIGS)
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
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of BLOCK_M query rows of one (batch, head); recomputes P from lse instead of atomics."""
    pid_m = _heavy_first(CAUSAL)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads_q
    h = pid_bh % n_heads_q
    hk = h // group
    start_q, len_q, start_k, len_k = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    b64 = b.to(tl.int64)
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


# --------------------------------------------------------------------------------------------
# Decode (flash-decoding)
# --------------------------------------------------------------------------------------------

@triton.jit
def _decode_split_kernel(
    Q, K, V, SEQLENS, PART_O, PART_LSE,
    stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    n_heads_kv, group, split_len, n_splits, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One (batch, kv head, split): the group's query heads against cache[split*split_len, ...).

    Writes the split's normalised partial output (fp32) and its lse in log2 units (-inf if empty).
    The loop bound comes from SEQLENS in device memory, so no recompilation or host sync.
    """
    b = tl.program_id(0)
    hk = tl.program_id(1)
    s = tl.program_id(2)
    b64 = b.to(tl.int64)
    length = tl.load(SEQLENS + b)
    lo = s * split_len
    hi = tl.minimum(lo + split_len, length)
    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    heads = hk * group + offs_h
    h_ok = offs_h < group
    q = _load_tile(Q + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], offs_h, group, offs_d,
                   HEAD_D, BLOCK_D, True)
    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        ok = cols < hi
        rows = cols[:, None].to(tl.int64)
        k = _load_tile(k_base + rows * stride_kn + offs_d[None, :], cols, hi, offs_d, HEAD_D, BLOCK_D, True)
        v = _load_tile(v_base + rows * stride_vn + offs_d[None, :], cols, hi, offs_d, HEAD_D, BLOCK_D, True)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        qk = tl.where(ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every iteration has >= 1 valid key
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    row = (b64 * n_heads_kv * group + heads) * n_splits + s  # PART_* are [B, Hq, n_splits(, D)]
    tl.store(PART_O + row[:, None] * BLOCK_D + offs_d[None, :], out, mask=h_ok[:, None])
    tl.store(PART_LSE + row, lse, mask=h_ok)


@triton.jit
def _decode_combine_kernel(
    PART_O, PART_LSE, OUT, stride_ob, stride_oh, n_heads_q, n_splits,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse) (fp32); 0 for an empty cache."""
    bh = tl.program_id(0)
    b = bh // n_heads_q
    h = bh % n_heads_q
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    rows = bh.to(tl.int64) * n_splits + offs_s
    lse = tl.load(PART_LSE + rows, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    o = tl.load(PART_O + rows[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(OUT + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty),
             mask=offs_d < HEAD_D)


# --------------------------------------------------------------------------------------------
# Launchers (same signatures as janus_fast/ops/reference.py, minus defaults)
# --------------------------------------------------------------------------------------------

def _block_d(head_dim):
    if head_dim > 256:
        raise ValueError(f"head_dim must be <= 256 for the triton attention kernels, got {head_dim}")
    return max(16, triton.next_power_of_2(head_dim))


def _check_runnable(q):
    # The interpreter's tl.dot on bf16 returns garbage: refuse rather than answer wrongly.
    if triton.knobs.runtime.interpret and q.dtype == torch.bfloat16:
        raise TypeError("bfloat16 attention does not run in the Triton interpreter (TRITON_INTERPRET=1); "
                        "use float16/float32 on the CPU or run on a CUDA GPU")


def _dot_prec(dtype):
    # fp32 inputs get exact fp32 dots (tf32 would miss the fp32 tolerance); 16-bit dtypes ignore it
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(t):
    # Autograd may hand a broadcast gradient (stride(-1) == 0); the kernels need unit stride there.
    return t if t.stride(-1) == 1 else t.contiguous()


def _common_meta(q, causal):
    d = q.shape[-1]
    return dict(HEAD_D=d, BLOCK_D=_block_d(d), CAUSAL=bool(causal), DOT_PREC=_dot_prec(q.dtype))


def _forward(q, k, v, cu_q, cu_k, n_seq, max_q, max_k, causal, softmax_scale, varlen):
    _check_runnable(q)
    hq, hkv = q.shape[-2], k.shape[-2]
    out = torch.empty_like(q)
    if varlen:
        lse = torch.empty((hq, q.shape[0]), device=q.device, dtype=torch.float32)
        qs, ks, vs, os_ = (0, *q.stride()[:2]), (0, *k.stride()[:2]), (0, *v.stride()[:2]), (0, *out.stride()[:2])
        ls = (0, lse.stride(0))
    else:
        lse = torch.empty((q.shape[0], hq, q.shape[1]), device=q.device, dtype=torch.float32)
        qs, ks, vs, os_ = q.stride()[:3], k.stride()[:3], v.stride()[:3], out.stride()[:3]
        ls = lse.stride()[:2]
    if out.numel() == 0:
        return out, lse

    def grid(meta):
        return (triton.cdiv(max_q, meta["BLOCK_M"]), n_seq * hq)

    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k, *qs, *ks, *vs, *os_, *ls,
        max_q, max_k, hq, hq // hkv, softmax_scale * _LOG2E,
        IS_VARLEN=varlen, **_common_meta(q, causal),
    )
    return out, lse


def _backward(dout, q, k, v, out, lse, cu_q, cu_k, n_seq, max_q, max_k, causal, softmax_scale, varlen):
    _check_runnable(q)
    dout = _last_dim_contiguous(dout)
    hq, hkv = q.shape[-2], k.shape[-2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)

    def strides(t):
        return (0, *t.stride()[:2]) if varlen else t.stride()[:3]

    ls = (0, lse.stride(0)) if varlen else lse.stride()[:2]
    meta = _common_meta(q, causal)
    block_d = meta["BLOCK_D"]
    _bwd_delta_kernel[(triton.cdiv(max_q, 64), n_seq * hq)](
        out, dout, delta, cu_q, *strides(out), *strides(dout), *ls, max_q, hq,
        HEAD_D=meta["HEAD_D"], BLOCK_D=block_d, IS_VARLEN=varlen, BLOCK_M=64,
    )
    args = (*strides(q), *strides(k), *strides(v), *strides(dout))
    scale2 = softmax_scale * _LOG2E
    _attn_bwd_dkdv_kernel[lambda m: (triton.cdiv(max_k, m["BLOCK_N"]), n_seq * hkv)](
        q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, *args, *strides(dk), *strides(dv), *ls,
        max_q, max_k, hkv, hq // hkv, scale2, softmax_scale, IS_VARLEN=varlen, **meta,
    )
    _attn_bwd_dq_kernel[lambda m: (triton.cdiv(max_q, m["BLOCK_M"]), n_seq * hq)](
        q, k, v, dout, lse, delta, dq, cu_q, cu_k, *args, *strides(dq), *ls,
        max_q, max_k, hq, hq // hkv, scale2, softmax_scale, IS_VARLEN=varlen, **meta,
    )
    return dq, dk, dv


def attention_forward(q, k, v, causal, softmax_scale):
    """Dense attention. q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> out like q, lse fp32 [B, Hq, Sq]."""
    b, sq = q.shape[:2]
    return _forward(q, k, v, q, q, b, sq, k.shape[1], causal, float(softmax_scale), False)


def attention_backward(dout, q, k, v, out, lse, causal, softmax_scale):
    """Gradients (dq, dk, dv) of attention_forward in the input dtypes."""
    b, sq = q.shape[:2]
    return _backward(dout, q, k, v, out, lse, q, q, b, sq, k.shape[1], causal, float(softmax_scale), False)


def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                             softmax_scale):
    """Packed attention. q [total_q, Hq, D], k/v [total_k, Hkv, D] -> out like q, lse fp32 [Hq, total_q]."""
    n_seq = cu_seqlens_q.shape[0] - 1
    return _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, n_seq, int(max_seqlen_q), int(max_seqlen_k),
                    causal, float(softmax_scale), True)


def varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              causal, softmax_scale):
    """Gradients (dq, dk, dv) of varlen_attention_forward in the input dtypes."""
    n_seq = cu_seqlens_q.shape[0] - 1
    return _backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, n_seq, int(max_seqlen_q),
                     int(max_seqlen_k), causal, float(softmax_scale), True)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index):
    if triton.knobs.runtime.interpret:
        return 8  # small, so CPU tests still exercise several splits
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _decode_plan(batch, n_heads_kv, s_max, device):
    """(BLOCK_N, split_len, n_splits) from static shapes only, so CUDA graphs replay with any lengths.

    Enough splits that batch * kv heads * splits gives >= 4 programs per SM (a short tail), each
    split a multiple of BLOCK_N.
    """
    block_n = 16 if triton.knobs.runtime.interpret else 64
    n_blocks = max(1, triton.cdiv(s_max, block_n))
    want = triton.cdiv(4 * _num_sms(device.index if device.type == "cuda" else -1), batch * n_heads_kv)
    n_splits = max(1, min(n_blocks, want, 128))
    split_len = triton.cdiv(n_blocks, n_splits) * block_n
    return block_n, split_len, triton.cdiv(n_blocks * block_n, split_len)


def decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale):
    """One query token per sequence against a KV cache. q [B, Hq, D], caches [B, S_max, Hkv, D] -> out like q.

    Two launches, no host sync: per-split partial softmax (fp32) then a log-sum-exp combine.
    Not autotuned on purpose: benchmarking inside CUDA-graph capture is not allowed.
    """
    _check_runnable(q)
    b, hq, d = q.shape
    s_max, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    group = hq // hkv
    block_d = _block_d(d)
    block_n, split_len, n_splits = _decode_plan(b, hkv, s_max, q.device)
    part_o = torch.empty((b, hq, n_splits, block_d), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((b, hq, n_splits), device=q.device, dtype=torch.float32)
    block_h = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16
    wide = block_d > 128 or q.element_size() == 4
    _decode_split_kernel[(b, hkv, n_splits)](
        q, k_cache, v_cache, cache_seqlens, part_o, part_lse,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        hkv, group, split_len, n_splits, float(softmax_scale) * _LOG2E,
        HEAD_D=d, BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_N=block_n, DOT_PREC=_dot_prec(q.dtype),
        num_warps=8 if wide else 4, num_stages=2,
    )
    _decode_combine_kernel[(b * hq,)](
        part_o, part_lse, out, out.stride(0), out.stride(1), hq, n_splits,
        HEAD_D=d, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(n_splits)), num_warps=4,
    )
    return out
