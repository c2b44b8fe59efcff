"""The VQ ids of text-to-image targets: computed once by the frozen VQ encoder and
ops.vq_quantize, cached on disk (one safetensors file per image, written atomically).

A cache entry is keyed by the image file's bytes and a fingerprint of the encoder weights and
image size, so a changed image or another VQ model never reads stale ids.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..checkpoint import atomic_write
from ..processor import load_image
from .data import GEN_IMAGE, DatasetError, EncodedSample, Sample


def load_sample_image(sample_name: str, path: Path):
    """The RGB image of a sample; a missing or undecodable file raises DatasetError naming it."""
    try:
        return load_image(path)
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
        raise DatasetError(f"sample {sample_name}: image {path} cannot be read ({type(e).__name__}: {e})") from None


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _weights_fingerprint(vq, image_size: int) -> str:
    h = hashlib.sha256(str(image_size).encode())
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
    """image file -> int64 [tokens] VQ ids of `model` (a JanusPro), cached under `directory`."""

    def __init__(self, directory, model, processor, batch_size: int = 8):
        self.model, self.proc, self.batch_size = model, processor, batch_size
        vq = model.gen_vision_model
        self.directory = Path(directory) / _weights_fingerprint(vq, processor.image_size)

    def _entry(self, digest: str) -> Path:
        return self.directory / f"{digest}.safetensors"

    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        """PIL images -> VQ ids [n, grid * grid] (VQModel.token_ids)."""
        vq = self.model.gen_vision_model
        weight = vq.quant_conv.weight
        x = self.proc.preprocess_images(images).to(weight.device, weight.dtype)
        ids = vq.token_ids(x)
        if bool((ids < 0).any()):
            raise DatasetError("the VQ encoder produced non-finite latents (index -1) for an image")
        return ids.cpu()

    def fill(self, samples: list[Sample], encoded: list[EncodedSample]) -> None:
        """Write the VQ ids of every generation sample into its GEN_IMAGE positions, encoding
        (and caching) the images that are not cached yet."""
        todo = []
        for sample, enc in zip(samples, encoded):
            if enc.prompt is None:
                continue
            if not enc.image.is_file():
                raise sample.error(f"image {enc.image} not found")
            digest = _file_digest(enc.image)
            if self._entry(digest).is_file():
                from safetensors.torch import load_file

                self._put(enc, load_file(str(self._entry(digest)))["ids"], sample)
            else:
                todo.append((sample, enc, digest))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            ids = self.encode_images([load_sample_image(s.name, e.image) for s, e, _ in chunk])
            for (sample, enc, digest), row in zip(chunk, ids):
                atomic_save_file({"ids": row.contiguous()}, self._entry(digest))
                self._put(enc, row, sample)

    @staticmethod
    def _put(enc: EncodedSample, ids: torch.Tensor, sample: Sample) -> None:
        at = [i for i, k in enumerate(enc.kinds) if k == GEN_IMAGE]
        if len(at) != ids.numel():
            raise sample.error(f"the VQ model gives {ids.numel()} tokens per image, "
                               f"the model expects {len(at)}")
        for i, v in zip(at, ids.tolist()):
            enc.ids[i] = v
