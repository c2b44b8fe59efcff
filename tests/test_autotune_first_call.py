"""First calls under GPU-style autotuning: every autotuned kernel, through the public ops.

On a GPU the autotuner benchmarks each surviving config on the real arguments before the first
launch of a key (Triton 3.6 even a lone survivor): a kernel with side effects (an atomic
accumulator, an in-place output) that does not reset them returns a wrong first result. The
interpreter has one config per kernel and no benchmark, so this test makes every Autotuner behave
as on a GPU: each key is pruned to several configs and each config is run BENCH_RUNS times on the
real arguments before the chosen one runs. The first call's outputs and gradients must match the
float64 reference (tests/helpers' rule) and equal a second, untuned call.

Every Autotuner in the package is found by scanning the sources for `autotune(`; each must be
reached here (test_every_autotuned_kernel_is_exercised): a new autotuned kernel needs a case.
"""

from __future__ import annotations

import collections
import copy
import functools
import importlib
import os
import re

import pytest
import torch
from triton.runtime.autotuner import Autotuner

import janus_fast.kernels.attention as K
import janus_fast.kernels.attention_fwd_sm90 as K90
from janus_fast import ops
from janus_fast.ops import reference
from tests.test_attention import _check_all, _cu, _grads, _leaf, _randn, _torch_attention, _torch_varlen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_RUNS = 3  # per config, as do_bench repeats a kernel (Triton's warm-up and timed runs are many more)
N_CONFIGS = 2  # survivors per key
_BENCHMARKED = collections.Counter()  # autotuned kernel -> benchmarked configs, over this module's tests


def _modules_that_autotune():
    """janus_fast modules whose source calls triton.autotune or the kernels' autotune helper."""
    for top, package in (("kernels", "janus_fast.kernels"), ("janus_fast", "janus_fast")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    if not re.search(r"\bautotune\(", f.read()):
                        continue
                rel = os.path.relpath(os.path.join(dirpath, name[:-3]), os.path.join(ROOT, top))
                yield f"{package}.{rel.replace(os.sep, '.')}".removesuffix(".__init__")


@functools.cache
def autotuned_kernels() -> dict[str, Autotuner]:
    """{module.name: Autotuner} of every autotuned kernel in the package."""
    found = {}
    for module_name in _modules_that_autotune():
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if isinstance(value, Autotuner):
                found.setdefault(id(value), (f"{module_name}.{name}", value))
    return dict(found.values())


def _label(tuner):
    return next((name for name, t in autotuned_kernels().items() if t is tuner), repr(tuner))


@pytest.fixture
def gpu_style_autotuning(monkeypatch):
    """Every key of every Autotuner is tuned afresh over N_CONFIGS survivors (copies of the
    interpreter's config with other num_stages, distinct to the autotuner), each run BENCH_RUNS
    times by the benchmark; the last one wins, so the timed runs precede the real launch."""
    prune = Autotuner.prune_configs

    def several(self, kwargs):
        survivors = prune(self, kwargs)
        variants = []
        for i in range(N_CONFIGS):
            config = copy.copy(survivors[i % len(survivors)])
            config.num_stages = config.num_stages + i
            variants.append(config)
        return variants

    def do_bench(self):
        def bench(kernel_call, quantiles=None, **_):
            for _ in range(BENCH_RUNS):
                kernel_call()
            _BENCHMARKED[_label(self)] += 1
            return [10.0 - _BENCHMARKED[_label(self)]] * 3
        return bench

    monkeypatch.setattr(Autotuner, "prune_configs", several)
    monkeypatch.setattr(Autotuner, "do_bench", property(do_bench))
    for tuner in autotuned_kernels().values():
        monkeypatch.setattr(tuner, "cache", {})
        monkeypatch.setattr(tuner, "cache_results", False)


def _route_forward(monkeypatch, path):
    """The forward kernel: the pointer-load one, or the sm_90 TMA one routed to in the interpreter."""
    if path == "sm90":
        if not K90.available():
            pytest.skip("this Triton lacks tensor descriptors or warp_specialize")
        monkeypatch.setattr(K, "_use_sm90_forward", lambda *args: True)


def _first_and_second(run):
    """run() twice: under fresh GPU-style tuning, then from the autotuner's cache."""
    first = run()
    again = run()
    for a, b in zip(first, again):
        assert torch.equal(a, b), "the first call (tuned on its arguments) differs from the second"
    return first


# each backward kernel and each forward path meets a fresh key twice over the four cases
@pytest.mark.parametrize("path,causal,deterministic", [("pointer", True, False), ("sm90", False, True)])
def test_dense_first_call(gpu_style_autotuning, monkeypatch, path, causal, deterministic):
    _route_forward(monkeypatch, path)
    dtype = torch.float16
    q, k, v = _randn(1, 21, 2, 16, dtype=dtype), _randn(1, 19, 1, 16, dtype=dtype), _randn(1, 19, 1, 16, dtype=dtype)
    dout, scale = _randn(1, 21, 2, 16, dtype=dtype), 16 ** -0.5

    def run():
        leaves = [_leaf(t) for t in (q, k, v)]
        out = ops.flash_attention(*leaves, causal=causal, backend="triton", deterministic=deterministic)
        return (out.detach(), *_grads(out, dout, *leaves))

    got = _first_and_second(run)
    exact_out, exact_lse = reference.attention(q.double(), k.double(), v.double(), causal, scale)
    exact = (exact_out, *reference.attention_backward(dout.double(), q.double(), k.double(), v.double(),
                                                      exact_out, exact_lse, causal, scale))
    leaves = [_leaf(t) for t in (q, k, v)]
    base_out, _ = _torch_attention(*leaves, causal, scale)
    base = (base_out, *_grads(base_out, dout, *leaves))
    _check_all(got, base, exact, dtype, ("out", "dq", "dk", "dv"))


@pytest.mark.parametrize("path,deterministic", [("pointer", True), ("sm90", False)])
def test_varlen_first_call(gpu_style_autotuning, monkeypatch, path, deterministic):
    _route_forward(monkeypatch, path)
    # fp32 on the pointer path (exact dots); the TMA forward is 16-bit only
    dtype, causal, scale = torch.float32 if path == "pointer" else torch.float16, True, 0.2
    lq, lk = [5, 0, 17], [9, 4, 17]
    cu_q, cu_k = _cu(lq), _cu(lk)
    q, dout = _randn(sum(lq), 2, 16, dtype=dtype), _randn(sum(lq), 2, 16, dtype=dtype)
    k, v = _randn(sum(lk), 1, 16, dtype=dtype), _randn(sum(lk), 1, 16, dtype=dtype)

    def run():
        leaves = [_leaf(t) for t in (q, k, v)]
        out = ops.varlen_attention(*leaves, cu_q, cu_k, 17, 17, causal=causal, softmax_scale=scale,
                                   backend="triton", deterministic=deterministic)
        return (out.detach(), *_grads(out, dout, *leaves))

    got = _first_and_second(run)
    exact_out, exact_lse = reference.varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k, causal, scale)
    exact = (exact_out, *reference.varlen_attention_backward(dout.double(), q.double(), k.double(), v.double(),
                                                             exact_out, exact_lse, cu_q, cu_k, causal, scale))
    leaves = [_leaf(t) for t in (q, k, v)]
    base_out, _ = _torch_varlen(*leaves, cu_q, cu_k, causal, scale)
    base = (base_out, *_grads(base_out, dout, *leaves))
    _check_all(got, base, exact, dtype, ("out", "dq", "dk", "dv"))


def test_no_benchmark_inside_a_cuda_graph_capture(gpu_style_autotuning, monkeypatch):
    """A key first met while a CUDA graph is being captured (where timing runs would break the
    capture) launches its first survivor untimed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    before = sum(_BENCHMARKED.values())
    q = _randn(1, 9, 2, 16, dtype=torch.float32)
    out = ops.flash_attention(q, q[:, :, :1], q[:, :, :1], backend="triton")
    assert sum(_BENCHMARKED.values()) == before
    assert K._attn_fwd_kernel.best_config.num_stages == K._attn_fwd_kernel.survivors[0].num_stages
    exact, _ = reference.attention(q.double(), q[:, :, :1].double(), q[:, :, :1].double(), False, 16 ** -0.5)
    torch.testing.assert_close(out, exact.float())


def test_every_autotuned_kernel_is_exercised():
    """Runs after the cases above (file order): each Autotuner in the package was benchmarked."""
    tuners = autotuned_kernels()
    assert tuners, "no autotuned kernel found: the scan is broken"
    if not _BENCHMARKED:
        pytest.skip("the cases were deselected: run the whole file")
    missed = sorted(name for name in tuners if not _BENCHMARKED[name])
    if missed and not K90.available():
        missed = [m for m in missed if not m.endswith("_attn_fwd_tma_kernel")]
    assert not missed, f"autotuned kernels no case here reaches under GPU-style tuning: {missed}"

