"""Every op is safe to capture in a CUDA graph: no host sync, and replays recompute (GPU only)."""

import pytest
import torch

from janus_fast import ops
from tests.test_vq import without_near_ties

pytestmark = pytest.mark.gpu


def capture(fn):
    """Warm up on a side stream (compiles kernels), capture fn, return (graph, static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def test_decode_attention_replays_with_new_lengths():
    q = torch.randn(4, 8, 128, device="cuda", dtype=torch.bfloat16)
    kc, vc = (torch.randn(4, 300, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([1, 17, 300, 129], dtype=torch.int32, device="cuda")
    graph, out = capture(lambda: ops.decode_attention(q, kc, vc, lengths))
    for new in ([5, 300, 1, 0], [2, 3, 4, 250]):
        lengths.copy_(torch.tensor(new, dtype=torch.int32))
        q.normal_()
        graph.replay()
        torch.testing.assert_close(out, ops.decode_attention(q, kc, vc, lengths, backend="reference"),
                                   atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("batch,heads", [(2, 16), (32, 32)])  # several splits + combine; one split, no combine
def test_decode_attention_replays_for_janus_shapes(batch, heads):
    q = torch.randn(batch, heads, 128, device="cuda", dtype=torch.bfloat16)
    kc, vc = (torch.randn(batch, 700, heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.full((batch,), 600, dtype=torch.int32, device="cuda")
    graph, out = capture(lambda: ops.decode_attention(q, kc, vc, lengths))
    for new in (1, 350, 700):
        lengths.fill_(new)
        graph.replay()
        torch.testing.assert_close(out, ops.decode_attention(q, kc, vc, lengths, backend="reference"),
                                   atol=2e-2, rtol=2e-2)


def test_flash_attention_bf16_replays():
    """bf16 runs the TMA forward on an H100 (its descriptor workspace comes from the graph's pool)."""
    q, k, v = (torch.randn(2, 576, 16, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    graph, out = capture(lambda: ops.flash_attention(q, k, v))
    q.normal_()
    graph.replay()
    torch.testing.assert_close(out, ops.flash_attention(q, k, v, backend="reference"), atol=2e-2, rtol=2e-2)


def test_flash_attention_replays():
    q, k, v = (torch.randn(2, 129, 4, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    graph, out = capture(lambda: ops.flash_attention(q, k, v, causal=True))
    q.normal_()
    graph.replay()
    torch.testing.assert_close(out, ops.flash_attention(q, k, v, causal=True, backend="reference"),
                               atol=2e-3, rtol=2e-3)


def test_vq_ops_replay():
    z, codebook = torch.randn(1000, 8, device="cuda"), torch.randn(4096, 8, device="cuda")
    ids = torch.randint(0, 4096, (2 * 24 * 24,), device="cuda")
    graph_q, tokens = capture(lambda: ops.vq_quantize(z, codebook))
    graph_l, image = capture(lambda: ops.vq_lookup(ids, codebook, shape=(2, 8, 24, 24)))
    z.copy_(without_near_ties(torch.randn_like(z), codebook, l2_norm=True, keep_shape=True))
    ids.random_(0, 4096)
    graph_q.replay()
    graph_l.replay()
    assert torch.equal(tokens, ops.vq_quantize(z, codebook, backend="reference"))
    torch.testing.assert_close(image, ops.vq_lookup(ids, codebook, shape=(2, 8, 24, 24), backend="reference"))


def test_cfg_sample_replays_draw_new_tokens():
    logits = torch.randn(64, 16384, device="cuda")
    graph, tokens = capture(lambda: ops.cfg_sample(logits, cfg_weight=5.0))
    draws = []
    for _ in range(3):
        graph.replay()
        draws.append(tokens.clone())
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    greedy_graph, greedy = capture(lambda: ops.cfg_sample(logits, cfg_weight=5.0, temperature=0.0))
    greedy_graph.replay()
    assert torch.equal(greedy, ops.cfg_sample(logits, cfg_weight=5.0, temperature=0.0, backend="reference"))
