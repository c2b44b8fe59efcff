"""Speculative Jacobi decoding beside token-by-token decoding, on the engine, in one run: image
tokens for one prompt (prefill and sampling included, VQ decode not), at the 1B and 7B configs with
random bf16 weights (janus_fast.models.random_model), 1 and 16 images, the default sampling
settings (cfg 5, temperature 1, no filter) and SJD's default window of 16.

A cell is seconds per batch (host clock, median of its runs) with seconds per image, the model
forward passes per image (token by token: the prefill and one decode step per token after the
first; SJD: the prefill and its verification passes, mean over the images and for the slowest
one) and the tokens committed per verification pass. Random weights are not a trained model:
their guided distribution barely depends on the context, so a reused draft's q is almost the new
p and SJD accepts nearly every draft; on a trained model acceptance is lower
(examples/sjd_compression.py measures it on the trained tiny model). JANUS_FAST_SJD_MODEL=DIR adds
a trained release directory as one more size.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest

from benchmarks import generation_peers as peers
from benchmarks import harness
from benchmarks.bench_generation import DTYPE, PROMPT, model_of
from janus_fast import JanusPro
from janus_fast.engine import ImageSettings, generate_image_tokens_sjd
from janus_fast.engine.step import Buckets

TABLE = "generation_sjd: speculative Jacobi decoding beside token by token"
TRAINED = os.environ.get("JANUS_FAST_SJD_MODEL")
SIZES = harness.shapes(full=["1b", "7b"], tiny=["tiny"]) + (["trained"] if TRAINED else [])
PARALLEL = harness.shapes(full=[1, 16], tiny=[2])
WINDOW = 16
LABELS = {"token": "janus_fast token by token", "sjd": f"janus_fast SJD (window {WINDOW})"}


def model_for(size: str):
    if size != "trained":
        return model_of(size)
    return JanusPro.from_pretrained(TRAINED, dtype=DTYPE, device=harness.DEVICE)


@pytest.mark.parametrize("decoding", list(LABELS))
@pytest.mark.parametrize("parallel_size", PARALLEL)
@pytest.mark.parametrize("size", SIZES)
def test_sjd_beside_token_by_token(size, parallel_size, decoding):
    case = f"{size}, {parallel_size} image{'s' if parallel_size > 1 else ''}"
    harness.declare(case, LABELS[decoding])
    model = model_for(size)
    ids = peers.prompt_ids(model, PROMPT)
    n_tokens = model.config.vq.num_tokens
    settings = ImageSettings(5.0, 1.0, 0, 1.0)
    buckets = Buckets()
    results = []

    def run():
        if decoding == "token":
            return model.generate_image_tokens([ids], model.processor.pad_id, parallel_size, 5.0, 1.0, 0, 1.0, [0])
        results.append(generate_image_tokens_sjd(model, [ids], model.processor.pad_id, parallel_size, settings, [0],
                                                 buckets, window=WINDOW))
        return results[-1].codes

    start = time.perf_counter()
    harness.available(run, LABELS[decoding], errors=(ImportError,))  # warm-up: compilation, graph capture
    runs = 1 if harness.TINY else 3 if time.perf_counter() - start < 5 else 1
    harness.synchronize()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        codes = run()
        harness.synchronize()
        seconds.append(time.perf_counter() - start)
    assert tuple(codes.shape) == (parallel_size, n_tokens)
    s = statistics.median(seconds)
    info = {"runs": runs, "seconds_per_image": s / parallel_size, "window": WINDOW if decoding == "sjd" else 1}
    if decoding == "token":
        info.update(forward_passes_per_image=n_tokens, tokens_per_pass=1.0)
    else:
        passes = results[-1].passes.double()
        info.update(forward_passes_per_image=1 + float(passes.mean()), slowest_image_passes=1 + float(passes.max()),
                    tokens_per_pass=(n_tokens - 1) / float(passes.mean()), batch_passes=1 + results[-1].steps)
    harness.keep(case, LABELS[decoding], s * 1000, f"host clock, median of {runs} batch{'es' if runs > 1 else ''}",
                 info=info)
    buckets.clear()
    harness.free_memory()
