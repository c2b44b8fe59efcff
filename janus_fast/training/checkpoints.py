"""Training checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards
of the model and the optimizer state, in parallel (`__<rank>_0.distcp`), rank 0 the index
(`.metadata`) and `trainer_state.json` (step, data-loader position, config, dataset fingerprint).
A checkpoint loads on any number of processes (DCP reshards), and `janus-fast export` turns one
into a release directory tensor group by tensor group (training/export.py).

Atomic: a save is written into `.checkpoint-<step>.staging`, renamed to `checkpoint-<step>` by
rank 0 once every rank's shards and the index are on disk (fsynced), and only then does `latest`
move. A save killed at any moment leaves the previous checkpoints as they were; the next start
removes the staging folder. Resuming takes the newest checkpoint that validates (index readable,
every shard file long enough, trainer_state.json whole), warning about newer ones that do not.

Loading reads no pickled code: tensors go through torch.load(weights_only=True) (DCP's reader)
and the index through an unpickler that admits only DCP's metadata classes; the optimizer's
hyper-parameters are not stored (they come from the config), so no pickled Python objects are.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from ..checkpoint import CheckpointError, _fsync_dir, _plain_name, atomic_write_text

STATE_NAME = "trainer_state.json"
METADATA_NAME = ".metadata"
LATEST = "latest"
FORMAT = 2  # trainer_state.json's format (1: janus_fast <= 0.2's release directory + training_state.pt)
_NAME = re.compile(r"checkpoint-(\d{7,})")
_STAGING = re.compile(r"\.checkpoint-\d+\.(staging|deleting|tmp-.*)")  # tmp-: janus_fast <= 0.2's mkdtemp


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def checkpoint_dirs(output_dir) -> list[tuple[int, Path]]:
    """(step, folder) of output_dir's checkpoint-<step> folders, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), output_dir / m.group(0)) for m in map(_NAME.fullmatch, os.listdir(output_dir)) if m]
    return sorted((s, p) for s, p in found if p.is_dir())


def clean_staging(output_dir) -> list[str]:
    """Remove what saves killed before their commit left in output_dir; returns the names."""
    output_dir = Path(output_dir)
    gone = [n for n in os.listdir(output_dir) if _STAGING.fullmatch(n)] if output_dir.is_dir() else []
    for name in gone:
        shutil.rmtree(output_dir / name, ignore_errors=True)
    return gone


# --------------------------------------------------------------------------- reading safely

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = _METADATA_CLASSES.get(module, ())
        if name in allowed or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


def read_metadata(path):
    """DCP's index of checkpoint `path`, unpickled without running code; every shard file it
    names must be a plain name inside `path`."""
    file = Path(path) / METADATA_NAME
    try:
        metadata = _MetadataUnpickler(io.BytesIO(file.read_bytes())).load()
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete") from None
    except Exception as e:  # a truncated or foreign pickle raises any of several types
        raise CheckpointError(f"{file} is not a readable checkpoint index ({type(e).__name__}: {e})") from None
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict) or not hasattr(metadata, "state_dict_metadata"):
        raise CheckpointError(f"{file} is not a checkpoint index")
    for info in storage.values():
        if not _plain_name(getattr(info, "relative_path", None)):
            raise CheckpointError(f"{file} names a shard outside the checkpoint: {info.relative_path!r}")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file reader with the index read by read_metadata."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = read_metadata(self.path)
        metadata.storage_meta = StorageMeta(load_id=self.load_id)
        return metadata


def validate(path) -> dict:
    """The trainer state of checkpoint `path` after checking that it is whole: the index reads
    and every shard file holds the bytes it lists. Raises CheckpointError naming the file."""
    path = Path(path)
    file = path / STATE_NAME
    if not file.is_file():
        old = (path / "training_state.pt").is_file()
        hint = " (a janus_fast <= 0.2 checkpoint: resume it with that version, or load its weights with " \
               "from_pretrained)" if old else ""
        raise CheckpointError(f"{file} is missing{hint}")
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{file} is damaged ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{file} is not a janus_fast training state of format {FORMAT}")
    metadata = read_metadata(path)
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        try:
            have = (path / name).stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{path / name} is missing: the checkpoint is incomplete") from None
        if have < size:
            raise CheckpointError(f"{path / name} is truncated: {have} bytes, the index needs {size}")
    return state


# --------------------------------------------------------------------------- saving and loading


@contextlib.contextmanager
def single_process_quietly():
    """DCP warns on every single-process save or load that it assumes one process: it does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def _state(model, optimizer) -> dict:
    """What DCP stores: the model's (sharded) state dict and the optimizer's per-parameter state
    (its `param_groups`, plain Python objects, come from the config instead)."""
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)["state"]}


def save_checkpoint(output_dir, step: int, model, optimizer, state: dict, topology, keep: int = 2) -> Path:
    """Write checkpoint-<step> (every rank must call this: DCP's save is collective) from the
    ranks' shards and `state` (JSON: rank 0 writes it); returns its path. Older checkpoints
    beyond the newest `keep` are removed once it is in place."""
    output_dir = Path(output_dir)
    final = output_dir / checkpoint_name(step)
    staging = output_dir / f".{final.name}.staging"
    if topology.main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    topology.barrier()
    with single_process_quietly():
        dcp.save(_state(model, optimizer), storage_writer=FileSystemWriter(staging, sync_files=True),
                 no_dist=not topology.distributed)
    if topology.main:
        config = model.config.to_dict()
        config["torch_dtype"] = "float32"
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        if getattr(model, "processor", None) is not None:
            model.processor.save_pretrained(staging)
        (staging / STATE_NAME).write_text(json.dumps({"format": FORMAT, "step": step, **state}, indent=1))
        for name in (STATE_NAME, "config.json"):
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(staging)
        if final.exists():  # a damaged one that resume passed over
            shutil.rmtree(final)
        os.rename(staging, final)  # the commit point
        _fsync_dir(output_dir)
        atomic_write_text(output_dir / LATEST, final.name)
        older = [p for s, p in checkpoint_dirs(output_dir) if s < step]
        for old in older[:max(len(older) - (keep - 1), 0)]:
            doomed = old.with_name(f".{old.name}.deleting")  # never a half-deleted checkpoint-<step>
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    topology.barrier()
    return final


def load_checkpoint(path, model, optimizer) -> None:
    """Load checkpoint `path`'s model and optimizer shards into `model` and `optimizer` (every
    rank, collectively), whatever the number of processes that wrote it."""
    state = _state(model, optimizer)
    try:
        with single_process_quietly():
            dcp.load(state, storage_reader=SafeReader(path), no_dist=not torch.distributed.is_initialized())
    except Exception as e:  # DCP wraps each rank's failure in a CheckpointException
        raise CheckpointError(f"checkpoint {path} could not be loaded into this model: "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}") from e
    set_model_state_dict(model, state["model"])
    groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
    set_optimizer_state_dict(model, optimizer, {"state": state["optim"], "param_groups": groups})
