"""Speculative Jacobi decoding on the engine (janus_fast.engine.sjd), on tiny random models.

The proofs of janus_fast/ops/sampling_verify.py, checked end to end:
  - temperature 0: SJD commits exactly the token-by-token tokens (any window);
  - sampling: SJD draws from the token-by-token distribution. On a tiny model with 2 x 2-token
    images and top-k 3, the exact law of a whole image (81 outcomes) is enumerated from the model
    and thousands of SJD images are tested against it (chi-square on the joint: every marginal
    and pair statistic at once); the same test rejects a deliberately wrong rule (a rejected
    draft redrawn from p instead of max(p - q, 0)) by a wide margin. The full tier adds the
    16-token tiny model: per-position marginals and horizontal / vertical pair statistics of SJD
    against token-by-token images. Fixed seeds: deterministic, not flaky.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from janus_fast import cli, ops
from janus_fast.engine import BadLogitsError, ImageSettings, JanusPro, MemoryPlanWarning, generate_image_tokens_sjd
from janus_fast.engine import images as engine_images
from janus_fast.engine.lookahead import LOOKAHEAD
from janus_fast.engine.step import Buckets, tensor_bytes
from janus_fast.models import JanusPro as EagerJanusPro
from janus_fast.models.janus_pro import unconditional_prompt
from janus_fast.ops import reference
from tests.helpers import FULL, chi_square_pvalue, grid
from tests import test_cli, test_engine
from tests.test_engine import engine_copy
from tests.tiny_janus import tiny_model

plain, engine = test_engine.plain, test_engine.engine  # the tiny model, and its engine copy (module fixtures)


def prompt_ids(model, *texts):
    return [model._generation_prompt_ids(model.processor, t) for t in texts]


def sjd(model, ids, parallel_size, seeds, window, buckets=None, progress=None, **settings):
    s = dict(cfg_weight=5.0, temperature=1.0, top_k=0, top_p=1.0) | settings
    image = ImageSettings(s["cfg_weight"], s["temperature"], s["top_k"], s["top_p"])
    return generate_image_tokens_sjd(model, ids, model.processor.pad_id, parallel_size, image, seeds,
                                     Buckets() if buckets is None else buckets, window=window, progress=progress)


# ---------------------------------------------------------------------------- the verification pass


def test_verify_step_is_w_decode_steps(plain):
    """W tokens through verify_step give the hidden states and cache entries of W decode steps,
    and leave the lengths to the caller."""
    lm = plain.language_model.model
    b, w, prompt = 3, 4, 5
    x = torch.randn(b, prompt + w, lm.config.hidden_size)
    with torch.no_grad():
        caches = [lm.new_cache(b, prompt + w + 2) for _ in range(2)]
        for cache in caches:
            lm(inputs_embeds=x[:, :prompt], past_key_values=cache, use_cache=True)
        one_by_one = torch.stack([lm.decode_step(x[:, prompt + j], caches[0]) for j in range(w)], 1)
        window = lm.verify_step(x[:, prompt:], caches[1])
    torch.testing.assert_close(window, one_by_one, atol=1e-5, rtol=1e-5)
    assert caches[1].seqlens.tolist() == [prompt] * b and caches[0].seqlens.tolist() == [prompt + w] * b
    for layer in range(len(lm.layers)):
        torch.testing.assert_close(caches[1].k[layer][:, :prompt + w], caches[0].k[layer][:, :prompt + w])


# ---------------------------------------------------------------------------- greedy: the same tokens


@pytest.mark.parametrize("window", grid([3, 16], [1, 2, 5]))
def test_greedy_sjd_gives_the_token_by_token_tokens(plain, engine, window):
    ids = prompt_ids(plain, "fox", "a much longer prompt about a fox in the snow")  # different lengths
    want = plain.generate_image_tokens(ids, plain.processor.pad_id, 2, 5.0, 0.0, 0, 1.0, [5, 6])
    got = sjd(engine, ids, 2, [5, 6], window, temperature=0.0)
    assert torch.equal(got.codes, want)
    assert (got.passes >= 1).all() and (got.passes <= 15).all()


def test_window_of_one_takes_one_pass_per_token(engine):
    got = sjd(engine, prompt_ids(engine, "fox"), 3, [1], 1, top_k=5)
    assert got.passes.tolist() == [15, 15, 15] and got.steps == 15


# ---------------------------------------------------------------------------- sampling: the same law


def short_image_model(plain) -> JanusPro:
    """The tiny model's weights with 32 x 32 images: 2 x 2 = 4 tokens per image."""
    config = dataclasses.replace(plain.config, vq=dataclasses.replace(plain.config.vq, image_size=32))
    model = JanusPro(config).eval()
    model.load_state_dict(plain.state_dict())
    model.processor = plain.processor
    return model


@torch.no_grad()
def exact_image_law(model, ids, cfg_weight, temperature, top_k, top_p):
    """Every image the sampler can draw and its probability (float64), enumerated token by token
    from the model's guided filtered distributions (reference.sampling_probs), batching the
    prefixes of one length in one dense forward."""
    lm, n_tokens, hidden = model.language_model, model.config.vq.num_tokens, model.config.language.hidden_size
    pair = (ids, unconditional_prompt(ids, model.processor.pad_id))
    prompts = [lm.get_input_embeddings()(torch.tensor(p)) for p in pair]
    images, probs = torch.zeros(1, 0, dtype=torch.long), torch.ones(1, dtype=torch.float64)
    for t in range(n_tokens):
        drawn = model.prepare_gen_img_embeds(images.reshape(-1)).view(len(images), t, hidden)
        rows = torch.stack([torch.cat([p.expand(len(images), -1, -1), drawn], 1) for p in prompts], 1).flatten(0, 1)
        logits = model.gen_head(lm.model(inputs_embeds=rows).last_hidden_state[:, -1])
        p = reference.sampling_probs(logits.double(), cfg_weight, temperature, top_k, top_p)
        prefix, token = torch.nonzero(p > 0, as_tuple=True)
        images = torch.cat([images[prefix], token[:, None]], 1)
        probs = probs[prefix] * p[prefix, token]
    return images, probs


def joint_pvalue(codes, images, probs):
    """(p-value of the drawn images' counts against the exact law, images outside its support)."""
    index = {tuple(x): i for i, x in enumerate(images.tolist())}
    found = [index.get(tuple(x), -1) for x in codes.tolist()]
    counts = torch.bincount(torch.tensor([i for i in found if i >= 0]), minlength=len(images)).double()
    return chi_square_pvalue(counts, probs), found.count(-1)


@pytest.fixture(scope="module")
def short(plain):
    model = short_image_model(plain)
    return model, prompt_ids(model, "a red square")[0]


SAMPLING = grid([(2, dict(temperature=1.0, top_k=3))],
                [(3, dict(temperature=0.7, top_k=3)), (4, dict(temperature=1.0, top_k=4, top_p=0.8)),
                 (1, dict(temperature=1.3, top_k=3))])


@pytest.mark.parametrize("window, settings", SAMPLING)
def test_sjd_images_have_the_exact_token_by_token_law(short, window, settings):
    model, ids = short
    s = dict(cfg_weight=5.0, top_p=1.0) | settings
    images, probs = exact_image_law(model, ids, s["cfg_weight"], s["temperature"], s["top_k"], s["top_p"])
    assert abs(float(probs.sum()) - 1) < 1e-9
    assert len(images) == s["top_k"] ** 4 if s["top_p"] == 1 else len(images) > 20
    n = 8000 if FULL else 2500
    codes = sjd(model, [ids], n, [7], window, **settings).codes
    pvalue, outside = joint_pvalue(codes, images, probs)
    assert outside == 0 and pvalue > 1e-4, (pvalue, outside)


def test_the_law_test_rejects_a_wrong_rule(short, monkeypatch):
    """Redrawing a rejected draft from p (a classic bug) instead of max(p - q, 0) over-weights the
    drafts: the same test as above fails by dozens of orders of magnitude."""
    model, ids = short
    images, probs = exact_image_law(model, ids, 5.0, 1.0, 3, 1.0)
    monkeypatch.setattr(reference, "sjd_residual", lambda p, q: p)
    codes = sjd(model, [ids], 1500, [7], 2, top_k=3).codes
    pvalue, outside = joint_pvalue(codes, images, probs)
    assert outside == 0 and pvalue < 1e-10, pvalue


@pytest.mark.skipif(not FULL, reason="full tier: the enumeration checked against the token-by-token sampler")
def test_token_by_token_images_have_the_enumerated_law(short):
    model, ids = short
    images, probs = exact_image_law(model, ids, 5.0, 1.0, 3, 1.0)
    codes = model.generate_image_tokens([ids], model.processor.pad_id, 8000, 5.0, 1.0, 3, 1.0, [3])
    pvalue, outside = joint_pvalue(codes, images, probs)
    assert outside == 0 and pvalue > 1e-4


def two_sample_pvalue(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson's chi-square test that two samples of categories share one distribution."""
    cats, inverse = torch.unique(torch.cat([a, b]), return_inverse=True)
    counts = torch.stack([torch.bincount(inverse[:len(a)], minlength=len(cats)),
                          torch.bincount(inverse[len(a):], minlength=len(cats))]).double()
    expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor(max(len(cats) - 1, 1) / 2, dtype=torch.float64), stat / 2).item()


def marginal_and_pair_pvalues(x, y, grid_width, vocab):
    """Two-sample p-values of every position's token, and of every horizontal and vertical pair."""
    n = x.shape[1]
    tables = [(x[:, i], y[:, i]) for i in range(n)]
    tables += [(x[:, i] * vocab + x[:, j], y[:, i] * vocab + y[:, j]) for i in range(n)
               for j in (i + 1, i + grid_width) if j < n and (j != i + 1 or j % grid_width)]
    return [two_sample_pvalue(a, b) for a, b in tables]


@pytest.mark.skipif(not FULL, reason="full tier: thousands of 16-token images")
@pytest.mark.parametrize("window", [16, 3])
def test_sjd_marginals_and_pairs_match_token_by_token(engine, window):
    ids = prompt_ids(engine, "a red square")
    n, vq = 3000, engine.config.vq
    base = engine.generate_image_tokens(ids, engine.processor.pad_id, n, 5.0, 1.0, 3, 1.0, [1])
    codes = sjd(engine, ids, n, [2], window, top_k=3).codes
    pvalues = marginal_and_pair_pvalues(base, codes, vq.grid, vq.codebook_size)
    assert len(pvalues) == 16 + 24 and min(pvalues) > 1e-4 / len(pvalues), sorted(pvalues)[:3]


# ---------------------------------------------------------------------------- seeds, requests, API


def test_same_seed_same_images_and_requests_are_independent(engine):
    ids = prompt_ids(engine, "a dog on a sofa", "a cat")
    alone = sjd(engine, ids[1:], 3, [11], 4, top_k=8).codes
    assert torch.equal(sjd(engine, ids[1:], 3, [11], 4, top_k=8).codes, alone)
    batch = sjd(engine, ids, 3, [3, 11], 4, top_k=8).codes
    assert torch.equal(batch[3:], alone) and not torch.equal(batch[:3], alone)
    assert not torch.equal(sjd(engine, ids[1:], 3, [12], 4, top_k=8).codes, alone)


def test_generate_images_front_door(engine):
    images = engine.generate_images("a fox", parallel_size=2, seed=3, top_k=10, decoding="sjd", window=5)
    codes = engine.generate_image_tokens(prompt_ids(engine, "a fox"), engine.processor.pad_id, 2, 5.0, 1.0, 10, 1.0,
                                         [3], decoding="sjd", window=5)
    assert torch.equal(images, engine.decode_images(codes))


def test_bad_logits_raise_with_their_token(engine):
    calls = []

    def poison(module, args, out):  # the 3rd gen_head call: the 2nd verification pass
        calls.append(1)
        return out.index_fill(1, torch.tensor([3]), float("nan")) if len(calls) == 3 else out

    handle = engine.gen_head.register_forward_hook(poison)
    try:
        with pytest.raises(BadLogitsError, match="image token"):
            sjd(engine, prompt_ids(engine, "a fox"), 2, [0], 2)
    finally:
        handle.remove()


@pytest.mark.parametrize("decoding, window, error", [
    ("jacobi", 16, ValueError), ("sjd", 0, ValueError), ("sjd", 17, ValueError), ("sjd", 2.0, TypeError),
    ("sjd", True, TypeError)])
def test_bad_decoding_arguments_fail_before_any_launch(engine, monkeypatch, decoding, window, error):
    monkeypatch.setattr(ops, "varlen_attention", lambda *a, **k: pytest.fail("launched"))
    with pytest.raises(error, match="decoding" if decoding != "sjd" else "window"):
        engine.generate_images("a fox", parallel_size=1, decoding=decoding, window=window)
    with pytest.raises(error):
        engine.generate_image_tokens(prompt_ids(engine, "a fox"), engine.processor.pad_id, 1, 5.0, 1.0, 0, 1.0,
                                     [0], decoding=decoding, window=window)


def test_sjd_refuses_a_quantized_kv_cache(plain, monkeypatch):
    eng = engine_copy(plain).quantize(None, kv_cache_dtype="int8")
    monkeypatch.setattr(ops, "varlen_attention", lambda *a, **k: pytest.fail("launched"))
    with pytest.raises(ValueError, match="quantized KV cache"):
        eng.generate_images("a fox", parallel_size=1, decoding="sjd")


def test_eager_models_class_says_sjd_needs_the_engine(plain):
    assert type(plain) is EagerJanusPro
    with pytest.raises(ValueError, match="runs on the engine"):
        plain.generate_images("a fox", parallel_size=1, decoding="sjd")


def test_cli_passes_decoding_and_window(tmp_path, monkeypatch, engine):
    seen = {}

    def fake(self, prompt, **kw):
        seen.update(kw)
        return torch.zeros(1, 8, 8, 3, dtype=torch.uint8)

    monkeypatch.setattr(JanusPro, "generate_images", fake)
    monkeypatch.setattr(cli, "_load", lambda args, model_dir: engine)
    monkeypatch.setattr(cli, "check_model_dir", lambda path: tmp_path)
    cli.main(["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--n", "1", "--out", str(tmp_path / "o"),
              "--device", "cpu", "--decoding", "sjd", "--window", "8"])
    assert seen["decoding"] == "sjd" and seen["window"] == 8
    monkeypatch.setattr(cli, "_load", lambda args, model_dir: pytest.fail("loaded"))
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--out", str(tmp_path / "o"),
                  "--decoding", "sjd", "--kv-cache-dtype", "int8"])
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--out", str(tmp_path / "o"),
                  "--decoding", "fast"])


# ------------------------------------------------------------------ buckets, settings, memory, progress


def test_first_token_is_the_token_by_token_draw(engine):
    """The first token of every image comes from the prefill's logits through the same sampler and
    stream as the token-by-token step's (cfg_sample_settings, (seed, index) per image)."""
    ids = prompt_ids(engine, "a dog on a sofa", "a cat")
    want = engine.generate_image_tokens(ids, engine.processor.pad_id, 3, 5.0, 1.0, 8, 1.0, [3, 11])
    got = sjd(engine, ids, 3, [3, 11], 4, top_k=8).codes
    assert torch.equal(got[:, 0], want[:, 0]) and not torch.equal(got, want)


def test_one_bucket_serves_settings_and_splits_with_a_step_each(engine):
    """The buffers of an SJD bucket serve every setting and every split of its rows into prompts,
    but sjd_verify takes the settings as host numbers (kernel branches) and one launch per
    request: each (settings, split) has its own step. A reused step would draw with the first
    settings: the second run must equal a fresh run with its own."""
    buckets = Buckets()
    ids = prompt_ids(engine, "a fox", "a cat")
    sjd(engine, ids[:1], 2, [5], 3, buckets, top_k=8)
    second = sjd(engine, ids[:1], 2, [5], 3, buckets, temperature=0.0)
    split = sjd(engine, ids, 1, [5, 6], 3, buckets, top_k=8)  # the same 4 rows as two requests
    assert buckets.built == 1 and len(buckets) == 1
    (bucket,) = buckets._items.values()
    assert len(bucket.steps) == 3
    assert torch.equal(second.codes, sjd(engine, ids[:1], 2, [5], 3, temperature=0.0).codes)
    assert torch.equal(split.codes, sjd(engine, ids, 1, [5, 6], 3, top_k=8).codes)
    sjd(engine, ids[:1], 2, [5], 5, buckets, top_k=8)  # another window: other buffer shapes
    assert buckets.built == 2 and {k[0] for k in buckets._items} == {"sjd:3", "sjd:5"}


def test_sjd_buffers_are_counted_by_the_memory_plan(engine):
    from janus_fast.engine.sjd import SjdBuffers, sjd_bucket_bytes

    real, meta = SjdBuffers(engine, 6, 90, 4), SjdBuffers(engine, 6, 90, 4, torch.device("meta"))
    assert tensor_bytes(meta) == tensor_bytes(real) - tensor_bytes(real.cache)
    nbytes = sjd_bucket_bytes(engine, 6, 90, 4)
    assert tensor_bytes(real) < nbytes < tensor_bytes(real) + 6 * 4 * 4096 * 8  # + the window's transients
    assert sjd_bucket_bytes(engine, 6, 90, 8) > nbytes > engine_images.image_bucket_bytes(engine, 6, 90)
    buckets = Buckets()
    sjd(engine, prompt_ids(engine, "a fox"), 3, [1], 4, buckets, top_k=5)
    (bucket,) = buckets._items.values()
    assert bucket.nbytes == tensor_bytes(bucket.buffers) > tensor_bytes(real.cache)  # (eager: no graph bytes)


def test_sjd_batch_over_the_free_memory_is_split_into_equal_chunks(engine, monkeypatch):
    from janus_fast.engine.sjd import sjd_bucket_bytes, sjd_capacity

    ids = prompt_ids(engine, "a fox", "a cat on a sofa", "x")
    whole = sjd(engine, ids, 2, [3, 4, 5], 4, top_k=8)
    two = sjd_bucket_bytes(engine, 8, sjd_capacity(engine, ids, 4), 4)  # two prompts' 8 rows fit, three do not
    monkeypatch.setattr(engine_images, "free_bytes", lambda device, buckets=None: two + 1)
    seen = []
    with pytest.warns(MemoryPlanWarning, match="3 requests in 2 chunk\\(s\\) of 2 \\(8 rows"):
        split = sjd(engine, ids, 2, [3, 4, 5], 4, progress=lambda i, n: seen.append((i, n)), top_k=8)
    assert torch.equal(split.codes, whole.codes) and torch.equal(split.passes, whole.passes)
    assert seen[-1] == (32, 32) and all(b[0] >= a[0] for a, b in zip(seen, seen[1:]))
    assert any(i == 16 for i, _ in seen)  # the first chunk completes half way


def test_sjd_request_that_cannot_fit_is_refused_before_any_launch(engine, monkeypatch):
    monkeypatch.setattr(engine_images, "free_bytes", lambda device, buckets=None: 1000)
    monkeypatch.setattr(engine_images, "prefill", lambda *a, **k: pytest.fail("launched"))
    buckets = Buckets()
    with pytest.raises(ValueError, match="one request \\(4 rows\\) needs .* GiB .* lower parallel_size"):
        sjd(engine, prompt_ids(engine, "a fox"), 2, [0], 4, buckets)
    assert buckets.built == 0


def test_progress_follows_the_slowest_image_and_the_loop_stops_within_the_lookahead(engine):
    seen = []
    got = sjd(engine, prompt_ids(engine, "a fox"), 3, [2], 16, progress=lambda i, n: seen.append((i, n)), top_k=3)
    slowest = int(got.passes.max())
    assert got.steps <= min(slowest + LOOKAHEAD, 15) and got.steps >= slowest
    assert seen[-1] == (16, 16) and all(n == 16 and 1 <= i <= 16 for i, n in seen)
    assert all(b[0] >= a[0] for a, b in zip(seen, seen[1:])) and len(seen) == got.steps + 1


release, no_loading = test_cli.release, test_cli.no_loading  # the CLI tests' fixtures


def test_cli_plans_memory_for_sjd_before_loading(release, tmp_path, capsys, no_loading, monkeypatch):
    """`janus-fast generate --decoding sjd` plans with the SJD bucket's bytes (its window's
    buffers and transients): a batch that fits token by token but not by SJD is refused first."""
    from janus_fast.engine import memory
    from janus_fast.engine.sjd import image_generation_bytes

    model = tiny_model()
    ids = [model._generation_prompt_ids(model.processor, "x")]
    token, window = image_generation_bytes(model, ids)(8), image_generation_bytes(model, ids, "sjd", 16)(8)
    assert window > token
    monkeypatch.setattr(memory, "free_bytes", lambda device, buckets=None: memory.weight_bytes(model) + token + 1)
    cli.check_fits(release, "x", 4, "cpu", torch.float32)  # token by token fits
    argv = ["generate", "--model", str(release), "--prompt", "x", "--n", "4", "--out", str(tmp_path / "o"),
            "--device", "cpu", "--decoding", "sjd"]
    test_cli.one_line_error(*test_cli.run(argv, capsys), "--n 4 does not fit cpu", "lower --n")


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(top_k=20, top_p=0.9)])
def test_gpu_captured_sjd_equals_eager_steps(settings):
    from janus_fast.models.random_model import random_model

    model = random_model("tiny", device="cuda", dtype=torch.float16, model_class=JanusPro)
    ids = prompt_ids(model, "a fox", "a much longer prompt about a fox")
    image = ImageSettings(5.0, settings.get("temperature", 1.0), settings.get("top_k", 0), settings.get("top_p", 1.0))
    runs = [generate_image_tokens_sjd(model, ids, model.processor.pad_id, 2, image, [1, 2], Buckets(), window=6,
                                      use_graphs=capture) for capture in (False, True)]
    assert torch.equal(runs[0].codes, runs[1].codes) and torch.equal(runs[0].passes, runs[1].passes)
