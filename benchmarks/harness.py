"""Benchmark harness: GPU timing with warm-up excluded, and the run's context in extra_info.

Speed is measured here, never in unit tests. Without a GPU every benchmark skips with the
reason; `python -m janus_fast.bench` runs tiny shapes on the CPU instead.
"""

from __future__ import annotations

import functools
import subprocess

import torch

import janus_fast

# How a benchmark may run its contender: called from Python, or replayed from a CUDA graph.
MODES = ["eager", "graph"]


@functools.cache
def run_context() -> dict:
    """GPU, versions and commit, stored with every result."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    info = {k: str(v) for k, v in janus_fast.backends().items()}
    info["cuda"] = str(torch.version.cuda)
    info["commit"] = commit
    return info


def gpu_time_ms(fn, *, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds per call of fn on the GPU (triton.testing.do_bench: CUDA events,
    L2 flushed between calls, warm-up excluded)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def cuda_graph(fn):
    """The replay of a CUDA graph of fn (warmed up on a side stream first, so kernels compile
    outside the capture): times the kernels alone, without Python and launch gaps."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def record(benchmark, fn, *, case: str, label: str, graph: bool = False, **metrics_per_ms) -> float:
    """Time fn, attach the derived throughput to the pytest-benchmark result and return ms.

    `case` names the shape (a table row), `label` the contender (a table column: "triton",
    "sdpa-flash", ...); benchmarks/render.py lays results out that way. graph=True times the
    replay of a CUDA graph of fn instead of eager calls (label gets " (graph)").

    metrics_per_ms maps a metric name to a function of the median milliseconds, e.g.
    tflops=lambda ms: flops / ms / 1e9. pytest-benchmark's own statistics (host wall clock,
    one synchronised round per call) are kept alongside for reference.
    """
    if graph:
        fn, label = cuda_graph(fn), f"{label} (graph)"
    ms = gpu_time_ms(fn)
    benchmark.extra_info.update(run_context())
    benchmark.extra_info["case"] = case
    benchmark.extra_info["label"] = label
    benchmark.extra_info["median_ms"] = ms
    for name, f in metrics_per_ms.items():
        benchmark.extra_info[name] = f(ms)

    def synchronised():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synchronised, rounds=5, iterations=1, warmup_rounds=1)
    return ms
