"""Benchmark harness: what a number means, where it goes, and when a case skips.

Each table cell is one call of `record`, which measures

- kernel time: the median of single calls with L2 flushed before each (CUDA events), of a CUDA
  graph replay when graph=True (the kernels alone, as a captured engine step runs them) or of
  eager calls otherwise;
- call time: a tight loop of real eager calls timed by CUDA events, Python wrapper, checks and
  dispatch included (what a model pays per call). Measured for µs-scale ops (kernel time under
  CALL_TIME_BELOW_MS) or when asked.

`record` keeps the cell; benchmarks/conftest.py writes it as one JSON line the moment its test
ends (skips and failures too, with the reason), so a run cut off by a timeout keeps every case
that finished. On a machine without CUDA (JANUS_FAST_BENCH_TINY=1, set by `python -m
janus_fast.bench` there) every benchmark runs its tiny shapes and times with the host clock:
that proves the benchmark runs end to end, never how fast a kernel is.

Environment (set by `python -m janus_fast.bench`):
    JANUS_FAST_BENCH_OUT       the directory whose <family>.jsonl cells are appended to
    JANUS_FAST_BENCH_FILE      one file every family's cells are appended to instead
    JANUS_FAST_BENCH_TINY      1: tiny shapes (the default without CUDA)
    JANUS_FAST_BENCH_BUDGET    seconds per family, from its first case, after which its
                               remaining cases skip with the reason
    JANUS_FAST_BENCH_COMMAND   the command line stored with each cell
    JANUS_FAST_COMMIT / JANUS_FAST_DIRTY  commit and dirty flag where the copy has no .git
"""

from __future__ import annotations

import functools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TINY = os.environ.get("JANUS_FAST_BENCH_TINY", "0" if CUDA else "1") == "1"
CALL_TIME_BELOW_MS = 1.0  # ops faster than this also get a call time
REPO = Path(__file__).resolve().parent.parent


def shapes(full, tiny):
    """The real shapes on a GPU, the tiny ones in a tiny run."""
    return tiny if TINY else full


# --------------------------------------------------------------------------- context


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@functools.cache
def run_context() -> dict:
    """Device, versions, commit, dirty flag and command, stored with every cell."""
    import janus_fast

    info = {k: str(v) for k, v in janus_fast.backends().items() if k != "cuda_extension_error"}
    info["cuda"] = str(torch.version.cuda)
    commit = _git("rev-parse", "--short=12", "HEAD")
    if commit is not None:
        info["commit"] = commit
        info["dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    else:  # a copy without .git (the GPU machine gets the work tree only)
        info["commit"] = os.environ.get("JANUS_FAST_COMMIT", "unknown (no .git; set JANUS_FAST_COMMIT)")
        dirty = os.environ.get("JANUS_FAST_DIRTY")
        info["dirty"] = None if dirty is None else dirty == "1"
    info["command"] = os.environ.get("JANUS_FAST_BENCH_COMMAND", " ".join([Path(sys.executable).name, *sys.argv]))
    info["tiny"] = TINY
    info["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return info


# --------------------------------------------------------------------------- cells

_current: dict = {}
_records: list[dict] = []
_family_start: dict[str, float] = {}


def begin_test(family: str) -> None:
    """Called by conftest before each test: starts the family's clock at its first case."""
    _family_start.setdefault(family, time.monotonic())
    _current.clear()
    _records.clear()
    _current["family"] = family


def take_records() -> tuple[dict, list[dict]]:
    """The declared cell and the finished records of the test that just ended (conftest)."""
    declared, done = dict(_current), list(_records)
    declared.pop("family", None)
    _current.clear()
    _records.clear()
    return declared, done


def declare(case: str, label: str, **info) -> None:
    """Name the cell this test fills (so a skip or failure lands in the right place), and skip
    it if the family's time budget is used up."""
    _current.update(case=case, label=label, **info)
    budget = os.environ.get("JANUS_FAST_BENCH_BUDGET")
    start = _family_start.get(_current.get("family"))
    if budget and start is not None and time.monotonic() - start > float(budget):
        pytest.skip(f"the family's time budget ({float(budget):.0f} s, --budget) was used up before this case")


def skip_unavailable(what: str, error: BaseException):
    """Skip with the reason a contender cannot run here (first line of the error)."""
    text = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    pytest.skip(f"{what} unavailable here: {type(error).__name__}: {text}")


PEER_ERRORS = (RuntimeError, NotImplementedError, ImportError, AssertionError, ValueError, TypeError)


def available(fn, what: str, *, errors=PEER_ERRORS):
    """Run fn once (compiling, warming up) and return its result; skip with the reason when it
    raises one of `errors`. Peers pass the default; our own contenders pass errors=(ImportError,)
    so a bug in our code fails instead of hiding as a skip. The cache is emptied first, so a
    memory-hungry contender does not inherit the previous one's cached blocks."""
    free_memory()
    try:
        result = fn()
        synchronize()
        return result
    except torch.cuda.OutOfMemoryError as e:
        free_memory()
        skip_unavailable(f"{what} (out of memory; {memory_line()})", e)
    except errors as e:
        skip_unavailable(what, e)


def require_backend(op: str, backend: str, kernels: str) -> None:
    """Skip when janus_fast cannot run `op` on `backend` here: no triton, no janus_fast._C, or
    the Triton kernels module `kernels` cannot be imported (a copy that was not pip-installed)."""
    from janus_fast.ops import _backend

    try:
        _backend.resolve(op, backend, torch.device(DEVICE), ("triton", "cuda"))
    except (RuntimeError, ValueError, ImportError) as e:
        pytest.skip(f"janus_fast {backend} backend unavailable here: {e}")
    if backend == "triton":
        try:
            _backend.triton_kernels(kernels)
        except ImportError as e:
            pytest.skip(f"janus_fast's Triton kernels cannot be imported ({e}); pip install -e . first")


# --------------------------------------------------------------------------- memory


def free_memory() -> None:
    """Return cached blocks to the device, so the next peer starts from a clean pool."""
    import gc

    gc.collect()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def memory_line() -> str:
    if not CUDA:
        return "host memory"
    free, total = torch.cuda.mem_get_info()
    return f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free"


def require_memory(nbytes: float, what: str, *, copies: int = 1) -> None:
    """Skip `what` when it needs more device memory (nbytes per copy, `copies` of them) than is
    free after freeing the cache; says needed against free."""
    if not CUDA:
        return
    free_memory()
    free = torch.cuda.mem_get_info()[0]
    need = nbytes * copies
    if need > 0.92 * free:
        pytest.skip(f"{what} needs ~{need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free")


def peak_memory(fn) -> float | None:
    """Peak device bytes allocated by one call of fn beyond what was allocated before (None on
    the CPU)."""
    if not CUDA:
        return None
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


# --------------------------------------------------------------------------- timing


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


@functools.cache
def _l2_flush_buffer() -> torch.Tensor:
    return torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # > any GPU's L2


def _host_ms(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def kernel_time_ms(fn, *, warmup_ms: float = 25, rep_ms: float = 100, max_reps: int = 1000) -> float:
    """Median ms of single calls with L2 flushed before each, warm-up excluded (do_bench's
    method, without needing Triton). Host clock on the CPU."""
    if not CUDA:  # tiny shapes: the harness is checked, not timed; keep it short
        return statistics.median(_host_ms(fn, 2))
    flush = _l2_flush_buffer()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    reps = max(5, min(max_reps, int(rep_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def call_time_ms(fn, *, loop_ms: float = 20, loops: int = 3) -> float:
    """Median over `loops` tight loops of real calls (no flush, no sync inside), per call: the
    host's Python, checks and launches included whenever they are slower than the GPU."""
    if not CUDA:
        return _host_ms(fn, 1)[0]
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    n = max(10, min(2000, int(loop_ms / max(start.elapsed_time(end), 1e-3))))
    results = []
    for _ in range(loops):
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        results.append(start.elapsed_time(end) / n)
    return statistics.median(results)


def cuda_graph(fn):
    """The replay of a CUDA graph of fn (warmed up on a side stream first, so kernels compile
    outside the capture). The cache is emptied first so a large peer's eager blocks and its graph
    pool are not held at once."""
    free_memory()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    free_memory()  # the warm-up's blocks go back before the graph's private pool fills
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def record(benchmark, fn, *, case: str, label: str, graph: bool = False, call_time: bool | None = None,
           target: dict | None = None, info: dict | None = None, **metrics_per_ms) -> float:
    """Time fn as the cell (case row, label column), keep the cell for the JSON line and
    return the kernel time in ms.

    graph=True times kernel time as a CUDA-graph replay (on the CPU, eager calls); if the
    capture fails (a peer that syncs, or out of memory) the eager kernel time is kept and the
    reason noted. call_time=None measures the call time for ops under CALL_TIME_BELOW_MS.
    target, e.g. {"metric": "kernel_us", "at_most": 10} or {"metric": "tflops", "at_least": 560},
    marks a headline workload for render.py's summary. info adds fields (peak memory, ...).
    metrics_per_ms maps a metric name to a function of the kernel ms, e.g.
    tflops=lambda ms: flops / ms / 1e9.

    pytest-benchmark's own statistics (`benchmark`, may be None) time a few host-clocked calls,
    each followed by a device sync; they are kept in its JSON but are not the table's numbers.
    """
    declare(case, label)
    timing = "host clock (no CUDA)" if not CUDA else "CUDA events, L2 flushed, eager calls"
    kernel_fn = fn
    if graph and CUDA:
        try:
            kernel_fn = cuda_graph(fn)
            timing = "CUDA events, L2 flushed, CUDA-graph replay"
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            free_memory()
            timing += f" (graph capture failed: {str(e).splitlines()[0][:160]})"
    ms = kernel_time_ms(kernel_fn)
    kernel_fn = None  # drop the graph (and its memory pool) before the call-time loop
    if graph:
        free_memory()
    cell = keep(case, label, ms, timing, target=target, info=info)
    if call_time or (call_time is None and ms < CALL_TIME_BELOW_MS):
        cell["call_ms"] = call_time_ms(fn)
    for name, f in metrics_per_ms.items():
        cell[name] = f(ms)
    if benchmark is not None:
        benchmark.extra_info.update(run_context())
        benchmark.extra_info.update(cell)

        def synchronised():
            fn()
            synchronize()

        benchmark.pedantic(synchronised, rounds=3 if CUDA else 1, iterations=1, warmup_rounds=1 if CUDA else 0)
    return ms


def keep(case: str, label: str, ms: float, timing: str, *, target: dict | None = None,
         info: dict | None = None) -> dict:
    """Keep a cell measured by the caller (`ms` is its headline time, `timing` says how it was
    taken) for its JSON line; returns the cell for more fields."""
    _current.update(case=case, label=label)  # no budget check: a finished measurement is kept
    cell = {"case": case, "label": label, "status": "ok", "kernel_ms": ms, "median_ms": ms, "kernel_timing": timing}
    if target is not None:
        cell["target"] = dict(target)
    cell.update(info or {})
    _records.append(cell)
    return cell
