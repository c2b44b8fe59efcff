"""Test setup: without a GPU, Triton kernels run in the interpreter, which must be switched on
before triton is imported anywhere. Per-test timeouts, a run's deadline and a log that survives a
kill come from tests/run_limits.py (JANUS_FAST_TEST_TIMEOUT, _DEADLINE, _LOG, _RESUME)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.pluginmanager.import_plugin("tests.run_limits")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
