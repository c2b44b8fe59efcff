"""Dispatched-op counts of one decode step, measured with torch.profiler on the eager path (the
same ops a captured graph replays as kernels): what the benchmarks report as launches per step."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from .. import ops
from ..models.llama import LlamaModel
from .images import ImageBuffers, ImageSettings, image_step

# Ops that only describe memory (no kernel runs for them on a GPU).
METADATA_OPS = frozenset({
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view", "aten::as_strided",
    "aten::t", "aten::transpose", "aten::permute", "aten::expand", "aten::unsqueeze", "aten::squeeze",
    "aten::slice", "aten::select", "aten::split", "aten::chunk", "aten::unbind", "aten::alias",
    "aten::detach", "aten::lift_fresh", "aten::empty", "aten::empty_like", "aten::empty_strided",
    "aten::resolve_conj", "aten::resolve_neg", "aten::split_with_sizes", "aten::narrow",
})


def _count(fn) -> int:
    """Top-level dispatched ops of fn() that are not metadata-only."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.cpu_parent is None and e.name not in METADATA_OPS
               and e.name.startswith(("aten::", "janus_fast::")))


@torch.inference_mode()
def decode_op_counts(lm: LlamaModel, batch: int = 2, context: int = 8) -> dict:
    """{"per_layer", "fixed", "per_step"}: ops dispatched by one `lm.decode_step` (on the model's
    device; run it on the CPU for CI), split into the part each layer adds and the rest, by
    comparing the full model with its first layer alone."""
    layers = lm.layers
    if len(layers) < 2:
        raise ValueError("decode_op_counts needs a model with at least two layers")
    w = lm.embed_tokens.weight
    x = torch.randn(batch, w.shape[1], dtype=w.dtype, device=w.device)

    def step_ops(n_layers: int) -> int:
        cache = lm.new_cache(batch, context + 2)
        cache.seqlens.fill_(context)
        with ops.no_value_checks():
            lm.decode_step(x, cache)  # warm-up: first-call work is not a step's
            return _count(lambda: lm.decode_step(x, cache))

    total = step_ops(len(layers))
    try:
        lm.layers = torch.nn.ModuleList(layers[:1])
        one = step_ops(1)
    finally:
        lm.layers = layers
    per_layer = (total - one) // (len(layers) - 1)
    return {"per_layer": per_layer, "fixed": one - per_layer, "per_step": total}


def decode_launches_per_layer(model) -> int:
    """Dispatched ops per LLM layer per decode step of a JanusPro (or a LlamaForCausalLM /
    LlamaModel): the benchmark's `launches per layer` field."""
    lm = getattr(model, "language_model", model)
    return decode_op_counts(getattr(lm, "model", lm))["per_layer"]


@torch.inference_mode()
def image_step_launches(model, parallel_size: int = 1, prompts: int = 1) -> int:
    """Dispatched ops of one whole image-token step of a JanusPro (gen_head, sampling, code write,
    gen_embed + gen_aligner, the LLM decode step): the benchmark's `launches per step` field.
    The same for any number of prompts (one sampling launch serves every request)."""
    rows = 2 * parallel_size * prompts
    buffers = ImageBuffers(model, rows, 8)
    buffers.reset([(0, j) for _ in range(prompts) for j in range(parallel_size)], ImageSettings(5.0, 1.0, 0, 1.0))
    with ops.no_value_checks():
        image_step(model, buffers)  # warm-up: first-call work (the weight fusion) is not a step's
        return _count(lambda: image_step(model, buffers))
