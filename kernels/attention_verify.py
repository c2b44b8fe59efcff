"""Verify attention: W query tokens per sequence (a speculative window) against a KV cache that
already holds their keys, causal inside the window; flash-decoding split over the cache length.

The decode kernel's scheme with W * group query rows per (sequence, kv head) instead of group:
rows are (window token j, query head of the group), j-major, BLOCK_M at a time (a third grid
axis over row blocks when W * group > BLOCK_M). Query j of a sequence with cache_seqlens L sees
keys k <= L - W + j, so the attention forward's inner loop serves as it is: rows at "position"
j with causal offset L - W. Launch configuration from static shapes only, so a CUDA graph
replays with any lengths; the loop bounds come from cache_seqlens in device memory.
"""
import torch
import triton
import triton.language as tl

from .attention_common import LOG2E, _load_tile, _store_tile, block_d_for, check_runnable, dot_precision
from .attention_configs import arch
from .attention_decode import _decode_combine_kernel, _decode_plan
from .attention_fwd import _fwd_inner


@triton.jit
def _verify_split_kernel(
    Q, K, V, SEQLENS, OUT, PART_O, PART_LSE,
    stride_qb, stride_qw, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_ow, stride_oh,
    n_heads_kv, group, window, m_blocks, split_len, n_splits, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One (sequence, kv head x row block, split): BLOCK_M (window token, query head) rows against
    cache[split*split_len, ...). Online softmax in fp32 (scores in log2 units); key tiles that every
    row of the block sees run unmasked, the rest (the window's diagonal, the split's ragged end)
    masked, a non-finite value a row cannot see kept out of its result. SPLIT: the split's
    normalised partial output and lse (log2 units, -inf if empty) for _decode_combine_kernel, rows
    indexed (sequence * W + j) * Hq + head; otherwise the final output."""
    b = tl.program_id(0)
    hk = tl.program_id(1) // m_blocks
    first_row = (tl.program_id(1) % m_blocks) * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    s = tl.program_id(2)
    b64 = b.to(tl.int64)
    length = tl.load(SEQLENS + b)
    n_rows = window * group
    j = rows // group  # window token of each row
    heads = hk * group + rows % group
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b64 * stride_qb + j[:, None].to(tl.int64) * stride_qw + heads[:, None] * stride_qh
                   + offs_d[None, :], rows, n_rows, offs_d, HEAD_D, BLOCK_D, True)
    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh
    lo = s * split_len
    hi = tl.minimum(lo + split_len, length)
    causal_off = length - window  # row j sees keys <= j + causal_off
    # tiles below the first row's last visible key (and inside the split) need no mask
    full = lo + tl.maximum(tl.minimum(hi, causal_off + first_row // group + 1) - lo, 0) // BLOCK_N * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, j, offs_n, offs_d,
                               lo, full, hi, causal_off, qk_scale, HEAD_D, BLOCK_D, BLOCK_N, True, False, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, j, offs_n, offs_d,
                               full, hi, hi, causal_off, qk_scale, HEAD_D, BLOCK_D, BLOCK_N, True, True, DOT_PREC)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if SPLIT:
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        part = ((b64 * window + j) * n_heads_kv * group + heads) * n_splits + s  # [B * W, Hq, n_splits]
        ok = rows < n_rows
        tl.store(PART_O + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=ok[:, None])
        tl.store(PART_LSE + part, lse, mask=ok)
    else:
        _store_tile(OUT + b64 * stride_ob + j[:, None].to(tl.int64) * stride_ow + heads[:, None] * stride_oh
                    + offs_d[None, :], out.to(OUT.dtype.element_ty), rows, n_rows, offs_d, HEAD_D, BLOCK_D)


# --------------------------------------------------------------------------------------------
# Launch plan (static shapes only) and launcher
# --------------------------------------------------------------------------------------------


def tiles(arch_name, block_d, element_size, rows):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for W * group = `rows` query rows: 16-bit tiles
    up to head_dim 128 take BLOCK_M up to 64 (at least 16, tl.dot's minimum) and 64 keys; wider
    heads and fp32 take smaller fixed tiles. 2 stages double-buffer the K/V tiles. Chosen by
    compile facts (tests/test_verify_compile_facts.py): spill-free on sm_80 and sm_90 under
    Triton 3.6 and 3.9, where larger tiles spill (fp32 with 32 keys, 16-bit 256-wide with 16 rows
    on 3.6, 4 warps at 128 on 3.6's sm_80)."""
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    if arch_name == "interp":
        return block_m, 16, 4, 1
    if element_size == 4:
        return 16, 16, 4, 2
    if block_d > 128:
        return 32, 32, 8, 2
    return block_m, 64, 8, 2


def verify_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale):
    """q [B, W, Hq, D], caches [B, S_max, Hkv, D] holding the window's keys at the last W of each
    row's cache_seqlens -> out like q. One launch with one split, else split partials and the
    decode kernels' log-sum-exp combine; no host sync, not autotuned (graph capture)."""
    check_runnable(q)
    b, w, hq, d = q.shape
    s_max, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    group = hq // hkv
    block_d = block_d_for(d)
    block_m, block_n, num_warps, num_stages = tiles(arch(q.device.index if q.is_cuda else -1), block_d,
                                                    q.element_size(), w * group)
    m_blocks = triton.cdiv(w * group, block_m)
    split_len, n_splits = _decode_plan(s_max, block_n)  # the decode kernel's fixed splits: batch invariant
    split = n_splits > 1
    if split:
        part_o = torch.empty((b * w, hq, n_splits, block_d), device=q.device, dtype=torch.float32)
        part_lse = torch.empty((b * w, hq, n_splits), device=q.device, dtype=torch.float32)
    else:
        part_o = part_lse = out  # unused
    _verify_split_kernel[(b, hkv * m_blocks, n_splits)](
        q, k_cache, v_cache, cache_seqlens, out, part_o, part_lse,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:3],
        hkv, group, w, m_blocks, split_len, n_splits, float(softmax_scale) * LOG2E,
        HEAD_D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=split,
        DOT_PREC=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        flat = out.view(b * w, hq, d)
        # each (sequence, token) row combines the splits below its sequence's length (those past
        # its own last visible key hold lse -inf: they add nothing)
        row_lengths = cache_seqlens.repeat_interleave(w)
        _decode_combine_kernel[(b * w * hq,)](
            part_o, part_lse, row_lengths, flat, flat.stride(0), flat.stride(1), hq, n_splits, split_len,
            HEAD_D=d, BLOCK_D=block_d, num_warps=4,
        )
    return out


def compile_specs(arch_name, head_dim, dtype, windows=(16,), groups=(1,)):
    """The verify kernel as launched on `arch_name` (tests/test_verify_compile_facts.py), with and
    without a combine, for each window x query heads per kv head."""
    from .attention_configs import CompileSpec

    block_d = block_d_for(head_dim)
    for w in windows:
        for group in groups:
            block_m, block_n, num_warps, num_stages = tiles(arch_name, block_d, 4 if dtype == "fp32" else 2,
                                                            w * group)
            for split in (False, True):
                meta = dict(HEAD_D=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=split,
                            DOT_PREC="ieee" if dtype == "fp32" else "tf32")
                yield CompileSpec("verify", _verify_split_kernel, meta,
                                  dict(num_warps=num_warps, num_stages=num_stages), dtype)
