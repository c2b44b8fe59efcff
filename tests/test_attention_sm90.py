"""The Hopper forward (TMA descriptors, warp specialisation, persistent grid) and its fallback.

The interpreter runs tensor descriptors, so the sm_90 kernel's maths is checked on the CPU by
routing the launcher to it; on an H100 the same cases run natively and against the fallback.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from triton.runtime.errors import OutOfResources, PTXASError

import janus_fast.kernels.attention as K
import janus_fast.kernels.attention_fwd_sm90 as K90
from tests.helpers import DEVICE
from tests.test_attention import _run_dense, _run_varlen


@pytest.fixture
def sm90_forward(monkeypatch):
    """Route the launcher's forward to the sm_90 kernel (the interpreter has no architecture)."""
    if not K90.available():
        pytest.skip("this Triton lacks tensor descriptors or warp_specialize")
    monkeypatch.setattr(K, "_use_sm90_forward", lambda q, k, v, out, causal, scale: True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 33, 20, 4, 1, 40), (1, 17, 70, 2, 2, 64), (1, 1, 1, 2, 2, 32),
                                   (1, 19, 19, 1, 1, 160)])
def test_sm90_forward_dense(sm90_forward, shape, causal):
    _run_dense(shape, causal, torch.float16)


@pytest.mark.parametrize("causal", [False, True])
def test_sm90_forward_varlen(sm90_forward, causal):
    _run_varlen([5, 0, 17, 1, 33], [9, 4, 17, 0, 20], 4, 2, 64, causal, torch.float16)


@pytest.mark.parametrize("causal", [False, True])
def test_sm90_forward_never_reads_another_sequence(sm90_forward, causal):
    """Contract 1 on the TMA path: NaN/inf in another packed sequence's keys and values."""
    cu = torch.tensor([0, 7, 19, 30], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(30, 2, 32, dtype=torch.float16, device=DEVICE) for _ in range(3))
    clean, _ = K.varlen_attention_forward(q, k, v, cu, cu, 12, 12, causal, 0.2)
    k[7:19], v[7:19] = float("nan"), float("inf")
    out, _ = K.varlen_attention_forward(q, k, v, cu, cu, 12, 12, causal, 0.2)
    assert torch.equal(out[:7], clean[:7]) and torch.equal(out[19:], clean[19:]) and out[7:19].isnan().all()


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_sm90_causal_never_reads_hidden_values(sm90_forward, poison):
    """Contract 1 for the causal TMA path: one non-finite value v[j0, d0] (or key j0) of kv head 1.
    Rows before j0 come out bit-identical (the block holding j0 is a diagonal block of the first
    query block, where hidden values are kept out of P V); rows from j0 on are non-finite (NaN for
    a NaN) in column d0 only (or entirely for a key), in the diagonal block and in later query
    blocks, where j0's block is fully visible and takes the plain path."""
    q, k, v = (torch.randn(1, 45, 2, 32, dtype=torch.float16, device=DEVICE) for _ in range(3))
    clean, clean_lse = K.attention_forward(q, k, v, True, 0.2)
    j0, d0 = 21, 5
    v_bad = v.clone()
    v_bad[0, j0, 1, d0] = poison
    out, lse = K.attention_forward(q, k, v_bad, True, 0.2)
    expected_bad = torch.zeros_like(out, dtype=torch.bool)
    expected_bad[0, j0:, 1, d0] = True
    bad = out.isnan() if poison != poison else ~out.isfinite()
    assert torch.equal(bad, expected_bad) and torch.equal(out[~expected_bad], clean[~expected_bad])
    assert torch.equal(lse, clean_lse)
    k_bad = k.clone()
    k_bad[0, j0, 1] = poison
    out, _ = K.attention_forward(q, k_bad, v, True, 0.2)
    assert torch.equal(out[:, :j0], clean[:, :j0]) and torch.equal(out[:, :, 0], clean[:, :, 0])
    assert not out[0, j0:, 1].isfinite().any()


def test_fallback_when_the_features_are_missing(monkeypatch):
    """Without TMA-suitable strides, a Hopper GPU or the Triton features, the pointer-load kernel runs."""
    q = torch.randn(1, 8, 2, 48, dtype=torch.float16, device=DEVICE)
    misaligned = torch.randn(1, 8, 2, 49, dtype=torch.float16, device=DEVICE)[..., :48]  # row stride 98 bytes
    assert K90.tma_compatible(q, q, q, q) and not K90.tma_compatible(q, misaligned, q, q)
    if not q.is_cuda:
        assert not K._use_sm90_forward(q, q, q, q, False, 0.1)
    monkeypatch.setattr(K90, "available", lambda: False)
    assert not K._use_sm90_forward(q, q, q, q, False, 0.1)
    launched = []
    monkeypatch.setattr(K, "_attn_fwd_kernel", _Recorder(K._attn_fwd_kernel, launched))
    out, _ = K.attention_forward(q, q, q, False, 0.1)
    assert launched and not out.isnan().any()


@pytest.fixture
def fresh_sm90_state(monkeypatch):
    """No kind of call checked or failed yet, as in a new process."""
    monkeypatch.setattr(K, "_SM90_FAILED", {})
    monkeypatch.setattr(K, "_SM90_CHECKED", set())


class _TmaStandIn:
    """Stands in for the sm_90 kernel: counts launches; raises `errors` in turn (None: launch the
    real kernel), then perturbs the output if `perturb`."""

    def __init__(self, errors=(), perturb=False):
        self.real, self.errors, self.perturb, self.launches = K90._attn_fwd_tma_kernel, list(errors), perturb, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            error = self.errors.pop(0) if self.errors else None
            if error is not None:
                raise error
            self.real[grid](*args, **kwargs)
            if self.perturb:
                args[3].add_(1.0)
        return launch


def _pointer_result(monkeypatch, q, causal):
    with monkeypatch.context() as m:
        m.setattr(K, "_use_sm90_forward", lambda *args: False)
        return K.attention_forward(q, q, q, causal, 0.2)


@pytest.mark.parametrize("error", [OutOfResources(300000, 232448, "shared memory"), PTXASError("ptxas fatal"),
                                   RuntimeError("PassManager::run failed")])
def test_fallback_when_this_triton_cannot_build_it(sm90_forward, fresh_sm90_state, monkeypatch, error):
    """A Triton that cannot build the kernel: warn once, answer with the pointer-load kernel, and
    keep that kind of call (here non-causal) on it; another kind (causal) still tries sm_90."""
    stand_in = _TmaStandIn([error])
    monkeypatch.setattr(K90, "_attn_fwd_tma_kernel", stand_in)
    q = torch.randn(1, 20, 2, 32, dtype=torch.float16, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="did not compile"):
        out, lse = K.attention_forward(q, q, q, False, 0.2)
    expected = _pointer_result(monkeypatch, q, False)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1]) and len(K._SM90_FAILED) == 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the sm_90 attention forward")
        assert torch.equal(K.attention_forward(q, q, q, False, 0.2)[0], out)
        assert stand_in.launches == 1
        K.attention_forward(q, q, q, True, 0.2)
    assert stand_in.launches > 1 and len(K._SM90_FAILED) == 1


def test_out_of_memory_falls_back_for_this_call_only(sm90_forward, fresh_sm90_state, monkeypatch):
    stand_in = _TmaStandIn([torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")])
    monkeypatch.setattr(K90, "_attn_fwd_tma_kernel", stand_in)
    q = torch.randn(1, 20, 2, 32, dtype=torch.float16, device=DEVICE)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the sm_90 attention forward")
        out, _ = K.attention_forward(q, q, q, True, 0.2)
        assert torch.equal(out, _pointer_result(monkeypatch, q, True)[0]) and stand_in.launches == 1
        K.attention_forward(q, q, q, True, 0.2)
    assert stand_in.launches >= 2 and not K._SM90_FAILED and K._SM90_CHECKED  # tried again, checked, kept


@pytest.mark.parametrize("varlen", [False, True])
def test_self_check_disagreement_warns_once_and_falls_back(sm90_forward, fresh_sm90_state, monkeypatch, varlen):
    """Wrong code on an untested Triton is worse than slow code: a kernel whose output differs
    from the pointer kernel's on the check input is used once at most, and never trusted."""
    stand_in = _TmaStandIn(perturb=True)
    monkeypatch.setattr(K90, "_attn_fwd_tma_kernel", stand_in)
    q = torch.randn(1, 20, 2, 32, dtype=torch.float16, device=DEVICE)
    cu = torch.tensor([0, 20], dtype=torch.int32, device=DEVICE)

    def run():
        if varlen:
            return K.varlen_attention_forward(q[0], q[0], q[0], cu, cu, 20, 20, True, 0.2)[0][None]
        return K.attention_forward(q, q, q, True, 0.2)[0]

    with pytest.warns(RuntimeWarning, match="disagrees with the pointer-load kernel") as caught:
        out = run()
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert torch.equal(out, _pointer_result(monkeypatch, q, True)[0])
    launches = stand_in.launches
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the sm_90 attention forward")
        assert torch.equal(run(), out) and stand_in.launches == launches


def test_self_check_once_per_kind(sm90_forward, fresh_sm90_state, monkeypatch):
    """The real kernel passes its check (NaN contract included) once per kind of call; a GQA
    call is another kind (its group is not the constant 1)."""
    checks = []
    real = K._sm90_self_check
    monkeypatch.setattr(K, "_sm90_self_check", lambda *a: checks.append(a[2]["CAUSAL"]) or real(*a))
    q = torch.randn(1, 20, 2, 32, dtype=torch.float16, device=DEVICE)
    for _ in range(2):
        K.attention_forward(q, q, q, True, 0.2)
    assert checks == [True] and not K._SM90_FAILED
    K.attention_forward(q, q[:, :, :1], q[:, :, :1], True, 0.2)
    assert len(checks) == 2 and not K._SM90_FAILED


def test_unchecked_kind_takes_the_pointer_kernel_inside_a_capture(sm90_forward, fresh_sm90_state, monkeypatch):
    """The check syncs with the host: inside a CUDA graph capture an unchecked kind runs the
    pointer kernel; once checked outside, the sm_90 kernel is captured too."""
    stand_in = _TmaStandIn()
    monkeypatch.setattr(K90, "_attn_fwd_tma_kernel", stand_in)
    monkeypatch.setattr(K, "_capturing", lambda q: True)
    q = torch.randn(1, 20, 2, 32, dtype=torch.float16, device=DEVICE)
    K.attention_forward(q, q, q, False, 0.2)
    assert stand_in.launches == 0
    monkeypatch.setattr(K, "_capturing", lambda q: False)
    K.attention_forward(q, q, q, False, 0.2)
    launches = stand_in.launches
    monkeypatch.setattr(K, "_capturing", lambda q: True)
    K.attention_forward(q, q, q, False, 0.2)
    assert launches >= 2 and stand_in.launches == launches + 1


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
    assert K._use_sm90_forward(q, k, v, q, causal, d ** -0.5)
    fast = K.attention_forward(q, k, v, causal, d ** -0.5)
    assert not K._SM90_FAILED, K._SM90_FAILED
    monkeypatch.setattr(K, "_use_sm90_forward", lambda *args: False)
    slow = K.attention_forward(q, k, v, causal, d ** -0.5)
    torch.testing.assert_close(fast[0], slow[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fast[1], slow[1], atol=1e-3, rtol=1e-3)
