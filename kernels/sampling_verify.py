"""Triton verification of speculative Jacobi decoding: one launch per window for the acceptance
test of every draft, the residual draw, and the commit (the algorithm and its proof:
janus_fast/ops/sampling_verify.py).

Program layout: ROWS flat items f = b * W + j (image b, window column j) per program, each a
[2B, W, V] logits pair row kept on the chip (V <= ON_CHIP_MAX) with the tilings of
kernels.sampling.launch_config. Per item, in fp32 with the cfg_sample kernel's helpers (so s,
the top-k / top-p thresholds and the kept set are bit for bit cfg_sample's):
    s = guided / T; m = max s; t_k, t_p the radix-selected thresholds; the kept mass
    Z = sum over kept tokens of the fixed-point e_t 2^S (an exact integer, as cfg_sample's);
    p_t = exp(s_t - m) / (Z 2^-S) on the kept set, 0 elsewhere; one-hot at argmax g where the
    temperature is 0 or g / T overflows; a row with NaN / +inf / nothing finite is bad (-1).
    d = the draft at position n_b + j; q = the point mass on d, or the stored slot (n_b + j) % W.
    accepted iff U q(d) < p(d), U = ((r >> 9) + 0.5) 2^-23 from Philox4x32 lane 0 with counter
    (2^32 - 1, f, offset) (the Gumbel noise of the tokens uses counters (t // 4, f, offset), so
    every number is distinct).
    otherwise the output is argmax_t log(p_t - q_t) + G_t over p_t > q_t (Gumbel-max: an exact
    draw from norm(max(p - q, 0))), the draft itself if no token has p_t > q_t.
    The output replaces the draft, and p (exactly the values used here) replaces q in its slot.
The last program to arrive (arrivals counted in the random state's third entry, as cfg_sample
counts them) commits every image: count = min(first rejected column + 1, W, N - n_b), fresh
point-mass drafts for the positions entering the window (reference.sjd_init_position), the
next pass's input ids, n_b and passes, the pair's cache lengths; then it moves the offset on.
"""
import torch
import triton
import triton.language as tl

from .sampling import (
    NO_FLOOR,
    ON_CHIP_MAX,
    _chip_mask,
    _first_pass,
    _gumbel,
    _load_s,
    _masses,
    _running_argmax,
    _select,
    _stream,
    _tile,
    _ukey,
    _value,
    _weights,
    launch_config,
    mass_scale,
)



def commit_block(b: int, interpreted: bool) -> int:
    """Images per step of the commit loop: the whole batch up to 64 (the interpreter's cost is per
    op, not per element: up to 4096 there)."""
    return min(triton.next_power_of_2(b), 4096 if interpreted else 64)


@triton.jit
def _probs(s, mask, t_k, t_p, m, z, argmax_at, cols, TOP_P: tl.constexpr):
    """p of a [ROWS, n] tile of tokens `cols`: exp(s - m) / z on the kept tokens (ukey(s) >= t_k,
    and with TOP_P ukey(W) >= t_p), 0 elsewhere; the one-hot at argmax_at where that is >= 0."""
    w = _masses(s, mask, t_k, m)
    if TOP_P:
        w = tl.where(w >= _value(t_p)[:, None], w, 0.0)
    p = w / z[:, None]
    return tl.where(argmax_at[:, None] >= 0, (cols == argmax_at[:, None]).to(tl.float32), p)


@triton.jit
def _uniform(seed, off_lo, off_hi, rows):
    """One uniform in (0, 1) per row, from a Philox counter no token's noise uses."""
    c0 = tl.zeros(rows.shape, tl.uint32) + 0xFFFFFFFF
    r, _, _, _ = tl.philox(seed, c0, rows.to(tl.uint32), tl.zeros(rows.shape, tl.uint32) + off_lo,
                           tl.zeros(rows.shape, tl.uint32) + off_hi)
    return ((r >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def _fresh_draft(row_ptr, i, end, last, grid_width, ok):
    """The point-mass draft of positions i [COMMIT, WP] entering an image's window: the token
    grid_width back if that position held one before the commit (< end), else `last`."""
    above = i - grid_width
    use_above = (above < i) & (above >= 0) & (above < end[:, None])  # (above < i: grid_width > 0)
    return tl.where(use_above, tl.load(row_ptr[:, None] + above, mask=ok & use_above, other=0, cache_modifier=".cg"),
                    last[:, None])


@triton.jit(do_not_specialize=["grid_width"])
def _sjd_verify_kernel(logits_ptr, stride_pair, stride_col, tokens_ptr, stride_tok, point_ptr, stride_point,
                       q_ptr, stride_qb, stride_qs, progress_ptr, lengths_ptr, next_ptr, stride_next, accepted_ptr,
                       seed_ptr, B, V, N, cfg_weight, temperature, top_k, top_p, mass_scale, grid_width,
                       W: tl.constexpr, WP: tl.constexpr, GREEDY: tl.constexpr, SCALE: tl.constexpr, TOP_K: tl.constexpr,
                       TOP_P: tl.constexpr, ON_CHIP: tl.constexpr, DIGIT: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK: tl.constexpr, SELECT_BLOCK: tl.constexpr, PASS_BLOCK: tl.constexpr,
                       COMMIT: tl.constexpr):
    f = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = f < B * W
    b = (f // W).to(tl.int64)
    j = f % W
    n = tl.load(progress_ptr + 2 * b, mask=row_ok, other=N)
    active = row_ok & (n < N)
    pos = tl.minimum(n, N) + j
    c_off = 2 * b * stride_pair + j * stride_col
    u_off = c_off + stride_pair
    seed, offset, off_lo, off_hi = _stream(seed_ptr, 0, 0, False)

    # the row's flags, argmax of g and max s (as cfg_sample's first pass)
    bad = tl.zeros([ROWS], tl.int32)
    finite = tl.zeros([ROWS], tl.int32)
    top = tl.full([ROWS], float("-inf"), tl.float32)
    top_idx = tl.zeros([ROWS], tl.int32)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    for start in range(0, V, PASS_BLOCK):
        g, s, mask = _tile(logits_ptr, c_off, u_off, row_ok, start, V, cfg_weight, temperature, SCALE, PASS_BLOCK)
        bad, finite, top, top_idx, _, _, _, _ = _first_pass(g, s, mask, start, seed, off_lo, off_hi, f, bad, finite,
                                                            top, top_idx, m, top, top_idx, m, True, False, ROWS,
                                                            PASS_BLOCK)
        m = tl.maximum(m, tl.max(s, axis=1))
    bad = (bad != 0) | (finite == 0)
    draft = tl.load(tokens_ptr + b * stride_tok + pos, mask=row_ok, other=0)
    safe = tl.minimum(tl.maximum(draft, 0), V - 1)
    if GREEDY:
        accept = active & ~bad & (draft == top_idx)
        out = top_idx.to(tl.int64)
    else:
        # one-hot rows: g / T overflowed (the argmax, as cfg_sample)
        argmax_at = tl.where((m == float("inf")) | (m == float("-inf")), top_idx, -1)
        m = tl.where(m > float("-inf"), m, 0.0)
        zero = tl.zeros([ROWS], tl.int64)
        t_k = zero + NO_FLOOR
        t_p = zero
        if TOP_K or TOP_P:  # the thresholds, on the row kept on the chip
            s_chip = _tile(logits_ptr, c_off, u_off, row_ok, 0, V, cfg_weight, temperature, SCALE, BLOCK)[1]
            chip = _chip_mask(row_ok, V, BLOCK)
            if TOP_K:
                t_k = tl.maximum(t_k, _select(s_chip, logits_ptr, c_off, u_off, row_ok, V, cfg_weight, temperature,
                                              m, zero, mass_scale, zero + top_k, False, SCALE, ON_CHIP, DIGIT,
                                              ROWS, SELECT_BLOCK))
            w_chip = _masses(s_chip, chip, t_k, m)
            if TOP_P:
                kept = tl.sum(_weights(w_chip, mass_scale, True), axis=1)
                t_p = _select(w_chip, logits_ptr, c_off, u_off, row_ok, V, cfg_weight, temperature, m, t_k,
                              mass_scale, top_p * kept.to(tl.float64), True, SCALE, ON_CHIP, DIGIT, ROWS,
                              SELECT_BLOCK)
                t_p = tl.minimum(t_p, _ukey(tl.full([ROWS], 1.0, tl.float32)))  # W = 1 (the max) stays
                w_chip = tl.where(w_chip >= _value(t_p)[:, None], w_chip, 0.0)
            total = tl.sum(_weights(w_chip, mass_scale, True), axis=1)
        else:
            total = zero
            for start in range(0, V, PASS_BLOCK):
                _, s, mask = _tile(logits_ptr, c_off, u_off, row_ok, start, V, cfg_weight, temperature, SCALE,
                                   PASS_BLOCK)
                total += tl.sum(_weights(_masses(s, mask, t_k, m), mass_scale, True), axis=1)
        z = (total.to(tl.float64) / mass_scale).to(tl.float32)
        z = tl.where(z > 0.0, z, 1.0)  # (a bad row)
        point = tl.load(point_ptr + b * stride_point + pos, mask=row_ok, other=1) != 0
        q_row = q_ptr + b * stride_qb + (pos % W) * stride_qs
        s_d = _load_s(logits_ptr, c_off, u_off, safe, row_ok, cfg_weight, temperature, SCALE)
        p_d = tl.sum(_probs(s_d[:, None], row_ok[:, None], t_k, t_p, m, z, argmax_at, safe[:, None], TOP_P), axis=1)
        q_d = tl.where(point, 1.0, tl.load(q_row + safe, mask=row_ok & ~point, other=1.0))
        accept = active & ~bad & (_uniform(seed, off_lo, off_hi, f) * q_d < p_d)
        # the residual draw, and p stored as the slot's q for the next pass
        best = tl.full([ROWS], float("-inf"), tl.float32)
        out = safe.to(tl.int32)
        for start in range(0, V, PASS_BLOCK):
            _, s, mask = _tile(logits_ptr, c_off, u_off, row_ok, start, V, cfg_weight, temperature, SCALE, PASS_BLOCK)
            cols = start + tl.arange(0, PASS_BLOCK)
            p = _probs(s, mask, t_k, t_p, m, z, argmax_at, cols[None, :], TOP_P)
            q_ptrs = q_row[:, None] + cols[None, :]
            q = tl.where(point[:, None], (cols[None, :] == draft[:, None]).to(tl.float32),
                         tl.load(q_ptrs, mask=mask & ~point[:, None], other=0.0))
            r = p - q
            score = tl.where(mask & (r > 0.0),
                             tl.log(r) + _gumbel(seed, off_lo, off_hi, f, start, ROWS, PASS_BLOCK), float("-inf"))
            best, out, _, _ = _running_argmax(score, start, best, out)
            tl.store(q_ptrs, p, mask=mask & active[:, None])
        out = tl.where(accept, draft, out.to(tl.int64))
    out = tl.where(bad, -1, out)
    tl.store(tokens_ptr + b * stride_tok + pos, out, mask=active)
    tl.store(point_ptr + b * stride_point + pos, tl.zeros([ROWS], tl.int8), mask=active)
    tl.store(accepted_ptr + f, accept.to(tl.int8), mask=row_ok)

    # the last program to arrive commits every image
    tl.debug_barrier()
    arrived = tl.atomic_add(seed_ptr + 2, 1)
    if arrived == tl.num_programs(0) - 1:
        win = tl.arange(0, WP)
        for b0 in range(0, B, COMMIT):
            bb = (b0 + tl.arange(0, COMMIT)).to(tl.int64)
            ok = bb < B
            ok2 = ok[:, None] & (win[None, :] < W)
            n_img = tl.load(progress_ptr + 2 * bb, mask=ok, other=N, cache_modifier=".cg")
            passes = tl.load(progress_ptr + 2 * bb + 1, mask=ok, other=0, cache_modifier=".cg")
            acc = tl.load(accepted_ptr + bb[:, None] * W + win[None, :], mask=ok2, other=0, cache_modifier=".cg")
            first_rejected = tl.min(tl.where((acc != 0) | (win[None, :] >= W), W, win[None, :]), axis=1)
            count = tl.minimum(tl.minimum(first_rejected + 1, W).to(tl.int64), N - n_img)
            count = tl.where(ok & (n_img < N), count, 0)
            img_row = tokens_ptr + bb * stride_tok
            end = tl.minimum(n_img, N) + W  # positions < end hold a token
            last = tl.load(img_row + end - 1, mask=ok, other=0, cache_modifier=".cg")
            fresh = end[:, None] + win[None, :]
            tl.store(img_row[:, None] + fresh, _fresh_draft(img_row, fresh, end, last, grid_width, ok2),
                     mask=ok2 & (win[None, :] < count[:, None]))
            tl.store(point_ptr + bb[:, None] * stride_point + fresh, tl.full([COMMIT, WP], 1, tl.int8),
                     mask=ok2 & (win[None, :] < count[:, None]))
            nxt = (n_img + count - 1)[:, None] + win[None, :]
            held = nxt < end[:, None]
            ids = tl.where(held, tl.load(img_row[:, None] + nxt, mask=ok2 & held, other=0, cache_modifier=".cg"),
                           _fresh_draft(img_row, nxt, end, last, grid_width, ok2 & ~held))
            tl.store(next_ptr + (2 * bb)[:, None] * stride_next + win[None, :], ids, mask=ok2)
            tl.store(next_ptr + (2 * bb + 1)[:, None] * stride_next + win[None, :], ids, mask=ok2)
            tl.store(progress_ptr + 2 * bb, n_img + count, mask=ok)
            tl.store(progress_ptr + 2 * bb + 1, passes + (count > 0).to(tl.int64), mask=ok)
            for r in tl.static_range(2):
                lengths = tl.load(lengths_ptr + 2 * bb + r, mask=ok, other=0, cache_modifier=".cg")
                tl.store(lengths_ptr + 2 * bb + r, lengths + count.to(tl.int32), mask=ok)
        tl.store(seed_ptr + 1, offset + 1)
        tl.store(seed_ptr + 2, 0)


def check_vocabulary(v: int) -> None:
    if v > ON_CHIP_MAX:
        raise ValueError(f"the Triton sjd_verify keeps a row on the chip: V must be <= {ON_CHIP_MAX}, got {v}")


def launch_meta(items: int, v: int, interpreted: bool) -> tuple[int, dict]:
    """(ROWS, tiling constexprs and num_warps/maxnreg) for `items` = B * W rows of V tokens:
    cfg_sample's on-chip tilings (tests/test_verify_compile_facts.py checks them spill-free)."""
    check_vocabulary(v)
    rows, meta = launch_config(items, v, interpreted)
    return rows, meta


def sjd_verify(logits, tokens, point, q, progress, lengths, next_ids, cfg_weight, temperature, top_k, top_p, seed,
               grid_width):
    """The launcher: see the module docstring and reference.sjd_verify for the arguments; seed is
    the device random state (seed, offset, arrival counter), advanced by one. -> accepted bool [B, W]."""
    two_b, w, v = logits.shape
    b = two_b // 2
    accepted = torch.empty((b, w), dtype=torch.int8, device=logits.device)
    if b == 0:
        seed[1] += 1
        return accepted.bool()
    greedy = temperature == 0
    interpreted = logits.device.type == "cpu"
    rows, meta = launch_meta(b * w, v, interpreted)
    _sjd_verify_kernel[(triton.cdiv(b * w, rows),)](
        logits, logits.stride(0), logits.stride(1), tokens, tokens.stride(0), point, point.stride(0), q, q.stride(0),
        q.stride(1), progress, lengths, next_ids, next_ids.stride(0), accepted, seed, b, v, tokens.shape[1] - w,
        float(cfg_weight), float(temperature), int(top_k), float(top_p), mass_scale(v), int(grid_width), W=w,
        WP=triton.next_power_of_2(w),
        GREEDY=greedy, SCALE=temperature != 1.0, TOP_K=not greedy and 0 < top_k < v, TOP_P=not greedy and top_p < 1.0,
        COMMIT=commit_block(b, interpreted), **meta, enable_fp_fusion=False)
    return accepted.bool()
