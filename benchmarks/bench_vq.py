"""VQ codebook ops: janus_fast's vq_quantize and vq_lookup (Triton, CUDA) against the torch code
the official model runs (full distance matrix + argmin; embedding + normalize + permute), in one
run, at issue 5's shapes. GPU only; extra_info carries the median, TFLOP/s of the distance
search (2·N·K·D) or GB/s of the lookup, and the peak extra memory of quantize. Eager calls and
CUDA-graph replays are timed side by side (harness.record(graph=True))."""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import MODES, record
from janus_fast import ops, peers
from janus_fast.ops import _backend

QUANTIZE_CASES = [("9216 latents x 16384 codes, D 8", 9216, 16384, 8),
                  ("147456 latents x 16384 codes, D 8", 147456, 16384, 8)]
LOOKUP_CASES = [("16 x 576 ids -> [16, 8, 24, 24]", (16, 8, 24, 24), 16384)]
CONTENDERS = ["torch", "janus_fast triton", "janus_fast cuda"]


def backend_of(contender: str, op: str) -> str:
    backend = contender.split()[-1]
    if backend == "cuda" and _backend.cuda_op(op) is None:
        pytest.skip(_backend.extension_error() or f"janus_fast._C has no {op}")
    return backend


@pytest.mark.benchmark(group="vq_quantize")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("case,n,k,d", QUANTIZE_CASES, ids=[c[0] for c in QUANTIZE_CASES])
def test_vq_quantize(benchmark, contender, mode, case, n, k, d):
    z, codebook = torch.randn(n, d, device="cuda"), torch.randn(k, d, device="cuda")
    if contender == "torch":
        fn = lambda: peers.torch_vq_quantize(z, codebook)
    else:
        backend = backend_of(contender, "vq_quantize")
        fn = lambda: ops.vq_quantize(z, codebook, backend=backend)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    benchmark.extra_info["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    record(benchmark, fn, case=case, label=contender, graph=mode == "graph", tflops=lambda ms: 2 * n * k * d / ms / 1e9)


@pytest.mark.benchmark(group="vq_lookup")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("case,shape,k", LOOKUP_CASES, ids=[c[0] for c in LOOKUP_CASES])
def test_vq_lookup(benchmark, contender, mode, case, shape, k):
    b, d, h, w = shape
    codebook = torch.randn(k, d, device="cuda")
    ids = torch.randint(0, k, (b * h * w,), device="cuda")
    if contender == "torch":
        fn = lambda: peers.torch_vq_lookup(ids, codebook, shape)
    else:
        backend = backend_of(contender, "vq_lookup")

        def fn():
            with ops.no_value_checks():  # the index range check syncs with the host; engines skip it
                return ops.vq_lookup(ids, codebook, shape=shape, backend=backend)
    # ids read, one codebook row gathered and one output row written per id
    nbytes = ids.numel() * (ids.element_size() + 2 * d * codebook.element_size())
    record(benchmark, fn, case=case, label=contender, graph=mode == "graph", gbps=lambda ms: nbytes / ms / 1e6)
