"""A training checkpoint as a release directory (`janus-fast export`): config.json, safetensors
weights and the tokenizer, loadable by JanusPro.from_pretrained. Weights stream from the
checkpoint's shard files one output shard at a time (DCP reads just those tensors' chunks), so
no process ever holds the whole model; the directory is committed crash-safely like
save_pretrained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from ..checkpoint import CONFIG_NAME, CheckpointError, save_files, write_weight_shards
from .checkpoints import METADATA_NAME, STATE_NAME, SafeReader, read_metadata, single_process_quietly, validate
from .resume import find_resume

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_of(source) -> Path:
    """A checkpoint folder as given, or the newest valid one of a run's output_dir."""
    source = Path(source)
    if (source / STATE_NAME).is_file() or (source / METADATA_NAME).is_file():
        validate(source)
        return source
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such checkpoint or run directory")
    resume = find_resume(source)
    if resume is None:
        raise CheckpointError(f"{source} holds no training checkpoint")
    return resume.path


def export_release(source, out, dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB",
                   on_shard=None) -> Path:
    """Write checkpoint `source` (a checkpoint folder or a run's output_dir) as a release
    directory `out`, its weights cast to `dtype` (default: as trained, fp32). `on_shard(keys)`
    is told each group of tensors as it is read. Returns the checkpoint exported."""
    path = checkpoint_of(source)
    metadata = read_metadata(path).state_dict_metadata
    stored = {k[len("model."):]: m for k, m in metadata.items() if k.startswith("model.")}
    if not stored:
        raise CheckpointError(f"{path} holds no model weights")
    out_dtype = {k: dtype if dtype is not None and m.properties.dtype.is_floating_point else m.properties.dtype
                 for k, m in stored.items()}
    sizes = {k: m.size.numel() * out_dtype[k].itemsize for k, m in stored.items()}

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        if on_shard is not None:
            on_shard(keys)
        tensors = {k: torch.empty(stored[k].size, dtype=stored[k].properties.dtype) for k in keys}
        with single_process_quietly():
            dcp.load({"model": tensors}, storage_reader=SafeReader(path), no_dist=True)
        return {k: t.to(out_dtype[k]) for k, t in tensors.items()}

    def fill(staging: Path) -> None:
        config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        config["torch_dtype"] = str(dtype or torch.float32).replace("torch.", "")
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        for file in path.iterdir():  # the tokenizer's files
            if file.is_file() and file.name not in (CONFIG_NAME, STATE_NAME, METADATA_NAME) \
                    and file.suffix != ".distcp":
                shutil.copyfile(file, staging / file.name)
        write_weight_shards(sizes, read, staging, max_shard_size=max_shard_size)

    save_files(out, fill)
    return path
