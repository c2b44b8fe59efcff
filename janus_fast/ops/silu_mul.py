"""SiLU·mul, the SwiGLU of a Llama MLP: silu(gate) · up, forward and backward.

Two forms: separate gate and up tensors, or (up omitted) the [M, 2N] output of one fused gate/up
projection, gate columns first, whose gradient then comes back as one [M, 2N] tensor (no
gradients of two column slices to gather). Each public function validates, resolves the backend
and calls a torch.library custom op with a fake implementation; both forms are differentiable,
and `silu_mul_backward` is public for a fused layer that recomputes silu(gate) · up in its own
backward instead of keeping it.
"""

from __future__ import annotations

import torch

from . import _backend, _checks

FAST = ("triton",)
_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


def _impl(backend: str, name: str):
    return _backend.implementation(backend, "silu_mul", name)


def _halves(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = gate_up.shape[1] // 2
    return gate_up[:, :n], gate_up[:, n:]


@torch.library.custom_op("janus_fast::silu_mul", mutates_args=())
def _silu_mul(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    return _impl(backend, "silu_mul")(gate, up).contiguous()


@_silu_mul.register_fake
def _(gate, up, backend):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("janus_fast::silu_mul_fused", mutates_args=())
def _silu_mul_fused(gate_up: torch.Tensor, backend: str) -> torch.Tensor:
    return _impl(backend, "silu_mul")(*_halves(gate_up)).contiguous()


@_silu_mul_fused.register_fake
def _(gate_up, backend):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.custom_op("janus_fast::silu_mul_backward", mutates_args=())
def _silu_mul_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    # autograd's incoming gradient may be expanded (stride 0): the kernels read contiguous rows
    dgate, dup = _impl(backend, "silu_mul_backward")(dout.contiguous(), gate, up)
    return dgate.contiguous(), dup.contiguous()


@_silu_mul_backward.register_fake
def _(dout, gate, up, backend):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


@torch.library.custom_op("janus_fast::silu_mul_fused_backward", mutates_args=())
def _silu_mul_fused_backward(dout: torch.Tensor, gate_up: torch.Tensor, backend: str) -> torch.Tensor:
    return _impl(backend, "silu_mul_backward")(dout.contiguous(), *_halves(gate_up), fused=True)


@_silu_mul_fused_backward.register_fake
def _(dout, gate_up, backend):
    return gate_up.new_empty(gate_up.shape)


def _setup(ctx, inputs, output):
    *tensors, ctx.backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.set_materialize_grads(False)


def _grad(ctx, dout):
    if dout is None:
        return None, None, None
    return (*_silu_mul_backward(dout, *ctx.saved_tensors, ctx.backend), None)


def _fused_grad(ctx, dout):
    if dout is None:
        return None, None
    return _silu_mul_fused_backward(dout, *ctx.saved_tensors, ctx.backend), None


_silu_mul.register_autograd(_grad, setup_context=_setup)
_silu_mul_fused.register_autograd(_fused_grad, setup_context=_setup)


def _check(gate, up) -> None:
    """Checks of (gate, up), or of (gate_up, None)."""
    if up is None:
        _checks.tensor("gate_up", gate, ndim=2, dtypes=_DTYPES)
        if gate.shape[1] % 2:
            raise ValueError(f"gate_up must have an even number of columns (gate | up), got {gate.shape[1]}")
        _checks.last_dim_contiguous("gate_up", gate)
    else:
        _checks.tensor("gate", gate, ndim=2, dtypes=_DTYPES)
        _checks.tensor("up", up, ndim=2, dtypes=(gate.dtype,), device=gate.device)
        _checks.same("gate and up shapes", gate=tuple(gate.shape), up=tuple(up.shape))
        _checks.last_dim_contiguous("gate", gate)
        _checks.last_dim_contiguous("up", up)


def silu_mul(gate, up=None, *, backend: str = "auto"):
    """silu(gate) · up for gate/up [M, N] (rows may be strided: the two halves of one fused
    gate/up projection), in fp32, rounded once -> [M, N] contiguous. With up omitted, `gate` is
    that fused projection [M, 2N] (gate columns first) and its gradient is one [M, 2N] tensor.
    Differentiable."""
    _check(gate, up)
    chosen = _backend.resolve_float("silu_mul", backend, gate, FAST)
    return _silu_mul_fused(gate, chosen) if up is None else _silu_mul(gate, up, chosen)


def silu_mul_backward(grad_out, gate, up=None, *, backend: str = "auto"):
    """The gradients of `silu_mul` for grad_out [M, N]: (of gate, of up), or with up omitted the
    gradient of the fused [M, 2N] gate/up tensor. For a fused layer that recomputes silu(gate) · up
    in its backward rather than keeping it."""
    _check(gate, up)
    n = gate.shape[1] if up is not None else gate.shape[1] // 2
    _checks.tensor("grad_out", grad_out, ndim=2, dtypes=(gate.dtype,), device=gate.device)
    _checks.same("grad_out and output shapes", grad_out=tuple(grad_out.shape), output=(gate.shape[0], n))
    _checks.last_dim_contiguous("grad_out", grad_out)
    chosen = _backend.resolve_float("silu_mul", backend, gate, FAST)
    if up is None:
        return _silu_mul_fused_backward(grad_out, gate, chosen)
    return _silu_mul_backward(grad_out, gate, up, chosen)
