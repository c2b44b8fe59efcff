"""Shared test helpers: tiers, devices, and comparing a backend with the float64 reference."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

FULL = os.environ.get("JANUS_FAST_FULL_TESTS", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Backends a test can exercise on this machine: the interpreter stands in for the GPU.
FAST_BACKENDS = ["triton"] + (["cuda"] if torch.cuda.is_available() else [])
# dtypes a kernel with tl.dot is checked in here: the interpreter's dot is wrong for bf16, a GPU's is not.
DOT_DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def grid(quick: list, full: list | None = None) -> list:
    """A parametrisation: `quick` in CI, `quick + full` under JANUS_FAST_FULL_TESTS=1."""
    return quick + (full or []) if FULL else quick


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """A NaN-filled buffer shaped like t, to catch elements a kernel never writes."""
    return torch.full_like(t, float("nan"))


@pytest.fixture
def on_device():
    """Every tensor a test makes is on DEVICE: with a GPU the kernels run natively, bf16 too. (A
    test module uses it with `pytestmark = pytest.mark.usefixtures("on_device")`.)"""
    with torch.device(DEVICE):
        yield


def exact_and_baseline(fn, *tensors):
    """fn on float64 copies (the exact result) and on the inputs as given (plain torch at the
    same precision, the baseline)."""
    return fn(*(t.double() if t.is_floating_point() else t for t in tensors)), fn(*tensors)


def grads_of(fn, inputs, grad_outputs) -> list:
    """Gradients of Σ out · grad_out of fn(*inputs) with respect to `inputs` (copies made leaves)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    torch.autograd.backward(outs if isinstance(outs, tuple) else (outs,), grad_outputs)
    return [t.grad for t in leaves]


def skip_interpreted_bf16(backend: str, dtype: torch.dtype) -> None:
    """The Triton interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest): bf16 runs
    on the reference here and on every backend on a GPU."""
    if dtype == torch.bfloat16 and backend == "triton" and not torch.cuda.is_available():
        pytest.skip("bf16 casts under the Triton interpreter truncate")


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty / empty_like return NaN-filled float buffers inside the context, so an output
    element a kernel never writes shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with mock.patch.object(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw))), \
            mock.patch.object(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw))):
        yield


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_close_to_reference(actual, baseline, exact, *, factor: float = 2.0, floor: float = 1e-5,
                              name: str = "output") -> None:
    """flash-attn's rule: the kernel's error against the float64 `exact` result is at most
    `factor` times the error of the plain-torch `baseline` at the same low precision, plus
    `floor`. NaN or inf where `exact` is finite never passes."""
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    finite = torch.isfinite(exact)
    bad = finite & ~torch.isfinite(actual.double())
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values where the reference is finite"
    err = max_error(actual[finite], exact[finite])
    allowed = factor * max_error(baseline[finite], exact[finite]) + floor
    assert err <= allowed, f"{name}: max error {err:.3e} > allowed {allowed:.3e} (torch baseline x{factor} + {floor})"


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of observed `counts` against `probs` (tokens with
    probability 0 are left out; the caller checks they were never drawn)."""
    keep = probs > 0
    expected = probs[keep].double() * counts.sum()
    stat = ((counts[keep].double() - expected) ** 2 / expected).sum()
    dof = max(int(keep.sum()) - 1, 1)
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


def compile_facts_per_arch(module: str, env: dict, caps=(80, 90)) -> dict:
    """{cap: `module`.compile_facts(cap)'s rows, or the error text}: each architecture compiled in
    its own process, all at once (CI has two cores; compiling needs the interpreter off: `env`)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    jobs = {cap: subprocess.Popen(
        [sys.executable, "-c", f"import json, {module} as t; print(json.dumps(t.compile_facts({cap})))"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cap in caps}
    results = {}
    for cap, job in jobs.items():
        out, err = job.communicate()
        results[cap] = json.loads(out.strip().splitlines()[-1]) if job.returncode == 0 else err[-4000:]
    return results
