"""Checks of the generation arguments of `JanusPro.generate_images` / `answer` and
`LlamaForCausalLM.generate`, made before anything is allocated; each error names the argument."""

from __future__ import annotations

import math
import operator

import torch

SEED_LIMIT = 1 << 63  # seeds are ints in [0, 2**63): one int64 on the device


def seed_value(seed, name: str = "seed") -> int:
    """An int (or integer-like, e.g. numpy.int64) in [0, 2**63)."""
    if isinstance(seed, bool):
        raise TypeError(f"{name} must be an int in [0, 2**63), got {seed!r}")
    try:
        value = operator.index(seed)
    except TypeError:
        raise TypeError(f"{name} must be an int in [0, 2**63), got {seed!r} ({type(seed).__name__})") from None
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {value}")
    return value


def request_seeds(seed, n: int) -> list[int]:
    """One seed per request from None (drawn on the host: no device sync), one int, or one per
    request."""
    if seed is None:
        return torch.randint(0, 1 << 62, (n,)).tolist()
    if isinstance(seed, (str, bytes)) or not hasattr(seed, "__iter__"):
        return [seed_value(seed)] * n
    seeds = [seed_value(s, f"seed[{i}]") for i, s in enumerate(seed)]
    if len(seeds) != n:
        raise ValueError(f"seed must be one int or one per prompt: {len(seeds)} seeds for {n} prompts")
    return seeds


def _number(name: str, value, rule: str, ok) -> float:
    """A finite real number for which ok(value) holds, else an error stating `rule`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number {rule}, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{name} must be a finite number {rule}, got {value}")
    return value


def _count(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
    return value


def sampling(cfg_weight=None, temperature=1.0, top_k=None, top_p=None) -> tuple[float | None, float, int, float]:
    """(cfg_weight, temperature, top_k, top_p) checked: cfg_weight >= 0 (0 draws from the
    unconditional logits, 1 from the conditional ones, above 1 guides; None where there is no
    guidance), temperature >= 0 (0 takes the argmax), top_k an int >= 0 or None (0 and None: off),
    top_p in (0, 1] or None (1 and None: off; 0 would keep nothing, so use temperature 0 for the
    most likely token)."""
    if cfg_weight is not None:
        cfg_weight = _number("cfg_weight", cfg_weight, ">= 0", lambda x: x >= 0)
    temperature = _number("temperature", temperature, ">= 0 (0: the most likely token)", lambda x: x >= 0)
    top_k = 0 if top_k is None else _count("top_k", top_k, 0)
    if top_p is not None:
        top_p = _number("top_p", top_p, "in (0, 1] (for the most likely token use temperature 0)",
                        lambda x: 0 < x <= 1)
    return cfg_weight, temperature, top_k, 1.0 if top_p is None else top_p


def max_new_tokens(value) -> int:
    return _count("max_new_tokens", value, 1)


def parallel_size(value) -> int:
    return _count("parallel_size", value, 1)


def fits_context(prompt_tokens: int, new_tokens: int, context: int, what: str) -> None:
    """The prompt and the tokens to generate must fit the model's context
    (language_config.max_position_embeddings): checked before any cache is allocated."""
    if prompt_tokens + new_tokens > context:
        raise ValueError(f"the prompt is {prompt_tokens} tokens and {what} {new_tokens} more: {prompt_tokens + new_tokens} "
                         f"> the model's context of {context} tokens (language_config.max_position_embeddings); "
                         f"shorten the prompt")
