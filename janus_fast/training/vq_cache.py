"""The VQ ids of text-to-image targets: computed by the frozen VQ encoder and ops.vq_quantize,
cached on disk (one safetensors file per image, written atomically).

The cache is filled lazily by whichever rank first packs an image into one of its micro-batches
(so every rank encodes its own share, in parallel, while it trains) and read by everyone after.
An entry is keyed by the image file's bytes and a fingerprint of the encoder weights, the image
size and the fit (centre-crop or letterbox), so a changed image or another VQ model never reads
stale ids.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import atomic_write
from ..models.vq import VQModel
from ..processor import load_image
from .data import DatasetError

GEN_IMAGE_FITS = ("crop", "letterbox")


def load_sample_image(sample_name: str, path: Path):
    """The RGB image of a sample; a missing or undecodable file raises DatasetError naming it."""
    try:
        return load_image(path)
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
        raise DatasetError(f"sample {sample_name}: image {path} cannot be read ({type(e).__name__}: {e})") from None


def generation_pixels(processor, sample_name: str, path: Path, fit: str) -> torch.Tensor:
    """float32 [3, S, S] of a text-to-image target: the centred square crop resized to S
    ("crop", the default: no bars for the model to learn to draw) or the whole image resized
    and padded with the mean colour as for understanding ("letterbox")."""
    image = load_sample_image(sample_name, path)
    if fit == "crop":
        w, h = image.size
        side = min(w, h)
        image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    return processor.preprocess_images([image])[0]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _weights_fingerprint(vq, image_size: int, fit: str) -> str:
    h = hashlib.sha256(f"{image_size}:{fit}".encode())
    for name, t in sorted(vq.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.", "quantize.")):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def atomic_save_file(tensors: dict, path: Path) -> None:
    """A safetensors file written whole or not at all (checkpoint.atomic_write)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


class VQTokenCache:
    """image digest -> int64 [tokens] VQ ids of `vq` (a VQModel), on disk under `directory`."""

    def __init__(self, directory, vq, image_size: int, fit: str):
        self.directory = Path(directory) / _weights_fingerprint(vq, image_size, fit)

    def _entry(self, digest: str) -> Path:
        return self.directory / f"{digest}.safetensors"

    def get(self, digest: str) -> torch.Tensor | None:
        from safetensors.torch import load_file

        entry = self._entry(digest)
        return load_file(str(entry))["ids"] if entry.is_file() else None

    def put(self, digest: str, ids: torch.Tensor) -> None:
        atomic_save_file({"ids": ids.contiguous()}, self._entry(digest))


class VQEncoder(nn.Module):
    """The loader's own copy of the frozen VQ encoder (encoder, quant_conv, codebook), taken
    before FSDP shards the model's: the loader calls it outside the training step, where a
    sharded module would all-gather out of step with the other ranks."""

    token_ids, _latents = VQModel.token_ids, VQModel._latents

    def __init__(self, vq: VQModel):
        super().__init__()
        self.config = vq.config
        self.encoder, self.quant_conv, self.quantize = (copy.deepcopy(m) for m in (vq.encoder, vq.quant_conv, vq.quantize))
        self.requires_grad_(False)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 [n, 3, S, S] -> VQ ids int64 [n, tokens] on the host."""
        weight = self.quant_conv.weight
        ids = self.token_ids(pixels.to(weight.device, weight.dtype)).cpu()
        if bool((ids < 0).any()):
            raise DatasetError("the VQ encoder produced non-finite latents (index -1) for an image")
        return ids
