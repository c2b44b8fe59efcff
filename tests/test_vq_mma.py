"""The tensor-core (3xTF32 mma.sync) codebook search of csrc/vq/vq_mma.cuh.

On the CPU: a float64 emulation of its arithmetic (the tf32 split, exact products, fp32
accumulation that may truncate, as the tensor cores do) shows that every estimate lies within
the kernel's margin of the fp32 FMA chain it re-checks with, and that the kernel's pruning (per
thread, codes in increasing order, a running upper bound) then picks exactly the chain's argmin,
near-ties and exact ties included. On a GPU: the kernel against the same chain, evaluated in
float64 with fp32 rounding per step (exact indices, no near-tie filtering), and against the
reference where the tests of test_vq.py compare exactly.
"""

import os
import re

import pytest
import torch

from janus_fast import ops
from janus_fast.ops import reference as ref
from tests.helpers import DEVICE
from tests.test_vq import without_near_ties

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS32 = 2.0 ** -23


def rel_err(dp: int) -> float:
    """vq_mma.cuh's rel_err (the test below checks that the source says the same)."""
    return (4.0 * dp + 16.0) * EPS32


def test_margin_formula_is_the_kernels():
    with open(os.path.join(ROOT, "csrc", "vq", "vq_mma.cuh")) as f:
        src = f.read()
    assert re.search(r"rel_err\(int dp\) \{ return \(4\.f \* dp \+ 16\.f\) \* 1\.1920928955078125e-07f; \}", src)


# ------------------------------------------------------------------------ emulation (CPU)


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """cvt.rna.tf32.f32: fp32 rounded to 10 mantissa bits, to nearest, ties away from zero."""
    bits = x.float().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def fp32_toward_zero(s: torch.Tensor) -> torch.Tensor:
    """float64 -> fp32 rounded toward zero (the tensor cores' accumulation may truncate)."""
    f = s.float()
    over = f.double().abs() > s.abs()
    return torch.where(over, torch.nextafter(f, torch.zeros_like(f)), f)


def chain(z: torch.Tensor, w: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """[N, K] fp32 distances as vq.cu's FMA chain: sq_k, then fmaf(z_j, w_kj, .) for j in order
    (float64 product + sum is the exact fma before its one rounding to fp32)."""
    dist = sq[None, :].float().expand(z.shape[0], -1)
    for j in range(z.shape[1]):
        dist = (z[:, j, None].double() * w[None, :, j].double() + dist.double()).float()
    return dist


def estimate(z: torch.Tensor, w: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """[N, K] 3xTF32 estimates: per 8-dimension step the mma adds lo_z hi_w, hi_z lo_w, hi_z hi_w
    (exact products, summed exactly, rounded toward zero to fp32), then sq + acc in fp32."""
    z_hi, w_hi = to_tf32(z), to_tf32(w)
    z_lo, w_lo = to_tf32(z - z_hi), to_tf32(w - w_hi)
    acc = torch.zeros(z.shape[0], w.shape[0], dtype=torch.float32)
    for s in range(0, z.shape[1], 8):
        cols = slice(s, s + 8)
        for a, b in ((z_lo, w_hi), (z_hi, w_lo), (z_hi, w_hi)):
            acc = fp32_toward_zero(acc.double() + a[:, cols].double() @ b[:, cols].double().T)
    return sq[None, :] + acc


def prepared(codebook: torch.Tensor, l2_norm: bool):
    """(w = -2c, sq = ||c||^2) as the prepare kernel makes them (fp32, chains in j order)."""
    c = codebook.float()
    if l2_norm:
        sum_sq = chain(c, c, torch.zeros(c.shape[0]))[range(c.shape[0]), range(c.shape[0])]
        c = c / torch.clamp(sum_sq.sqrt(), min=1e-12)[:, None]
    sq = chain(c, c, torch.zeros(c.shape[0]))[range(c.shape[0]), range(c.shape[0])]
    return -2.0 * c, sq


def kernel_pick(est: torch.Tensor, exact: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """vq_mma.cuh's selection: each of a quad's 4 threads sees codes 2t, 2t+1 of every 8 in
    increasing order, keeps U = min(estimate + margin) and re-checks (fp32 chain) a code only
    when estimate - margin <= U; the quad keeps the smallest (distance, index)."""
    n, k = est.shape
    inf = torch.full((n,), float("inf"))
    winners = []
    for t in range(4):
        upper, best, best_idx = inf.clone(), inf.clone(), torch.full((n,), k)
        for c in [c for c in range(k) if (c % 8) // 2 == t]:
            check = est[:, c] - margin[:, c] <= upper
            better = check & (exact[:, c] < best)
            best = torch.where(better, exact[:, c], best)
            best_idx = torch.where(better, torch.full_like(best_idx, c), best_idx)
            upper = torch.minimum(upper, est[:, c] + margin[:, c])
        winners.append((best, best_idx))
    best, best_idx = winners[0]
    for other, other_idx in winners[1:]:
        take = (other < best) | ((other == best) & (other_idx < best_idx))
        best, best_idx = torch.where(take, other, best), torch.where(take, other_idx, best_idx)
    return best_idx


def near_tie_case(n: int, k: int, d: int, gen: torch.Generator):
    """Codes in groups of 4 near-copies (1e-7 apart, some exact copies), latents near them and
    halfway between two groups: many estimates within the margin of each other."""
    base = torch.randn(k // 4, d, generator=gen)
    codebook = base.repeat_interleave(4, 0) + 1e-7 * torch.randn(k, d, generator=gen)
    codebook[1::8] = codebook[0::8]  # exact copies: the lower index must win
    pick = torch.randint(0, k // 4, (n, 2), generator=gen)
    z = 0.5 * (base[pick[:, 0]] + base[pick[:, 1]]) + 1e-6 * torch.randn(n, d, generator=gen)
    z[: n // 2] = base[pick[: n // 2, 0]] + 1e-7 * torch.randn(n // 2, d, generator=gen)
    return z, codebook


@pytest.mark.parametrize("d", [8, 16, 64])
@pytest.mark.parametrize("l2_norm", [True, False])
@pytest.mark.parametrize("case", ["random", "near_ties"])
def test_emulated_estimates_lie_within_the_margin_and_the_recheck_is_exact(d, l2_norm, case):
    gen = torch.Generator().manual_seed(d + 100 * l2_norm)
    n, k = 96, 256
    if case == "random":
        z, codebook = 3 * torch.randn(n, d, generator=gen), torch.randn(k, d, generator=gen)
    else:
        z, codebook = near_tie_case(n, k, d, gen)
    w, sq = prepared(codebook, l2_norm)
    zn = z.float()
    if l2_norm:
        sum_sq = (zn.double() ** 2).sum(1).float()  # (the margin needs only ||z||^2 roughly)
        zn = zn / torch.clamp(sum_sq.sqrt(), min=1e-12)[:, None]
    zsq = (zn.double() ** 2).sum(1).float()
    exact, est = chain(zn, w, sq), estimate(zn, w, sq)
    margin = rel_err(d) * (2 * sq[None, :] + zsq[:, None])
    err = (est.double() - exact.double()).abs()
    assert torch.isfinite(err).all() and (err <= margin).all(), (err / margin).max()
    assert (err / margin).max() > 1e-3  # the bound is within ~1000x of the error actually made
    chain_argmin = torch.argmin(exact, dim=1)  # first minimum: lowest index
    assert torch.equal(kernel_pick(est, exact, margin), chain_argmin)
    if case == "near_ties":  # the estimates alone, or a re-check without the margin, pick otherwise
        assert not torch.equal(torch.argmin(est, dim=1), chain_argmin)
        assert not torch.equal(kernel_pick(est, exact, 0 * margin), chain_argmin)


# ------------------------------------------------------------------------------ GPU


def chain_argmin_cuda(z: torch.Tensor, codebook: torch.Tensor, l2_norm: bool) -> torch.Tensor:
    """vq.cu's fp32 FMA chain on the extension's own prepared codebook, evaluated in float64
    with fp32 rounding per step, normalised as the kernels normalise; -1 for non-finite rows."""
    work, sq = torch.ops.janus_fast_C.vq_prepare_codebook(codebook.contiguous(), l2_norm)
    x = z.float()
    if l2_norm:
        sum_sq = torch.zeros(x.shape[0], device=x.device)
        for j in range(x.shape[1]):
            sum_sq = (x[:, j].double() ** 2 + sum_sq.double()).float()
        x = x / torch.clamp(torch.sqrt(sum_sq), min=1e-12)[:, None]
    w = work[:, : x.shape[1]]
    dist = sq[None, :].expand(x.shape[0], -1)
    for j in range(x.shape[1]):
        dist = (x[:, j, None].double() * w[None, :, j].double() + dist.double()).float()
    out = torch.argmin(dist, dim=1)
    return out.masked_fill(~torch.isfinite(z).all(-1), -1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("l2_norm", [True, False])
@pytest.mark.parametrize("n,k,d", [(1, 1, 8), (130, 1000, 8), (9216, 16384, 8), (999, 4096, 32), (257, 77, 64),
                                   (300, 513, 24), (70, 129, 16)])
def test_mma_search_equals_the_fma_chain_and_the_reference(dtype, l2_norm, n, k, d):
    torch.manual_seed(n + k + d)
    codebook = torch.randn(k, d, device=DEVICE).to(dtype)
    z = torch.randn(n, d, device=DEVICE).to(dtype)
    got = ops.vq_quantize(z, codebook, l2_norm=l2_norm, backend="cuda")
    assert torch.equal(got, chain_argmin_cuda(z, codebook, l2_norm))
    clear = without_near_ties(z, codebook, l2_norm)
    assert torch.equal(ops.vq_quantize(clear, codebook, l2_norm=l2_norm, backend="cuda"),
                       ref.vq_quantize(clear, codebook, l2_norm))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [8, 32])
def test_mma_search_on_near_ties(dtype, d):
    gen = torch.Generator().manual_seed(d)
    z, codebook = near_tie_case(4096, 2048, d, gen)
    z, codebook = z.to(DEVICE, dtype), codebook.to(DEVICE, dtype)
    z[5, 3] = float("nan")
    got = ops.vq_quantize(z, codebook, l2_norm=True, backend="cuda")
    assert got[5] == -1
    assert torch.equal(got, chain_argmin_cuda(z, codebook, True))
