"""Our Llama (janus_fast.models.llama) against transformers' LlamaForCausalLM with the same
weights, in float32 (transformers' eager attention turns left-padded float64 batches into NaN): logits without and with the KV cache, left padding, chunked prefill, greedy
generate, and gradients through the training path."""

import pytest
import torch

from janus_fast.models.config import LlamaConfig
from janus_fast.models.llama import KVCache, LlamaForCausalLM

transformers = pytest.importorskip("transformers")

CFG = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=256)
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ours = LlamaForCausalLM(CFG).eval()
    with torch.no_grad():  # non-trivial norms so a misplaced weight shows
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf_cfg = transformers.LlamaConfig(
        hidden_size=CFG.hidden_size, intermediate_size=CFG.intermediate_size,
        num_hidden_layers=CFG.num_hidden_layers, num_attention_heads=CFG.num_attention_heads,
        num_key_value_heads=CFG.num_key_value_heads, vocab_size=CFG.vocab_size,
        max_position_embeddings=CFG.max_position_embeddings, rms_norm_eps=1e-6, tie_word_embeddings=False,
        attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return ours, hf


def hf_logits(hf, ids, mask=None):
    kwargs = {}
    if mask is not None:  # positions from 0 at each row's first real token, as generate does
        kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    with torch.no_grad():
        return hf(input_ids=ids, **kwargs).logits


def left_padded(lengths, total):
    ids = torch.randint(0, CFG.vocab_size, (len(lengths), total))
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, total - n:] = 1
    return ids, mask


def test_logits_match_transformers(models):
    ours, hf = models
    ids = torch.randint(0, CFG.vocab_size, (2, 11))
    with torch.no_grad():
        got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, hf_logits(hf, ids), **TOL)


def test_left_padding_matches_transformers(models):
    ours, hf = models
    ids, mask = left_padded([9, 4, 1], 9)
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
    want = hf_logits(hf, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], **TOL)


def test_padded_row_equals_unpadded_row(models):
    ours, _ = models
    ids, mask = left_padded([7, 3], 7)
    with torch.no_grad():
        batch = ours(input_ids=ids, attention_mask=mask).logits
        alone = ours(input_ids=ids[1:, 4:]).logits
    torch.testing.assert_close(batch[1, 4:], alone[0], **TOL)


@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_decode_matches_full_forward(models, padded):
    ours, hf = models
    lengths = [10, 6] if padded else [10, 10]
    ids, mask = left_padded(lengths, 10)
    prefix = 6
    want = hf_logits(hf, ids, mask)
    with torch.no_grad():
        out = ours(input_ids=ids[:, :prefix], attention_mask=mask[:, :prefix], use_cache=True)
        assert isinstance(out.past_key_values, KVCache)
        got = [out.logits[:, -1]]
        cache = out.past_key_values
        for t in range(prefix, 10):  # one token at a time, mask growing as in transformers
            out = ours(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            got.append(out.logits[:, -1])
    got = torch.stack(got, 1)
    torch.testing.assert_close(got, want[:, prefix - 1:], **TOL)
    assert cache.seqlens.tolist() == lengths


def test_chunked_prefill_with_cache(models):
    """A multi-token chunk after cached tokens (packed path with per-row cache offsets)."""
    ours, hf = models
    ids, mask = left_padded([9, 5], 9)
    want = hf_logits(hf, ids, mask)
    with torch.no_grad():
        first = ours(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        second = ours(input_ids=ids[:, 5:], attention_mask=mask, past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(second.logits, want[:, 5:], **TOL)


def test_cache_grows_past_its_capacity(models):
    ours, hf = models
    ids = torch.randint(0, CFG.vocab_size, (1, 8))
    cache = ours.model.new_cache(1, 2)
    with torch.no_grad():
        logits = [ours(input_ids=ids[:, t:t + 1], past_key_values=cache).logits[:, 0] for t in range(8)]
    assert cache.capacity >= 8
    torch.testing.assert_close(torch.stack(logits, 1), hf_logits(hf, ids), **TOL)


def test_greedy_generate_matches_transformers(models):
    ours, hf = models
    ids, mask = left_padded([6, 3], 6)
    ids = ids.masked_fill(mask == 0, 0)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
    assert got.tolist() == want.tolist()


def test_generate_from_embeddings_stops_at_eos(models):
    ours, _ = models
    embeds = ours.get_input_embeddings()(torch.randint(0, CFG.vocab_size, (2, 4)))
    first = ours.generate(inputs_embeds=embeds, max_new_tokens=3)
    eos = int(first[0, 0])  # make row 0 finish at once
    out = ours.generate(inputs_embeds=embeds, max_new_tokens=3, eos_token_id=eos, pad_token_id=-1)
    assert out.shape[1] <= 3 and out[0, 0] == eos and (out[0, 1:] == -1).all()


def test_sampled_generate_is_reproducible(models):
    ours, _ = models
    ids = torch.randint(0, CFG.vocab_size, (2, 4))
    run = [ours.generate(input_ids=ids, max_new_tokens=4, do_sample=True, temperature=1.0, top_p=0.9,
                         generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(run[0], run[1])


def test_gradients_flow(models):
    ours, _ = models
    ids = torch.randint(0, CFG.vocab_size, (2, 5))
    ours.zero_grad()
    ours(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())
    ours.zero_grad()


def test_bad_inputs(models):
    ours, _ = models
    ids = torch.randint(0, CFG.vocab_size, (2, 5))
    with pytest.raises(ValueError, match="exactly one"):
        ours(input_ids=ids, inputs_embeds=torch.zeros(2, 5, 64))
    with pytest.raises(ValueError, match="attention_mask"):
        ours(input_ids=ids, attention_mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="KVCache"):
        ours(input_ids=ids, past_key_values=((None, None),))
    with pytest.raises(ValueError, match="left-padded"):
        ours.generate(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 1, 0]] * 2))


@pytest.mark.gpu
def test_decode_step_replays_in_a_cuda_graph():
    """decode_step is free of host syncs: captured once, a replay equals an eager step."""
    torch.manual_seed(0)
    lm = LlamaForCausalLM(CFG).cuda().eval().model
    with torch.no_grad():
        cache = lm.new_cache(2, 16)
        lm(inputs_embeds=torch.randn(2, 5, 64, device="cuda"), past_key_values=cache, use_cache=True)
        x = torch.randn(2, 64, device="cuda")
        saved = ([k.clone() for k in cache.k], [v.clone() for v in cache.v], cache.seqlens.clone())

        def restore():
            for dst, src in zip(cache.k + cache.v + [cache.seqlens], saved[0] + saved[1] + [saved[2]]):
                dst.copy_(src)

        want = lm.decode_step(x, cache).clone()
        restore()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            lm.decode_step(x, cache)
        torch.cuda.current_stream().wait_stream(stream)
        restore()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = lm.decode_step(x, cache)
        restore()
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)
    assert cache.seqlens.tolist() == [6, 6]
