"""Generation arguments are checked before anything is allocated, each error naming the
argument: seeds, sampling settings, max_new_tokens and the model's context (API and CLI)."""

import numpy as np
import pytest
import torch

from janus_fast import cli, ops
from janus_fast.models import arguments

from .test_cli import run
from .tiny_janus import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def no_allocation(monkeypatch, model):
    """Any KV cache allocation fails the test: the checks must come first."""
    def allocated(*args, **kwargs):
        raise AssertionError("a cache was allocated before the arguments were checked")

    monkeypatch.setattr(type(model.language_model.model), "new_cache", allocated)


@pytest.mark.parametrize("seed, error, match", [
    (-1, ValueError, r"seed must be an int in \[0, 2\*\*63\), got -1"),
    (1 << 63, ValueError, r"got 9223372036854775808"),
    (1 << 64, ValueError, r"seed must be an int in \[0, 2\*\*63\)"),
    (-(1 << 63), ValueError, r"seed must be an int"),
    (1.5, TypeError, r"seed must be an int .*got 1.5 \(float\)"),
    (True, TypeError, r"seed must be an int"),
    ("7", TypeError, r"seed must be an int"),
    ([0, -3], ValueError, r"seed\[1\] must be an int in \[0, 2\*\*63\), got -3"),
])
def test_bad_seeds_are_refused_by_name(model, no_allocation, seed, error, match):
    prompts = ["a", "b"] if isinstance(seed, list) else "a"
    with pytest.raises(error, match=match):
        model.generate_images(prompts, parallel_size=1, seed=seed)


def test_seed_range_ends_are_accepted_and_numpy_ints_too():
    assert arguments.request_seeds(np.int64(5), 2) == [5, 5]
    assert arguments.request_seeds([0, (1 << 63) - 1], 2) == [0, (1 << 63) - 1]
    assert all(0 <= s < 1 << 63 for s in arguments.request_seeds(None, 3))


@pytest.mark.parametrize("seed", [1 << 62, 1 << 32, (1 << 63) - 1])
def test_distinct_seeds_draw_distinct_streams_on_the_reference(seed):
    """The CPU generator reads 32 bits of its seed: the reference mixes all bits of (seed,
    offset) into them, so seeds that differ only above bit 31 no longer alias seed 0."""
    logits = torch.zeros(2, 4096)
    draws = [ops.cfg_sample(logits, cfg_weight=1.0, rng_state=ops.new_rng_state(s, device="cpu"), backend="reference")
             for s in (0, seed)]
    assert not torch.equal(draws[0], draws[1])


def test_seed_aliases_reported_in_issue_22_now_differ(model):
    """Seed 2**62 gave the images of seed 0 (the reference sampler's 32-bit seeding)."""
    a = model.generate_images("a cat", parallel_size=1, seed=0)
    b = model.generate_images("a cat", parallel_size=1, seed=1 << 62)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(top_p=0), ValueError, r"top_p must be a finite number in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, r"top_p must be"),
    (dict(cfg_weight=-1), ValueError, r"cfg_weight must be a finite number >= 0, got -1.0"),
    (dict(cfg_weight=float("nan")), ValueError, r"cfg_weight must be a finite number"),
    (dict(temperature=-0.5), ValueError, r"temperature must be a finite number >= 0"),
    (dict(top_k=-2), ValueError, r"top_k must be an int >= 0"),
    (dict(top_k=2.5), TypeError, r"top_k must be an int"),
    (dict(parallel_size=0), ValueError, r"parallel_size must be an int >= 1"),
    (dict(parallel_size=True), TypeError, r"parallel_size must be an int"),
])
def test_bad_image_settings_are_refused_by_name(model, no_allocation, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.generate_images("a", **{"parallel_size": 1, **kwargs})


def test_prompt_longer_than_the_context_is_refused_before_allocation(model, no_allocation):
    context = model.config.language.max_position_embeddings
    with pytest.raises(ValueError, match=rf"> the model's context of {context} tokens"):
        model.generate_images("word " * 100_000, parallel_size=1)  # the issue's 100k characters
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.answer(None, "word " * 2 * context, max_new_tokens=4)


def test_prompt_that_fits_with_its_image_tokens_runs(model):
    """The boundary: prompt + image tokens == context is accepted."""
    proc, context, image = model.processor, model.config.language.max_position_embeddings, model.config.vq.num_tokens
    length = lambda text: len(model._generation_prompt_ids(proc, text))  # noqa: E731
    text = "a" * (context - image - length("a"))  # (each further character adds at most one token)
    while length(text + "a") + image <= context:
        text += "a"
    assert length(text) + image == context
    assert model.generate_images(text, parallel_size=1, seed=0).shape[0] == 1
    with pytest.raises(ValueError, match="context"):
        model.generate_images(text + "a b", parallel_size=1, seed=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_new_tokens=-1), ValueError, r"max_new_tokens must be an int >= 1, got -1"),
    (dict(max_new_tokens=0), ValueError, r"max_new_tokens must be an int >= 1"),
    (dict(max_new_tokens=2.0), TypeError, r"max_new_tokens must be an int"),
    (dict(top_p=0.0, do_sample=True), ValueError, r"top_p must be"),
    (dict(seed=-5), ValueError, r"seed must be an int in \[0, 2\*\*63\)"),
])
def test_bad_answer_arguments_are_refused_by_name(model, no_allocation, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.answer(None, "what?", **{"max_new_tokens": 4, **kwargs})


def test_language_model_generate_checks_its_arguments(model, no_allocation):
    lm, context = model.language_model, model.config.language.max_position_embeddings
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        lm.generate(ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match=rf"{8 + context} > the model's context of {context}"):
        lm.generate(ids, max_new_tokens=context)
    with pytest.raises(ValueError, match="top_p must be"):
        lm.generate(ids, max_new_tokens=2, do_sample=True, top_p=0)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = tmp_path_factory.mktemp("release")
    tiny_model().save_pretrained(path)
    return path


def error_line(code, out, err, *fragments):
    """Status 2 and one error line after whatever progress the command printed, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("janus-fast generate: error: "), err
    assert all(fragment in lines[-1] for fragment in fragments), err
    assert not any("error" in line for line in lines[:-1]), err


@pytest.mark.parametrize("flag, value, fragment", [
    ("--seed", "-1", "seed must be an int in [0, 2**63), got -1"),
    ("--seed", str(1 << 64), "seed must be an int in [0, 2**63)"),
    ("--seed", "1.5", "must be an int, got 1.5"),
    ("--cfg", "-2", "must be a finite number >= 0.0"),
])
def test_cli_bad_settings_are_usage_errors(release, tmp_path, capsys, flag, value, fragment):
    code, _, err = run(["generate", "--model", str(release), "--prompt", "x", "--out", str(tmp_path), flag, value],
                       capsys)
    assert code == 2 and f"argument {flag}" in err and fragment in err, err


def test_cli_long_prompt_is_one_line(release, tmp_path, capsys):
    error_line(*run(["generate", "--model", str(release), "--prompt", "word " * 5000, "--n", "1",
                     "--device", "cpu", "--out", str(tmp_path)], capsys), "the model's context of")


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 160.00 GiB"),
                                   MemoryError(),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 171798691840 bytes.")])
def test_cli_out_of_memory_is_one_line(release, tmp_path, capsys, monkeypatch, error):
    from janus_fast.engine import JanusPro

    def too_big(*args, **kwargs):
        raise error

    monkeypatch.setattr(JanusPro, "generate_images", too_big)
    error_line(*run(["generate", "--model", str(release), "--prompt", "x", "--n", "100000", "--device", "cpu",
                     "--out", str(tmp_path)], capsys), "out of memory", "try a smaller --n")


def test_cli_other_runtime_errors_keep_their_traceback(release, tmp_path, monkeypatch):
    from janus_fast.engine import JanusPro

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(JanusPro, "generate_images", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["generate", "--model", str(release), "--prompt", "x", "--device", "cpu", "--out", str(tmp_path)])
