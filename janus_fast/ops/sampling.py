"""Classifier-free-guided token sampling from paired conditional/unconditional logits."""

from __future__ import annotations

import torch

from . import _backend, _checks, reference

FAST = ("cuda", "triton")
LAYOUTS = ("interleaved", "halves")


def _reference_sample(logits, cfg_weight, temperature, top_k, top_p, seed, layout):
    """The reference draw, made reproducible from the (seed, offset) pair in `seed`."""
    s, offset = seed.tolist()
    generator = torch.Generator(device=logits.device)
    generator.manual_seed((s * 0x9E3779B97F4A7C15 + offset) % (1 << 63))
    return reference.cfg_sample(logits, cfg_weight, temperature, top_k, top_p, generator, layout)


def _impl(backend: str):
    if backend == "reference":
        return _reference_sample
    if backend == "cuda":
        return _backend.cuda_op("cfg_sample")
    return _backend.triton_kernels("sampling").cfg_sample


@torch.library.custom_op("janus_fast::cfg_sample", mutates_args=())
def _cfg_sample(logits: torch.Tensor, cfg_weight: float, temperature: float, top_k: int,
                top_p: float, seed: torch.Tensor, layout: str, backend: str) -> torch.Tensor:
    return _impl(backend)(logits, cfg_weight, temperature, top_k, top_p, seed, layout)


@_cfg_sample.register_fake
def _(logits, cfg_weight, temperature, top_k, top_p, seed, layout, backend):
    return logits.new_empty((logits.shape[0] // 2,), dtype=torch.int64)


def _draw_seed(generator, device) -> torch.Tensor:
    """(seed, offset) int64 [2] on `device`, drawn from `generator` (or the device's default
    generator) without a host sync, so CUDA-graph replays draw new streams."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, logits on {device}")
    return torch.randint(0, 1 << 62, (2,), dtype=torch.int64, device=device, generator=generator)


def cfg_sample(logits, *, cfg_weight: float, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, generator=None, layout: str = "interleaved",
               backend: str = "auto") -> torch.Tensor:
    """One token per image from [2B, V] conditional/unconditional logits -> int64 [B].

    guided = u + cfg_weight·(c − u) in fp32; layout "interleaved" has conditional rows even and
    unconditional rows odd (the official loop), "halves" conditional rows first (transformers).
    temperature 0 takes the argmax (lowest index on ties); otherwise top_k (0 = off) and top_p
    (1 = off) filter softmax(guided / temperature) as `reference.sampling_probs` defines, and one
    token is drawn. `generator` makes the draw reproducible.
    """
    _checks.tensor("logits", logits, ndim=2, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    if logits.shape[0] % 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [2B, V] with V >= 1, got shape {tuple(logits.shape)}")
    _checks.last_dim_contiguous("logits", logits)
    cfg_weight = _checks.finite_number("cfg_weight", cfg_weight)
    temperature = _checks.finite_number("temperature", temperature, low=0.0)
    top_k = _checks.whole_number("top_k", top_k)
    top_p = _checks.finite_number("top_p", top_p, low=0.0, high=1.0)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    chosen = _backend.resolve("cfg_sample", backend, logits.device, FAST)
    if chosen != "reference" and logits.dtype == torch.float64:
        raise TypeError(f"the {chosen} cfg_sample takes float16, bfloat16 or float32 logits, got float64")
    seed = _draw_seed(generator, logits.device)
    return _cfg_sample(logits, cfg_weight, temperature, top_k, top_p, seed, layout, chosen)
