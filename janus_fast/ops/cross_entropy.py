"""Fused linear + cross-entropy (linear_cross_entropy): the loss of `x Wᵀ + b` against targets
without the [tokens, vocab] logits.

The public function validates, resolves the backend and calls a torch.library custom op that
returns the loss together with its gradients (computed chunk by chunk in the forward pass, as
the loss ends the graph); the registered backward only scales them by dloss.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _backend, _checks, reference

FAST = ("triton",)
REDUCTIONS = ("mean", "sum")
_REFERENCE_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


def _grads_reference(x, weight, bias, target, ignore_index, mean, input_grad, weight_grad):
    loss, dx, dw, db = reference.linear_cross_entropy_backward(x, weight, target, bias, ignore_index,
                                                               "mean" if mean else "sum")
    def unless(needed, t):  # a fresh empty tensor per output: outputs must not alias
        return t if needed else x.new_empty(0, dtype=t.dtype)

    return loss, unless(input_grad, dx), unless(weight_grad, dw), unless(weight_grad and bias is not None, db)


@torch.library.custom_op("janus_fast::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          target: torch.Tensor, ignore_index: int, mean: bool, input_grad: bool,
                          weight_grad: bool, chunk_size: int, backend: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # The public function already cast for autocast; inside, every dtype is chosen explicitly.
    with torch.autocast(x.device.type, enabled=False):
        if backend == "reference":
            return _grads_reference(x, weight, bias, target, ignore_index, mean, input_grad, weight_grad)
        kernels = _backend.triton_kernels("cross_entropy")
        return kernels.linear_cross_entropy(x, weight, bias, target, ignore_index, mean, input_grad,
                                            weight_grad, chunk_size)


def _grad_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@_linear_cross_entropy.register_fake
def _(x, weight, bias, target, ignore_index, mean, input_grad, weight_grad, chunk_size, backend):
    ct = _grad_dtype(x)
    dx = x.new_empty(tuple(x.shape) if input_grad else (0,))
    dw = x.new_empty(tuple(weight.shape) if weight_grad else (0,), dtype=ct)
    db = x.new_empty((weight.shape[0],) if weight_grad and bias is not None else (0,), dtype=ct)
    return x.new_empty((), dtype=ct), dx, dw, db


def _setup(ctx, inputs, output):
    x, weight, bias, _target, _ignore, _mean, input_grad, weight_grad, *_ = inputs
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.computed = (input_grad, weight_grad, weight_grad and bias is not None)
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, dloss, *_unused):
    saved = ctx.saved_tensors
    for name, needed, computed in zip(("x", "weight", "bias"), ctx.needs_input_grad[:3], ctx.computed):
        if needed and not computed:
            raise RuntimeError(f"linear_cross_entropy: the gradient of {name} was not computed in the forward "
                               "pass (grad mode was off, or it did not require grad then)")
    grads = [(dloss * g).to(dtype) if needed else None
             for g, dtype, needed in zip(saved, ctx.dtypes, ctx.needs_input_grad[:3])]
    return (*grads, None, None, None, None, None, None, None)


_linear_cross_entropy.register_autograd(_backward, setup_context=_setup)


def _autocast(*tensors):
    """Under torch.autocast a linear layer computes in the autocast dtype: so does this one."""
    device = tensors[0].device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return tuple(None if t is None else t.to(dtype) for t in tensors)
    return tensors


def linear_cross_entropy(x, weight, target, bias=None, *, ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: int | None = None, backend: str = "auto") -> torch.Tensor:
    """cross_entropy(x Wᵀ + b, target), differentiable in x, weight and bias, without forming the
    [N, V] logits on the fast backends.

    x [N, H] float, weight [V, H] and bias [V] of x's dtype (under torch.autocast all three
    compute in the autocast dtype, as F.linear would), target int64/int32 [N] in [0, V) or
    ignore_index. reduction "mean" divides the sum over valid targets by their number (a batch
    with no valid target gives 0 and zero gradients, where torch gives NaN), "sum" does not.
    Returns a 0-dim float32 tensor (float64 for float64 inputs). chunk_size: rows per chunk of
    logits (default: about N·H/V, so a chunk is as large as x). The gradients are computed during
    the forward pass when grad mode is on and an input requires grad.
    """
    x, weight, bias = _autocast(x, weight, bias)
    dtypes = _REFERENCE_DTYPES if backend in ("reference", "auto") else _checks.FLOAT_DTYPES
    _checks.tensor("x", x, ndim=2, dtypes=dtypes)
    _checks.tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    _checks.same("hidden size of x and weight", x=x.shape[1], weight=weight.shape[1])
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1)")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=x.device)
        _checks.same("vocabulary size of weight and bias", weight=weight.shape[0], bias=bias.shape[0])
    _checks.tensor("target", target, ndim=1, dtypes=(torch.int64, torch.int32), device=x.device)
    _checks.same("rows of x and target", x=x.shape[0], target=target.shape[0])
    ignore_index = _checks.whole_number("ignore_index", ignore_index, low=-(2 ** 31))
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    chunk = 0 if chunk_size is None else _checks.whole_number("chunk_size", chunk_size, low=1)
    if target.numel() and _checks.value_checks_enabled(target):
        valid = target[target != ignore_index]
        _checks.index_range("target (entries other than ignore_index)", valid, weight.shape[0])
    chosen = _backend.resolve("linear_cross_entropy", backend, x.device, FAST,
                              fast_inputs=x.dtype in _checks.FLOAT_DTYPES)
    x, weight = x.contiguous(), weight.contiguous()
    grad_on = torch.is_grad_enabled()
    input_grad = grad_on and x.requires_grad
    weight_grad = grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad))
    return _linear_cross_entropy(x, weight, bias, target.contiguous(), ignore_index, reduction == "mean",
                                 input_grad, weight_grad, chunk, chosen)[0]
