"""The generation engine on the CPU (eager steps) against the straightforward eager loops of the
models, and on the GPU (gpu-marked) captured and replayed against eager steps."""

import math

import pytest
import torch

from janus_fast import ops
from janus_fast.engine import BadLogitsError, JanusPro
from janus_fast.models.llama import LlamaForCausalLM
from janus_fast.ops import reference

from .tiny_janus import tiny_model


def engine_copy(model):
    """The engine-backed JanusPro with `model`'s weights and processor."""
    eng = JanusPro(model.config).to(model.device).eval()
    eng.load_state_dict(model.state_dict())
    eng.processor = model.processor
    return eng


@pytest.fixture(scope="module")
def plain():
    return tiny_model()


@pytest.fixture(scope="module")
def engine(plain):
    return engine_copy(plain)


def tokens(model, prompts, parallel_size, seeds, use_graphs=None, **settings):
    """generate_image_tokens for text prompts (use_graphs: the engine's choice, or forced)."""
    proc = model.processor
    ids = [model._generation_prompt_ids(proc, p) for p in prompts]
    s = dict(cfg_weight=5.0, temperature=1.0, top_k=0, top_p=1.0) | settings
    args = (ids, proc.pad_id, parallel_size, s["cfg_weight"], s["temperature"], s["top_k"], s["top_p"], seeds)
    if use_graphs is None:
        return model.generate_image_tokens(*args)
    return model.generate_image_tokens(*args, use_graphs=use_graphs)


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(top_k=20, top_p=0.9)])
def test_same_codes_as_the_eager_loop(plain, engine, settings):
    prompts = ["fox", "a much longer prompt about a fox in the snow"]  # different lengths
    want = tokens(plain, prompts, 2, [5, 6], **settings)
    assert torch.equal(tokens(engine, prompts, 2, [5, 6], **settings), want)


@pytest.mark.parametrize("parallel_size", [1, 4])
def test_a_request_alone_equals_the_same_request_in_a_batch(engine, parallel_size):
    alone = tokens(engine, ["a cat"], parallel_size, [11])
    batch = tokens(engine, ["a dog on a sofa", "a cat", "x"], parallel_size, [3, 11, 4])
    assert torch.equal(batch[parallel_size:2 * parallel_size], alone)
    assert not torch.equal(batch[:parallel_size], alone)  # different prompt and seed


def test_copies_of_a_prompt_share_one_prefill(engine, monkeypatch):
    calls = []
    real = ops.varlen_attention
    monkeypatch.setattr(ops, "varlen_attention", lambda q, *a, **k: calls.append(q.shape[0]) or real(q, *a, **k))
    ids = engine._generation_prompt_ids(engine.processor, "a fox")
    tokens(engine, ["a fox"], 4, [0])
    n_layers = engine.config.language.num_hidden_layers
    assert calls == [2 * len(ids)] * n_layers  # one conditional + one unconditional row, not 8


def only_bucket(model):
    (bucket,) = model._engine.buckets._items.values()
    return bucket


def allocated_bytes(fn):
    """(bytes of the new tensor storages fn() creates - every op output that is not an input's
    storage, seen by a dispatch mode: what a call allocates, transient or kept - fn's result)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            outputs = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                       for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)}
            Count.total += sum(n for ptr, n in outputs.items() if ptr not in inputs)
            return out

    with Count():
        result = fn()
    return Count.total, result


def test_one_bucket_serves_every_setting_prompt_length_and_request_split(plain):
    eng = engine_copy(plain)
    long_prompt = "a much longer prompt about a fox in the snow, at dusk, seen from far away"
    tokens(eng, [long_prompt], 2, [1])  # 4 rows, a capacity the shorter prompts fit in
    bucket, buckets = only_bucket(eng), eng._engine.buckets
    step = bucket.steps[("image", False)]
    # other settings, shorter prompts, 2 prompts x 1 image in the same 4 rows: nothing new is
    # allocated beyond what a repeated call allocates, and the codes are the eager loop's
    mixed = dict(cfg_weight=2.0, temperature=0.9, top_k=7, top_p=0.9)
    first, codes = allocated_bytes(lambda: tokens(eng, ["a fox", "x"], 1, [3, 4], **mixed))
    assert first == allocated_bytes(lambda: tokens(eng, ["a fox", "x"], 1, [3, 4], **mixed))[0]
    assert torch.equal(codes, tokens(plain, ["a fox", "x"], 1, [3, 4], **mixed))
    assert buckets.built == 1 and only_bucket(eng) is bucket and bucket.steps == {("image", False): step}


def test_a_bucket_is_reused_without_a_new_build(plain):
    eng = engine_copy(plain)
    first = tokens(eng, ["a fox"], 2, [1])
    buckets = eng._engine.buckets
    step = only_bucket(eng).steps[("image", False)]
    tokens(eng, ["a fix"], 2, [1])  # same length class, same settings
    assert buckets.built == 1 and only_bucket(eng).steps[("image", False)] is step
    assert torch.equal(first, tokens(eng, ["a fox"], 2, [1]))
    tokens(eng, ["a fox"], 3, [1])  # more rows: a new bucket
    assert buckets.built == 2
    copy = __import__("copy").deepcopy(eng)  # starts without the buckets
    assert copy._engine.buckets.built == 0 and copy._engine.module is copy
    eng.double()  # new weight tensors: the buckets (whose graphs hold the old ones) are dropped
    assert tokens(eng, ["a fox"], 3, [1]).shape == (3, 16)
    assert buckets.built == 3 and len(buckets) == 1


def contract_sampler(real):
    """ops.cfg_sample as contract 1 defines it for bad logits (-1 for a pair whose guided logits
    hold NaN or +inf or nothing finite), around a sampler that may not implement it yet."""

    def sample(logits, *, cfg_weight, return_ids=False, **kw):
        g = reference.guided_logits(logits, cfg_weight)
        bad = torch.isnan(g).any(-1) | (g == math.inf).any(-1) | ~torch.isfinite(g).any(-1)
        pairs = bad.repeat_interleave(2)
        tokens, ids = real(logits.masked_fill(pairs[:, None], 0.0), cfg_weight=cfg_weight, return_ids=True, **kw)
        tokens, ids = tokens.masked_fill(bad, -1), ids.masked_fill(pairs, -1)
        return (tokens, ids) if return_ids else tokens

    return sample


@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
@pytest.mark.parametrize("on_engine", [True, False])
def test_bad_logits_raise_with_their_step(plain, monkeypatch, bad_value, on_engine):
    # the engine and the models' eager loop alike: the -1 is never embedded, and reported
    eng = engine_copy(plain) if on_engine else plain
    monkeypatch.setattr(ops, "cfg_sample", contract_sampler(ops.cfg_sample))
    calls = []

    def poison(module, args, out):  # the 6th image token's logits, image 1 only
        calls.append(1)
        if len(calls) == 6:
            out = out.clone()
            out[2, 3] = bad_value
        return out

    handle = eng.gen_head.register_forward_hook(poison)
    try:
        with pytest.raises(BadLogitsError, match="at image token 5 of 16"):
            tokens(eng, ["a fox"], 2, [0])
    finally:
        handle.remove()
    assert (tokens(eng, ["a fox"], 2, [0]) >= 0).all()  # the flag is reset for the next call


@pytest.mark.parametrize("on_engine", [True, False])
def test_bad_text_logits_raise_with_their_step(plain, on_engine):
    lm = (engine_copy(plain) if on_engine else plain).language_model
    calls = []

    def poison(module, args, out):  # the logits of new token 3
        calls.append(1)
        return out.index_fill(-1, torch.tensor([7]), math.nan) if len(calls) == 4 else out

    ids = torch.tensor([[1, 5, 9, 2]])
    handle = lm.lm_head.register_forward_hook(poison)
    try:
        with pytest.raises(BadLogitsError, match="at new token 3"):
            lm.generate(input_ids=ids, max_new_tokens=6, do_sample=True, pad_token_id=-1)
    finally:
        handle.remove()
    assert (lm.generate(input_ids=ids, max_new_tokens=6, do_sample=True) >= 0).all()  # (the flag is reset)


def cache_free_greedy(lm, ids, steps):
    """Greedy decoding that recomputes every sequence from scratch: no cache, no padding."""
    out = []
    for row in ids:
        seq = list(row)
        for _ in range(steps):
            seq.append(int(lm(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        out.append(seq[len(row):])
    return out


def test_greedy_text_equals_a_plain_greedy_reference(plain, engine):
    lm, plain_lm = engine.language_model, plain.language_model
    assert isinstance(lm, LlamaForCausalLM) and type(lm) is not LlamaForCausalLM
    rows = [[5, 9, 2, 7, 1, 3], [8, 4, 6]]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding
        ids[i, 6 - len(r):], mask[i, 6 - len(r):] = torch.tensor(r), 1
    with torch.no_grad():
        want = cache_free_greedy(plain_lm, rows, 10)
    got = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10)
    assert got[:, 6:].tolist() == want
    assert torch.equal(got, plain_lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10))


def test_text_stops_at_eos_and_pads(plain, engine):
    lm, plain_lm = engine.language_model, plain.language_model
    embeds = lm.get_input_embeddings()(torch.randint(0, 100, (2, 4))).detach()
    first = lm.generate(inputs_embeds=embeds, max_new_tokens=20)
    eos = int(first[0, 3])  # row 0 finishes after 4 tokens
    out = lm.generate(inputs_embeds=embeds, max_new_tokens=20, eos_token_id=eos, pad_token_id=-1)
    assert torch.equal(out, plain_lm.generate(inputs_embeds=embeds, max_new_tokens=20, eos_token_id=eos,
                                              pad_token_id=-1))
    assert out[0, 3] == eos and (out[0, 4:] == -1).all()


def test_sampled_text_is_reproducible(engine):
    lm = engine.language_model
    ids = torch.randint(0, 100, (3, 5))
    run = [lm.generate(input_ids=ids, max_new_tokens=6, do_sample=True, top_p=0.9,
                       generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(run[0], run[1]) and not torch.equal(run[0], run[2])


def test_answer_in_one_batch(engine):
    from PIL import Image

    img = Image.new("RGB", (64, 40), (200, 30, 30))
    both = engine.answer([img, None], ["What is this?", "Say something longer, please."], max_new_tokens=6)
    assert both == [engine.answer(img, "What is this?", max_new_tokens=6),
                    engine.answer(None, "Say something longer, please.", max_new_tokens=6)]


# --------------------------------------------------------------------------- GPU: capture and replay


@pytest.mark.gpu
@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(top_k=20, top_p=0.9)])
def test_replayed_graphs_equal_eager_steps(settings):
    eng = engine_copy(tiny_model().cuda())
    prompts = ["fox", "a much longer prompt about a fox in the snow"]
    want = tokens(eng, prompts, 3, [1, 2], use_graphs=False, **settings)
    got = tokens(eng, prompts, 3, [1, 2], **settings)
    bucket = only_bucket(eng)  # one bucket: the eager and the captured step share its buffers
    assert [s.captured for s in bucket.steps.values()] == [False, True]
    assert torch.equal(got, want)
    torch.cuda.set_sync_debug_mode("error")  # a host sync inside the replays raises
    try:
        for _ in range(eng.config.vq.num_tokens):
            bucket.steps[("image", True)]()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
def test_replayed_text_equals_eager_text():
    plain = tiny_model().cuda()
    eng = engine_copy(plain)
    ids = torch.randint(0, 100, (3, 7), device="cuda")
    got = eng.language_model.generate(input_ids=ids, max_new_tokens=12)
    assert only_bucket(eng.language_model).steps[("greedy", True)].captured
    assert torch.equal(got, plain.language_model.generate(input_ids=ids, max_new_tokens=12))


@pytest.mark.gpu
def test_changing_only_settings_allocates_no_device_memory():
    eng = engine_copy(tiny_model().cuda())
    tokens(eng, ["a fox"], 2, [1])
    before = torch.cuda.memory_allocated()
    for settings in (dict(cfg_weight=2.0), dict(temperature=0.5, top_k=9), dict(top_p=0.7)):
        tokens(eng, ["a fox"], 2, [1], **settings)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before and eng._engine.buckets.built == 1
    assert len(only_bucket(eng).steps) == 1


@pytest.mark.gpu
def test_batch_independence_on_the_gpu():
    """What the README says holds on the GPU, bitwise: a row's decode attention alone, in a
    batch and in a bigger cache; a prompt's images beside other prompts of the same lengths."""
    q, k, v = (torch.randn(3, n, 16, 128, device="cuda", dtype=torch.bfloat16) for n in (1, 700, 700))
    q = q[:, 0]
    lengths = torch.tensor([700, 300, 90], dtype=torch.int32, device="cuda")
    batch = ops.decode_attention(q, k, v, lengths)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(ops.decode_attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], lengths[b:b + 1]),
                           batch[b:b + 1])
    eng = engine_copy(tiny_model().cuda())
    proc = eng.processor
    prompts = ["a red fox", "a big cat", "a tiny ox"]
    assert len({len(eng._generation_prompt_ids(proc, p)) for p in prompts}) == 1  # one batch shape
    first = tokens(eng, prompts[:2], 2, [7, 8])
    assert torch.equal(tokens(eng, [prompts[0], prompts[2]], 2, [7, 9])[:2], first[:2])


def test_a_decode_layer_dispatches_nine_ops(plain):
    from janus_fast.engine import decode_launches_per_layer, decode_op_counts, image_step_launches

    counts = decode_op_counts(plain.language_model.model)
    assert counts["per_layer"] == decode_launches_per_layer(plain) == 9  # 42 before the fused layer
    layers = plain.config.language.num_hidden_layers
    assert counts["per_step"] == counts["fixed"] + layers * counts["per_layer"]
    image_step = image_step_launches(plain)
    assert counts["per_step"] < image_step < counts["per_step"] + 30  # + head, sampler, embeddings
    # one sampling launch for every prompt of the batch: the same step for 2 prompts x 1 image
    assert image_step_launches(plain, parallel_size=1, prompts=2) == image_step_launches(plain, parallel_size=2)


def test_text_rejects_a_mask_that_is_not_left_padding(engine):
    ids = torch.randint(0, 100, (2, 5))
    for mask in ([[1, 1, 1, 1, 0]] * 2, [[1, 0, 1, 1, 1], [1] * 5]):
        with pytest.raises(ValueError, match="left-padded"):
            engine.language_model.generate(input_ids=ids, attention_mask=torch.tensor(mask))


def test_decode_step_on_the_triton_kernels(plain):
    """The model's fused decode step with the layer ops forced onto the Triton kernels (the
    interpreter here) equals the reference step: the views of the fused projections, the cache
    slots and the RoPE table reach the kernels as the reference reads them."""
    lm = plain.language_model.model
    prefix = torch.randn(3, 5, 64)

    def step():
        cache = lm.new_cache(3, 8)
        with torch.no_grad():
            lm(inputs_embeds=prefix, attention_mask=torch.tensor([[1] * 5, [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]]),
               past_key_values=cache, use_cache=True)
            out = lm.decode_step(prefix[:, 0] * 0.5, cache)
        return out, cache

    want, want_cache = step()
    with ops.prefer_backend("triton", ops=("rms_norm", "rope_kv_write", "silu_mul")):
        got, got_cache = step()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_cache.k + got_cache.v, want_cache.k + want_cache.v):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_cache.seqlens, want_cache.seqlens)


def test_graphs_only_where_every_op_is_capture_safe():
    from janus_fast.engine import graphs_usable

    assert not graphs_usable(torch.device("cpu"), torch.float32)
    assert not graphs_usable(torch.device("cuda"), torch.float64)  # the reference sampler would sync


def test_random_model_on_the_engine():
    import janus_fast
    from janus_fast.models.random_model import random_model

    assert janus_fast.JanusPro is JanusPro
    model = random_model("tiny", model_class=janus_fast.JanusPro)
    assert type(model) is JanusPro and type(model.language_model).__module__ == "janus_fast.engine.model"


def test_buckets_serve_callers_in_and_out_of_inference_mode(plain):
    lm = engine_copy(plain).language_model
    ids = torch.randint(0, 100, (2, 5))
    with torch.inference_mode():
        first = lm.generate(input_ids=ids, max_new_tokens=3)
    again = lm.generate(input_ids=ids, max_new_tokens=3)  # same bucket, outside inference mode
    assert torch.equal(first, again) and not again.is_inference()
    again.add_(1)  # a normal tensor


class FakeBuffers:
    def __init__(self, nbytes):
        self.device, self.data = torch.device("cpu"), torch.zeros(nbytes, dtype=torch.uint8)


def test_buckets_keep_the_most_recent_within_a_byte_budget():
    from janus_fast.engine import Bucket, Buckets

    buckets = Buckets(max_bytes=1000)

    def get(kind, rows, capacity, nbytes):
        return buckets.get(kind, rows, capacity, nbytes,
                           lambda: Bucket(kind, rows, capacity, FakeBuffers(nbytes)))

    a = get("image", 4, 80, 400)
    b = get("image", 4, 144, 400)
    assert get("image", 4, 70, 400) is a  # the smallest capacity that is enough, now the most recent
    assert get("image", 4, 100, 400) is b and get("text", 4, 50, 400) is not a  # evicts a: 1200 > 1000
    assert buckets.built == 3 and list(buckets._items) == [("image", 4, 144), ("text", 4, 50)]
    big = get("image", 8, 80, 5000)  # alone over the budget: kept, every older bucket dropped
    assert list(buckets._items.values()) == [big] and buckets.nbytes == 5000
    assert buckets.drop(1) == 5000 and len(buckets) == 0
