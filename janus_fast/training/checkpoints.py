"""Training checkpoints: a `save_pretrained` release directory (config.json, safetensors, tokenizer)
plus training_state.pt (optimizer, data-loader position, step, loss history), written into a
temporary directory and renamed into place, then `latest` is switched atomically. An
interrupted save leaves the previous checkpoint as it was.

State dicts go through torch.distributed.checkpoint.state_dict (full, CPU-offloaded), so the
same code saves a single-process model and an FSDP2-sharded one (rank 0 writes).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..checkpoint import CONFIG_NAME, atomic_write_text, weight_files, write_weights

STATE_NAME = "training_state.pt"
LATEST = "latest"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    return sorted(p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir())


def latest_checkpoint(output_dir) -> Path | None:
    pointer = Path(output_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(output_dir) / pointer.read_text().strip()
    return path if (path / STATE_NAME).is_file() else None


def save_checkpoint(output_dir, step: int, model, optimizer, state: dict, topology, keep: int = 2) -> Path | None:
    """Write checkpoint-<step> (every rank must call this: gathering the state is collective);
    returns its path on rank 0."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step:07d}"
    if topology.main:
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=output_dir))
        try:
            config = model.config.to_dict()
            config["torch_dtype"] = str(next(iter(model_sd.values())).dtype).replace("torch.", "")
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
            write_weights(model_sd, tmp)
            if getattr(model, "processor", None) is not None:
                model.processor.save_pretrained(tmp)
            torch.save({**state, "step": step, "optimizer": optim_sd}, tmp / STATE_NAME)
            if final.exists():  # a stale one from a run that was resumed from an earlier step
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(output_dir / LATEST, final.name)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    topology.barrier()
    return final if topology.main else None


def load_checkpoint(path, model, optimizer) -> dict:
    """Load weights and optimizer state from checkpoint directory `path` into `model` and
    `optimizer` (each rank reads the files); returns the rest of the training state."""
    from safetensors.torch import load_file

    path = Path(path)
    model_sd = {}
    for file in weight_files(path):
        model_sd.update(load_file(str(file)))
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=state.pop("optimizer"),
                   options=StateDictOptions(full_state_dict=True))
    return state
