"""A JSONL dataset made ready for packing: read, tokenised, images checked, VQ ids filled in."""

from __future__ import annotations

from pathlib import Path

import torch

from .data import EncodedSample, SampleEncoder, read_jsonl
from .vq_cache import VQTokenCache, load_sample_image


def prepare_dataset(path, model, processor, cache_dir) -> list[EncodedSample]:
    """Every sample of `path` encoded for `model`; understanding images are decoded once here and
    text-to-image images VQ-encoded (cached), so a bad sample fails before training starts, with
    its file and line in the message."""
    path = Path(path)
    samples = read_jsonl(path)
    encoder = SampleEncoder(processor, model.config.vq.num_tokens)
    encoded = [encoder.encode(i, s, path.parent) for i, s in enumerate(samples)]
    for sample, enc in zip(samples, encoded):
        if sample.kind == "understanding":
            load_sample_image(sample.name, enc.image)
    VQTokenCache(cache_dir, model, processor).fill(samples, encoded)
    return encoded


def understanding_pixels(processor):
    """sample -> float32 [3, S, S], the processor's preprocessing of its image."""

    def pixels(sample: EncodedSample) -> torch.Tensor:
        return processor.preprocess_images([load_sample_image(sample.name, sample.image)])[0]

    return pixels
