"""Which checkpoint a run resumes from, and whether it may: the newest checkpoint that validates,
refused when it belongs to another model, another trained set or another global batch (a
silently different run; the loader refuses another dataset or packing), with changed
hyper-parameters announced."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import CheckpointError
from .checkpoints import LATEST, STATE_NAME, checkpoint_dirs, validate

# What a checkpoint must share with the run that resumes it, in words.
IDENTITY = {
    "model_config": "the model (its config)",
    "trained": "the trained parameters (stage, stage1_gen_embed)",
    "micro_batches_per_step": "the micro-batches per optimizer step (processes x grad_accum)",
}
# Config fields whose change is not worth a note (paths, display; the identity covers the rest).
_QUIET = {"data", "model", "output_dir", "vq_cache_dir", "device", "progress", "collective_timeout"}


@dataclass
class ResumePoint:
    path: Path
    state: dict
    notes: list[str]  # checkpoints passed over and why, for a warning


def find_resume(output_dir) -> ResumePoint | None:
    """The newest checkpoint in output_dir that validates, with notes on newer ones that do not
    (and on `latest` when it names another); None for a fresh output_dir. An output_dir with
    checkpoints, a `latest` or a metrics.jsonl but nothing loadable raises CheckpointError
    naming what is wrong: such a run is not silently started again over its own history."""
    output_dir = Path(output_dir)
    notes = []
    for step, path in reversed(checkpoint_dirs(output_dir)):
        try:
            state = validate(path)
        except CheckpointError as e:
            notes.append(f"skipping {path.name}: {e}")
            continue
        if state["step"] != step:
            notes.append(f"skipping {path.name}: its {STATE_NAME} is for step {state['step']}")
            continue
        pointer = output_dir / LATEST
        named = pointer.read_text(encoding="utf-8", errors="replace").strip() if pointer.is_file() else None
        if named != path.name:
            notes.append(f"{LATEST} names {named!r}, resuming from the newest valid checkpoint {path.name}"
                         if named else f"{LATEST} is missing, resuming from the newest valid checkpoint {path.name}")
        return ResumePoint(path, state, notes)
    history = [n for n in (LATEST, "metrics.jsonl") if (output_dir / n).exists()]
    if notes or history:
        what = "; ".join(notes) if notes else f"it holds {' and '.join(history)} but no checkpoint"
        raise CheckpointError(f"{output_dir} has no loadable checkpoint to resume from ({what}); move the damaged "
                              "files away to start this run again there, or choose a new output_dir")
    return None


def check_resumable(resume: ResumePoint, identity: dict, config, world: int) -> list[str]:
    """Raise CheckpointError when the checkpoint belongs to another run (see IDENTITY); return
    notes on what changes from here on (hyper-parameters, the number of processes)."""
    saved = resume.state
    for key, words in IDENTITY.items():
        if saved.get(key) != identity[key]:
            raise CheckpointError(f"checkpoint {resume.path} belongs to another run: {words} differ "
                                  f"({_difference(saved.get(key), identity[key])}){_hint(key, saved, world)}; "
                                  "resume with the checkpoint's settings, or choose a new output_dir")
    old = saved.get("config", {})
    notes = [f"{k} changed from {old[k]!r} to {v!r}" for k, v in config.to_dict().items()
             if k in old and k not in _QUIET and old[k] != v]
    if saved.get("world") != world:
        notes.append(f"resharding: the checkpoint was written by {saved.get('world')} processes, this run has {world}")
    return notes


def _hint(key: str, saved: dict, world: int) -> str:
    if key == "micro_batches_per_step" and isinstance(saved.get(key), int) and saved[key] % world == 0:
        return f"; on {world} processes that is grad_accum {saved[key] // world}"
    return ""


def _difference(a, b) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        more = " ..." if len(keys) > 4 else ""
        return ", ".join(f"{k}: {_difference(a.get(k), b.get(k))}" for k in keys[:4]) + more
    return f"checkpoint {a!r}, this run {b!r}"
