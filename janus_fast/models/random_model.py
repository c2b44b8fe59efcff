"""Random-weight Janus-Pro models for the demo, benchmarks and tests: the real module layout
and a toy byte-level tokenizer, built in memory (and written as a release directory on request)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..processor import JanusProcessor, toy_tokenizer
from .config import JanusProConfig
from .janus_pro import JanusPro

SIZES = ("tiny", "1b", "7b")


def random_config(size: str) -> JanusProConfig:
    """The config of `size`: "tiny" (a few MB, the toy tokenizer's vocabulary) or the official
    "1b" / "7b" sizes."""
    if size == "tiny":
        return JanusProConfig.tiny(vocab_size=len(toy_tokenizer()))
    if size == "1b":
        return JanusProConfig.janus_pro_1b()
    if size == "7b":
        return JanusProConfig.janus_pro_7b()
    raise ValueError(f"size must be one of {SIZES}, got {size!r}")


def random_model(size: str, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                 model_class: type[JanusPro] = JanusPro) -> JanusPro:
    """A JanusPro of `size` with random weights (std 0.02) and a toy tokenizer as its processor,
    built directly on `device` in `dtype`. model_class picks the class: the models' JanusPro
    (eager loops) by default, `janus_fast.JanusPro` for generation on the engine."""
    config = random_config(size)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(config).init_random_weights().to(dtype).eval()
    model.processor = JanusProcessor(toy_tokenizer(), image_size=config.vision.image_size,
                                     num_image_tokens=config.vision.num_tokens)
    return model


def build_random_checkpoint(path: str | Path, size: str, device="cpu", dtype: torch.dtype = torch.float32,
                            seed: int = 0) -> JanusProConfig:
    """Write a random-weight release directory (config, weights, tokenizer) at `path`."""
    model = random_model(size, device, dtype, seed)
    model.save_pretrained(path)
    return model.config
