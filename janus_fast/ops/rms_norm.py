"""RMSNorm (Llama convention), optionally fused with the residual add before it: forward and
backward, for decoding (one token per row) and training (the packed fused layer).

Each public function validates its inputs, resolves the backend and calls a torch.library custom
op with a fake implementation; `rms_norm` is differentiable (its registered backward is the
`rms_norm_backward` op), and `rms_norm_backward` is public too, for a fused layer that recomputes
the norm in its own backward instead of keeping its output.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _backend, _checks

FAST = ("triton",)
_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


def _impl(backend: str, name: str):
    return _backend.implementation(backend, "rms_norm", name)


@torch.library.custom_op("janus_fast::rms_norm", mutates_args=())
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    return _impl(backend, "rms_norm")(x, weight, eps)[0].contiguous()


@_rms_norm.register_fake
def _(x, weight, eps, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("janus_fast::add_rms_norm", mutates_args=())
def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    y, h = _impl(backend, "rms_norm")(x, weight, eps, residual)
    return y.contiguous(), h.contiguous()


@_add_rms_norm.register_fake
def _(x, residual, weight, eps, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("janus_fast::rms_norm_backward", mutates_args=())
def _rms_norm_backward(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, dh: Optional[torch.Tensor],
                       eps: float, weight_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    # autograd's incoming gradients may be expanded (stride 0): the kernels read contiguous rows
    dh_total, dw = _impl(backend, "rms_norm_backward")(dy.contiguous(), h, weight, eps,
                                                      None if dh is None else dh.contiguous(), weight_grad)
    return dh_total.contiguous(), dw


@_rms_norm_backward.register_fake
def _(dy, h, weight, dh, eps, weight_grad, backend):
    return h.new_empty(h.shape), weight.new_empty(weight.shape if weight_grad else (0,))


def _grads(ctx, h, weight, dy, dh):
    """(gradient of h, of weight) for the incoming dy (of y) and dh (of h itself), either None."""
    if dy is None:
        return dh, None
    weight_grad = ctx.needs_input_grad[ctx.weight_index]
    dh_total, dw = _rms_norm_backward(dy, h, weight, dh, ctx.eps, weight_grad, ctx.backend)
    return dh_total, dw if weight_grad else None


def _setup(ctx, inputs, output):
    # x's gradient is h's: the sum x + residual with a residual (one of the outputs), x without one
    fused = len(inputs) == 5
    x, weight, ctx.eps, ctx.backend = (inputs[0], *inputs[2:]) if fused else inputs
    ctx.weight_index = 2 if fused else 1
    ctx.save_for_backward(output[1] if fused else x, weight)
    ctx.set_materialize_grads(False)


def _rms_norm_grad(ctx, dy):
    h, weight = ctx.saved_tensors
    dx, dw = _grads(ctx, h, weight, dy, None)
    return dx, dw, None, None


def _add_rms_norm_grad(ctx, dy, dh):
    h, weight = ctx.saved_tensors
    dx, dw = _grads(ctx, h, weight, dy, dh)
    return dx, dx, dw, None, None


_rms_norm.register_autograd(_rms_norm_grad, setup_context=_setup)
_add_rms_norm.register_autograd(_add_rms_norm_grad, setup_context=_setup)


def _check_norm(x, weight, eps, name: str = "x"):
    _checks.tensor(name, x, ndim=2, dtypes=_DTYPES)
    _checks.tensor("weight", weight, ndim=1, dtypes=(x.dtype, torch.float32), device=x.device)
    _checks.same(f"hidden sizes of {name} and weight", **{name: x.shape[1]}, weight=weight.shape[0])
    _checks.last_dim_contiguous(name, x)
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")
    eps = _checks.finite_number("eps", eps)
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return eps


def _check_like(name: str, t, x, x_name: str = "x") -> None:
    _checks.tensor(name, t, ndim=2, dtypes=(x.dtype,), device=x.device)
    _checks.same(f"shapes of {x_name} and {name}", **{x_name: tuple(x.shape)}, **{name: tuple(t.shape)})
    _checks.last_dim_contiguous(name, t)


def rms_norm(x, weight, *, eps: float, residual=None, backend: str = "auto"):
    """Llama RMSNorm over rows of x [M, N]: weight · (h / sqrt(mean(h²) + eps)), normalised in fp32
    and cast to x.dtype before the weight (the Llama convention). With `residual` [M, N], h = x +
    residual is formed first (in x.dtype) and the result is (y, h): the fused pre-norm of a
    residual block, whose h is the next residual. Without it: y alone, h = x. weight has x's
    dtype or float32 (fp32 master weights under bf16 compute). Differentiable in x, residual and
    weight (the weight's gradient in its own dtype, summed in fp32)."""
    eps = _check_norm(x, weight, eps)
    chosen = _backend.resolve_float("rms_norm", backend, x, FAST)
    if residual is None:
        return _rms_norm(x, weight, eps, chosen)
    _check_like("residual", residual, x)
    return _add_rms_norm(x, residual, weight, eps, chosen)


def rms_norm_backward(grad_y, h, weight, *, eps: float, grad_h=None, weight_grad: bool = True,
                      backend: str = "auto"):
    """The gradients of `rms_norm` from h (its input x, or the sum x + residual of the fused form)
    and grad_y, the gradient of y: (the gradient of h, of weight). grad_h, the gradient reaching h
    itself (the fused form's second output), is added in the same pass, so the first result is
    the gradient of x and of residual. weight_grad=False skips the weight's (an empty tensor).
    For a fused layer that recomputes y in its backward rather than keeping it."""
    eps = _check_norm(h, weight, eps, "h")
    _check_like("grad_y", grad_y, h, "h")
    if grad_h is not None:
        _check_like("grad_h", grad_h, h, "h")
    chosen = _backend.resolve_float("rms_norm", backend, h, FAST)
    return _rms_norm_backward(grad_y, h, weight, grad_h, eps, bool(weight_grad), chosen)
