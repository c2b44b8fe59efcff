"""Triton VQ codebook ops: nearest-code search (vq_quantize) and code lookup (vq_lookup).

Maths (all in fp32, whatever the input dtype):
    normalise(x) = x / max(||x||_2, 1e-12)          (F.normalize: a zero row stays zero)
    vq_quantize:  idx_n = argmin_k ||c_k||^2 - 2 z_n . c_k     (z, c normalised when l2_norm)
                  the expanded squared distance without the per-row constant ||z_n||^2; a running
                  argmin over codebook tiles, ties to the lowest index (strict < across tiles,
                  leftmost within a tile); no N x K matrix is ever stored.
    vq_lookup:    out_n = normalise(c_{idx_n}) (or c_{idx_n}), cast to the codebook dtype, written
                  row-major [N, D] or straight into channels-first [B, D, H, W] (n = b*H*W + h*W + w).
Norms use IEEE sqrt/division (sqrt_rn/div_rn) to round like torch. The codebook is prepared once
(janus_fast.ops caches it per codebook) into an fp32, transposed [D, K] copy of -2 c plus ||c_k||^2;
each distance is ||c_k||^2 + D fp32 rank-1 FMA updates in a fixed order (no tl.dot: exact ties
must stay exact).
A latent row with a non-finite entry gets index -1. Out-of-range indices (-1 among them) give
NaN rows instead of reading outside the codebook.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _normalise_rows(x, L2_NORM: tl.constexpr):
    """x [R, D] fp32 -> rows scaled to unit norm (F.normalize) when L2_NORM."""
    if L2_NORM:
        norm = tl.sqrt_rn(tl.sum(x * x, axis=1))
        x = tl.div_rn(x, tl.maximum(norm, 1e-12)[:, None])
    return x


# --------------------------------------------------------------------------------- lookup


@triton.jit
def _vq_lookup_kernel(idx_ptr, cb_ptr, out_ptr, N, K, D, HW,
                      L2_NORM: tl.constexpr, CHANNELS_FIRST: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    idx = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    valid = row_ok & (idx >= 0) & (idx < K)
    x = tl.load(cb_ptr + idx[:, None] * D + cols[None, :], mask=valid[:, None] & col_ok[None, :],
                other=0.0).to(tl.float32)
    x = _normalise_rows(x, L2_NORM)
    x = tl.where(valid[:, None], x, float("nan"))
    if CHANNELS_FIRST:
        b = rows // HW
        offs = (b * D * HW + rows % HW)[:, None] + (cols * HW)[None, :]
    else:
        offs = rows[:, None] * D + cols[None, :]
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def lookup_blocks(d: int) -> dict:
    """_vq_lookup_kernel's tile for codes of dimension d (also compiled by the compile-facts test)."""
    block_d = triton.next_power_of_2(d)
    return dict(BLOCK_N=max(1, min(128, 4096 // block_d)), BLOCK_D=block_d)


QUANTIZE_BLOCKS = dict(BLOCK_N=64, BLOCK_K=128, num_warps=8)  # _vq_quantize_kernel's tile
PREPARE_BLOCK_K = 128


def vq_lookup(indices, codebook, l2_norm, shape):
    k, d = codebook.shape
    n = indices.numel()
    size = tuple(shape) if shape is not None else (*indices.shape, d)
    out = torch.empty(size, dtype=codebook.dtype, device=codebook.device)
    if n == 0:
        return out
    hw = shape[2] * shape[3] if shape is not None else 1
    blocks = lookup_blocks(d)
    _vq_lookup_kernel[(triton.cdiv(n, blocks["BLOCK_N"]),)](
        indices.reshape(-1), codebook, out, n, k, d, hw,
        L2_NORM=bool(l2_norm), CHANNELS_FIRST=shape is not None, **blocks)
    return out


# --------------------------------------------------------------------------------- quantize


@triton.jit
def _prepare_codebook_kernel(cb_ptr, cbt_ptr, sq_ptr, K, D,
                             L2_NORM: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr):
    """cbt[d, k] = -2 x normalised c_k[d] (fp32, transposed so each dimension is a contiguous
    row; -2 is exact), sq[k] = ||normalised c_k||^2: a distance is one FMA chain from sq."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < K
    cols = tl.arange(0, D_PAD)
    col_ok = cols < D
    x = tl.load(cb_ptr + rows[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                other=0.0).to(tl.float32)
    x = _normalise_rows(x, L2_NORM)
    tl.store(cbt_ptr + cols[None, :] * K + rows[:, None], -2.0 * x, mask=row_ok[:, None] & col_ok[None, :])
    tl.store(sq_ptr + rows, tl.sum(x * x, axis=1), mask=row_ok)


@triton.jit
def _vq_quantize_kernel(z_ptr, stride_z, cbt_ptr, sq_ptr, out_ptr, N, K, codes_per_split,
                        D: tl.constexpr, L2_NORM: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, D_PAD: tl.constexpr):
    """Program (x, y): BLOCK_N latents against codes [y * codes_per_split, ...). With SPLIT the
    winners merge by 64-bit atomic_min on (order-preserving distance key << 32 | index) into
    out (int64 max on entry): the smaller distance, then the lower index, in any order."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    dims = tl.arange(0, D_PAD)
    z = tl.load(z_ptr + rows[:, None] * stride_z + dims[None, :],
                mask=row_ok[:, None] & (dims < D)[None, :], other=0.0).to(tl.float32)
    denom = tl.maximum(tl.sqrt_rn(tl.sum(z * z, axis=1)), 1e-12)
    finite = tl.sum((tl.abs(z) < float("inf")).to(tl.int32), axis=1) == D_PAD  # NaN fails too
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    k_lo = tl.program_id(1) * codes_per_split
    k_hi = tl.minimum(k_lo + codes_per_split, K)
    best_idx = tl.zeros([BLOCK_N], tl.int32) + k_lo
    for start in range(k_lo, k_hi, BLOCK_K):
        codes = start + tl.arange(0, BLOCK_K)
        code_ok = codes < k_hi
        # z.c as D rank-1 updates in a fixed order: every (latent, code) pair is rounded the
        # same way wherever it sits in the tile, so duplicate codes tie exactly (a tl.dot need
        # not guarantee that). A runtime loop over d (re-reading z columns from L1) keeps the
        # registers bounded for D up to 64; unrolled, it spills.
        sq = tl.load(sq_ptr + codes, mask=code_ok, other=float("inf"))
        dist = tl.zeros([BLOCK_N, BLOCK_K], tl.float32) + sq[None, :]
        for d in range(D):
            zd = tl.load(z_ptr + rows * stride_z + d, mask=row_ok, other=0.0).to(tl.float32)
            if L2_NORM:
                zd = tl.div_rn(zd, denom)
            zd = tl.where(finite, zd, 0.0)  # a non-finite row searches as zero, then gets -1
            cd = tl.load(cbt_ptr + d * K + codes, mask=code_ok, other=0.0)  # -2 c_d
            dist += zd[:, None] * cd[None, :]  # ||c||^2 - 2 z.c: one FMA chain
        tile_min = tl.min(dist, axis=1)
        tile_arg = tl.argmin(dist, axis=1, tie_break_left=True)
        better = tile_min < best  # strict: an equal distance in a later tile keeps the lower index
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, start + tile_arg, best_idx)
    if SPLIT:  # a non-finite latent is never offered: it stays at int64 max, which unpacks to -1
        bits = best.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)  # order-preserving
        tl.atomic_min(out_ptr + rows, (key << 32) | best_idx.to(tl.int64), mask=row_ok & finite)
    else:
        tl.store(out_ptr + rows, tl.where(finite, best_idx.to(tl.int64), -1), mask=row_ok)


def prepare_codebook(codebook, l2_norm):
    """(cbt fp32 [D, K] = -2 x normalised codebook, transposed; sq fp32 [K]) for vq_quantize,
    made once per codebook (janus_fast.ops caches it)."""
    k, d = codebook.shape
    cbt = torch.empty((d, k), dtype=torch.float32, device=codebook.device)
    sq = torch.empty(k, dtype=torch.float32, device=codebook.device)
    _prepare_codebook_kernel[(triton.cdiv(k, PREPARE_BLOCK_K),)](
        codebook, cbt, sq, k, d, L2_NORM=bool(l2_norm), BLOCK_K=PREPARE_BLOCK_K, D_PAD=triton.next_power_of_2(d))
    return cbt, sq


def codebook_splits(blocks_n: int, k: int, block_k: int, slots: int) -> int:
    """Code splits per latent block, as csrc/vq's codebook_splits: the grid runs in whole waves
    of `slots` resident programs and the time goes as waves / splits, so take the fewest waves
    per unit of work (at most one split per BLOCK_K codes, 256 in all); more splits must win by
    10% (each adds atomics and re-reads the latents)."""
    best, best_cost = 1, None
    for s in range(1, min(triton.cdiv(k, block_k), 256) + 1):
        cost = triton.cdiv(blocks_n * s, slots) / s
        if best_cost is None or cost < 0.9 * best_cost:
            best, best_cost = s, cost
    return best


def _slots(device: torch.device) -> int:
    """Programs resident at once: two per SM (a small stand-in under the CPU interpreter)."""
    if device.type != "cuda":
        return 8
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def vq_quantize(z, cbt, sq, l2_norm):
    """Indices int64 [N] of z's nearest codes, from prepare_codebook's (cbt, sq)."""
    n, d = z.shape
    k = sq.shape[0]
    block_k, block_n = QUANTIZE_BLOCKS["BLOCK_K"], QUANTIZE_BLOCKS["BLOCK_N"]
    splits = codebook_splits(triton.cdiv(n, block_n), k, block_k, _slots(z.device)) if n else 1
    per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, per_split)
    if splits > 1:
        out = torch.full((n,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=z.device)
    else:
        out = torch.empty(n, dtype=torch.int64, device=z.device)
    if n == 0:
        return out
    _vq_quantize_kernel[(triton.cdiv(n, block_n), splits)](
        z, z.stride(0), cbt, sq, out, n, k, per_split, D=d, L2_NORM=bool(l2_norm), SPLIT=splits > 1,
        D_PAD=triton.next_power_of_2(d), **QUANTIZE_BLOCKS)
    if splits > 1:
        out = torch.where(out == torch.iinfo(torch.int64).max, -1, out & 0xFFFFFFFF)
    return out
