"""VQ codebook ops: janus_fast's vq_quantize and vq_lookup (Triton, CUDA) against the torch code
the official model runs (full distance matrix + argmin; embedding + normalize + permute), in one
run, with the model's bf16 codebook and an fp32 one.

Kernel time is a CUDA-graph replay; call time (µs-scale cases) is a tight loop of eager calls.
vq_lookup is called as a model calls it (value checks on): its call time is the end-to-end cost.
Metrics: TFLOP/s of the distance search (2·N·K·D), GB/s of the lookup, peak extra memory.

Budget on a cold H100 (~2.5 min): 2 quantize shapes × 2 dtypes × 3 contenders + 2 lookup × 3,
each ≈ a capture, 25 ms warm-up + 100 ms of replays + a 60 ms call-time loop; the torch peer at
N 147,456 (fp32 distance matrix 9.7 GB, ~3 live) dominates at ~1-2 s with its capture.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import harness
from janus_fast import ops, peers

# (case, N latents, K codes, D, target µs on an H100 from issue 12)
QUANTIZE = harness.shapes(full=[("9216 x 16384 x 8", 9216, 16384, 8, 30),
                                ("147456 x 16384 x 8", 147456, 16384, 8, 500)],
                          tiny=[("64 x 256 x 8", 64, 256, 8, 30)])
LOOKUP = harness.shapes(full=[("16 x 576 -> [16, 8, 24, 24]", (16, 8, 24, 24), 16384)],
                        tiny=[("2 x 16 -> [2, 8, 4, 4]", (2, 8, 4, 4), 256)])
LOOKUP_TARGET_US = 8  # end to end, no host sync
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CONTENDERS = ["torch", "janus_fast triton", "janus_fast cuda"]


def _backend(contender: str, op: str) -> str:
    backend = contender.split()[-1]
    harness.require_backend(op, backend, "vq")
    return backend


@pytest.mark.parametrize("impl", CONTENDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case,n,k,d,target_us", QUANTIZE, ids=[c[0] for c in QUANTIZE])
def test_vq_quantize(benchmark, case, n, k, d, target_us, dtype, impl):
    case = f"quantize {case}, {dtype} codebook"
    harness.declare(case, impl)
    dt = DTYPES[dtype]
    if impl == "torch":
        # normalised copies + the [N, K] distance matrix and two temporaries of its size
        harness.require_memory(3 * n * k * torch.finfo(dt).bits / 8, "the torch distance matrix")
    z = torch.randn(n, d, device=harness.DEVICE, dtype=dt)
    codebook = torch.randn(k, d, device=harness.DEVICE, dtype=dt)
    if impl == "torch":
        fn = lambda: peers.torch_vq_quantize(z, codebook)  # noqa: E731
        harness.available(fn, impl)
    else:
        backend = _backend(impl, "vq_quantize")
        fn = lambda: ops.vq_quantize(z, codebook, backend=backend)  # noqa: E731
        harness.available(fn, impl, errors=(ImportError,))
    peak = harness.peak_memory(fn)
    target = None if impl == "torch" else {"metric": "kernel_us", "at_most": target_us}
    harness.record(benchmark, fn, case=case, label=impl, graph=True, target=target,
                   info=None if peak is None else {"peak_extra_mib": peak / 2**20},
                   tflops=lambda ms: 2 * n * k * d / ms / 1e9)


@pytest.mark.parametrize("impl", CONTENDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case,shape,k", LOOKUP, ids=[c[0] for c in LOOKUP])
def test_vq_lookup(benchmark, case, shape, k, dtype, impl):
    case = f"lookup {case}, {dtype} codebook"
    harness.declare(case, impl)
    b, d, h, w = shape
    codebook = torch.randn(k, d, device=harness.DEVICE, dtype=DTYPES[dtype])
    ids = torch.randint(0, k, (b * h * w,), device=harness.DEVICE)
    if impl == "torch":
        fn = lambda: peers.torch_vq_lookup(ids, codebook, shape)  # noqa: E731
        harness.available(fn, impl)
    else:
        backend = _backend(impl, "vq_lookup")
        fn = lambda: ops.vq_lookup(ids, codebook, shape=shape, backend=backend)  # noqa: E731
        harness.available(fn, impl, errors=(ImportError,))
    # ids read, one codebook row gathered and one output row written per id
    nbytes = ids.numel() * (ids.element_size() + 2 * d * codebook.element_size())
    target = None if impl == "torch" else {"metric": "call_us", "at_most": LOOKUP_TARGET_US}
    harness.record(benchmark, fn, case=case, label=impl, graph=True, call_time=True, target=target,
                   gbps=lambda ms: nbytes / ms / 1e6)
