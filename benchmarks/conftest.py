"""Benchmark plumbing: every finished test becomes one JSON line at once (so a run cut off by a
timeout keeps what finished), with its skip or failure reason when it did not time anything.
Without CUDA the benchmarks run their tiny shapes (benchmarks/harness.py)."""

from __future__ import annotations

import importlib.util
import json
import os

import torch

if not torch.cuda.is_available():  # Triton contenders run in the interpreter; set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from benchmarks import harness  # noqa: E402


if importlib.util.find_spec("pytest_benchmark") is None:

    @pytest.fixture
    def benchmark():
        """Without pytest-benchmark the cells are still timed and written (harness.record)."""
        return None


def _family(item) -> str:
    return item.path.stem.removeprefix("bench_")


def pytest_configure(config):
    config.pluginmanager.import_plugin("tests.run_limits")  # JANUS_FAST_TEST_TIMEOUT: a hung case fails alone


def pytest_runtest_setup(item):
    harness.begin_test(_family(item))


def _fallback_cell(item) -> dict:
    """Where a test that never declared its cell goes: its parameters."""
    params = dict(getattr(getattr(item, "callspec", None), "params", {}))
    label = next((str(params.pop(k)) for k in ("impl", "contender", "label") if k in params), item.name)
    return {"case": " ".join(str(v) for v in params.values()) or item.name, "label": label}


def _reason(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    text = getattr(report, "longreprtext", "") or str(report.longrepr)
    lines = [line for line in text.splitlines() if line.startswith("E ")]
    return (" ".join(line[1:].strip() for line in lines[:3]) or text.strip().splitlines()[-1])[:400]


def _write(family: str, lines: list[dict]) -> None:
    """Appends to JANUS_FAST_BENCH_FILE, or to <family>.jsonl in JANUS_FAST_BENCH_OUT."""
    out, path = os.environ.get("JANUS_FAST_BENCH_OUT"), os.environ.get("JANUS_FAST_BENCH_FILE")
    if not (out or path) or not lines:
        return
    # appended and synced per test; a line cut by a kill is skipped by render.py
    with open(path or os.path.join(out, f"{family}.jsonl"), "a", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


@pytest.hookimpl(hookwrapper=True)  # the old-style wrapper: works with every pytest the GPU machine may have
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    # A test ends at its call phase, or at setup when setup skipped or failed.
    if not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return
    declared, records = harness.take_records()
    family = _family(item)
    base = {"family": family, "table": getattr(item.module, "TABLE", family), "test": item.nodeid,
            "context": harness.run_context()}
    lines = [{**base, **cell} for cell in records]
    if not report.passed:
        cell = {**_fallback_cell(item), **declared}
        cell.update(status="skipped" if report.skipped else "failed", reason=_reason(report))
        lines.append({**base, **cell})
    _write(family, lines)
