"""verify_attention: the Triton kernel (the interpreter on CPU) against the float64 reference with
flash-attn's error rule; W = 1 is decode attention; the causal window; garbage past the window
and non-finite keys a query cannot see; opcheck; bad inputs; a CUDA graph replayed with new lengths."""

import math

import pytest
import torch

import janus_fast.kernels.attention_configs as C
import janus_fast.kernels.attention_decode as K_decode
import janus_fast.kernels.attention_verify as K
from janus_fast import ops
from janus_fast.ops import reference
from tests.helpers import DEVICE, DOT_DTYPES, assert_close_to_reference, grid, nan_like

NAN, INF = float("nan"), float("inf")


def torch_verify(q, k_cache, v_cache, seqlens, scale):
    """Plain torch in the input dtype, one window at a time: the tolerance rule's baseline."""
    w, group = q.shape[1], q.shape[2] // k_cache.shape[2]
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        n = int(seqlens[b])
        kh = k_cache[b, :n].transpose(0, 1).repeat_interleave(group, 0)  # [Hq, n, D]
        vh = v_cache[b, :n].transpose(0, 1).repeat_interleave(group, 0)
        s = (q[b].transpose(0, 1) @ kh.transpose(-1, -2)) * scale  # [Hq, W, n]
        seen = torch.arange(n, device=q.device)[None, :] < (n - (w - 1) + torch.arange(w, device=q.device))[:, None]
        s = s.masked_fill(~seen, -math.inf)
        p = torch.softmax(s.masked_fill(~seen.any(-1, keepdim=True), 0.0), -1) * seen.any(-1, keepdim=True)
        out[b] = (p @ vh).transpose(0, 1)
    return out


def case(b, w, hq, hkv, d, s_max, dtype, lengths=None, device=DEVICE):
    q = torch.randn(b, w, hq, d, dtype=dtype, device=device)
    k_cache, v_cache = (torch.randn(b, s_max, hkv, d, dtype=dtype, device=device) for _ in range(2))
    if lengths is None:  # a window that fills the cache, one shorter than itself, and random ones
        fixed = torch.tensor([s_max, min(w, s_max), max(w - 1, 0), 1, 0])[:b]
        lengths = torch.cat([fixed, torch.randint(0, s_max + 1, (b - fixed.numel(),))])
    return q, k_cache, v_cache, torch.as_tensor(lengths, dtype=torch.int32, device=device), d ** -0.5


def check(out, q, k_cache, v_cache, seqlens, scale):
    exact = reference.verify_attention(q.double(), k_cache.double(), v_cache.double(), seqlens, scale)
    assert_close_to_reference(out, torch_verify(q, k_cache, v_cache, seqlens, scale), exact, name="verify out")


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("shape", grid(
    [(5, 4, 4, 2, 32, 40), (2, 16, 2, 2, 64, 70), (3, 3, 8, 1, 16, 9), (2, 1, 4, 4, 40, 33)],
    [(3, 16, 16, 16, 128, 600), (2, 7, 32, 8, 128, 300), (4, 16, 4, 4, 256, 129), (1, 5, 6, 3, 24, 5)]))
def test_matches_reference(shape, dtype):
    """Odd sizes, head dims that are not powers of two, GQA, windows of 1 and of the whole cache,
    rows whose first queries see no key (length < W) and empty rows."""
    args = case(*shape, dtype)
    out = ops.verify_attention(*args[:4], softmax_scale=args[4], backend="triton")
    check(out, *args)
    empty = args[3] == 0
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))


def test_reference_window_of_one_is_decode():
    q, k_cache, v_cache, seqlens, scale = case(4, 1, 4, 2, 16, 12, torch.float64)
    assert torch.equal(reference.verify_attention(q, k_cache, v_cache, seqlens, scale)[:, 0],
                       reference.decode_attention(q[:, 0], k_cache, v_cache, seqlens, scale))


def test_reference_is_causal_inside_the_window():
    """Query j equals decode attention over the first length - (W - 1 - j) keys."""
    q, k_cache, v_cache, seqlens, scale = case(3, 5, 4, 2, 16, 20, torch.float64, lengths=[20, 7, 3])
    out = reference.verify_attention(q, k_cache, v_cache, seqlens, scale)
    for j in range(5):
        seen = (seqlens - (4 - j)).clamp(min=0)
        torch.testing.assert_close(out[:, j], reference.decode_attention(q[:, j], k_cache, v_cache, seen, scale))


@pytest.mark.parametrize("w, group", grid([(17, 4)], [(16, 4), (130, 1)]))
def test_row_blocks_cover_every_row(w, group):
    """W * group rows in blocks of BLOCK_M: several blocks when the window x group is wide."""
    rows = w * group
    block_m = K.tiles("sm90", 128, 2, rows)[0]
    assert 16 <= block_m <= 64 and (block_m >= rows or rows > 64)
    q, k_cache, v_cache, seqlens, scale = case(2, w, group, 1, 16, w + 3, torch.float32)
    check(K.verify_attention(q, k_cache, v_cache, seqlens, scale), q, k_cache, v_cache, seqlens, scale)


def test_splits_over_the_cache():
    """The decode kernel's fixed splits (SPLIT_KEYS keys) and combine, for a window too."""
    q, k_cache, v_cache, seqlens, scale = case(2, 6, 4, 2, 32, 200, torch.float32, lengths=[200, 151])
    block_n = K.tiles(C.arch(-1), 32, 4, 12)[1]
    assert K_decode._decode_plan(200, block_n)[1] > 1
    check(K.verify_attention(q, k_cache, v_cache, seqlens, scale), q, k_cache, v_cache, seqlens, scale)


def test_a_rows_result_does_not_depend_on_the_batch_or_the_capacity():
    """Splits at fixed key positions, combined in order up to the row's length: a sequence's
    window gives the same bits alone, beside others, and in a cache with more slots."""
    q, k_cache, v_cache, seqlens, scale = case(3, 5, 4, 2, 32, 300, torch.float32, lengths=[290, 140, 7])
    batch = K.verify_attention(q, k_cache, v_cache, seqlens, scale)
    for b in range(3):
        alone = K.verify_attention(q[b:b + 1], k_cache[b:b + 1], v_cache[b:b + 1], seqlens[b:b + 1], scale)
        assert torch.equal(alone, batch[b:b + 1])
    short = K.verify_attention(q[1:2], k_cache[1:2, :150], v_cache[1:2, :150], seqlens[1:2], scale)
    assert torch.equal(short, batch[1:2])  # 2 splits of a 3-split cache


def test_strided_cache_and_query():
    """A cache sliced from a bigger buffer and q as a column view of a projection."""
    q, k_cache, v_cache, seqlens, scale = case(3, 4, 4, 2, 32, 30, torch.float16)
    big = torch.zeros(3, 48, 2, 2, 32, dtype=torch.float16, device=DEVICE)
    big[:, :30, 0], big[:, :30, 1] = k_cache, v_cache
    proj = torch.zeros(3, 4, 6, 32, dtype=torch.float16, device=DEVICE)
    proj[:, :, :4] = q
    out = K.verify_attention(proj[:, :, :4], big[:, :30, 0], big[:, :30, 1], seqlens, scale)
    check(out, q, k_cache, v_cache, seqlens, scale)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("s_max", grid([40], [300]))  # 300: several splits on the interpreter's plan
def test_unseen_garbage_is_never_read(backend, s_max):
    """NaN/inf past cache_seqlens, and in window keys a query cannot see yet, leave every output
    bit-identical; a NaN value inside the window reaches exactly the queries that see it."""
    b, w, hq, hkv, d = 3, 5, 4, 2, 32
    q, kc, vc, lengths, scale = case(b, w, hq, hkv, d, s_max, torch.float32, lengths=[s_max, s_max // 2 + 3, 2])
    clean = ops.verify_attention(q, kc, vc, lengths, backend=backend)
    kg, vg = kc.clone(), vc.clone()
    for row, n in enumerate(lengths.tolist()):
        kg[row, n:], vg[row, n:] = NAN, INF
    assert torch.equal(ops.verify_attention(q, kg, vg, lengths, backend=backend), clean)
    n = int(lengths[1])
    vg[1, n - 2, 1, 7] = NAN  # the window's 4th key (j = 3) in kv head 1 = query heads 2, 3
    out = ops.verify_attention(q, kg, vg, lengths, backend=backend)
    expected = torch.zeros_like(out, dtype=torch.bool)
    expected[1, 3:, 2:, 7] = True
    assert torch.equal(out.isnan(), expected)


def test_nothing_left_unwritten(monkeypatch):
    """Every output element is written (empty buffers filled with NaN first)."""
    q, k_cache, v_cache, seqlens, scale = case(4, 3, 4, 2, 24, 20, torch.float32)
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: nan_like(empty_like(t, **kw)))
    out = K.verify_attention(q, k_cache, v_cache, seqlens, scale)
    assert not out.isnan().any()


def test_opcheck():
    q, k_cache, v_cache, seqlens, scale = case(2, 3, 2, 1, 16, 8, torch.float32)
    for backend in ("reference", "triton"):
        torch.library.opcheck(torch.ops.janus_fast.verify_attention.default,
                              (q, k_cache, v_cache, seqlens, scale, backend))


def test_bad_inputs():
    q, k_cache, v_cache, seqlens, _ = case(2, 3, 4, 2, 16, 10, torch.float32)
    with pytest.raises(ValueError, match="4 dimensions"):
        ops.verify_attention(q[:, 0], k_cache, v_cache, seqlens)
    with pytest.raises(ValueError, match="batch sizes of q and k_cache"):
        ops.verify_attention(q[:1], k_cache, v_cache, seqlens)
    with pytest.raises(TypeError, match="cache_seqlens"):
        ops.verify_attention(q, k_cache, v_cache, seqlens.long())
    with pytest.raises(ValueError, match="cache_seqlens must lie in"):
        ops.verify_attention(q, k_cache, v_cache, seqlens + 11)
    with pytest.raises(ValueError, match="multiple of the kv head count"):
        ops.verify_attention(q[:, :, :3], k_cache, v_cache, seqlens)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 16, 16, 16, 128, 616), (32, 16, 32, 32, 128, 616), (2, 16, 32, 8, 128, 4096)])
def test_gpu_bf16_janus_shapes(shape):
    args = case(*shape, torch.bfloat16, device="cuda")
    check(ops.verify_attention(*args[:4], softmax_scale=args[4]), *args)


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_with_new_lengths():
    q, k_cache, v_cache, seqlens, scale = case(4, 16, 16, 16, 128, 640, torch.bfloat16, device="cuda")
    K.verify_attention(q, k_cache, v_cache, seqlens, scale)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.verify_attention(q, k_cache, v_cache, seqlens, scale)
    for lengths in ([16, 17, 300, 640], [640] * 4, [5, 0, 16, 100]):
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        graph.replay()
        check(out.clone(), q, k_cache, v_cache, seqlens, scale)
