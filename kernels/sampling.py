"""Triton CFG sampling: one launch per decoding step over the paired [2B, V] logits.

Maths (fp32 throughout; g and s are rounded exactly as torch rounds them: no FMA contraction,
IEEE division), per output row b with conditional row c and unconditional row u
("interleaved": c = 2b, u = 2b + 1; "halves": c = b, u = B + b):
    g_j = u_j + w (c_j - u_j) (u_j where c_j == u_j);   a row with a NaN or +inf g_j, or no finite
        g_j, gets token -1 (contract 1); g_j / T overflowing to +inf means temperature 0:
    temperature 0: token = argmax_j g_j (lowest index on ties)
    s_j = g_j / T
    top_k: keep j iff key(s_j) >= t_k, t_k = the k-th largest key (fewer than k strictly above j)
    top_p: among the top-k survivors, with e_j = exp(s_j - max s), keep j iff
           sum_{i kept, s_i > s_j} e_i < top_p * sum_{i kept} e_i   (the maximum is always kept)
    token = argmax_{j kept} s_j + G_j,   G_j = -log(-log U_j)   (Gumbel-max: an exact draw from
           softmax(s) restricted to the kept set, without normalising or sorting)
key(x) is the order-preserving int32 image of an fp32 value, so each filter is a threshold on keys
found by bisection over the key range (<= 32 counting/mass passes over the row, no sort); ties
share a key and are kept or dropped together. The fp32 masses can put a threshold on the other
side of the reference's only where a prefix mass is within rounding of top_p.

Random numbers: U_j is lane j % 4 of Philox4x32-10 keyed by the 64-bit seed, with counter
(j // 4, b, offset_lo, offset_hi), mapped to ((r >> 9) + 0.5) * 2^-23, strictly inside (0, 1);
-log U_j comes from the series of -log(1 - W), W = 1 - U exact, where U > 15/16. The CUDA kernel
(csrc/sampling) uses the same stream and formula (its logs are the hardware approximations). `seed` is an int64 device tensor
(seed, offset[, arrival counter]); with advance=True the kernel adds 1 to the offset itself (the
last program to finish does it, counting arrivals in seed[2], which must start at 0 and is
reset), so a replayed CUDA graph draws a new stream each step without another launch.

Each program handles ROWS output rows and streams the vocabulary in BLOCK-wide chunks; the
unfiltered path (the official loop) reads the logits exactly once.
"""
import torch
import triton
import triton.language as tl

_INT32_MIN = tl.constexpr(-2147483648)


@triton.jit
def _guided(logits_ptr, c_off, u_off, cols, mask, cfg_weight, temperature, SCALE: tl.constexpr):
    c = tl.load(logits_ptr + c_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(logits_ptr + u_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.where(c == u, u, u + cfg_weight * (c - u))  # -inf in both rows stays -inf, not NaN
    if SCALE:
        g = tl.div_rn(g, temperature)
    return g


@triton.jit
def _key(x):
    """Order-preserving fp32 -> int32 (-0.0 and +0.0 share a key)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _gumbel(seed, off_lo, off_hi, rows, start, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Gumbel noise for tokens start .. start+BLOCK-1 of each row (start % 4 == 0)."""
    group = (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    c0 = tl.broadcast_to(group[None, :], (ROWS, BLOCK // 4))
    c1 = tl.broadcast_to(rows.to(tl.uint32)[:, None], (ROWS, BLOCK // 4))
    c2 = tl.zeros((ROWS, BLOCK // 4), tl.uint32) + off_lo
    c3 = tl.zeros((ROWS, BLOCK // 4), tl.uint32) + off_hi
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    # token 4q + l takes lane l: interleave the four lanes along the last axis
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [ROWS, BLOCK])
    k = r >> 9
    u = (k.to(tl.float32) + 0.5) * 1.1920928955078125e-07
    w = ((0x7FFFFF - k).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 1 - u, exactly
    # E = -log u; near u = 1 (the small E that win) from the series of -log(1 - w), free of the
    # cancellation in log(u)
    series = w * (1.0 + w * (0.5 + w * (0.33333333 + w * (0.25 + w * 0.2))))
    e = tl.where(w < 0.0625, series, -tl.log(u))
    return -tl.log(e)


@triton.jit
def _running_argmax(x, start, best, best_idx):
    tile_max = tl.max(x, axis=1)
    tile_arg = tl.argmax(x, axis=1, tie_break_left=True)
    better = tile_max > best  # strict: a later tile never displaces an equal earlier maximum
    return tl.where(better, tile_max, best), tl.where(better, start + tile_arg, best_idx)


@triton.jit
def _threshold(logits_ptr, c_off, u_off, row_ok, V, cfg_weight, temperature, top_k, top_p,
               TOP_K: tl.constexpr, TOP_P: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Per row, the smallest key that survives top-k then top-p (int64 [ROWS])."""
    m = tl.full([ROWS], float("-inf"), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = row_ok[:, None] & (cols < V)[None, :]
        s = _guided(logits_ptr, c_off, u_off, cols, mask, cfg_weight, temperature, True)
        m = tl.maximum(m, tl.max(tl.where(mask, s, float("-inf")), axis=1))
    key_max = _key(m).to(tl.int64)
    thr = tl.full([ROWS], _INT32_MIN, tl.int64)
    if TOP_K:
        # invariant: count(key >= lo) >= k, count(key >= hi + 1) < k
        lo = thr
        hi = key_max
        while tl.max(hi - lo, axis=0) > 0:
            mid = lo + (hi - lo + 1) // 2
            count = tl.zeros([ROWS], tl.int32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = row_ok[:, None] & (cols < V)[None, :]
                s = _guided(logits_ptr, c_off, u_off, cols, mask, cfg_weight, temperature, True)
                count += tl.sum((mask & (_key(s) >= mid[:, None])).to(tl.int32), axis=1)
            ok = count >= top_k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        thr = lo
    if TOP_P:
        total = tl.zeros([ROWS], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = row_ok[:, None] & (cols < V)[None, :]
            s = _guided(logits_ptr, c_off, u_off, cols, mask, cfg_weight, temperature, True)
            keep = mask & (_key(s) >= thr[:, None])
            total += tl.sum(tl.where(keep, tl.exp(s - m[:, None]), 0.0), axis=1)
        target = top_p * total
        # invariant: mass(key > lo) >= target (or lo below every kept key), mass(key > hi) < target
        lo = thr - 1
        hi = key_max
        while tl.max(hi - lo, axis=0) > 1:
            mid = lo + (hi - lo) // 2
            mass = tl.zeros([ROWS], tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = row_ok[:, None] & (cols < V)[None, :]
                s = _guided(logits_ptr, c_off, u_off, cols, mask, cfg_weight, temperature, True)
                key = _key(s)
                above = mask & (key >= thr[:, None]) & (key > mid[:, None])
                mass += tl.sum(tl.where(above, tl.exp(s - m[:, None]), 0.0), axis=1)
            ok = mass < target
            hi = tl.where(ok, mid, hi)
            lo = tl.where(ok, lo, mid)
        thr = hi
    return thr


@triton.jit
def _cfg_sample_kernel(logits_ptr, stride_row, tokens_ptr, ids_ptr, seed_ptr, B, V,
                       cfg_weight, temperature, top_k, top_p,
                       INTERLEAVED: tl.constexpr, GREEDY: tl.constexpr, TOP_K: tl.constexpr,
                       TOP_P: tl.constexpr, ADVANCE: tl.constexpr, WRITE_IDS: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    if INTERLEAVED:
        c_row = 2 * rows64
        u_row = c_row + 1
    else:
        c_row = rows64
        u_row = rows64 + B
    c_off = c_row * stride_row
    u_off = u_row * stride_row
    seed = tl.load(seed_ptr)
    offset = tl.load(seed_ptr + 1)
    # the greedy argmax of g, and the flags of contract 1: any NaN/+inf in g, any finite entry
    top = tl.full([ROWS], float("-inf"), tl.float32)
    top_idx = tl.zeros([ROWS], tl.int32)
    bad = tl.zeros([ROWS], tl.int32)
    finite = tl.zeros([ROWS], tl.int32)
    best = tl.full([ROWS], float("-inf"), tl.float32)
    best_idx = tl.zeros([ROWS], tl.int32)
    thr = tl.full([ROWS], _INT32_MIN, tl.int64)
    if not GREEDY and (TOP_K or TOP_P):
        thr = _threshold(logits_ptr, c_off, u_off, row_ok, V, cfg_weight, temperature, top_k,
                         top_p, TOP_K, TOP_P, ROWS, BLOCK)
    off_lo = (offset & 0xFFFFFFFF).to(tl.uint32)
    off_hi = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = row_ok[:, None] & (cols < V)[None, :]
        g = _guided(logits_ptr, c_off, u_off, cols, mask, cfg_weight, temperature, False)
        bad |= tl.max((mask & ((g != g) | (g == float("inf")))).to(tl.int32), axis=1)
        finite |= tl.max((mask & (tl.abs(g) < float("inf"))).to(tl.int32), axis=1)
        top, top_idx = _running_argmax(tl.where(mask, g, float("-inf")), start, top, top_idx)
        if not GREEDY:
            s = tl.div_rn(g, temperature)
            keep = mask & (_key(s) >= thr[:, None])
            score = s + _gumbel(seed, off_lo, off_hi, rows, start, ROWS, BLOCK)
            best, best_idx = _running_argmax(tl.where(keep, score, float("-inf")), start, best, best_idx)
    # g / T overflowing to +inf means a temperature too small for fp32: the argmax (reference)
    if GREEDY:
        token = top_idx.to(tl.int64)
    else:
        token = tl.where(best == float("inf"), top_idx, best_idx).to(tl.int64)
    token = tl.where((bad != 0) | (finite == 0), -1, token)
    tl.store(tokens_ptr + rows, token, mask=row_ok)
    if WRITE_IDS:
        tl.store(ids_ptr + c_row, token, mask=row_ok)
        tl.store(ids_ptr + u_row, token, mask=row_ok)
    if ADVANCE:
        # the last program to arrive (all others have read the offset) moves the stream on
        arrived = tl.atomic_add(seed_ptr + 2, 1)
        if arrived == tl.num_programs(0) - 1:
            tl.store(seed_ptr + 1, offset + 1)
            tl.store(seed_ptr + 2, 0)


def _blocks(b: int, v: int, interpreted: bool) -> tuple[int, int]:
    """(ROWS, BLOCK): chunks of up to 4096 tokens; short rows are packed several per program, up
    to 2048 tokens per tile on a GPU (keeps the filters' registers from spilling) and 16384 under
    the CPU interpreter (whose cost is per program and per op, not per element)."""
    block = min(max(triton.next_power_of_2(v), 4), 4096)
    tile = 16384 if interpreted else 2048
    rows = min(max(tile // block, 1), triton.next_power_of_2(b))
    return rows, block


def cfg_sample(logits, cfg_weight, temperature, top_k, top_p, seed, layout, advance=False,
               return_ids=False):
    """tokens int64 [B] and the pair-duplicated ids int64 [2B] in the input layout (empty unless
    return_ids). `seed` holds (seed, offset[, arrival counter]); see the module docstring."""
    two_b, v = logits.shape
    b = two_b // 2
    tokens = torch.empty(b, dtype=torch.int64, device=logits.device)
    ids = torch.empty(two_b if return_ids else 0, dtype=torch.int64, device=logits.device)
    if b == 0:
        if advance:
            seed[1] += 1
        return tokens, ids
    greedy = temperature == 0
    rows, block = _blocks(b, v, logits.device.type == "cpu")
    _cfg_sample_kernel[(triton.cdiv(b, rows),)](
        logits, logits.stride(0), tokens, ids, seed, b, v,
        float(cfg_weight), float(temperature), int(top_k), float(top_p),
        INTERLEAVED=layout == "interleaved", GREEDY=greedy,
        TOP_K=not greedy and 0 < top_k < v, TOP_P=not greedy and top_p < 1.0,
        ADVANCE=bool(advance), WRITE_IDS=bool(return_ids), ROWS=rows, BLOCK=block,
        num_warps=4 if block * rows <= 1024 else 8,
        enable_fp_fusion=False)  # round u + w (c - u) and g / T exactly as torch does
    return tokens, ids
