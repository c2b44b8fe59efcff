"""Memory accounting of Janus-Pro-7B generating 16 images (CFG batch 32) on a 24 GB GPU: weights +
KV cache + workspace + an allowance for the CUDA context, for bf16 and quantized weights and caches;
and the weight bytes a decode step reads, which int8 halves.

Every number comes from tensors, none from a GPU:
  weights    the 7B model built on the meta device, quantized as `quantize` does it: the sum of
             its parameters' and buffers' nbytes (real sizes, no memory);
  KV cache   LlamaModel.kv_bytes_per_token x 32 rows x the capacity the engine allocates for a
             64-token prompt (rounded to CAPACITY_MULTIPLE) + 576 image tokens;
  workspace  the peak of the tensors allocated by each phase that runs while weights and cache are
             held - the prefill of the two prompts (conditional, unconditional), one image step
             (gen_head, sampling, the LLM decode step), the VQ decoding of the 16 images - tracked
             by torch's MemTracker on fake tensors (a one-layer model of the 7B width: activations
             do not add up over layers); plus the split partials the decode-attention launcher
             allocates inside its op (invisible to fake tensors), counted at their largest;
  context    1 GiB for the CUDA context, cuBLAS / Triton workspaces and allocator slack: not
             measurable here, an allowance.
A 24 GB card is taken as 24e9 bytes (the 24 GiB of an RTX 3090/4090 is more).

`python -m tests.test_quant_memory` prints the table.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path

import pytest
import torch

from janus_fast import ops
from janus_fast.engine.prefill import prefill
from janus_fast.engine.step import CAPACITY_MULTIPLE, round_up
from janus_fast.kernels.attention_common import block_d_for
from janus_fast.models import JanusProConfig
from janus_fast.models.janus_pro import JanusPro
from janus_fast.models.quant import decode_weight_bytes

from .helpers import grid

GPU_BYTES = 24 * 10**9
CONTEXT_BYTES = 2**30
IMAGES, PROMPT_TOKENS = 16, 64
ROWS = 2 * IMAGES
MAX_DECODE_SPLITS = 128  # kernels.attention_decode's cap on splits of the cache


def capacity(config: JanusProConfig) -> int:
    return round_up(PROMPT_TOKENS, CAPACITY_MULTIPLE) + config.vq.num_tokens


def _model(config: JanusProConfig, weights: str | None, kv: str | None) -> JanusPro:
    """A bf16 JanusPro quantized as asked, built in bf16 (fake tensors cannot be cast in place)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = JanusPro(config)
    finally:
        torch.set_default_dtype(default)
    return model.quantize(weights, kv_cache_dtype=kv) if weights or kv else model


def _peak(fn, held) -> int:
    """Peak bytes of the tensors fn allocates (activations and temporaries); `held` (the model,
    the buffers it writes in place) is registered first so that it is not counted."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    tracker = MemTracker()
    tracker.track_external(*held)
    with tracker:
        fn()
    return max(per_device[_MemRefType.ACT] + per_device[_MemRefType.TEMP]
               for per_device in tracker.get_tracker_snapshot("peak").values())


@functools.cache
def workspace(weights: str | None, kv: str | None) -> dict:
    """Peak bytes allocated by each generation phase (fake tensors, one LLM layer of the 7B width)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = JanusProConfig.janus_pro_7b()
    config = dataclasses.replace(config, language=dataclasses.replace(config.language, num_hidden_layers=1))
    n_tokens, hidden = config.vq.num_tokens, config.language.hidden_size
    with FakeTensorMode(), torch.no_grad(), ops.no_value_checks(), warnings.catch_warnings():
        # fused_weight compares data pointers: every fake tensor's is 0, so it fuses once, as on a GPU
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        model = _model(config, weights, kv)
        lm = model.language_model.model
        cache = lm.new_cache(ROWS, capacity(config))
        hidden_state = torch.zeros(ROWS, hidden, dtype=torch.bfloat16)
        rng = ops.new_rng_state(0)

        def image_step():  # what the engine's step runs: gen_head, sampling, the next embeddings, the LLM
            logits = model.gen_head(hidden_state)
            _, ids = ops.cfg_sample(logits, cfg_weight=5.0, rng_state=rng, return_ids=True)
            lm.decode_step(model.prepare_gen_img_embeds(ids), cache)

        image_step()  # first use: the decode GEMMs' weights get fused
        embeds = torch.zeros(2 * PROMPT_TOKENS, hidden, dtype=torch.bfloat16)
        rows_of = [list(range(0, ROWS, 2)), list(range(1, ROWS, 2))]
        codes = torch.zeros(IMAGES, n_tokens, dtype=torch.long)
        shape = (IMAGES, config.vq.codebook_dim, config.vq.grid, config.vq.grid)
        held = [model, hidden_state, rng, cache.seqlens, cache.rope_cos, cache.rope_sin, *cache.k, *cache.v,
                *(cache.k_scale + cache.v_scale if cache.quantized else [])]
        phases = {
            "prefill": _peak(lambda: prefill(lm, embeds, [PROMPT_TOKENS] * 2, cache, rows_of), held),
            "image step": _peak(image_step, held),
            "VQ decode": _peak(lambda: model.gen_vision_model.decode_code(codes, shape), held),
        }
    c = config.language
    phases["decode split partials"] = ROWS * c.num_attention_heads * MAX_DECODE_SPLITS * (block_d_for(c.head_dim) + 1) * 4
    return phases


@functools.cache
def meta_model(size: str, weights: str | None, kv: str | None) -> JanusPro:
    """The official `size` ("1b" / "7b") in bf16 on the meta device, quantized as asked."""
    config = JanusProConfig.janus_pro_7b() if size == "7b" else JanusProConfig.janus_pro_1b()
    with torch.device("meta"):
        return _model(config, weights, kv)


@functools.cache
def plan(weights: str | None, kv: str | None) -> dict:
    """Bytes of weights, KV cache, workspace and context for 7B x 16 images."""
    config = JanusProConfig.janus_pro_7b()
    model = meta_model("7b", weights, kv)
    held = sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))
    kv_bytes = model.language_model.model.kv_bytes_per_token() * ROWS * capacity(config)
    phases = workspace(weights, kv)
    work = max(v for k, v in phases.items() if k != "decode split partials") + phases["decode split partials"]
    total = held + kv_bytes + work + CONTEXT_BYTES
    return {"weights": held, "kv cache": kv_bytes, "workspace": work, "context": CONTEXT_BYTES, "total": total}


CASES = grid([(None, None), ("int8", "int8")], [("int8", None), ("int8", "fp8")])


def table() -> str:
    gb = 1e9
    lines = [f"7B x {IMAGES} images (CFG batch {ROWS}), KV capacity {capacity(JanusProConfig.janus_pro_7b())} "
             f"tokens, GPU {GPU_BYTES / gb:.0f} GB",
             f"{'weights':>8} {'kv cache':>9} | {'weights':>8} {'kv cache':>9} {'workspace':>9} {'context':>8} "
             f"{'total':>8}  fits"]
    for weights, kv in CASES:
        p = plan(weights, kv)
        lines.append(f"{weights or 'bf16':>8} {kv or 'bf16':>9} | {p['weights'] / gb:7.2f}G {p['kv cache'] / gb:8.2f}G "
                     f"{p['workspace'] / gb:8.2f}G {p['context'] / gb:7.2f}G {p['total'] / gb:7.2f}G  "
                     f"{'yes' if p['total'] <= GPU_BYTES else 'no'}")
    return "\n".join(lines)


def test_7b_x16_fits_24gb_with_int8_weights_and_a_quantized_cache():
    report = table()
    print("\n" + report)
    quantized = plan("int8", "int8")
    assert quantized["total"] <= GPU_BYTES, report
    assert plan(None, None)["total"] > GPU_BYTES, report  # what the quantization buys
    # the weights halve where they are quantized (SigLIP, VQ and the embeddings stay bf16)
    assert quantized["weights"] < 0.6 * plan(None, None)["weights"]
    assert quantized["kv cache"] < 0.52 * plan(None, None)["kv cache"]


@pytest.mark.parametrize("size", grid(["7b"], ["1b"]))
def test_weight_bytes_per_decode_step_halve(size):
    """The CPU proxy of decode speed: bytes of weights a step reads (each tensor once), bf16
    against int8 weights, at the official sizes."""
    for step in ("image", "text"):
        ratio = decode_weight_bytes(meta_model(size, "int8", "int8"), step) / decode_weight_bytes(
            meta_model(size, None, None), step)
        assert 0.49 < ratio <= 0.503, (step, ratio)


def test_the_readme_states_these_numbers():
    """The README's memory and bytes-per-step figures are this file's results."""
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    q, b = plan("int8", "int8"), plan(None, None)
    bf16, int8 = (decode_weight_bytes(meta_model("7b", *case), "image") / 1e9 for case in ((None, None), ("int8", "int8")))
    claims = [f"needs about {q['total'] / 1e9:.1f} GB", f"(weights {q['weights'] / 1e9:.2f} GB",
              f"cache {q['kv cache'] / 1e9:.2f} GB at {capacity(JanusProConfig.janus_pro_7b())} tokens",
              f"{q['workspace'] / 1e9:.2f} GB of workspace", f"{q['context'] / 1e9:.2f} GB allowed",
              f"against {b['total'] / 1e9:.1f} GB in bf16", f"one image token: {int8:.2f} GB against {bf16:.2f} GB"]
    missing = [c for c in claims if c not in readme]
    assert not missing, missing


def test_workspace_phases_are_measured():
    """The tracker sees each phase's allocations: the VQ decoding of 16 384x384 images holds
    activations of [16, 128, 384, 384] (bf16) at least, a step at least its logits."""
    phases = workspace("int8", "int8")
    assert phases["VQ decode"] >= IMAGES * 128 * 384 * 384 * 2
    assert phases["image step"] >= ROWS * 16384 * 2
    assert phases["prefill"] >= 2 * PROMPT_TOKENS * 4096 * 2


if __name__ == "__main__":
    print(table())
    for case in CASES:
        print(case, {k: f"{v / 1e9:.3f} GB" for k, v in workspace(*case).items()})
