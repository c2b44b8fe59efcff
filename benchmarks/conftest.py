"""Benchmarks skip, with the reason, where there is no CUDA GPU; the timing helpers live in
benchmarks/harness.py."""

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks time GPU kernels; no CUDA GPU here")
    for item in items:
        if HERE in Path(item.fspath).resolve().parents:
            item.add_marker(skip)
