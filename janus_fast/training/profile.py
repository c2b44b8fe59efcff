"""What one decoder layer costs in a training step, measured without a GPU: dispatched ops per
forward + backward (torch.profiler), and the activation bytes the backward keeps
(saved_tensors_hooks). The benchmark prints both; tests bound them.

Dispatched ops: the profiler's top-level operator calls (those not inside another operator),
leaving out those that only describe memory: views (an aliasing output in the op's schema) and
allocations (empty*), and composite ops (CompositeImplicitAutograd: aten::to, aten::linear,
aten::contiguous, ...) unless something inside them runs. A custom op (janus_fast::*) counts once,
whatever it launches. Per layer: the model against its first layer alone, as engine/profile.py
counts a decode step.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.profiler import ProfilerActivity, profile

from .. import ops
from ..models.config import LlamaConfig
from ..models.llama import LlamaModel
from .distributed import checkpoint_layers

ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
FUSED_OPS = ("rms_norm", "silu_mul", "rope_qkv", "varlen_attention")  # ops whose Triton backend a count runs


@functools.cache
def _only_describes_memory(name: str) -> bool:
    """A view (every overload returns an alias it does not write) or a bare allocation."""
    namespace, _, op = name.partition("::")
    if namespace != "aten":
        return False
    if op in ALLOCATIONS:
        return True
    schemas = torch._C._jit_get_schemas_for_operator(name)
    returns = [r for s in schemas for r in s.returns]
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


@functools.cache
def _composite(name: str) -> bool:
    """Whether every overload of aten op `name` only calls other ops (CompositeImplicitAutograd)."""
    if not name.startswith("aten::"):
        return False
    names = [f"{name}.{s.overload_name}" if s.overload_name else name
             for s in torch._C._jit_get_schemas_for_operator(name)]
    return bool(names) and all(torch._C._dispatch_has_kernel_for_dispatch_key(n, "CompositeImplicitAutograd")
                               for n in names)


def _is_operator(name: str) -> bool:
    return name.startswith(("aten::", "janus_fast::"))


def _runs(event) -> bool:
    """Whether this operator call does work a GPU would launch for."""
    if _only_describes_memory(event.name):
        return False
    if _composite(event.name):
        return any(_runs(c) or (not _is_operator(c.name) and _runs_inside(c)) for c in event.cpu_children)
    return True


def _runs_inside(event) -> bool:
    return any(_runs(c) if _is_operator(c.name) else _runs_inside(c) for c in event.cpu_children)


def _top_level(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if _is_operator(parent.name):
            return False
        parent = parent.cpu_parent
    return True


def dispatched_ops(fn) -> dict[str, int]:
    """{operator name: calls} of fn() that do work (see the module docstring)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict[str, int] = {}
    for e in prof.events():
        if _is_operator(e.name) and _top_level(e) and _runs(e):
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def tiny_llm_config() -> LlamaConfig:
    return LlamaConfig(64, 96, 2, 4, 4, 128, max_position_embeddings=64)


def _training_forward(cfg: LlamaConfig, mode: str, dtype: torch.dtype, lengths, seed: int = 0):
    """(model, forward): a LlamaModel with fp32 master weights and activation checkpointing `mode`,
    and the loss of one forward over packed sequences of `lengths` (autocast to dtype, the
    trainer's one-process mixed precision) through a linear cross-entropy."""
    torch.manual_seed(seed)
    cpu = torch.device("cpu")  # a CPU measure, whatever the default device
    with cpu:
        model = LlamaModel(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0, 0.05)
    checkpoint_layers(model.layers, mode)
    head = torch.randn(cfg.vocab_size, cfg.hidden_size, device=cpu) * 0.05
    ids = torch.randint(0, cfg.vocab_size, (sum(lengths),), device=cpu)
    positions = torch.cat([torch.arange(n, device=cpu) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=cpu)
    autocast = (torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())

    def forward():
        with ops.no_value_checks(), autocast:
            hidden = model.forward_packed(model.embed_tokens(ids), positions, cu, max(lengths))
            return ops.linear_cross_entropy(hidden, head, ids)

    return model, forward


def _per_layer(measure, model: LlamaModel) -> dict:
    layers = model.layers
    if len(layers) < 2:
        raise ValueError("per-layer measures need a model with at least two layers")
    total = measure()
    try:
        model.layers = torch.nn.ModuleList(layers[:1])
        one = measure()
    finally:
        model.layers = layers
    return total, one


def layer_op_counts(cfg: LlamaConfig | None = None, *, activation_checkpointing: str = "selective",
                    dtype: torch.dtype = torch.bfloat16, lengths=(3, 1, 2)) -> dict:
    """Dispatched ops of one training forward + backward of a LlamaModel (fp32 master weights,
    compute in `dtype`) over packed sequences of `lengths`: {"per_layer", "fixed", "total",
    "per_layer_ops": {name: count}}. The fused ops run on their Triton backend where it runs these
    inputs (the interpreter on the CPU, but not for bf16 attention, whose reference is the same
    single op). A first step dispatches the same ops as later ones: no warm-up."""
    cfg = cfg or tiny_llm_config()
    model, forward = _training_forward(cfg, activation_checkpointing, dtype, lengths)

    def step():
        loss = forward()
        with ops.no_value_checks():
            loss.backward()

    interpreted_bf16 = dtype == torch.bfloat16 and model.embed_tokens.weight.device.type == "cpu"
    fused = [op for op in FUSED_OPS if not (interpreted_bf16 and op == "varlen_attention")]

    def measure():
        model.zero_grad(set_to_none=True)  # gradients are stolen, not accumulated, as in a step
        with ops.prefer_backend("triton", ops=fused):
            return dispatched_ops(step)

    total, one = _per_layer(measure, model)
    n = len(model.layers)
    per_layer_ops = {k: (total.get(k, 0) - one.get(k, 0)) // (n - 1) for k in total}
    per_layer = (sum(total.values()) - sum(one.values())) // (n - 1)
    return {"per_layer": per_layer, "fixed": sum(one.values()) - per_layer, "total": sum(total.values()),
            "per_layer_ops": {k: v for k, v in sorted(per_layer_ops.items()) if v}}


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages that fn()'s forward saves for the backward (through
    saved_tensors_hooks), leaving out the storages of `exclude` (the parameters)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def layer_saved_bytes(cfg: LlamaConfig | None = None, *, activation_checkpointing: str = "selective",
                      dtype: torch.dtype = torch.bfloat16, lengths=(3, 1, 2)) -> int:
    """Activation bytes one decoder layer keeps for the backward in a training forward (fp32
    master weights, compute in `dtype`), per the whole packed batch of `lengths`; the model
    against its first layer alone. models.packed_layer.activation_bytes_per_token states it."""
    cfg = cfg or tiny_llm_config()
    model, forward = _training_forward(cfg, activation_checkpointing, dtype, lengths)
    params = list(model.parameters())

    def measure():
        return saved_bytes(forward, exclude=params)

    total, one = _per_layer(measure, model)
    return (total - one) // (len(model.layers) - 1)
