"""One CFG sampling step, [2B, V] interleaved cond/uncond logits -> B tokens: janus_fast's
cfg_sample (Triton, CUDA) against, in the same run,

- torch: the official loop's guidance + softmax + torch.multinomial, with transformers-style
  sort-based top-k / top-p (peers.torch_filtered_cfg_sample) when filtering;
- FlashInfer (when installed): guidance in torch, then sampling_from_logits or
  top_k_top_p_sampling_from_logits.

Shapes (issue 12): [2, 16384] (one image), [32, 16384] (16 images), bf16; [2, 102400] fp32
(the text vocabulary); each unfiltered, top-k 50, top-p 0.9 and both. Kernel time is a CUDA-graph
replay, call time a tight loop of eager calls (ours on the engine's one-launch path: a device
RNG state and return_ids). Metric: GB/s of logits read.

Budget on a cold H100 (~1 min): 12 cases × 4 contenders, each a capture, 125 ms of replays and a
60 ms call-time loop; Triton's first compile per filter combination adds a few seconds.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks import harness
from janus_fast import ops, peers

CFG_WEIGHT = 5.0
# (case, rows 2B, vocab, dtype)
SHAPES = harness.shapes(
    full=[("[2, 16384] bf16", 2, 16384, torch.bfloat16), ("[32, 16384] bf16", 32, 16384, torch.bfloat16),
          ("[2, 102400] fp32", 2, 102400, torch.float32)],
    tiny=[("[2, 256] fp32", 2, 256, torch.float32)])
FILTERS = {"unfiltered": (0, 1.0), "top-k 50": (50, 1.0), "top-p 0.9": (0, 0.9), "top-k 50 + top-p 0.9": (50, 0.9)}
if harness.TINY:  # the interpreter is slow: one unfiltered and one fully filtered case
    FILTERS = {name: FILTERS[name] for name in ("unfiltered", "top-k 50 + top-p 0.9")}
CONTENDERS = ["janus_fast triton", "janus_fast cuda", "torch", "flashinfer"]


def target_us(shape: str, filt: str) -> float | None:
    """Issue 12's H100 targets: [32, 16384] any filter <= 10 µs, [2, 102400] top-p <= 15 µs."""
    if shape.startswith("[32, 16384]"):
        return 10
    if shape.startswith("[2, 102400]") and filt == "top-p 0.9":
        return 15
    return None


def flashinfer_step(logits: torch.Tensor, top_k: int, top_p: float):
    if importlib.util.find_spec("flashinfer") is None:
        pytest.skip("flashinfer is not installed")
    import flashinfer.sampling as fs

    def step():
        cond, uncond = logits[0::2], logits[1::2]
        guided = (uncond + CFG_WEIGHT * (cond - uncond)).float()
        if not top_k and top_p >= 1.0:
            return fs.sampling_from_logits(guided)
        return fs.top_k_top_p_sampling_from_logits(guided, top_k or guided.shape[-1], top_p)

    return step


@pytest.mark.parametrize("impl", CONTENDERS)
@pytest.mark.parametrize("filt", list(FILTERS))
@pytest.mark.parametrize("shape,rows,vocab,dtype", SHAPES, ids=[s[0] for s in SHAPES])
def test_cfg_sample(benchmark, shape, rows, vocab, dtype, filt, impl):
    case = f"{shape}, {filt}"
    harness.declare(case, impl)
    top_k, top_p = FILTERS[filt]
    logits = torch.randn(rows, vocab, device=harness.DEVICE, dtype=dtype)
    if impl == "torch":
        if top_k or top_p < 1.0:
            fn = lambda: peers.torch_filtered_cfg_sample(logits, CFG_WEIGHT, top_k=top_k, top_p=top_p)  # noqa: E731
        else:
            fn = lambda: peers.official_cfg_sample(logits, CFG_WEIGHT)  # noqa: E731
        harness.available(fn, impl)
    elif impl == "flashinfer":
        fn = flashinfer_step(logits, top_k, top_p)
        harness.available(fn, impl)
    else:
        backend = impl.split()[-1]
        harness.require_backend("cfg_sample", backend, "sampling")
        state = ops.new_rng_state(0, device=harness.DEVICE)  # the engine's one-launch path
        workspace = ops.new_sampling_workspace(rows // 2, device=harness.DEVICE)  # made before the capture, as the engine

        def fn():
            return ops.cfg_sample(logits, cfg_weight=CFG_WEIGHT, top_k=top_k, top_p=top_p, rng_state=state,
                                  return_ids=True, workspace=workspace, backend=backend)

        harness.available(fn, impl, errors=(ImportError,))
    goal = target_us(shape, filt)
    target = {"metric": "kernel_us", "at_most": goal} if goal is not None and impl.startswith("janus_fast") else None
    nbytes = logits.numel() * logits.element_size()
    harness.record(benchmark, fn, case=case, label=impl, graph=True, call_time=True, target=target,
                   gbps=lambda ms: nbytes / ms / 1e6)
