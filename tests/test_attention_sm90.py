"""The Hopper forward (TMA descriptors, warp specialisation, persistent grid) and its fallback.

The interpreter runs tensor descriptors, so the sm_90 kernel's maths is checked on the CPU by
routing the launcher to it; on an H100 the same cases run natively and against the fallback.
"""

from __future__ import annotations

import pytest
import torch

import janus_fast.kernels.attention as K
import janus_fast.kernels.attention_fwd_sm90 as K90
from tests.helpers import DEVICE
from tests.test_attention import _run_dense, _run_varlen


@pytest.fixture
def sm90_forward(monkeypatch):
    """Route the launcher's forward to the sm_90 kernel (the interpreter has no architecture)."""
    if not K90.available():
        pytest.skip("this Triton lacks tensor descriptors or warp_specialize")
    monkeypatch.setattr(K, "_use_sm90_forward", lambda *args: True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 33, 20, 4, 1, 40), (1, 17, 70, 2, 2, 64), (1, 1, 1, 2, 2, 32)])
def test_sm90_forward_dense(sm90_forward, shape, causal):
    _run_dense(shape, causal, torch.float16)


@pytest.mark.parametrize("causal", [False, True])
def test_sm90_forward_varlen(sm90_forward, causal):
    _run_varlen([5, 0, 17, 1, 33], [9, 4, 17, 0, 20], 4, 2, 64, causal, torch.float16)


def test_sm90_forward_never_reads_hidden_values(sm90_forward):
    """Contract 1 on the TMA path: NaN in a causally hidden value or past a packed sequence's end."""
    q, k, v = (torch.randn(1, 37, 2, 32, dtype=torch.float16, device=DEVICE) for _ in range(3))
    clean, _ = K.attention_forward(q, k, v, True, 0.2)
    v[0, 21] = float("nan")
    out, _ = K.attention_forward(q, k, v, True, 0.2)
    assert torch.equal(out[:, :21], clean[:, :21]) and out[:, 21:].isnan().all()


def test_fallback_when_the_features_are_missing(monkeypatch):
    """Without TMA-suitable strides, a Hopper GPU or the Triton features, the pointer-load kernel runs."""
    q = torch.randn(1, 8, 2, 48, dtype=torch.float16, device=DEVICE)
    misaligned = torch.randn(1, 8, 2, 49, dtype=torch.float16, device=DEVICE)[..., :48]  # row stride 98 bytes
    assert K90.tma_compatible(q, q, q, q) and not K90.tma_compatible(q, misaligned, q, q)
    if not q.is_cuda:
        assert not K._use_sm90_forward(q, q, q, q, 0.1)
    monkeypatch.setattr(K90, "available", lambda: False)
    assert not K._use_sm90_forward(q, q, q, q, 0.1)
    launched = []
    monkeypatch.setattr(K, "_attn_fwd_kernel", _Recorder(K._attn_fwd_kernel, launched))
    out, _ = K.attention_forward(q, q, q, True, 0.1)
    assert launched and not out.isnan().any()


class _Recorder:
    """Stands in for a kernel: records that it was launched, then launches the real one."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(grid)
        return self.kernel[grid]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 1000, 1000, 32, 8, 128), (4, 576, 576, 16, 16, 64), (1, 100, 700, 4, 4, 256)])
def test_gpu_sm90_forward_matches_fallback(monkeypatch, shape, causal):
    if torch.cuda.get_device_capability()[0] < 9 or not K90.available():
        pytest.skip("needs an sm_90 GPU and a Triton with TMA descriptors and warp specialisation")
    b, sq, sk, hq, hkv, d = shape
    q = torch.randn(b, sq, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    assert K._use_sm90_forward(q, k, v, q, d ** -0.5)
    fast = K.attention_forward(q, k, v, causal, d ** -0.5)
    monkeypatch.setattr(K, "_use_sm90_forward", lambda *args: False)
    slow = K.attention_forward(q, k, v, causal, d ** -0.5)
    torch.testing.assert_close(fast[0], slow[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fast[1], slow[1], atol=1e-3, rtol=1e-3)
