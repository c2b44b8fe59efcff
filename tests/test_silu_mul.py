"""SiLU·mul (separate gate/up, or the halves of one fused projection), forward and backward, on
every backend against the float64 reference with the flash-attn error rule; gradients against
autograd through the reference; the public backward; opcheck; bad inputs."""

import pytest
import torch

from janus_fast import ops
from janus_fast.ops import reference
from janus_fast.ops.silu_mul import FAST

from .helpers import (assert_close_to_reference, exact_and_baseline, grads_of, grid, on_device,  # noqa: F401
                      poisoned_empty, skip_interpreted_bf16)

FAST_BACKENDS = list(FAST)  # (Triton only: janus_fast._C has none of these ops)
BACKENDS = ["reference"] + FAST_BACKENDS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
pytestmark = pytest.mark.usefixtures("on_device")  # (tests.helpers)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n", grid([(1, 1), (3, 130), (0, 8)], [(6, 5000), (2, 11008)]))
def test_silu_mul(backend, dtype, m, n):
    skip_interpreted_bf16(backend, dtype)
    gate_up = torch.randn(m, 2 * n, dtype=dtype) * 3
    gate, up = gate_up.split(n, -1)  # the halves of one fused projection: strided rows
    exact, base = exact_and_baseline(reference.silu_mul, gate, up)
    with poisoned_empty():
        separate, fused = ops.silu_mul(gate, up, backend=backend), ops.silu_mul(gate_up, backend=backend)
    assert_close_to_reference(separate, base, exact)
    assert torch.equal(fused, separate)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n", grid([(1, 1), (5, 130), (0, 8)], [(6, 5000), (3, 11008)]))
def test_silu_mul_backward(backend, dtype, m, n):
    """Gradients of gate and up (separate tensors) and of the fused gate/up tensor (one tensor)
    against autograd through the reference in float64, the rule's 3x; large |gate| included."""
    skip_interpreted_bf16(backend, dtype)
    gate_up = torch.randn(m, 2 * n, dtype=dtype) * 4
    if m * n:
        gate_up[0, 0], gate_up[-1, n - 1] = 40.0, -40.0  # saturated sigmoid at both ends
    gout = torch.randn(m, n, dtype=dtype)
    exact = grads_of(lambda g, u: reference.silu_mul(g, u), [t.double() for t in gate_up.split(n, -1)],
                     (gout.double(),))
    base = grads_of(lambda g, u: reference.silu_mul(g, u), gate_up.split(n, -1), (gout,))
    with poisoned_empty():
        separate = grads_of(lambda g, u: ops.silu_mul(g, u, backend=backend), gate_up.split(n, -1), (gout,))
        (fused,) = grads_of(lambda gu: ops.silu_mul(gu, backend=backend), (gate_up,), (gout,))
    for name, g, b, e in zip(("gate", "up"), separate, base, exact):
        assert_close_to_reference(g, b, e, factor=3.0, name=name)
    assert fused.shape == (m, 2 * n) and torch.equal(fused, torch.cat(separate, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_backward_is_the_registered_one(backend):
    gate_up, gout = torch.randn(4, 2 * 24), torch.randn(4, 24)
    (want,) = grads_of(lambda gu: ops.silu_mul(gu, backend=backend), (gate_up,), (gout,))
    assert torch.equal(ops.silu_mul_backward(gout, gate_up, backend=backend), want)
    dgate, dup = ops.silu_mul_backward(gout, *gate_up.split(24, -1), backend=backend)
    assert torch.equal(torch.cat([dgate, dup], 1), want)


def test_nan_propagates():
    x = torch.randn(2, 8)
    x[1, 3] = float("nan")
    for backend in BACKENDS:
        s = ops.silu_mul(x, torch.ones(2, 8), backend=backend)
        assert s[1, 3].isnan() and s.isnan().sum() == 1
        dgate, dup = ops.silu_mul_backward(torch.ones(2, 8), x, torch.ones(2, 8), backend=backend)
        assert dgate[1, 3].isnan() and dgate.isnan().sum() == 1 and dup.isnan().sum() == 1


def test_opcheck():
    gate, up, gate_up = (t.requires_grad_() for t in (torch.randn(3, 40), torch.randn(3, 40), torch.randn(3, 80)))
    torch.library.opcheck(torch.ops.janus_fast.silu_mul.default, (gate, up, "triton"))
    torch.library.opcheck(torch.ops.janus_fast.silu_mul_fused.default, (gate_up, "triton"))
    gout, light = torch.randn(3, 40), ("test_schema", "test_faketensor")  # backward ops: no autograd of their own
    torch.library.opcheck(torch.ops.janus_fast.silu_mul_backward.default, (gout, gate.detach(), up.detach(), "triton"),
                          test_utils=light)
    torch.library.opcheck(torch.ops.janus_fast.silu_mul_fused_backward.default, (gout, gate_up.detach(), "triton"),
                          test_utils=light)


def test_bad_inputs():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="gate and up shapes"):
        ops.silu_mul(x, torch.randn(2, 9))
    with pytest.raises(ValueError, match="gate_up must have an even number of columns"):
        ops.silu_mul(torch.randn(2, 7))
    with pytest.raises(TypeError, match="up must have dtype"):
        ops.silu_mul(x, x.half())
    with pytest.raises(ValueError, match="grad_out and output shapes"):
        ops.silu_mul_backward(torch.randn(2, 8), x)
    with pytest.raises(ValueError, match="gate_up must be contiguous in its last dimension"):
        ops.silu_mul(torch.randn(8, 2).t())
