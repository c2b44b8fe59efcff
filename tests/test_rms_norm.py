"""RMSNorm (alone and fused with the residual add), forward and backward, on every backend against
the float64 reference with the flash-attn error rule; gradients against autograd through the
reference; the public backward; opcheck; bad inputs."""

import pytest
import torch

from janus_fast import ops
from janus_fast.ops import reference
from janus_fast.ops.rms_norm import FAST

from .helpers import (assert_close_to_reference, exact_and_baseline, grads_of, grid, on_device,  # noqa: F401
                      poisoned_empty, skip_interpreted_bf16)

FAST_BACKENDS = list(FAST)  # (Triton only: janus_fast._C has none of these ops)
BACKENDS = ["reference"] + FAST_BACKENDS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
pytestmark = pytest.mark.usefixtures("on_device")  # (tests.helpers)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n", grid([(1, 64), (5, 100), (0, 32)], [(7, 1000), (3, 4096)]))
def test_rms_norm(backend, dtype, m, n):
    skip_interpreted_bf16(backend, dtype)
    x, r = torch.randn(m, n, dtype=dtype), torch.randn(m, n, dtype=dtype)
    w = torch.rand(n, dtype=dtype) + 0.5
    (y64, _), (y_base, _) = exact_and_baseline(lambda a, b, c: reference.rms_norm(a, c, 1e-6, b), x, r, w)
    with poisoned_empty():
        y, h = ops.rms_norm(x, w, eps=1e-6, residual=r, backend=backend)
        alone = ops.rms_norm(x, w, eps=1e-6, backend=backend)
    assert h.dtype == dtype and torch.equal(h, x + r)  # the residual sum rounds as torch adds
    assert_close_to_reference(y, y_base, y64)
    (a64, _), (a_base, _) = exact_and_baseline(lambda a, c: reference.rms_norm(a, c, 1e-6), x, w)
    assert_close_to_reference(alone, a_base, a64)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_rms_norm_reads_strided_rows(backend):
    x = torch.randn(4, 160)[:, 16:144]
    w = torch.rand(128)
    torch.testing.assert_close(ops.rms_norm(x, w, eps=1e-5, backend=backend),
                               reference.rms_norm(x.contiguous(), w, 1e-5)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, weight_dtype", grid([(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                      (torch.float16, torch.float32)], [(torch.float16, torch.float16)]))
@pytest.mark.parametrize("m, n", grid([(1, 64), (13, 100), (0, 32)], [(67, 1000), (9, 4096)]))
@pytest.mark.parametrize("fused", [True, False])
def test_rms_norm_backward(backend, dtype, weight_dtype, m, n, fused):
    """Gradients of x, residual and weight (fp32 weights under 16-bit compute included) against
    autograd through the reference in float64, the rule's 3x."""
    skip_interpreted_bf16(backend, dtype)
    x, r = torch.randn(m, n, dtype=dtype), torch.randn(m, n, dtype=dtype)
    w = (torch.rand(n) + 0.5).to(weight_dtype)
    gy, gh = torch.randn(m, n, dtype=dtype), torch.randn(m, n, dtype=dtype)

    def ref(x, r, w):
        y, h = reference.rms_norm(x, w, 1e-6, r if fused else None)
        return (y, h) if fused else y

    exact = grads_of(ref, [t.double() for t in (x, r, w)], [g.double() for g in (gy, gh)][:2 if fused else 1])
    base = grads_of(ref, (x, r, w), (gy, gh) if fused else (gy,))
    with poisoned_empty():
        got = grads_of(lambda a, b, c: ops.rms_norm(a, c, eps=1e-6, residual=b if fused else None, backend=backend),
                       (x, r, w), (gy, gh) if fused else (gy,))
    assert got[2].dtype == weight_dtype
    for name, g, b, e in zip(("x", "residual", "weight"), got, base, exact):
        if name == "residual" and not fused:
            assert g is None
            continue
        assert_close_to_reference(g, b, e, factor=3.0, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_backward_is_the_registered_one(backend):
    """ops.rms_norm_backward(grad_y, h, weight, grad_h=...) gives autograd's gradients of the fused
    form (x's and residual's are one tensor); weight_grad=False leaves the weight's out."""
    x, r, w = torch.randn(6, 48), torch.randn(6, 48), torch.rand(48) + 0.5
    gy, gh = torch.randn(6, 48), torch.randn(6, 48)
    dx, dr, dw = grads_of(lambda a, b, c: ops.rms_norm(a, c, eps=1e-5, residual=b, backend=backend), (x, r, w),
                          (gy, gh))
    dh, dweight = ops.rms_norm_backward(gy, x + r, w, eps=1e-5, grad_h=gh, backend=backend)
    assert torch.equal(dh, dx) and torch.equal(dh, dr) and torch.equal(dweight, dw)
    dh_only, nothing = ops.rms_norm_backward(gy, x + r, w, eps=1e-5, grad_h=gh, weight_grad=False, backend=backend)
    assert torch.equal(dh_only, dx) and nothing.numel() == 0


def test_nan_propagates():
    x = torch.randn(2, 8, requires_grad=True)
    with torch.no_grad():
        x[1, 3] = float("nan")
    for backend in BACKENDS:
        y = ops.rms_norm(x, torch.ones(8), eps=1e-6, backend=backend)
        assert y[1].isnan().all() and not y[0].isnan().any()
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert dx[1].isnan().all() and not dx[0].isnan().any()


def test_opcheck():
    """The forward ops with their autograd (one registration serves both), the backward op's
    schema and fake implementation (it is only ever called from a backward)."""
    x, r, w = torch.randn(3, 32), torch.randn(3, 32), torch.rand(32)
    torch.library.opcheck(torch.ops.janus_fast.rms_norm.default, (x, w, 1e-6, "triton"))
    torch.library.opcheck(torch.ops.janus_fast.add_rms_norm.default,
                          (x.requires_grad_(), r.requires_grad_(), w.requires_grad_(), 1e-6, "triton"))
    for dh in (None, torch.randn(3, 32)):
        torch.library.opcheck(torch.ops.janus_fast.rms_norm_backward.default,
                              (torch.randn(3, 32), torch.randn(3, 32), w.detach(), dh, 1e-6, True, "triton"),
                              test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs():
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(ValueError, match="hidden sizes"):
        ops.rms_norm(x, torch.ones(7), eps=1e-6)
    with pytest.raises(ValueError, match="eps"):
        ops.rms_norm(x, w, eps=0.0)
    with pytest.raises(TypeError, match="residual"):
        ops.rms_norm(x, w, eps=1e-6, residual=x.half())
    with pytest.raises(TypeError, match="weight"):
        ops.rms_norm(x.half(), w.double(), eps=1e-6)
    with pytest.raises(ValueError, match="shapes of h and grad_y"):
        ops.rms_norm_backward(x[:1], x, w, eps=1e-6)
    with pytest.raises(ValueError, match="shapes of h and grad_h"):
        ops.rms_norm_backward(x, x, w, eps=1e-6, grad_h=x[:, :4])
    with pytest.raises(ValueError, match="h must be contiguous in its last dimension"):
        ops.rms_norm_backward(x, torch.randn(8, 2).t(), w, eps=1e-6)
