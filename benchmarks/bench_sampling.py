"""One CFG sampling step: janus_fast's cfg_sample (Triton, CUDA) against the official loop's
softmax + torch.multinomial on the guided logits, in one run. GPU only; extra_info carries the
median µs and the logits read rate (GB/s).

Each contender is timed twice: called eagerly (GPU time includes the Python/launch gaps a
µs-scale op cannot hide) and replayed from a CUDA graph (the kernels alone, as the generation
engine runs them)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import MODES, record
from janus_fast import ops, peers
from janus_fast.ops import _backend
from janus_fast.ops.sampling import new_rng_state

# (case, rows 2B, vocab, dtype, top_k, top_p): issue 5's step first (16 images -> 32 rows)
CASES = [
    ("logits [32, 16384] bf16", 32, 16384, torch.bfloat16, 0, 1.0),
    ("logits [32, 16384] bf16, top-k 50 + top-p 0.9", 32, 16384, torch.bfloat16, 50, 0.9),
    ("logits [2, 102400] fp32 (text)", 2, 102400, torch.float32, 0, 1.0),
]
CONTENDERS = ["official softmax + multinomial", "janus_fast triton", "janus_fast cuda"]


def step_fn(contender: str, logits: torch.Tensor, top_k: int, top_p: float):
    if contender.startswith("official"):
        if top_k or top_p < 1.0:
            pytest.skip("the official loop has no top-k/top-p")
        return lambda: peers.official_cfg_sample(logits, 5.0)
    backend = contender.split()[-1]
    if backend == "cuda" and _backend.cuda_op("cfg_sample") is None:
        pytest.skip(_backend.extension_error() or "janus_fast._C has no cfg_sample")
    state = new_rng_state(0, device=logits.device)  # the engine's one-launch path
    return lambda: ops.cfg_sample(logits, cfg_weight=5.0, top_k=top_k, top_p=top_p, rng_state=state,
                                  return_ids=True, backend=backend)


@pytest.mark.benchmark(group="cfg_sample")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("case,rows,vocab,dtype,top_k,top_p", CASES, ids=[c[0] for c in CASES])
def test_cfg_sample(benchmark, contender, mode, case, rows, vocab, dtype, top_k, top_p):
    logits = torch.randn(rows, vocab, device="cuda", dtype=dtype)
    fn = step_fn(contender, logits, top_k, top_p)
    nbytes = logits.numel() * logits.element_size()
    ms = record(benchmark, fn, case=case, label=contender, graph=mode == "graph", gbps=lambda ms: nbytes / ms / 1e6)
    benchmark.extra_info["median_us"] = ms * 1000
