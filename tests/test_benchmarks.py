"""The benchmark suites import and the renderer lays results out (the timing itself needs a GPU)."""

import importlib
from pathlib import Path

import pytest

from benchmarks.render import render

SUITES = sorted(p.stem for p in (Path(__file__).parent.parent / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("suite", SUITES)
def test_suite_imports(suite):
    module = importlib.import_module(f"benchmarks.{suite}")
    assert any(name.startswith(("test_", "bench_")) for name in dir(module)), f"{suite} defines no benchmark"


def test_render_puts_peers_side_by_side():
    info = {"device": "GPU X", "torch": "2.x", "triton": "3.x", "cuda": "13", "commit": "abc"}
    data = {"benchmarks": [
        {"group": "attn", "name": "a", "extra_info": {**info, "case": "S1024", "label": "triton", "median_ms": 0.5, "tflops": 300.0}},
        {"group": "attn", "name": "b", "extra_info": {**info, "case": "S1024", "label": "sdpa", "median_ms": 2.0, "tflops": 75.0}},
        {"group": "attn", "name": "c", "extra_info": {**info, "case": "S2048", "label": "sdpa", "median_ms": 8.0}},
    ]}
    text = render(data)
    assert "Device: GPU X" in text and "| case | triton | sdpa |" in text
    assert "| S1024 | 500.0 µs · 300.0 TFLOP/s | 2.000 ms · 75.0 TFLOP/s |" in text
    assert "| S2048 | — | 8.000 ms |" in text
