"""Flash-decoding: one query token per sequence against a KV cache, split over the cache length.

Launch configuration from static shapes only (contract 2), so a CUDA graph replays with any
cache_seqlens; the loop bounds come from cache_seqlens in device memory, never from the host.
Splits are SPLIT_KEYS keys at fixed positions, combined in order: a row's result does not
depend on the batch or the cache's capacity (see _decode_plan).
"""
import torch
import triton
import triton.language as tl

from .attention_common import (
    LOG2E,
    _load_tile,
    _store_tile,
    block_d_for,
    check_runnable,
    dot_precision,
)
from .attention_configs import arch


@triton.jit
def _decode_split_kernel(
    Q, K, V, SEQLENS, OUT, PART_O, PART_LSE, K_SCALE, V_SCALE,
    stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_ob, stride_oh,
    stride_sb, stride_sn,
    n_heads_kv, group, split_len, n_splits, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PREC: tl.constexpr, KV_QUANTIZED: tl.constexpr = False,
):
    """One (batch, kv head, split): the group's query heads against cache[split*split_len, ...).

    Online softmax in fp32 over BLOCK_N-key tiles. The loop is software-pipelined: K/V tiles go
    to shared memory by async copies, num_stages buffers in flight. The group's query heads are
    the rows of a tensor-core dot, padded to 16 (MHA uses one row: the padding costs FLOPs a
    memory-bound loop has to spare, and buys the async double-buffered loads). SPLIT: writes the split's normalised partial output (fp32) and its
    lse in log2 units (-inf if empty) for _decode_combine_kernel; otherwise (one split) the final
    output, with no combine launch. The loop bound comes from SEQLENS in device memory, so no
    recompilation or host sync; keys at or past it are never loaded (contract 1).
    KV_QUANTIZED: the cache holds int8 / e4m3 heads with fp32 scales K_SCALE/V_SCALE [B, S, Hkv]
    (ops.reference.quantize_rows): key and value tiles are converted to q's dtype exactly, the
    key scales multiply the fp32 scores and the value scales the fp32 probabilities (rounded
    once to q's dtype for the P·V dot).
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
    s_base = b64 * stride_sb + hk
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        rows = cols[:, None].to(tl.int64)
        k = _load_tile(k_base + rows * stride_kn + offs_d[None, :], cols, hi, offs_d, HEAD_D, BLOCK_D, True)
        v = _load_tile(v_base + rows * stride_vn + offs_d[None, :], cols, hi, offs_d, HEAD_D, BLOCK_D, True)
        if KV_QUANTIZED:
            k_scale = tl.load(K_SCALE + s_base + cols * stride_sn, mask=cols < hi, other=0.0)
            v_scale = tl.load(V_SCALE + s_base + cols * stride_sn, mask=cols < hi, other=0.0)
            qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC) * (k_scale * qk_scale)[None, :]
            v = v.to(q.dtype)
        else:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        qk = tl.where((cols < hi)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite unless a score is NaN: each tile has a valid key
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = p
        if KV_QUANTIZED:
            pv = p * v_scale[None, :]
        acc = acc * alpha[:, None] + tl.dot(pv.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if SPLIT:
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        row = (b64 * n_heads_kv * group + heads) * n_splits + s  # PART_* are [B, Hq, n_splits(, BLOCK_D)]
        tl.store(PART_O + row[:, None] * BLOCK_D + offs_d[None, :], out, mask=h_ok[:, None])
        tl.store(PART_LSE + row, lse, mask=h_ok)
    else:
        _store_tile(OUT + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                    out.to(OUT.dtype.element_ty), offs_h, group, offs_d, HEAD_D, BLOCK_D)


@triton.jit
def _decode_combine_kernel(
    PART_O, PART_LSE, SEQLENS, OUT, stride_ob, stride_oh, n_heads_q, n_splits, split_len,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = sum_s w_s o_s / sum_s w_s over the row's used splits s < cdiv(length, split_len),
    w_s = 2^(lse_s - max lse) (fp32), accumulated one split after another in split order
    (rescaled as the maximum grows): the same operations for a row whatever the batch, the
    cache's capacity or the grid. 0 for an empty cache."""
    bh = tl.program_id(0)
    b = bh // n_heads_q
    h = bh % n_heads_q
    offs_d = tl.arange(0, BLOCK_D)
    used = tl.minimum(tl.cdiv(tl.load(SEQLENS + b), split_len), n_splits)
    rows = bh.to(tl.int64) * n_splits
    m = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s in range(0, used):
        lse = tl.load(PART_LSE + rows + s)
        o = tl.load(PART_O + (rows + s) * BLOCK_D + offs_d)
        m_new = tl.maximum(m, lse)
        keep = tl.math.exp2(m - tl.where(m_new == float("-inf"), 0.0, m_new))  # 0 while m is -inf
        w = tl.math.exp2(lse - tl.where(m_new == float("-inf"), 0.0, m_new))
        acc = acc * keep + w * o
        total = total * keep + w
        m = m_new
    out = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(OUT + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty),
             mask=offs_d < HEAD_D)


# --------------------------------------------------------------------------------------------
# Launch plan (static shapes only) and launcher
# --------------------------------------------------------------------------------------------

SPLIT_KEYS = 128  # keys per split: a whole number of tiles (>= 2, so the pipeline prefetches) on every arch


def _tiles(arch_name, block_d, element_size):
    """(BLOCK_N, num_warps, num_stages) of the split kernel; 2 stages = double-buffered K/V."""
    if arch_name == "interp":
        return 16, 4, 1
    wide = block_d * element_size > 256
    return (32 if wide else 64), (8 if wide else 4), 2


def _decode_plan(s_max, block_n):
    """(split_len, n_splits): splits of SPLIT_KEYS keys covering the cache, from its length only.

    A row's keys are always cut at the same positions and its partials combined in the same
    order, whatever the batch, the number of heads or the cache's capacity: a row's output is
    bitwise independent of the other rows (batch invariance), and static shapes alone set the
    grid, so CUDA graphs replay with any lengths. One split (no combine kernel) for a cache of
    at most SPLIT_KEYS slots.
    """
    assert SPLIT_KEYS % block_n == 0, (SPLIT_KEYS, block_n)
    return SPLIT_KEYS, max(1, triton.cdiv(s_max, SPLIT_KEYS))


def decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale, k_scale=None, v_scale=None):
    """One query token per sequence against a KV cache. q [B, Hq, D], caches [B, S_max, Hkv, D] -> out like q.
    A quantized cache (int8 / float8_e4m3fn) comes with k_scale/v_scale fp32 [B, S_max, Hkv] (same strides).

    One launch when the plan has one split, else per-split partial softmax (fp32) then a
    log-sum-exp combine; no host sync. Not autotuned on purpose: benchmarking inside CUDA-graph
    capture is not allowed.
    """
    check_runnable(q)
    b, hq, d = q.shape
    s_max, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    group = hq // hkv
    block_d = block_d_for(d)
    block_n, num_warps, num_stages = _tiles(arch(q.device.index if q.is_cuda else -1), block_d, q.element_size())
    quantized = k_scale is not None
    split_len, n_splits = _decode_plan(s_max, block_n)
    split = n_splits > 1
    if split:
        part_o = torch.empty((b, hq, n_splits, block_d), device=q.device, dtype=torch.float32)
        part_lse = torch.empty((b, hq, n_splits), device=q.device, dtype=torch.float32)
    else:
        part_o = part_lse = out  # unused
    _decode_split_kernel[(b, hkv, n_splits)](
        q, k_cache, v_cache, cache_seqlens, out, part_o, part_lse,
        *((k_scale, v_scale) if quantized else (out, out)),  # (unused without a quantized cache)
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], out.stride(0), out.stride(1),
        *(k_scale.stride()[:2] if quantized else (0, 0)),
        hkv, group, split_len, n_splits, float(softmax_scale) * LOG2E,
        HEAD_D=d, BLOCK_D=block_d, BLOCK_H=_block_h(group), BLOCK_N=block_n, SPLIT=split,
        DOT_PREC=dot_precision(q.dtype), KV_QUANTIZED=quantized, num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        _decode_combine_kernel[(b * hq,)](
            part_o, part_lse, cache_seqlens, out, out.stride(0), out.stride(1), hq, n_splits, split_len,
            HEAD_D=d, BLOCK_D=block_d, num_warps=1,
        )
    return out


def _block_h(group):
    return max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16


def compile_specs(arch_name, head_dim, dtype, full=True):
    """The decode kernels as launched on `arch_name` (for tests/test_compile_facts.py): the split
    kernel (query heads per kv head 1 and 32) with and without a combine (full=False: the Janus
    case, MHA, both ways), and the combine."""
    from .attention_configs import CompileSpec

    block_d = block_d_for(head_dim)
    block_n, num_warps, num_stages = _tiles(arch_name, block_d, 4 if dtype == "fp32" else 2)
    cases = [(1, False), (1, True), (32, False), (32, True)] if full else [(1, False), (1, True)]
    for group, split in cases:
        meta = dict(HEAD_D=head_dim, BLOCK_D=block_d, BLOCK_H=_block_h(group), BLOCK_N=block_n, SPLIT=split,
                    DOT_PREC="ieee" if dtype == "fp32" else "tf32", KV_QUANTIZED=False)
        yield CompileSpec("decode", _decode_split_kernel, meta, dict(num_warps=num_warps, num_stages=num_stages), dtype)
    yield CompileSpec("decode_combine", _decode_combine_kernel, dict(HEAD_D=head_dim, BLOCK_D=block_d),
                      dict(num_warps=1, num_stages=1), "fp32")


def quantized_compile_specs(arch_name, full=True):
    """The split kernel over a quantized cache as launched for Janus (MHA, head_dim 128, bf16
    queries) with a combine, for tests/test_quant_compile_facts.py: int8 caches, and e4m3 ones on
    sm_90 (sm_89+); full adds the one-split kernel and GQA groups of 32."""
    block_d = block_d_for(128)
    block_n, num_warps, num_stages = _tiles(arch_name, block_d, 2)
    for cache in ["i8"] + (["fp8e4nv"] if arch_name == "sm90" else []):
        for group, split in [(1, False), (1, True), (32, False), (32, True)] if full else [(1, True)]:
            meta = dict(HEAD_D=128, BLOCK_D=block_d, BLOCK_H=_block_h(group), BLOCK_N=block_n, SPLIT=split,
                        DOT_PREC="tf32", KV_QUANTIZED=True)
            dtypes = {"Q": "bf16", "K": cache, "V": cache, "SEQLENS": "i32", "OUT": "bf16", "PART_O": "fp32",
                      "PART_LSE": "fp32", "K_SCALE": "fp32", "V_SCALE": "fp32"}
            yield (f"decode_attention {cache} cache group {group}{' split' if split else ''}", _decode_split_kernel,
                   meta, dict(num_warps=num_warps, num_stages=num_stages), dtypes)
