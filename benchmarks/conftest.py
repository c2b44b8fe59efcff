"""Benchmarks skip, with the reason, where there is no CUDA GPU; the timing helpers live in
benchmarks/harness.py."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks time GPU kernels; no CUDA GPU here")
    for item in items:
        item.add_marker(skip)
