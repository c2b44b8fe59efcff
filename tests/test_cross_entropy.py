"""linear_cross_entropy: the Triton kernel (the interpreter on CPU) and the reference backend
against the float64 reference, loss and gradients, by flash-attn's rule (error at most 2x / 3x
that of plain torch at the same precision: fp16/bf16 logits from F.linear, then cross_entropy)."""

import pytest
import torch
import torch.nn.functional as F

from janus_fast import ops
from janus_fast.ops import reference as ref
from tests.helpers import DEVICE, assert_close_to_reference, grid

BACKENDS = ["triton", "reference"]
GPU_ONLY = pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter has no bfloat16 arithmetic")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=GPU_ONLY)]


def poison_allocator(numel: int) -> None:
    """Leave NaN in the caching allocator so an unwritten output shows (as tests/test_vq.py does)."""
    torch.full((numel,), float("nan"), device=DEVICE)


def make_case(n, h, v, dtype, bias, ignored=(), requires_grad=True):
    x = (torch.randn(n, h, device=DEVICE) * 2).to(dtype)
    w = (torch.randn(v, h, device=DEVICE) / h ** 0.5).to(dtype)
    b = torch.randn(v, device=DEVICE).to(dtype) if bias else None
    target = torch.randint(0, v, (n,), device=DEVICE)
    for i in ignored:
        target[i] = -100
    tensors = [t.requires_grad_(requires_grad) for t in (x, w, b) if t is not None]
    return x, w, b, target, tensors


def torch_loss(x, w, b, target, reduction):
    """What people write: full logits in the input dtype, cross-entropy in fp32."""
    total = F.cross_entropy(F.linear(x, w, b).float(), target, ignore_index=-100, reduction="sum")
    return total if reduction == "sum" else total / (target != -100).sum().clamp(min=1)


def loss_and_grads(fn, tensors):
    loss = fn()
    return [loss.detach(), *torch.autograd.grad(loss, tensors)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", grid(["mean"], ["sum"]))
@pytest.mark.parametrize("n,h,v,bias,chunk", grid(
    [(1, 16, 10, False, None), (37, 24, 101, True, 8), (50, 17, 33, True, 7)],
    [(64, 32, 300, False, None), (257, 64, 1000, True, None), (300, 40, 5000, False, 64),
     (129, 128, 4099, True, 32)]))
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(backend, reduction, n, h, v, bias, chunk, dtype):
    x, w, b, target, tensors = make_case(n, h, v, dtype, bias, ignored=range(0, n, 5))
    poison_allocator(4 * (n * h + v * h))
    got = loss_and_grads(lambda: ops.linear_cross_entropy(x, w, target, b, reduction=reduction, chunk_size=chunk,
                                                          backend=backend), tensors)
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    exact_inputs = [t.detach().double().requires_grad_() for t in tensors]
    xe, we, be = exact_inputs[0], exact_inputs[1], exact_inputs[2] if bias else None
    exact = loss_and_grads(lambda: ref.linear_cross_entropy(xe, we, target, be, reduction=reduction), exact_inputs)
    baseline = loss_and_grads(lambda: torch_loss(x, w, b, target, reduction), tensors)
    for i, name in enumerate(["loss", "dx", "dweight", "dbias"][:len(got)]):
        assert got[i].dtype == (torch.float32 if i == 0 else tensors[i - 1].dtype)
        # The floor is relative: a sum over many rows is only as exact as fp32 accumulation.
        floor = 1e-6 * max(1.0, exact[i].abs().max().item())
        assert_close_to_reference(got[i], baseline[i], exact[i], factor=2.0 if i == 0 else 3.0, floor=floor,
                                  name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_targets_ignored_give_zero(backend, reduction):
    x, w, b, target, tensors = make_case(9, 16, 20, torch.float32, True, ignored=range(9))
    loss, *grads = loss_and_grads(lambda: ops.linear_cross_entropy(x, w, target, b, reduction=reduction,
                                                                   chunk_size=4, backend=backend), tensors)
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows(backend):
    x, w, b, target, tensors = make_case(0, 16, 20, torch.float32, False)
    loss, dx, dw = loss_and_grads(lambda: ops.linear_cross_entropy(x, w, target, backend=backend), tensors)
    assert loss.item() == 0.0 and dx.shape == (0, 16) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_do_not_change_the_sum(backend):
    """Rows whose target is ignored contribute nothing: the same summed loss as without them
    (and the float64 reference's), and no gradient flows into their hidden states."""
    x, w, b, target, tensors = make_case(20, 16, 30, torch.float32, False, ignored=[2, 3, 11])
    loss = ops.linear_cross_entropy(x, w, target, reduction="sum", chunk_size=3, backend=backend)
    keep = target != -100
    alone = ops.linear_cross_entropy(x[keep], w, target[keep], reduction="sum", backend=backend)
    torch.testing.assert_close(loss, alone, rtol=1e-5, atol=1e-5)
    exact = ref.linear_cross_entropy(x.double(), w.double(), target, reduction="sum")
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-5)
    (dx,) = torch.autograd.grad(loss, [x])
    assert torch.equal(dx[~keep], torch.zeros_like(dx[~keep]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_no_grad(backend):
    """A frozen head gets no gradient (and none is computed); without grad mode only the loss."""
    x, w, _, target, _ = make_case(12, 16, 30, torch.float32, False)
    w.requires_grad_(False)
    loss = ops.linear_cross_entropy(x, w, target, backend=backend)
    loss.backward()
    assert x.grad is not None and w.grad is None
    with torch.no_grad():
        again = ops.linear_cross_entropy(x, w, target, backend=backend)
    assert not again.requires_grad
    torch.testing.assert_close(again, loss.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_upstream_gradient(backend):
    """The backward scales the gradients computed in the forward by dloss."""
    x, w, b, target, tensors = make_case(10, 16, 25, torch.float32, True)
    loss = ops.linear_cross_entropy(x, w, target, b, backend=backend)
    once = torch.autograd.grad(loss, tensors, retain_graph=True)
    thrice = torch.autograd.grad(3 * loss, tensors)
    for a, c in zip(once, thrice):
        torch.testing.assert_close(3 * a, c)


def test_autocast_computes_in_the_autocast_dtype():
    x, w, _, target, _ = make_case(8, 16, 20, torch.float32, False)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = ops.linear_cross_entropy(x, w, target, backend="reference")
        (dw,) = torch.autograd.grad(got, [w])
    expected = ref.linear_cross_entropy(x.bfloat16(), w.bfloat16(), target)
    torch.testing.assert_close(got, expected.float())
    assert dw.dtype == torch.float32


def test_opcheck():
    x, w, b, target, _ = make_case(19, 16, 40, torch.float32, True, ignored=[4])
    torch.library.opcheck(torch.ops.janus_fast.linear_cross_entropy.default,
                          (x, w, b, target, -100, True, True, True, 8, "triton"))
    torch.library.opcheck(torch.ops.janus_fast.linear_cross_entropy.default,
                          (x.detach(), w.detach(), None, target, -100, True, False, False, 0, "triton"))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(target=torch.tensor([0, 40, 1])), ValueError, "target"),
    (dict(target=torch.tensor([0, -5, 1])), ValueError, "target"),
    (dict(target=torch.tensor([0.0, 1.0, 2.0])), TypeError, "target"),
    (dict(target=torch.tensor([0, 1])), ValueError, "rows of x and target"),
    (dict(weight=torch.randn(40, 15)), ValueError, "hidden size"),
    (dict(weight=torch.randn(40, 16).half()), TypeError, "weight"),
    (dict(bias=torch.randn(39)), ValueError, "bias"),
    (dict(x=torch.randn(3, 16, 1)), ValueError, "x"),
    (dict(reduction="none"), ValueError, "reduction"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
])
def test_bad_input(kwargs, error, match):
    args = dict(x=torch.randn(3, 16), weight=torch.randn(40, 16), target=torch.tensor([0, 1, -100]))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ops.linear_cross_entropy(**args, backend="triton")


def largest_tensor_created(fn) -> int:
    """The most elements of any tensor an aten op returns while fn runs (a dispatch mode sees
    the ops inside the launcher; called on the launcher itself, not through the custom op, whose
    insides a mode does not see)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    largest = [0]

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:  # the interpreter's byte copies
                    largest[0] = max(largest[0], t.numel())
            return out

    with Watch():
        fn()
    return largest[0]


def test_triton_path_never_holds_the_full_logits():
    """Loss and gradients without any [N, V] tensor: the largest is a chunk of logits or dW;
    the reference, which does form the logits, shows the watch would see them."""
    from janus_fast.kernels.cross_entropy import linear_cross_entropy as launcher

    n, h, v = 256, 16, 300
    x, w, _, target, _ = make_case(n, h, v, torch.float32, False, ignored=[3], requires_grad=False)
    fused = largest_tensor_created(lambda: launcher(x, w, None, target, -100, True, True, True, 16))
    assert fused == max(16 * v, v * h, n * h) < n * v // 10
    assert largest_tensor_created(lambda: ref.linear_cross_entropy_backward(x, w, target)) >= n * v


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets(backend):
    x, w, b, target, _ = make_case(30, 16, 50, torch.float32, True, ignored=[1, 7])
    wide = ops.linear_cross_entropy(x, w, target, b, chunk_size=8, backend=backend)
    narrow = ops.linear_cross_entropy(x, w, target.int(), b, chunk_size=8, backend=backend)
    torch.testing.assert_close(wide, narrow)
