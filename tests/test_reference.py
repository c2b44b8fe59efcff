"""The references against independent formulations: they are the oracle of every other test."""

import math

import pytest
import torch
import torch.nn.functional as F

from janus_fast.ops import reference as ref
from tests.helpers import chi_square_pvalue


def explicit_attention(q, k, v, causal, scale):
    """Masked softmax written out per (batch, head, query), float64."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    out = torch.zeros(b, sq, hq, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            for i in range(sq):
                visible = [j for j in range(sk) if not causal or j <= i + sk - sq]
                if not visible:
                    continue
                s = torch.stack([(q[bi, i, h] * k[bi, j, kv]).sum() * scale for j in visible])
                p = torch.exp(s - s.max())
                p = p / p.sum()
                out[bi, i, h] = sum(p[n] * v[bi, j, kv] for n, j in enumerate(visible))
    return out


SHAPES = [(1, 1, 1, 1, 1), (2, 5, 7, 4, 2), (1, 9, 4, 2, 2), (2, 3, 3, 6, 1)]  # b, sq, sk, hq, hkv


@pytest.mark.parametrize("b,sq,sk,hq,hkv", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_explicit_softmax(b, sq, sk, hq, hkv, causal):
    q, k, v = (torch.randn(b, s, h, 8, dtype=torch.float64) for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    out, lse = ref.attention(q, k, v, causal, 0.3)
    torch.testing.assert_close(out, explicit_attention(q, k, v, causal, 0.3))
    if causal and sq > sk:  # queries before the first key see nothing
        assert torch.isneginf(lse[:, :, : sq - sk]).all()


def test_attention_matches_sdpa_float64():
    q, k, v = (torch.randn(2, 4, 11, 16, dtype=torch.float64) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out, _ = ref.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), True)
    torch.testing.assert_close(out.transpose(1, 2), expected)


@pytest.mark.parametrize("b,sq,sk,hq,hkv", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_backward_matches_autograd(b, sq, sk, hq, hkv, causal):
    q, k, v = (torch.randn(b, s, h, 8, dtype=torch.float64, requires_grad=True)
               for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    out, lse = ref.attention(q, k, v, causal)
    dout = torch.randn_like(out)
    expected = torch.autograd.grad(out, (q, k, v), dout)
    actual = ref.attention_backward(dout, q, k, v, out.detach(), lse.detach(), causal)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_per_sequence_attention(causal):
    lq, lk = [3, 0, 5, 1], [4, 2, 5, 0]
    cu_q = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32)
    q = torch.randn(sum(lq), 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lk), 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lk), 2, 8, dtype=torch.float64, requires_grad=True)
    out, lse = ref.varlen_attention(q, k, v, cu_q, cu_k, causal)
    for i in range(len(lq)):
        qs, qe, ks, ke = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        expected = explicit_attention(q[None, qs:qe].detach(), k[None, ks:ke].detach(),
                                      v[None, ks:ke].detach(), causal, 8 ** -0.5)[0]
        torch.testing.assert_close(out[qs:qe], expected)
    dout = torch.randn_like(out)
    expected = torch.autograd.grad(out, (q, k, v), dout)
    actual = ref.varlen_attention_backward(dout, q, k, v, out.detach(), lse, cu_q, cu_k, causal)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def test_decode_matches_attention_on_cache_prefix():
    q = torch.randn(3, 4, 8, dtype=torch.float64)
    kc, vc = torch.randn(3, 6, 2, 8, dtype=torch.float64), torch.randn(3, 6, 2, 8, dtype=torch.float64)
    lengths = torch.tensor([1, 6, 0], dtype=torch.int32)
    out = ref.decode_attention(q, kc, vc, lengths)
    for b, n in enumerate(lengths.tolist()):
        expected = explicit_attention(q[b, None, None], kc[b, None, :n], vc[b, None, :n], False, 8 ** -0.5)
        torch.testing.assert_close(out[b], expected[0, 0])


def test_vq_quantize_matches_brute_force():
    z, cb = torch.randn(300, 8), torch.randn(64, 8)
    zn, cn = z.double() / z.double().norm(dim=1, keepdim=True), cb.double() / cb.double().norm(dim=1, keepdim=True)
    expected = ((zn[:, None] - cn[None]) ** 2).sum(-1).argmin(-1)
    assert torch.equal(ref.vq_quantize(z, cb), expected)
    raw = ((z[:, None].double() - cb[None].double()) ** 2).sum(-1).argmin(-1)
    assert torch.equal(ref.vq_quantize(z, cb, l2_norm=False), raw)


def test_vq_quantize_ties_and_zero_rows():
    cb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [2.0, 0.0]])  # rows 1,2 equal; 0,3 equal after norm
    z = torch.tensor([[0.0, 5.0], [3.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    # [1,1] is equidistant from codes 0..3; a zero row is equidistant (distance 1) from all unit rows
    assert ref.vq_quantize(z, cb).tolist() == [1, 0, 0, 0]


def test_vq_lookup_layout():
    cb = torch.randn(10, 4)
    idx = torch.randint(0, 10, (2 * 3 * 5,))
    rows = ref.vq_lookup(idx, cb, l2_norm=False)
    torch.testing.assert_close(rows, cb[idx])
    image = ref.vq_lookup(idx, cb, shape=(2, 4, 3, 5))
    assert image.is_contiguous() and image.shape == (2, 4, 3, 5)
    normed = cb / cb.norm(dim=1, keepdim=True)
    for n in (0, 7, 29):
        b, h, w = n // 15, (n % 15) // 5, n % 5
        torch.testing.assert_close(image[b, :, h, w], normed[idx[n]])


def test_guided_logits_layouts_agree():
    cond, uncond = torch.randn(3, 7), torch.randn(3, 7)
    interleaved = torch.stack([cond, uncond], 1).reshape(6, 7)
    halves = torch.cat([cond, uncond])
    expected = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(ref.guided_logits(interleaved, 4.0, "interleaved"), expected)
    torch.testing.assert_close(ref.guided_logits(halves, 4.0, "halves"), expected)


def sorted_filter(g, top_k, top_p):
    """Top-k then top-p the textbook way (sort, cumulative sum), for tie-free inputs."""
    keep = torch.ones_like(g, dtype=torch.bool)
    if 0 < top_k < g.shape[-1]:
        keep &= g >= torch.sort(g, descending=True).values[:, top_k - 1: top_k]
    p = torch.softmax(g.masked_fill(~keep, -math.inf), -1)
    if top_p < 1:
        values, order = torch.sort(p, descending=True)
        exclusive = values.cumsum(-1) - values
        drop = torch.zeros_like(keep).scatter(1, order, exclusive >= top_p)
        drop[torch.arange(len(p)), p.argmax(-1)] = False
        keep &= ~drop
    p = p * keep
    return p / p.sum(-1, keepdim=True)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.6), (5, 0.8), (0, 0.0), (50, 1.0)])
def test_sampling_probs_filters(top_k, top_p):
    logits = torch.randn(8, 20, dtype=torch.float64)
    g = ref.guided_logits(logits, 3.0) / 0.7
    torch.testing.assert_close(ref.sampling_probs(logits, 3.0, 0.7, top_k, top_p), sorted_filter(g, top_k, top_p))


def test_sampling_filters_keep_ties_together():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).repeat_interleave(2, 0)
    assert (ref.sampling_probs(logits, 1.0, 1.0, 2, 1.0) > 0).tolist() == [[True, True, True, False], [True] * 4]
    p = ref.sampling_probs(logits, 1.0, 1.0, 0, 0.5)
    assert (p > 0).tolist() == [[True, False, False, False], [True] * 4]


@pytest.mark.parametrize("layout", ["interleaved", "halves"])
def test_cfg_sample_frequencies_match_guided_probabilities(layout):
    cond, uncond = torch.randn(1, 6), torch.randn(1, 6)
    n = 40000
    pair = torch.cat([cond, uncond]) if layout == "halves" else torch.stack([cond, uncond], 1).reshape(2, 6)
    logits = pair.repeat(n, 1) if layout == "interleaved" else torch.cat([cond.repeat(n, 1), uncond.repeat(n, 1)])
    tokens = ref.cfg_sample(logits, 2.0, 0.8, generator=torch.Generator().manual_seed(1), layout=layout)
    counts = torch.bincount(tokens, minlength=6).double()
    probs = torch.softmax((uncond + 2.0 * (cond - uncond))[0].double() / 0.8, -1)
    assert chi_square_pvalue(counts, probs) > 1e-4


def test_cfg_sample_temperature_zero_is_argmax_lowest_index():
    logits = torch.tensor([[1.0, 3.0, 3.0], [0.0, 0.0, 0.0]])
    assert ref.cfg_sample(logits, 5.0, 0.0).tolist() == [1]


def test_guided_rows_that_cannot_be_drawn_from_give_minus_one():
    cond, uncond = torch.randn(5, 6), torch.randn(5, 6)
    cond[0, 1] = math.nan
    cond[1, 2] = math.inf
    cond[2] = -math.inf  # g all -inf
    cond[3, :3] = uncond[3, :3] = -math.inf  # masked in both rows: -inf, not NaN
    logits = torch.stack([cond, uncond], 1).reshape(10, 6)
    g = ref.guided_logits(logits, 3.0)
    assert g[3, :3].eq(-math.inf).all() and not g[3].isnan().any()
    assert ref.unusable_rows(g).tolist() == [True, True, True, False, False]
    for t, k, p in ((0.0, 0, 1.0), (1.0, 0, 1.0), (0.5, 2, 0.7)):
        probs = ref.sampling_probs(logits, 3.0, t, k, p)
        assert probs[:3].isnan().all() and not probs[3:].isnan().any() and (probs[3, :3] == 0).all()
        tokens = ref.cfg_sample(logits, 3.0, t, k, p, generator=torch.Generator().manual_seed(0))
        assert tokens[:3].tolist() == [-1] * 3 and tokens[3] >= 3 and tokens[4] >= 0


def test_overflowing_temperature_is_argmax():
    logits = torch.tensor([[1e30, 2e30, 3e30], [0.0, 0.0, 0.0]])
    p = ref.sampling_probs(logits, 1.0, 1e-10)  # 3e30 / 1e-10 overflows
    assert p.tolist() == [[0.0, 0.0, 1.0]]


def test_vq_non_finite_latents_and_bad_indices():
    cb = torch.randn(4, 3)
    z = torch.randn(3, 3)
    z[1, 0] = math.nan
    assert ref.vq_quantize(z, cb)[1] == -1
    rows = ref.vq_lookup(torch.tensor([0, -1, 4]), cb)
    assert not rows[0].isnan().any() and rows[1:].isnan().all()
