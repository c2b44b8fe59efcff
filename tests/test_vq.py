"""vq_quantize / vq_lookup: the Triton kernels (the interpreter on CPU) and the CUDA kernels
(GPU) against janus_fast/ops/reference.py.

vq_quantize must equal the reference exactly. The kernels and the reference both compute the
expanded fp32 distance but round differently (the reference adds ||z||^2, sums in another
order), so they can only disagree where a latent's two best codes are within rounding (~1e-6)
of each other. Random inputs therefore drop such near-ties (measured in float64) before an exact
comparison, and ties are tested where they are exact in every formula: duplicate codebook rows,
mirror-symmetric codes, zero vectors against codes of exactly unit norm.
"""

import pytest
import torch

from janus_fast import ops
from janus_fast.ops import reference as ref
from tests.helpers import DEVICE, assert_close_to_reference, grid

BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
CPU_DTYPES = [torch.float32, torch.float16]
GPU_ONLY = pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter has no bfloat16 arithmetic")


def poison_allocator(numel: int, dtype: torch.dtype) -> None:
    """Leave a NaN-filled block in the caching allocator, so an output the kernel never writes
    shows up as NaN rather than as a plausible stale value."""
    torch.full((numel,), float("nan"), dtype=dtype, device=DEVICE)


def normalised64(x: torch.Tensor, l2_norm: bool) -> torch.Tensor:
    x = x.double()
    return torch.nn.functional.normalize(x, dim=-1) if l2_norm else x


def without_near_ties(z: torch.Tensor, codebook: torch.Tensor, l2_norm: bool, gap: float = 1e-5,
                      keep_shape: bool = False) -> torch.Tensor:
    """The rows of z whose best code beats the second best by more than `gap` (float64); with
    keep_shape, near-tied rows are replaced by a copy of a clear row instead of dropped."""
    if codebook.shape[0] < 2:
        return z
    d = torch.cdist(normalised64(z, l2_norm), normalised64(codebook, l2_norm)) ** 2
    two = d.topk(2, dim=1, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > gap
    if not keep_shape:
        return z[clear]
    return torch.where(clear[:, None], z, z[clear][:1])


def random_case(n, k, d, dtype, l2_norm):
    codebook = torch.randn(k, d, device=DEVICE).to(dtype)
    z = without_near_ties(torch.randn(n, d, device=DEVICE).to(dtype), codebook, l2_norm)
    return z, codebook


# ---------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l2_norm", [True, False])
@pytest.mark.parametrize("n,k,d", grid([(1, 1, 8), (37, 300, 8), (130, 1000, 8), (70, 129, 3), (33, 20, 17),
                                        (40, 77, 64)],
                                       [(2000, 16384, 8), (999, 4096, 32), (5000, 513, 8)]))
@pytest.mark.parametrize("dtype", CPU_DTYPES + [pytest.param(torch.bfloat16, marks=GPU_ONLY)])
def test_quantize_equals_reference(backend, l2_norm, n, k, d, dtype):
    z, codebook = random_case(n, k, d, dtype, l2_norm)
    poison_allocator(n, torch.float64)
    got = ops.vq_quantize(z, codebook, l2_norm=l2_norm, backend=backend)
    assert got.dtype == torch.int64 and got.shape == (z.shape[0],)
    assert torch.equal(got, ref.vq_quantize(z, codebook, l2_norm))


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_strided_latents(backend):
    codebook = torch.randn(50, 8, device=DEVICE)
    wide = torch.randn(60, 16, device=DEVICE)
    wide[:, :8] = without_near_ties(wide[:, :8], codebook, True, keep_shape=True)
    z = wide[:, :8]
    assert z.stride(0) == 16
    assert torch.equal(ops.vq_quantize(z, codebook, backend=backend), ref.vq_quantize(z, codebook))


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_exact_ties_go_to_the_lowest_index(backend):
    base = torch.randn(300, 8, device=DEVICE)
    # every code three times (a power-of-two multiple normalises bit-identically), the copies in
    # later codebook tiles (Triton: 128 codes, CUDA: 512) and splits: copies tie exactly and lose
    codebook = torch.cat([base, base, base * 4.0])
    z = without_near_ties(torch.randn(200, 8, device=DEVICE), base, True)
    got = ops.vq_quantize(z, codebook, backend=backend)
    assert torch.equal(got, ref.vq_quantize(z, codebook))
    assert (got < 300).all()
    # mirror symmetry: [1, 1] is equidistant from [1, 0] and [0, 1] (and their scaled copies)
    cb = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [-1.0, 0.0]], device=DEVICE)
    z = torch.tensor([[1.0, 1.0], [3.0, 3.0], [0.0, 5.0], [4.0, 0.0]], device=DEVICE)
    assert ops.vq_quantize(z, cb, backend=backend).tolist() == ref.vq_quantize(z, cb).tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l2_norm", [True, False])
def test_quantize_zero_vectors(backend, l2_norm):
    # codes of exactly unit norm (signed basis vectors, scaled) and zero codes; zero latents
    eye = torch.eye(8, device=DEVICE)
    scale = torch.ones(8, device=DEVICE) if not l2_norm else torch.arange(1.0, 9.0, device=DEVICE)[:, None]
    unit = torch.cat([eye * scale, -eye * scale])
    z = torch.cat([torch.zeros(3, 8, device=DEVICE), without_near_ties(torch.randn(50, 8, device=DEVICE), unit,
                                                                       l2_norm)])
    # no zero code: a zero latent is equally far from every unit code -> the first one
    got = ops.vq_quantize(z, unit, l2_norm=l2_norm, backend=backend)
    assert torch.equal(got, ref.vq_quantize(z, unit, l2_norm))
    assert got[:3].tolist() == [0, 0, 0]
    # zero codes stay zero under normalisation: a zero latent lands on the first of them
    with_zero = torch.cat([unit[:5], torch.zeros(2, 8, device=DEVICE), unit[5:]])
    got = ops.vq_quantize(z, with_zero, l2_norm=l2_norm, backend=backend)
    assert torch.equal(got, ref.vq_quantize(z, with_zero, l2_norm))
    assert got[:3].tolist() == [5, 5, 5]


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("l2_norm", [True, False])
def test_quantize_non_finite_latents_get_minus_one(backend, l2_norm):
    z, codebook = random_case(40, 300, 8, torch.float32, l2_norm)
    z[3, 2], z[7, 0], z[8, 7], z[9] = float("nan"), float("inf"), float("-inf"), float("nan")
    indices, rows = ops.vq_quantize(z, codebook, l2_norm=l2_norm, return_rows=True, backend=backend)
    bad = torch.zeros(z.shape[0], dtype=torch.bool, device=DEVICE)
    bad[[3, 7, 8, 9]] = True
    assert torch.equal(indices < 0, bad) and (indices[bad] == -1).all()
    assert torch.equal(indices[~bad], ref.vq_quantize(z[~bad], codebook, l2_norm))
    assert rows[bad].isnan().all() and not rows[~bad].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_return_rows(backend):
    z, codebook = random_case(50, 64, 8, torch.float32, True)
    indices, rows = ops.vq_quantize(z, codebook, return_rows=True, backend=backend)
    assert torch.equal(indices, ref.vq_quantize(z, codebook))
    torch.testing.assert_close(rows, ref.vq_lookup(indices, codebook))


@pytest.mark.parametrize("backend", BACKENDS)
def test_prepared_codebook_is_cached_until_the_codebook_changes(backend, monkeypatch):
    from janus_fast.ops import vq as vq_ops

    codebook = torch.nn.Parameter(torch.randn(300, 8, device=DEVICE))
    z = without_near_ties(torch.randn(64, 8, device=DEVICE), codebook.detach(), True)
    calls = []
    real = vq_ops._impl

    def counting(backend_, name):
        if "prepare" in name:
            calls.append(name)
        return real(backend_, name)

    monkeypatch.setattr(vq_ops, "_impl", counting)
    for _ in range(3):  # the model passes codebook.detach(): a new tensor each call, one storage
        assert torch.equal(ops.vq_quantize(z, codebook.detach(), backend=backend), ref.vq_quantize(z, codebook))
    assert len(calls) == 1
    with torch.no_grad():
        codebook[:150] = codebook[150:].clone()  # in place: the version counter moves
    z = without_near_ties(torch.randn(64, 8, device=DEVICE), codebook.detach(), True)
    assert torch.equal(ops.vq_quantize(z, codebook.detach(), backend=backend), ref.vq_quantize(z, codebook.detach()))
    assert len(calls) == 2
    ops.vq_quantize(z, codebook.detach(), l2_norm=False, backend=backend)  # another preparation
    assert len(calls) == 3
    with torch.inference_mode():  # inference tensors have no version counter: never cached
        fresh = torch.randn(50, 8, device=DEVICE)
        zi = without_near_ties(torch.randn(20, 8, device=DEVICE), fresh, True)
        assert torch.equal(ops.vq_quantize(zi, fresh, backend=backend), ref.vq_quantize(zi, fresh))
        ops.vq_quantize(zi, fresh, backend=backend)
    assert len(calls) == 5


def test_quantize_empty():
    out = ops.vq_quantize(torch.randn(0, 8, device=DEVICE), torch.randn(5, 8, device=DEVICE), backend="triton")
    assert out.shape == (0,) and out.dtype == torch.int64


# ---------------------------------------------------------------------------- lookup


def lookup_cases():
    return grid([((7,), 16, 8, None), ((2, 3, 5), 10, 4, (2, 4, 3, 5)), ((2, 9), 33, 3, (2, 3, 3, 3)),
                 ((1,), 1, 8, (1, 8, 1, 1)), ((0,), 4, 8, None), ((0,), 4, 8, (0, 8, 3, 3)), ((5,), 6, 100, None)],
                [((16, 576), 16384, 8, (16, 8, 24, 24)), ((3000,), 50, 64, (1, 64, 50, 60))])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l2_norm", [True, False])
@pytest.mark.parametrize("idx_shape,k,d,shape", lookup_cases())
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", CPU_DTYPES + [pytest.param(torch.bfloat16, marks=GPU_ONLY)])
def test_lookup_matches_reference(backend, l2_norm, idx_shape, k, d, shape, index_dtype, dtype):
    codebook = torch.randn(k, d, device=DEVICE).to(dtype)
    codebook[0] = 0  # a zero row stays zero
    indices = torch.randint(0, k, idx_shape, device=DEVICE, dtype=index_dtype)
    expected_shape = shape if shape is not None else (*idx_shape, d)
    poison_allocator(max(indices.numel(), 1) * d, dtype)
    got = ops.vq_lookup(indices, codebook, l2_norm=l2_norm, shape=shape, backend=backend)
    assert got.shape == expected_shape and got.dtype == dtype and got.is_contiguous()
    exact = ref.vq_lookup(indices, codebook.double(), l2_norm, shape)
    assert_close_to_reference(got, ref.vq_lookup(indices, codebook, l2_norm, shape), exact, name="lookup")


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_lookup_out_of_range(backend):
    codebook = torch.randn(16, 8, device=DEVICE)
    bad = torch.tensor([0, 16, -1], device=DEVICE)
    with pytest.raises(ValueError, match="indices must lie in \\[0, 16\\)"):
        ops.vq_lookup(bad, codebook, check_indices=True, backend=backend)
    # without the (host-syncing) range check, a bad index gives a NaN row, never a stray read
    with ops.no_value_checks():
        rows = ops.vq_lookup(bad, codebook, backend=backend)
    torch.testing.assert_close(rows[0], ref.vq_lookup(bad[:1], codebook)[0])
    assert rows[1:].isnan().all()
    assert torch.equal(rows.isnan(), ops.vq_lookup(bad, codebook, check_indices=False, backend=backend).isnan())
    if DEVICE == "cpu":  # the check is free on the CPU and on by default
        with pytest.raises(ValueError, match="indices must lie in"):
            ops.vq_lookup(bad, codebook, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_lookup_on_cuda_does_not_sync_by_default(backend):
    codebook = torch.randn(16, 8, device="cuda")
    bad = torch.tensor([0, 16, -1], device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows = ops.vq_lookup(bad, codebook, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rows[1:].isnan().all() and not rows[0].isnan().any()


# ---------------------------------------------------------------------------- op registration


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    z, codebook = random_case(9, 16, 8, torch.float32, True)
    torch.library.opcheck(torch.ops.janus_fast.vq_quantize, (z, codebook, True, backend))
    indices = torch.randint(0, 16, (8,), device=DEVICE)
    torch.library.opcheck(torch.ops.janus_fast.vq_lookup, (indices, codebook, True, [2, 8, 2, 2], backend))
    torch.library.opcheck(torch.ops.janus_fast.vq_lookup, (indices, codebook, False, None, backend))


@pytest.mark.gpu
def test_opcheck_cuda_extension_ops():
    codebook = torch.randn(16, 8, device="cuda", dtype=torch.float16)
    z = torch.randn(9, 8, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.janus_fast_C.vq_prepare_codebook, (codebook, True))
    work, sq = torch.ops.janus_fast_C.vq_prepare_codebook(codebook, True)
    torch.library.opcheck(torch.ops.janus_fast_C.vq_quantize, (z, work, sq, True))
    indices = torch.randint(0, 16, (8,), device="cuda", dtype=torch.int32)
    torch.library.opcheck(torch.ops.janus_fast_C.vq_lookup, (indices, codebook, True, [2, 8, 2, 2]))
    torch.library.opcheck(torch.ops.janus_fast_C.vq_lookup, (indices, codebook, False, None))


@pytest.mark.gpu
def test_quantize_large_batch_memory_is_linear():
    # 147456 latents x 16384 codes: the torch expanded form would need a 9 GiB temporary
    codebook = torch.randn(16384, 8, device="cuda")
    z = torch.randn(147456, 8, device="cuda")
    for backend in ("cuda", "triton"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        got = ops.vq_quantize(z, codebook, backend=backend)
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - before < 16 * 2**20
        sample = torch.arange(0, z.shape[0], 97, device="cuda")
        zs = without_near_ties(z[sample], codebook, True)
        keep = torch.isin(z[sample], zs).all(1)
        assert torch.equal(got[sample][keep], ref.vq_quantize(z[sample][keep], codebook))
