"""RoPE of the q and k heads of one fused QKV projection at packed position ids (ops.rope_qkv),
forward and backward, on every backend against the float64 reference with the flash-attn error
rule; gradients against autograd through the reference; opcheck; bad inputs."""

import pytest
import torch

from janus_fast import ops
from janus_fast.models.llama import rope_cos_sin
from janus_fast.ops import reference
from janus_fast.ops.rope import FAST

from .helpers import (assert_close_to_reference, grads_of, grid, on_device,  # noqa: F401
                      poisoned_empty, skip_interpreted_bf16)

FAST_BACKENDS = list(FAST)  # (Triton only: janus_fast._C has none of these ops)
BACKENDS = ["reference"] + FAST_BACKENDS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
pytestmark = pytest.mark.usefixtures("on_device")  # (tests.helpers)


SHAPES = grid([(5, 4, 2, 16, 9), (1, 2, 2, 64, 1), (0, 2, 1, 8, 4), (7, 3, 1, 6, 12)],
              [(33, 16, 16, 128, 40), (17, 8, 1, 96, 17), (9, 32, 32, 128, 4096)])


def rope_inputs(t, hq, hkv, d, s, dtype, position_dtype=torch.int64, tables="random"):
    """qkv as a row-strided view of a wider projection, positions below s, fp32 tables [s, d]:
    random (so the two halves of a row differ, as the op allows) or rope_cos_sin's over 0..s-1."""
    width = (hq + 2 * hkv) * d
    qkv = torch.randn(t, width + 8, dtype=dtype)[:, 4:4 + width]
    positions = torch.randint(0, s, (t,), dtype=position_dtype)
    if tables == "random":
        cos, sin = torch.randn(s, d), torch.randn(s, d)
    else:
        cos, sin = (x[:, 0] for x in rope_cos_sin(torch.arange(s), d, 10000.0, torch.float32))
    return qkv, positions, cos, sin


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, hq, hkv, d, s", SHAPES)
def test_rope_qkv(backend, dtype, t, hq, hkv, d, s):
    skip_interpreted_bf16(backend, dtype)
    qkv, pos, cos, sin = rope_inputs(t, hq, hkv, d, s, dtype, torch.int32 if t % 2 else torch.int64,
                                     "rope" if hq == hkv else "random")
    exact = reference.rope_qkv(qkv.double(), pos, cos.double(), sin.double(), hq, hkv)
    base = reference.rope_qkv(qkv, pos, cos, sin, hq, hkv)
    with poisoned_empty():
        got = ops.rope_qkv(qkv, pos, cos, sin, num_heads=hq, num_kv_heads=hkv, backend=backend)
    for name, g, b, e in zip("qkv", got, base, exact):
        assert g.is_contiguous() and g.dtype == dtype
        assert_close_to_reference(g, b, e, name=name)
    assert torch.equal(got[2], qkv.reshape(t, hq + 2 * hkv, d)[:, hq + hkv:])  # v is copied


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, hq, hkv, d, s", SHAPES)
def test_rope_qkv_backward(backend, dtype, t, hq, hkv, d, s):
    """The gradient of qkv (one tensor) against autograd through the reference in float64."""
    skip_interpreted_bf16(backend, dtype)
    qkv, pos, cos, sin = rope_inputs(t, hq, hkv, d, s, dtype)
    grads = [torch.randn(t, h, d, dtype=dtype) for h in (hq, hkv, hkv)]
    exact = grads_of(lambda x: reference.rope_qkv(x, pos, cos.double(), sin.double(), hq, hkv), (qkv.double(),),
                     [g.double() for g in grads])
    base = grads_of(lambda x: reference.rope_qkv(x, pos, cos, sin, hq, hkv), (qkv,), grads)
    with poisoned_empty():
        (got,) = grads_of(lambda x: ops.rope_qkv(x, pos, cos, sin, num_heads=hq, num_kv_heads=hkv, backend=backend),
                          (qkv,), grads)
    assert got.shape == qkv.shape and got.is_contiguous()
    assert_close_to_reference(got, base[0], exact[0], factor=3.0, name="dqkv")
    explicit = reference.rope_qkv_backward(*grads, pos, cos, sin)
    assert_close_to_reference(explicit, base[0], exact[0], factor=3.0, name="reference.rope_qkv_backward")


def test_unused_outputs_have_zero_gradient():
    qkv, pos, cos, sin = rope_inputs(3, 2, 1, 8, 5, torch.float32)
    qkv.requires_grad_()
    q, k, v = ops.rope_qkv(qkv, pos, cos, sin, num_heads=2, num_kv_heads=1, backend="triton")
    (dqkv,) = torch.autograd.grad(k.sum(), qkv)
    assert (dqkv[:, :16] == 0).all() and (dqkv[:, 24:] == 0).all() and (dqkv[:, 16:24] != 0).any()


def test_nan_propagates():
    qkv, pos, cos, sin = rope_inputs(2, 2, 1, 8, 5, torch.float32)
    qkv = qkv.contiguous()
    qkv[1, 3] = float("nan")  # q head 0, first half: with its partner, two NaNs
    for backend in BACKENDS:
        q, k, v = ops.rope_qkv(qkv, pos, cos, sin, num_heads=2, num_kv_heads=1, backend=backend)
        assert q[1, 0].isnan().sum() == 2 and q.isnan().sum() == 2 and not (k.isnan().any() or v.isnan().any())


def test_opcheck():
    qkv, pos, cos, sin = rope_inputs(4, 2, 1, 8, 6, torch.float32)
    torch.library.opcheck(torch.ops.janus_fast.rope_qkv.default,
                          (qkv.contiguous().requires_grad_(), pos, cos, sin, 2, 1, "triton"))
    grads = (torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.randn(4, 1, 8))
    torch.library.opcheck(torch.ops.janus_fast.rope_qkv_backward.default, (*grads, pos, cos, sin, "triton"),
                          test_utils=("test_schema", "test_faketensor"))  # only ever called from a backward


def test_bad_inputs():
    qkv, pos, cos, sin = rope_inputs(3, 2, 1, 8, 6, torch.float32)
    with pytest.raises(ValueError, match="not a multiple of num_heads"):
        ops.rope_qkv(qkv, pos, cos, sin, num_heads=3, num_kv_heads=1)
    with pytest.raises(ValueError, match="head_dim must be even"):
        ops.rope_qkv(qkv[:, :28], pos, cos, sin, num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match="positions must lie in"):
        ops.rope_qkv(qkv, pos + 6, cos, sin, num_heads=2, num_kv_heads=1)
    with pytest.raises(TypeError, match="positions must have dtype"):
        ops.rope_qkv(qkv, pos.float(), cos, sin, num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match="tokens of qkv and positions"):
        ops.rope_qkv(qkv, pos[:2], cos, sin, num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match=r"cos must be \[S, 8\]"):
        ops.rope_qkv(qkv, pos, cos[:, :4], sin[:, :4], num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match="num_kv_heads must be >= 1"):
        ops.rope_qkv(qkv, pos, cos, sin, num_heads=4, num_kv_heads=0)
