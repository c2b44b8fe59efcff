"""Triton CFG sampling: one launch per decoding step over the paired [2B, V] logits (a filtered
row split across programs: one launch per phase).

Maths (fp32; g and s rounded exactly as torch rounds them: no FMA contraction, IEEE division),
per output row b with conditional row c and unconditional row u ("interleaved": c = 2b,
u = 2b + 1; "halves": c = b, u = B + b):
    g_j = u_j + w (c_j - u_j), and u_j where c_j == u_j (-inf in both rows stays -inf)
    contract 1: a row with a NaN or +inf g_j, or no finite g_j, gets token -1
    temperature 0, or g / T overflowing (to +inf anywhere, or to -inf everywhere: max s = +-inf
          in a row with a finite g): token = argmax_j g_j (lowest index on ties)
    s_j = g_j / T (no division at T == 1);  e_j = exp(s_j - max s), as the integer e_j 2^S
          (S = 62 - bits(V)): masses are exact integer sums, the same in any order
    ukey(x): the order-preserving image of fp32 x in [0, 2^32) (-0.0 and +0.0 share one)
    top_k: keep j iff ukey(s_j) >= t_k, t_k = the largest t with count(ukey >= t) >= k
    top_p: over the top-k survivors, keep j iff ukey(s_j) >= t_p, t_p = the largest t with
           mass(ukey >= t) >= top_p * mass(all kept)  (always at least the maximum): exactly
           "the mass strictly above j is < top_p" of reference.sampling_probs
    token = argmax_{j kept} s_j + G_j,  G_j = -log(-log U_j)  (Gumbel-max: an exact draw from
           softmax(s) on the kept set, with neither a normaliser nor a sort)
Exact shortcut: the unfiltered Gumbel winner w is the answer whenever w survives both filters
(it is then also the argmax over the kept set). It survives top-k iff count(ukey > ukey_w) < k
and top-p if mass(ukey > ukey_w) < top_p * mass(ukey >= ukey_w) (top-k on; a lower bound of the
kept mass) or < top_p * mass(all) (top-k off) - integer sums, so the shortcut never changes a
result, only skips the selection. Otherwise the thresholds are found by a bitwise radix select:
DIGIT bits per pass, each pass counting (or weighing) the tokens at or above every candidate
prefix. ties share a key and are kept or dropped together.

Layout on the chip: for V up to ON_CHIP_MAX a filtered row's s is kept in registers; the
shortcut test and the 32 one-bit select steps per filter work on them. The two passes that
need the Gumbel noise (the first pass, and the final argmax over the kept set) walk the row in
PASS_BLOCK chunks, re-reading it (from L2) rather than holding the noise of the whole row beside
s: that keeps every shipped config free of register spills on sm_80 and sm_90
(tests/test_kernel_compile_facts.py). Longer rows are streamed in BLOCK chunks and each pass
re-reads them (4-bit digits: 8 passes per filter). Unfiltered and greedy rows need only the
first pass.

Rows split across programs (small batches of long rows, ops.sampling.row_splits): each program
takes a chunk of the row and merges into the row's slots (SLOT_* below) - packed (key, index)
maxima and integer sums, exact in any order. Unfiltered and greedy rows take one launch. A
filtered row takes one launch per phase, the launch boundary being the barrier between them:
the first pass, then one launch per 8-bit radix pass (4 for top-k, 4 for top-p; the first also
sums the shortcut's terms, and the later ones skip rows whose winner survives), each program
replaying the digits chosen so far from the merged 256-bin histograms, then the final draw.
The thresholds are the same integers as above, so the tokens are those of one program per row.

Random numbers: U_j is lane j % 4 of Philox4x32-10 keyed by the 64-bit seed, with counter
(j // 4, b, offset_lo, offset_hi), mapped to ((r >> 9) + 0.5) * 2^-23, strictly inside (0, 1);
-log U_j comes from the series of -log(1 - W), W = 1 - U exact, where U > 15/16. The CUDA kernel
(csrc/sampling) uses the same stream, keys, masses and thresholds (its logs and exps are the
hardware approximations). `seed` is an int64 device tensor (seed, offset[, arrival counter]),
or a CPU tensor (seed, offset) read on the host and passed by value (eager draws: no extra launch);
with advance=True the kernel adds 1 to the offset itself (the last program to finish does it,
counting arrivals in seed[2], which must start at 0 and is reset), so a replayed CUDA graph
draws a new stream each step without another launch.
"""
import torch
import triton
import triton.language as tl

ON_CHIP_MAX = 16384  # elements of s kept in registers per program (32 per thread at 16 warps)
PASS_MAX = 4096  # tokens per chunk of the noisy passes (the Gumbel noise is computed per chunk)
SPLIT_BLOCK = 4096  # columns per tile of a row split across programs (ops.sampling.row_splits)
SPLIT_SELECT = 32  # tokens per step of a split row's histogram passes ([32, 256] digit one-hots)
SPLIT_WARPS = 8
# Registers per thread of a split program: two 8-warp programs per SM, as row_splits plans. Left
# alone, ptxas (Triton 3.6) gives a phase 64 and spills (tests/test_kernel_compile_facts.py).
SPLIT_MAX_REGISTERS = 65536 // (2 * 32 * SPLIT_WARPS)
_EMPTY = tl.constexpr(-(2**63))  # an empty merge slot: below every packed (key, index)
NO_FLOOR = tl.constexpr(0x7FFFFF)  # the ukey of -inf: a top-k floor that keeps every token
# A split row's merge slots (ops.sampling.merge_slots), int64 per row: the header, then one
# 256-bin histogram per radix pass (top-k: passes 0-3 over ukey(s); top-p: the next 4 over
# ukey(W)); csrc/sampling uses the same layout. Header: 0 the Gumbel winner, 1 the argmax of g
# (packed (key << 32) | (2^32 - 1 - index)), 2 contract 1's flags, 3 arrivals, 4 the key of
# max s, 5 the kept Gumbel winner (packed), 6-9 the shortcut's sums (count above the winner,
# mass above it, mass at or above it, total). 0, 1, 4 and 5 start at -2^63, every other entry
# at 0; every launch leaves them so.
SLOT_HEADER = tl.constexpr(16)
SLOT_BINS = tl.constexpr(256)
SLOT_USED = tl.constexpr(16 + 8 * 256)  # entries a row uses; rows lie slot_stride apart


@triton.jit
def _guided(logits_ptr, c_off, u_off, cols, mask, cfg_weight):
    c = tl.load(logits_ptr + c_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(logits_ptr + u_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return tl.where(c == u, u, u + cfg_weight * (c - u))  # -inf in both rows stays -inf, not NaN


@triton.jit
def _key(x):
    """Order-preserving fp32 -> int32 (-0.0 and +0.0 share a key)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _ukey(x):
    """_key shifted to [0, 2^32), as int64: the unsigned key the radix select walks."""
    return _key(x).to(tl.int64) + 2147483648


@triton.jit
def _signed(ukey):
    """An unsigned key (int64 in [0, 2^32]) as the int32 key it compares like; 2^32 (above
    every key) saturates to the largest int32, which only NaN reaches."""
    return tl.minimum(ukey - 2147483648, 2147483647).to(tl.int32)


@triton.jit
def _masses(s, mask, floor, m):
    """W = exp(s - max s) on the tokens top-k keeps (ukey(s) >= floor), 0 elsewhere (fp32);
    floor >= NO_FLOOR (below it _value is a NaN pattern)."""
    # (a float compare against the threshold's value: no per-token key; a NaN s fails both tests.
    # The exp reads the filtered s, so that it cannot be hoisted above the search for the floor,
    # which would keep exp(s - m) in registers beside s.)
    keep = mask & (s >= _value(floor)[:, None])
    e = tl.exp(tl.where(keep, s, float("-inf")) - m[:, None])
    return tl.where(keep & (e <= 1.0), e, 0.0)


@triton.jit
def _weights(x, mass_scale, MASS: tl.constexpr):
    """Per token: 1 (counts), or the fixed-point mass W 2^S (x = W)."""
    if MASS:
        return (x * mass_scale).to(tl.int64)
    else:
        return tl.full(x.shape, 1, tl.int64)


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
    return tl.where(better, tile_max, best), tl.where(better, start + tile_arg, best_idx), better, tile_arg


@triton.jit
def _tile(logits_ptr, c_off, u_off, row_ok, start, V, cfg_weight, temperature, SCALE: tl.constexpr,
          BLOCK: tl.constexpr):
    """(g, s, mask) of tokens start .. start+BLOCK-1: guided, scaled (-inf where masked)."""
    cols = start + tl.arange(0, BLOCK)
    mask = row_ok[:, None] & (cols < V)[None, :]
    g = _guided(logits_ptr, c_off, u_off, cols, mask, cfg_weight)
    s = g
    if SCALE:
        s = tl.div_rn(g, temperature)
    return g, tl.where(mask, s, float("-inf")), mask


@triton.jit
def _chip_mask(row_ok, V, BLOCK: tl.constexpr):
    return row_ok[:, None] & (tl.arange(0, BLOCK) < V)[None, :]


@triton.jit
def _value(ukey):
    """The fp32 value whose ukey is `ukey` (a NaN pattern above +inf): for non-NaN x,
    x >= _value(t) iff ukey(x) >= t, so a threshold test needs no per-token key."""
    k = _signed(ukey)
    return tl.where(k < 0, k ^ 0x7FFFFFFF, k).to(tl.float32, bitcast=True)


@triton.jit
def _at_least(x, mask, cand, mass_scale, MASS: tl.constexpr):
    """Count of the tokens with ukey(x) >= cand (x = s), or their mass (x = W), per row. The
    weights are formed after the test, so nothing per token outlives one select step."""
    hit = mask & (x >= _value(cand)[:, None])
    if MASS:
        return tl.sum(_weights(tl.where(hit, x, 0.0), mass_scale, True), axis=1)
    else:
        return tl.sum(hit.to(tl.int32), axis=1).to(tl.int64)


@triton.jit
def _select(x_chip, logits_ptr, c_off, u_off, row_ok, V, cfg_weight, temperature, m, floor,
            mass_scale, target, MASS: tl.constexpr, SCALE: tl.constexpr, ON_CHIP: tl.constexpr,
            DIGIT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The largest t in [0, 2^32) with F(t) >= target: F(t) = the count of tokens with
    ukey(s) >= t (counts), or the mass of those with ukey(W) >= t (MASS; W from _masses with
    `floor`). Bitwise from the top, DIGIT bits per pass: F never increases with t, so each pass
    keeps the largest digit whose candidate still reaches the target. x_chip holds s (counts) or
    W (MASS) when ON_CHIP; otherwise every pass re-reads the row."""
    t = tl.zeros([ROWS], tl.int64)
    if ON_CHIP:  # DIGIT == 1: one reduction of the registers per bit (a rolled loop: nothing hoisted)
        for shift in range(31, -1, -1):
            cand = t | (tl.full([ROWS], 1, tl.int64) << shift)  # int64: 1 << 31 must stay positive
            f = _at_least(x_chip, _chip_mask(row_ok, V, BLOCK), cand, mass_scale, MASS)
            t = tl.where(f >= target, cand, t)
    for p in tl.static_range(0 if ON_CHIP else 32 // DIGIT):
        shift = 32 - DIGIT * (p + 1)
        if not ON_CHIP:  # every candidate digit in one streamed pass
            digits = tl.arange(0, 1 << DIGIT).to(tl.int64)
            cand = _signed(t[:, None] | (digits[None, :] << shift))  # [ROWS, 2^DIGIT]
            f = tl.zeros([ROWS, 1 << DIGIT], tl.int64)
            for start in range(0, V, BLOCK):
                _, x, mask = _tile(logits_ptr, c_off, u_off, row_ok, start, V, cfg_weight, temperature,
                                   SCALE, BLOCK)
                if MASS:
                    x = _masses(x, mask, floor, m)
                w = tl.where(mask, _weights(x, mass_scale, MASS), 0)
                f += tl.sum(tl.where(_key(x)[:, :, None] >= cand[:, None, :], w[:, :, None], 0), axis=1)
            # the largest digit that reaches the target (digit 0 always does: the invariant)
            best = tl.max(tl.where(f >= target[:, None], digits[None, :], 0), axis=1)
            t = t | (best << shift)
    return t


@triton.jit
def _first_pass(g, s, mask, start, seed, off_lo, off_hi, rows, bad, finite, top, top_idx, m, best,
                best_idx, best_s, GREEDY: tl.constexpr, WINNER_S: tl.constexpr, ROWS: tl.constexpr,
                BLOCK: tl.constexpr):
    """One tile of the first pass: contract 1's flags (a NaN/+inf g, a finite g), the running
    argmax of g, max s, and the unfiltered Gumbel winner (with its s when WINNER_S)."""
    bad |= tl.max((mask & ((g != g) | (g == float("inf")))).to(tl.int32), axis=1)
    finite |= tl.max((mask & (tl.abs(g) < float("inf"))).to(tl.int32), axis=1)
    top, top_idx, _, _ = _running_argmax(tl.where(mask, g, float("-inf")), start, top, top_idx)
    if not GREEDY:
        m = tl.maximum(m, tl.max(s, axis=1))
        score = tl.where(mask, s + _gumbel(seed, off_lo, off_hi, rows, start, ROWS, BLOCK), float("-inf"))
        best, best_idx, better, arg = _running_argmax(score, start, best, best_idx)
        if WINNER_S:
            at_arg = tl.arange(0, BLOCK)[None, :] == arg[:, None]
            best_s = tl.where(better, tl.sum(tl.where(at_arg, s, 0.0), axis=1), best_s)
    return bad, finite, top, top_idx, m, best, best_idx, best_s


@triton.jit
def _stream(seed_ptr, seed_value, offset_value, HOST_SEED: tl.constexpr):
    """(seed, offset, offset low/high words): from the device state, or from the host."""
    if HOST_SEED:
        seed = tl.full([], seed_value, tl.int64)
        offset = tl.full([], offset_value, tl.int64)
    else:
        seed = tl.load(seed_ptr)
        offset = tl.load(seed_ptr + 1)
    return seed, offset, (offset & 0xFFFFFFFF).to(tl.uint32), ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _pair_rows(rows, B, INTERLEAVED: tl.constexpr):
    """(conditional, unconditional) logits rows of output rows `rows`, int64."""
    rows64 = rows.to(tl.int64)
    if INTERLEAVED:
        return 2 * rows64, 2 * rows64 + 1
    else:
        return rows64, rows64 + B


@triton.jit
def _finish(token, rows, row_ok, c_row, u_row, tokens_ptr, ids_ptr, seed_ptr, offset,
            ADVANCE: tl.constexpr, WRITE_IDS: tl.constexpr):
    tl.store(tokens_ptr + rows, token, mask=row_ok)
    if WRITE_IDS:
        tl.store(ids_ptr + c_row, token, mask=row_ok)
        tl.store(ids_ptr + u_row, token, mask=row_ok)
    if ADVANCE:
        # the last program to arrive (all others have read the offset) moves the stream on
        arrived = tl.atomic_add(seed_ptr + 2, 1)
        if arrived == tl.num_programs(0) * tl.num_programs(1) - 1:
            tl.store(seed_ptr + 1, offset + 1)
            tl.store(seed_ptr + 2, 0)


@triton.jit
def _kept_scores(s, mask, start, t_k, t_p, m, seed, off_lo, off_hi, rows, TOP_P: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK: tl.constexpr):
    """s + G on the kept tokens of a tile (ukey(s) >= t_k and, with TOP_P, ukey(W) >= t_p, W with
    floor t_k; t_k, t_p [ROWS]), -inf elsewhere: the final draw's scores, with the first pass's noise."""
    keep = mask & (s >= _value(t_k)[:, None])  # (a NaN s: its row is -1 anyway)
    if TOP_P:
        keep &= _masses(s, mask, t_k, m) >= _value(t_p)[:, None]
    return tl.where(keep, s + _gumbel(seed, off_lo, off_hi, rows, start, ROWS, BLOCK), float("-inf"))


@triton.jit
def _shortcut_sums(s, mask, best_s, m, mass_scale, above, mass_above, mass_ge, total, TOP_K: tl.constexpr,
                   TOP_P: tl.constexpr):
    """Adds one tile to the exact shortcut's integer sums: the count of tokens above the winner
    (s > s_w), the mass of the more probable ones, the mass at or above the winner's logit (a
    lower bound of what top-k keeps: the winner survives it) and the whole mass. Only the sums
    the filters read (each is 64-bit per token); float compares order like the keys."""
    if TOP_K:
        above += tl.sum((mask & (s > best_s[:, None])).to(tl.int32), axis=1).to(tl.int64)
    if TOP_P:
        e = _masses(s, mask, tl.zeros_like(above) + NO_FLOOR, m)
        e_w = tl.exp(best_s - m)
        mass_above += tl.sum(_weights(tl.where(e > e_w[:, None], e, 0.0), mass_scale, True), axis=1)
        if TOP_K:
            mass_ge += tl.sum(_weights(tl.where(s >= best_s[:, None], e, 0.0), mass_scale, True), axis=1)
        else:
            total += tl.sum(_weights(e, mass_scale, True), axis=1)
    return above, mass_above, mass_ge, total


@triton.jit
def _survives(above, mass_above, mass_ge, total, top_k, top_p, TOP_K: tl.constexpr, TOP_P: tl.constexpr):
    """Whether the unfiltered winner survives both filters (the shortcut's exact test)."""
    survives = tl.zeros_like(above) == 0
    kept_mass = total
    if TOP_K:
        survives &= above < top_k
        kept_mass = mass_ge
    if TOP_P:
        survives &= mass_above.to(tl.float64) < top_p * kept_mass.to(tl.float64)
    return survives


@triton.jit
def _digit_histogram(x, mask, prefix, shift, mass_scale, MASS: tl.constexpr):
    """[ROWS, 256] radix histogram of one tile: the count (x = s) or fixed-point mass (x = W,
    MASS) of the tokens whose ukey(x) shares `prefix` above bit shift + 8, by the digit
    (ukey(x) >> shift) & 255."""
    key = _ukey(x)
    ok = mask & ((key >> (shift + 8)) == (prefix >> (shift + 8))[:, None])
    w = tl.where(ok, _weights(x, mass_scale, MASS), 0)
    digits = tl.arange(0, 256)
    onehot = ((key >> shift) & 255)[:, :, None] == digits[None, None, :]
    return tl.sum(tl.where(onehot, w[:, :, None], 0), axis=1)


@triton.jit
def _choose_digit(hist, above, target):
    """One radix step: the largest digit d with F(d) >= target, F(d) = above (the weight of the
    tokens above the prefix) + the histogram's weight at digits >= d; and the weight above the
    prefix extended by d. F never increases with d and F(0) >= target (the invariant)."""
    digits = tl.arange(0, 256)
    at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    d = tl.max(tl.where((above + at_or_above).to(tl.float64) >= target, digits, 0), axis=0)
    return d.to(tl.int64), above + tl.sum(tl.where(digits > d, hist, 0), axis=0)


@triton.jit
def _merge_histogram(bins_ptr, hist, row_ok):
    """Adds a tile's [1, 256] histogram into the row's merged bins at bins_ptr ([1] pointers).
    The mask is built at the histogram's full shape, not broadcast from [1, 1]: Triton 3.6's
    interpreter reads an atomic's mask and value as contiguous arrays, so a broadcast one is
    garbage past its first element there (compiled code broadcasts in the IR and is unaffected;
    tests/test_sampling.py runs under 3.6's interpreter in CI)."""
    digits = tl.arange(0, 256)
    tl.atomic_add(bins_ptr[:, None] + digits[None, :], hist, mask=row_ok[:, None] & (digits < 256)[None, :])


@triton.jit
def _split_thresholds(slot, top_k, top_p, PASS: tl.constexpr, K_PASSES: tl.constexpr):
    """Replays radix passes 0 .. PASS-1 of a split row from their merged histograms (every
    program gets the same digits): (t_k, prefix, above, target) of the select that pass PASS
    continues, t_k final once PASS >= K_PASSES (NO_FLOOR without top-k). A top-p select's
    target, top_p * the kept mass, is its first histogram's total."""
    t_k = tl.full([], NO_FLOOR, tl.int64)
    prefix = tl.zeros([], tl.int64)
    above = tl.zeros([], tl.int64)
    target = tl.zeros([], tl.float64) + top_k
    for j in tl.static_range(PASS):
        hist = tl.load(slot + SLOT_HEADER + SLOT_BINS * j + tl.arange(0, 256))
        if j == K_PASSES:  # the top-p select starts: top-k's threshold is complete
            t_k = tl.maximum(prefix, NO_FLOOR)
            prefix = tl.zeros([], tl.int64)
            above = tl.zeros([], tl.int64)
            target = top_p * tl.sum(hist, axis=0).to(tl.float64)
        d, above = _choose_digit(hist, above, target)
        prefix |= d << (24 - 8 * (j % 4))
    if PASS == K_PASSES:
        t_k = tl.maximum(prefix, NO_FLOOR)
        prefix = tl.zeros([], tl.int64)
        above = tl.zeros([], tl.int64)
    return t_k, prefix, above, target


@triton.jit
def _load_s(logits_ptr, c_off, u_off, index, ok, cfg_weight, temperature, SCALE: tl.constexpr):
    """s at one index per row (-inf where not ok), bit-identical to the tiles' s."""
    c = tl.load(logits_ptr + c_off + index, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(logits_ptr + u_off + index, mask=ok, other=0.0).to(tl.float32)
    s = tl.where(c == u, u, u + cfg_weight * (c - u))
    if SCALE:
        s = tl.div_rn(s, temperature)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _split_rows(logits_ptr, stride_row, tokens_ptr, ids_ptr, seed_ptr, rows, seed, offset, off_lo, off_hi, noise_rows,
                work_ptr, slot_stride, B, V, chunk, cfg_weight, temperature, top_k, top_p, mass_scale,
                SPLITS: tl.constexpr, INTERLEAVED: tl.constexpr, GREEDY: tl.constexpr, SCALE: tl.constexpr,
                TOP_K: tl.constexpr, TOP_P: tl.constexpr, ADVANCE: tl.constexpr, WRITE_IDS: tl.constexpr,
                PHASE: tl.constexpr, K_PASSES: tl.constexpr, P_PASSES: tl.constexpr, BLOCK: tl.constexpr,
                SELECT: tl.constexpr):
    """Rows split across SPLITS programs each (grid (B, SPLITS), `chunk` columns per program),
    merged in the row's slots (SLOT_* above) with 64-bit atomics on (key << 32 | ~index) - the
    maximum key wins, then the lowest index, whatever the order of arrival - and integer sums.
    Launched once per PHASE; each launch boundary is the barrier between phases:
      0: the first pass (flags, argmax of g, max s, Gumbel winner). Unfiltered and greedy rows
         end here: the row's last program writes the token and resets the slots.
      1 .. K_PASSES + P_PASSES: radix pass PHASE - 1 (8 bits of t_k, then of t_p), phase 1 with
         the shortcut's sums; once those show the winner survives, the phases skip the row.
      K_PASSES + P_PASSES + 1: the Gumbel winner among the kept tokens; the row's last program
         writes the token and resets the slots.
    Thresholds, masses and noise are those of _cfg_sample_kernel: the tokens are the same. Row
    `rows` [1] draws its noise as _sample_rows does (key seed, counter noise_rows)."""
    row_ok = rows < B
    c_row, u_row = _pair_rows(rows, B, INTERLEAVED)
    c_off = c_row * stride_row
    u_off = u_row * stride_row
    slot = work_ptr + slot_stride * rows.to(tl.int64)
    lo = tl.program_id(1) * chunk
    hi = tl.minimum(lo + chunk, V)
    low = 0xFFFFFFFF
    FINAL: tl.constexpr = K_PASSES + P_PASSES + 1
    MASS: tl.constexpr = PHASE - 1 >= K_PASSES  # a radix pass over W (top-p), not s
    if PHASE == 0:
        bad = tl.zeros([1], tl.int32)
        finite = tl.zeros([1], tl.int32)
        top = tl.full([1], float("-inf"), tl.float32)
        top_idx = tl.zeros([1], tl.int32)
        m = tl.full([1], float("-inf"), tl.float32)
        best = tl.full([1], float("-inf"), tl.float32)
        best_idx = tl.zeros([1], tl.int32)
        for start in range(lo, hi, BLOCK):
            g, s, mask = _tile(logits_ptr, c_off, u_off, row_ok, start, V, cfg_weight, temperature, SCALE,
                               BLOCK)
            bad, finite, top, top_idx, m, best, best_idx, _ = _first_pass(
                g, s, mask, start, seed, off_lo, off_hi, noise_rows, bad, finite, top, top_idx, m, best, best_idx,
                best, GREEDY, False, 1, BLOCK)
        tl.atomic_max(slot, (_key(best).to(tl.int64) << 32) | (low - best_idx), mask=row_ok)
        tl.atomic_max(slot + 1, (_key(top).to(tl.int64) << 32) | (low - top_idx), mask=row_ok)
        tl.atomic_or(slot + 2, (bad + 2 * finite).to(tl.int64), mask=row_ok)
        if FINAL > 1:
            tl.atomic_max(slot + 4, _key(m).to(tl.int64), mask=row_ok)
    else:
        m = _value(tl.load(slot + 4) + 2147483648)
        m = tl.where(m > float("-inf"), m, 0.0)  # rows with no finite s are marked -1 below
        survives = tl.zeros_like(rows) == 0
        if PHASE > 1:
            survives = _survives(tl.load(slot + 6), tl.load(slot + 7), tl.load(slot + 8), tl.load(slot + 9),
                                 top_k, top_p, TOP_K, TOP_P)
        if PHASE == 1:
            winner = tl.load(slot)
            best_s = _load_s(logits_ptr, c_off, u_off, low - (winner & low), winner != _EMPTY, cfg_weight,
                             temperature, SCALE)
            zero = tl.zeros([1], tl.int64)
            above, mass_above, mass_ge, total = zero, zero, zero, zero
            hist = tl.zeros([1, 256], tl.int64)
            t_k = zero + NO_FLOOR
            prefix = zero
            for start in range(lo, hi, SELECT):
                _, s, mask = _tile(logits_ptr, c_off, u_off, row_ok, start, hi, cfg_weight, temperature, SCALE,
                                   SELECT)
                above, mass_above, mass_ge, total = _shortcut_sums(s, mask, best_s, m, mass_scale, above,
                                                                   mass_above, mass_ge, total, TOP_K, TOP_P)
                if K_PASSES == 0:
                    s = _masses(s, mask, t_k, m)
                hist += _digit_histogram(s, mask, prefix, 24, mass_scale, K_PASSES == 0)
            tl.atomic_add(slot + 6, above, mask=row_ok)
            tl.atomic_add(slot + 7, mass_above, mask=row_ok)
            tl.atomic_add(slot + 8, mass_ge, mask=row_ok)
            tl.atomic_add(slot + 9, total, mask=row_ok)
            _merge_histogram(slot + SLOT_HEADER, hist, row_ok)
        elif PHASE < FINAL:
            if tl.max(survives.to(tl.int32), axis=0) == 0:  # the winner was filtered out: one more digit
                t_k, prefix, _above, _target = _split_thresholds(slot, top_k, top_p, PHASE - 1, K_PASSES)
                t_k = tl.zeros([1], tl.int64) + t_k
                prefix = tl.zeros([1], tl.int64) + prefix
                hist = tl.zeros([1, 256], tl.int64)
                for start in range(lo, hi, SELECT):
                    _, s, mask = _tile(logits_ptr, c_off, u_off, row_ok, start, hi, cfg_weight, temperature,
                                       SCALE, SELECT)
                    if MASS:
                        s = _masses(s, mask, t_k, m)
                    hist += _digit_histogram(s, mask, prefix, 24 - 8 * ((PHASE - 1) % 4), mass_scale, MASS)
                _merge_histogram(slot + SLOT_HEADER + SLOT_BINS * (PHASE - 1), hist, row_ok)
        else:
            if tl.max(survives.to(tl.int32), axis=0) == 0:  # the Gumbel winner among the kept tokens
                t_k, t_p, _above, _target = _split_thresholds(slot, top_k, top_p, FINAL - 1, K_PASSES)
                t_k = tl.zeros([1], tl.int64) + t_k
                t_p = tl.zeros([1], tl.int64) + tl.minimum(t_p, _ukey(tl.full([], 1.0, tl.float32)))  # W = 1 stays
                best = tl.full([1], float("-inf"), tl.float32)
                best_idx = tl.zeros([1], tl.int32)
                for start in range(lo, hi, BLOCK):
                    _, s, mask = _tile(logits_ptr, c_off, u_off, row_ok, start, hi, cfg_weight, temperature, SCALE,
                                       BLOCK)
                    score = _kept_scores(s, mask, start, t_k, t_p, m, seed, off_lo, off_hi, noise_rows, P_PASSES > 0, 1,
                                         BLOCK)
                    best, best_idx, _, _ = _running_argmax(score, start, best, best_idx)
                tl.atomic_max(slot + 5, (_key(best).to(tl.int64) << 32) | (low - best_idx),
                              mask=row_ok & (best > float("-inf")))
    if PHASE == FINAL or FINAL == 1:
        tl.debug_barrier()  # every thread has read the slots (m, the sums) before the last program resets them
        last = row_ok & (tl.atomic_add(slot + 3, 1, mask=row_ok) == SPLITS - 1)
        # the last program of the row: read and reset in one exchange each
        merged = tl.atomic_xchg(slot, _EMPTY, mask=last)
        merged_top = tl.atomic_xchg(slot + 1, _EMPTY, mask=last)
        flags = tl.atomic_xchg(slot + 2, 0, mask=last)
        tl.atomic_xchg(slot + 3, 0, mask=last)
        token = low - (merged_top & low)
        if not GREEDY:  # the Gumbel winner, unless it is +-inf: g / T overflowed, which means the argmax
            top_key = merged >> 32  # (+-inf exactly when max s is: the noise is finite)
            overflow = (top_key == _key(tl.full([1], float("inf"), tl.float32))) | (
                top_key == _key(tl.full([1], float("-inf"), tl.float32)))
            winner = low - (merged & low)
            if FINAL > 1:
                tl.atomic_xchg(slot + 4, _EMPTY, mask=last)
                kept = tl.atomic_xchg(slot + 5, _EMPTY, mask=last)
                survives = _survives(tl.load(slot + 6), tl.load(slot + 7), tl.load(slot + 8), tl.load(slot + 9),
                                     top_k, top_p, TOP_K, TOP_P)
                winner = tl.where(survives, winner, low - (kept & low))
                tl.debug_barrier()  # every thread of this program has read the sums too
                for off in range(6, SLOT_USED, 256):  # the sums and histograms (all read by now)
                    cols = off + tl.arange(0, 256)
                    tl.store(slot[:, None] + cols[None, :], tl.zeros([1, 256], tl.int64),
                             mask=last[:, None] & (cols < SLOT_USED)[None, :])
            token = tl.where(overflow, token, winner)
        token = tl.where(((flags & 1) != 0) | ((flags & 2) == 0), -1, token)
        _finish(token, rows, last, c_row, u_row, tokens_ptr, ids_ptr, seed_ptr, offset, ADVANCE, WRITE_IDS)


@triton.jit(do_not_specialize=["seed_value", "offset_value"])
def _cfg_sample_split_kernel(logits_ptr, stride_row, tokens_ptr, ids_ptr, seed_ptr, seed_value, offset_value,
                             work_ptr, slot_stride, B, V, chunk, cfg_weight, temperature, top_k, top_p, mass_scale,
                             HOST_SEED: tl.constexpr, SPLITS: tl.constexpr, INTERLEAVED: tl.constexpr,
                             GREEDY: tl.constexpr, SCALE: tl.constexpr, TOP_K: tl.constexpr,
                             TOP_P: tl.constexpr, ADVANCE: tl.constexpr, WRITE_IDS: tl.constexpr,
                             PHASE: tl.constexpr, K_PASSES: tl.constexpr, P_PASSES: tl.constexpr,
                             BLOCK: tl.constexpr, SELECT: tl.constexpr):
    """One phase of the rows split across programs (_split_rows), grid (B, SPLITS)."""
    rows = tl.program_id(0) + tl.arange(0, 1)
    seed, offset, off_lo, off_hi = _stream(seed_ptr, seed_value, offset_value, HOST_SEED)
    _split_rows(logits_ptr, stride_row, tokens_ptr, ids_ptr, seed_ptr, rows, seed, offset, off_lo, off_hi, rows,
                work_ptr, slot_stride, B, V, chunk, cfg_weight, temperature, top_k, top_p, mass_scale, SPLITS,
                INTERLEAVED, GREEDY, SCALE, TOP_K, TOP_P, ADVANCE, WRITE_IDS, PHASE, K_PASSES, P_PASSES, BLOCK,
                SELECT)


@triton.jit
def _sample_rows(logits_ptr, stride_row, tokens_ptr, ids_ptr, seed_ptr, rows, seed, offset, off_lo, off_hi,
                 noise_rows, B, V, cfg_weight, temperature, top_k, top_p, mass_scale, INTERLEAVED: tl.constexpr,
                 GREEDY: tl.constexpr, SCALE: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
                 ADVANCE: tl.constexpr, WRITE_IDS: tl.constexpr, ON_CHIP: tl.constexpr, DIGIT: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK: tl.constexpr, SELECT_BLOCK: tl.constexpr, PASS_BLOCK: tl.constexpr):
    """The program of _cfg_sample_kernel for output rows `rows` [ROWS]: their noise is Philox keyed
    by `seed` (a scalar, or [ROWS, 1]: one key per row) at counter (j // 4, noise_rows, offset)."""
    row_ok = rows < B
    c_row, u_row = _pair_rows(rows, B, INTERLEAVED)
    c_off = c_row * stride_row
    u_off = u_row * stride_row

    # Pass 1, the only read of the logits when the row stays on the chip: contract 1's flags
    # (any NaN/+inf in g, any finite g), the argmax of g, max s, and the unfiltered Gumbel winner.
    bad = tl.zeros([ROWS], tl.int32)
    finite = tl.zeros([ROWS], tl.int32)
    top = tl.full([ROWS], float("-inf"), tl.float32)
    top_idx = tl.zeros([ROWS], tl.int32)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    best = tl.full([ROWS], float("-inf"), tl.float32)
    best_idx = tl.zeros([ROWS], tl.int32)
    best_s = tl.zeros([ROWS], tl.float32)  # s of the winner
    s_chip = tl.zeros([ROWS, BLOCK], tl.float32)  # s kept in registers when ON_CHIP (-inf: masked)
    # (in PASS_BLOCK chunks: the noise of a whole on-chip row at once would not fit beside it)
    for start in range(0, V, PASS_BLOCK):
        g, s, mask = _tile(logits_ptr, c_off, u_off, row_ok, start, V, cfg_weight, temperature, SCALE,
                           PASS_BLOCK)
        bad, finite, top, top_idx, m, best, best_idx, best_s = _first_pass(
            g, s, mask, start, seed, off_lo, off_hi, noise_rows, bad, finite, top, top_idx, m, best, best_idx,
            best_s, GREEDY, TOP_K or TOP_P, ROWS, PASS_BLOCK)
    if ON_CHIP and (TOP_K or TOP_P) and not GREEDY:  # the row's s, loaded once more (from L2)
        s_chip = _tile(logits_ptr, c_off, u_off, row_ok, 0, V, cfg_weight, temperature, SCALE, BLOCK)[1]

    overflow = (m == float("inf")) | (m == float("-inf"))  # (no finite g: -1 below)
    token = best_idx
    if not GREEDY and (TOP_K or TOP_P):
        m = tl.where(m > float("-inf"), m, 0.0)  # rows with no finite s are marked -1 below
        zero = tl.zeros([ROWS], tl.int64)
        # The exact shortcut (integer sums: the test is exact)
        above = zero
        mass_above = zero
        mass_ge = zero
        total = zero
        for start in range(0, V, BLOCK):
            if ON_CHIP:
                s = s_chip
                mask = _chip_mask(row_ok, V, BLOCK)
            else:
                g, s, mask = _tile(logits_ptr, c_off, u_off, row_ok, start, V, cfg_weight, temperature,
                                   SCALE, BLOCK)
            above, mass_above, mass_ge, total = _shortcut_sums(s, mask, best_s, m, mass_scale, above, mass_above,
                                                               mass_ge, total, TOP_K, TOP_P)
        survives = _survives(above, mass_above, mass_ge, total, top_k, top_p, TOP_K, TOP_P)
        accept = survives | (row_ok == 0)  # rows past B need nothing
        if tl.min(accept.to(tl.int32), axis=0) == 0:  # some row needs the thresholds
            t_k = zero + NO_FLOOR
            if TOP_K:  # (a floor below -inf's key keeps what NO_FLOOR keeps: every non-NaN s)
                t_k = tl.maximum(t_k, _select(s_chip, logits_ptr, c_off, u_off, row_ok, V, cfg_weight,
                                              temperature, m, zero, mass_scale, zero + top_k, False,
                                              SCALE, ON_CHIP, DIGIT, ROWS, SELECT_BLOCK))
            t_p = zero
            if TOP_P:
                if ON_CHIP:  # (not in a loop: W would be carried beside s)
                    w_chip = _masses(s_chip, _chip_mask(row_ok, V, BLOCK), t_k, m)
                    kept = tl.sum(_weights(w_chip, mass_scale, True), axis=1)
                else:
                    w_chip = s_chip
                    kept = zero
                    for start in range(0, V, BLOCK):
                        g, s, mask = _tile(logits_ptr, c_off, u_off, row_ok, start, V, cfg_weight,
                                           temperature, SCALE, BLOCK)
                        kept += tl.sum(_weights(_masses(s, mask, t_k, m), mass_scale, True), axis=1)
                t_p = _select(w_chip, logits_ptr, c_off, u_off, row_ok, V, cfg_weight, temperature, m,
                              t_k, mass_scale, top_p * kept.to(tl.float64), True, SCALE, ON_CHIP,
                              DIGIT, ROWS, SELECT_BLOCK)
                t_p = tl.minimum(t_p, _ukey(tl.full([ROWS], 1.0, tl.float32)))  # W = 1 (the max) stays
            # the Gumbel winner among the kept tokens, with the noise of the first pass
            best = tl.full([ROWS], float("-inf"), tl.float32)
            token = tl.zeros([ROWS], tl.int32)
            for start in range(0, V, PASS_BLOCK):  # s is read again, in chunks, like the first pass
                g, s, mask = _tile(logits_ptr, c_off, u_off, row_ok, start, V, cfg_weight, temperature,
                                   SCALE, PASS_BLOCK)
                score = _kept_scores(s, mask, start, t_k, t_p, m, seed, off_lo, off_hi, noise_rows, TOP_P, ROWS, PASS_BLOCK)
                best, token, _, _ = _running_argmax(score, start, best, token)
            token = tl.where(accept, best_idx, token)

    if GREEDY:
        token = top_idx
    else:  # g / T overflowing is a temperature too small for fp32: the argmax
        token = tl.where(overflow, top_idx, token)
    token = tl.where((bad != 0) | (finite == 0), -1, token.to(tl.int64))
    _finish(token, rows, row_ok, c_row, u_row, tokens_ptr, ids_ptr, seed_ptr, offset, ADVANCE, WRITE_IDS)


@triton.jit(do_not_specialize=["seed_value", "offset_value"])
def _cfg_sample_kernel(logits_ptr, stride_row, tokens_ptr, ids_ptr, seed_ptr, seed_value, offset_value, B, V,
                       cfg_weight, temperature, top_k, top_p, mass_scale, HOST_SEED: tl.constexpr,
                       INTERLEAVED: tl.constexpr, GREEDY: tl.constexpr, SCALE: tl.constexpr,
                       TOP_K: tl.constexpr, TOP_P: tl.constexpr, ADVANCE: tl.constexpr,
                       WRITE_IDS: tl.constexpr, ON_CHIP: tl.constexpr, DIGIT: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr, SELECT_BLOCK: tl.constexpr,
                       PASS_BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    seed, offset, off_lo, off_hi = _stream(seed_ptr, seed_value, offset_value, HOST_SEED)
    _sample_rows(logits_ptr, stride_row, tokens_ptr, ids_ptr, seed_ptr, rows, seed, offset, off_lo, off_hi, rows, B,
                 V, cfg_weight, temperature, top_k, top_p, mass_scale, INTERLEAVED, GREEDY, SCALE, TOP_K, TOP_P,
                 ADVANCE, WRITE_IDS, ON_CHIP, DIGIT, ROWS, BLOCK, SELECT_BLOCK, PASS_BLOCK)


def mass_scale(v: int) -> float:
    """2^S for the fixed-point masses: V tokens of mass <= 1 sum below 2^62."""
    return float(2 ** (62 - v.bit_length()))


def _blocks(b: int, v: int, interpreted: bool) -> tuple[int, int, bool]:
    """(ROWS, BLOCK, ON_CHIP): a row of up to ON_CHIP_MAX tokens is one tile kept on the chip,
    short rows packed several per program (up to ON_CHIP_MAX tokens per program; the CPU
    interpreter's cost is per op, not per element); longer rows stream in 4096-token chunks."""
    if v > ON_CHIP_MAX:
        return 1, 4096, False
    block = max(triton.next_power_of_2(v), 4)
    rows = min(max(ON_CHIP_MAX // block, 1), triton.next_power_of_2(b))
    if not interpreted:
        rows = min(rows, max(2048 // block, 1))  # short rows: keep several programs per SM busy
    return rows, block, True


def launch_config(b: int, v: int, interpreted: bool) -> tuple[int, dict]:
    """(ROWS, the tiling constexprs and num_warps of _cfg_sample_kernel): what cfg_sample
    launches, and what the compile-facts test builds. The noisy passes (first and last) walk
    PASS_BLOCK tokens at a time so that nothing but s itself spans the on-chip row; every config
    compiles without a register spill on sm_80 and sm_90 (tests/test_sampling.py)."""
    rows, block, on_chip = _blocks(b, v, interpreted)
    pass_block = min(block, PASS_MAX)
    warps = 16 if rows * block >= 8192 else (8 if rows * block > 1024 else 4)
    # maxnreg: the whole register file is the program's to use; left alone, ptxas caps an
    # 8-warp program at 128 registers on sm_80 and spills
    meta = dict(ON_CHIP=on_chip, DIGIT=1 if on_chip else 4, ROWS=rows, BLOCK=block,
                SELECT_BLOCK=block if on_chip else 256, PASS_BLOCK=pass_block, num_warps=warps,
                maxnreg=max_registers(warps))
    return rows, meta


def split_passes(v: int, temperature: float, top_k: int, top_p: float) -> tuple[int, int]:
    """Radix passes of a split row: (4 for top-k or 0, 4 for top-p or 0); the row takes one
    launch per pass plus two (the first pass, the final draw), or one launch unfiltered."""
    filtering = temperature != 0
    return 4 * (filtering and 0 < top_k < v), 4 * (filtering and top_p < 1.0)


def max_registers(warps: int) -> int:
    """Registers per thread when one program of `warps` warps has the SM's 64K to itself."""
    return min(255, 65536 // (32 * warps)) // 8 * 8


def cfg_sample(logits, cfg_weight, temperature, top_k, top_p, seed, layout, advance=False,
               return_ids=False, splits=1, work=None, host_seed=None):
    """tokens int64 [B] and the pair-duplicated ids int64 [2B] in the input layout (empty unless
    return_ids). `seed` holds (seed, offset[, arrival counter]); see the module docstring.
    splits > 1 spreads each row over that many programs, merged in `work` (int64
    [>= B, >= SLOT_USED] as SLOT_HEADER describes, left so): one launch, or split_passes + 2 launches
    for a filtered row. A `seed` on the CPU beside CUDA
    logits (host_seed, the default then) is read on the host and passed by value: no device
    state, nothing to launch but the kernel."""
    two_b, v = logits.shape
    b = two_b // 2
    tokens = torch.empty(b, dtype=torch.int64, device=logits.device)
    ids = torch.empty(two_b if return_ids else 0, dtype=torch.int64, device=logits.device)
    if b == 0:
        if advance:
            seed[1] += 1
        return tokens, ids
    greedy = temperature == 0
    if host_seed is None:
        host_seed = seed.device != logits.device
    seed_value, offset_value = seed[:2].tolist() if host_seed else (0, 0)
    if host_seed and advance:
        raise ValueError("a host seed cannot be advanced by the kernel")
    # (a host seed is not read on the device: any device pointer stands in for it)
    stream = {"seed_ptr": tokens if host_seed else seed, "seed_value": seed_value, "offset_value": offset_value,
              "HOST_SEED": bool(host_seed)}
    if splits > 1:
        chunk = triton.cdiv(triton.cdiv(v, splits), SPLIT_BLOCK) * SPLIT_BLOCK
        split = triton.cdiv(v, chunk)
        k_passes, p_passes = split_passes(v, temperature, top_k, top_p)
        final = k_passes + p_passes + 1 if k_passes + p_passes else 0
        # (the interpreter's cost is per op: wider histogram steps there)
        select = SPLIT_SELECT if logits.device.type != "cpu" else 256
        for phase in range(final + 1):
            _cfg_sample_split_kernel[(b, split)](
                logits, logits.stride(0), tokens, ids, work_ptr=work, slot_stride=work.stride(0), B=b, V=v,
                chunk=chunk,
                cfg_weight=float(cfg_weight), temperature=float(temperature), top_k=int(top_k),
                top_p=float(top_p), mass_scale=mass_scale(v), SPLITS=split, **stream,
                INTERLEAVED=layout == "interleaved", GREEDY=greedy, SCALE=temperature != 1.0,
                TOP_K=k_passes > 0, TOP_P=p_passes > 0, ADVANCE=bool(advance) and phase == final,
                WRITE_IDS=bool(return_ids), PHASE=phase, K_PASSES=k_passes, P_PASSES=p_passes,
                BLOCK=SPLIT_BLOCK, SELECT=select, num_warps=SPLIT_WARPS, maxnreg=SPLIT_MAX_REGISTERS,
                enable_fp_fusion=False)
        return tokens, ids
    rows, tiling = launch_config(b, v, logits.device.type == "cpu")
    _cfg_sample_kernel[(triton.cdiv(b, rows),)](
        logits, logits.stride(0), tokens, ids, B=b, V=v, cfg_weight=float(cfg_weight),
        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), mass_scale=mass_scale(v), **stream,
        INTERLEAVED=layout == "interleaved", GREEDY=greedy, SCALE=temperature != 1.0,
        TOP_K=not greedy and 0 < top_k < v, TOP_P=not greedy and top_p < 1.0,
        ADVANCE=bool(advance), WRITE_IDS=bool(return_ids), **tiling,
        enable_fp_fusion=False)  # round u + w (c - u) and g / T exactly as torch does
    return tokens, ids
