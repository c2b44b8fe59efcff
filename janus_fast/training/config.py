"""The training configuration (a JSON file, or YAML when PyYAML is installed) and the three
stages' freezing recipes (the Janus / Janus-Pro reports).

Every field carries its rule (type and range) beside it; a config is checked whole when it is
built, before anything loads, and a bad one raises one ValueError line naming each bad field
and its rule."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .distributed import ACTIVATION_CHECKPOINTING
from .rules import Betas, Bool, Choice, DataFiles, Device, Float, Int, Text, setting, shown

# Stage I trains the adaptors and the image head; stage II everything but the two visual
# encoders; stage III (SFT) also the SigLIP encoder. The VQ tokenizer is always frozen.
FROZEN_PREFIXES = {
    1: None,  # see TRAINED_IN_STAGE_1
    2: ("vision_model.", "gen_vision_model."),
    3: ("gen_vision_model.",),
}
TRAINED_IN_STAGE_1 = ("aligner.", "gen_aligner.", "gen_head.")


def is_trained(name: str, stage: int, stage1_gen_embed: bool = False) -> bool:
    """Whether parameter `name` (a JanusPro state-dict key) is trained in `stage`. The Janus-Pro
    report's stage I trains "the adaptors and the image head"; whether the generation embedding
    (gen_embed) counts among them is not said: `stage1_gen_embed` picks (off by default)."""
    if stage == 1:
        return name.startswith(TRAINED_IN_STAGE_1 + (("gen_embed.",) if stage1_gen_embed else ()))
    return not name.startswith(FROZEN_PREFIXES[stage])


def apply_stage(model: nn.Module, stage: int, stage1_gen_embed: bool = False) -> list[str]:
    """Set requires_grad per the stage's recipe; returns the trained parameter names."""
    if stage not in FROZEN_PREFIXES:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_trained(name, stage, stage1_gen_embed))
        if p.requires_grad:
            trained.append(name)
    return trained


MODEL_SPEC = r"random:(tiny|1b|7b)|(?!random:).+"
MAX_SEED = 2**32 - 1


@dataclass
class TrainConfig:
    # JSONL file(s), optionally weighted (see janus_fast.training.dataset.data_files)
    data: str | list = setting(None, DataFiles())
    output_dir: str = setting(None, Text(words="a directory path"))
    # a release directory, or random:tiny|1b|7b (random weights)
    model: str = setting("random:tiny", Text(pattern=MODEL_SPEC, words="a release directory or random:tiny|1b|7b"))
    stage: int = setting(3, Choice((1, 2, 3)))
    stage1_gen_embed: bool = setting(False, Bool())  # stage 1 also trains gen_embed (see is_trained)
    steps: int = setting(100, Int(1))  # optimizer steps of the whole run
    row_tokens: int = setting(4096, Int(1, 1 << 20))  # the longest sample, in tokens
    # a micro-batch holds up to rows_per_batch x row_tokens tokens (per rank)
    rows_per_batch: int = setting(1, Int(1, 1 << 16))
    grad_accum: int = setting(1, Int(1, 1 << 16))  # micro-batches per optimizer step (per rank)
    lr: float = setting(1e-4, Float(positive=True))
    min_lr_ratio: float = setting(0.1, Float(0, 1))  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = setting(0, Int(0))
    weight_decay: float = setting(0.0, Float(0))
    betas: tuple = setting((0.9, 0.95), Betas())
    max_grad_norm: float = setting(1.0, Float(0))  # 0 turns clipping off
    # "bf16" (fp32 master weights, bf16 compute) or "fp32"
    mixed_precision: str = setting("bf16", Choice(("bf16", "fp32")))
    # "selective" (keep GEMM and attention outputs, recompute norms and SiLU·mul), "full" (keep each
    # layer's inputs, recompute the layer) or "none"; true/false are the former "full"/"none"
    activation_checkpointing: str = setting("selective", Choice(ACTIVATION_CHECKPOINTING,
                                                                aliases=((True, "full"), (False, "none"))))
    uncond_prob: float = setting(0.1, Float(0, 1))  # text-to-image prompts replaced by the unconditional prompt
    image_loss_weight: float = setting(1.0, Float(0))
    seed: int = setting(0, Int(0, MAX_SEED))
    save_every: int = setting(0, Int(0))  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = setting(2, Int(1))  # the newest N checkpoints are kept
    # default: <output_dir>/vq_cache
    vq_cache_dir: str | None = setting(None, Text(optional=True, words="a directory path"))
    device: str | None = setting(None, Device())  # default: cuda (this rank's) if available, else cpu
    progress: bool = setting(True, Bool())
    # Data loading (janus_fast.training.loader)
    pack_window: int = setting(1024, Int(1))  # samples packed together (best-fit)
    # "best_fit" or "next_fit" (in stream order; for comparison)
    packing: str = setting("best_fit", Choice(("best_fit", "next_fit")))
    # non-square text-to-image targets: centre "crop" or "letterbox"
    gen_image_fit: str = setting("crop", Choice(("crop", "letterbox")))
    loader_workers: int = setting(2, Int(0))  # worker processes (0: in a background thread of the trainer)
    # seconds a worker may hold a task before the run stops, naming it
    loader_timeout: float = setting(300.0, Float(positive=True))
    prefetch_steps: int = setting(2, Int(1))  # optimizer steps prepared ahead
    # FSDP2 (under torchrun). Gradients are reduce-scattered after every micro-batch, so a rank
    # only ever holds its shard of the accumulated gradient; defer_grad_reduce keeps full-size
    # unsharded gradients over the step's micro-batches and reduces once (less traffic, more memory).
    defer_grad_reduce: bool = setting(False, Bool())
    # Free each unit's gathered parameters after its forward (and gather them again for the
    # backward); false keeps them until the backward: one all-gather fewer per unit, more memory.
    reshard_after_forward: bool = setting(True, Bool())
    # FSDP2's CPUOffloadPolicy: sharded parameters, gradients and optimizer state in host memory,
    # the optimizer step on the CPU. Needs torchrun.
    cpu_offload: bool = setting(False, Bool())
    # Seconds a collective may wait for the other ranks before the run fails with an error
    # naming it (a rank that died or stalls). It also bounds the start-up barrier while rank 0
    # fills the VQ-id cache: raise it for a large uncached dataset.
    collective_timeout: float = setting(600.0, Float(positive=True))
    # 0: a non-finite loss or gradient norm stops the run (exit status 2, naming the step). N > 0:
    # such a step is skipped (no update) and the run stops at the (N+1)-th such step in a row.
    skip_nonfinite_steps: int = setting(0, Int(0))

    def __post_init__(self):
        problems = []
        for f in dataclasses.fields(self):
            rule = f.metadata.get("rule")
            if rule is None:
                continue
            value = getattr(self, f.name)
            try:
                setattr(self, f.name, rule(value))
            except ValueError as e:
                problems.append(f"{f.name} {e} (got {shown(value)})")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict, base: Path | None = None) -> "TrainConfig":
        """From a parsed config; relative paths (data, output_dir, a model directory) are read
        from `base` (the config file's folder)."""
        if not isinstance(d, dict):
            raise ValueError(f"a training config must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known: {sorted(names)}")
        missing = [k for k in ("data", "output_dir") if k not in d]
        if missing:
            raise ValueError(f"the training config needs {missing}")
        d = dict(d)
        if base is not None:
            for key in ("data", "output_dir", "vq_cache_dir", "model"):
                value = d.get(key)
                relative = isinstance(value, str) and value and not Path(value).is_absolute()
                if relative and not value.startswith("random:"):
                    d[key] = str(base / value)
            if isinstance(d["data"], list):  # several files: each path read from `base` too
                d["data"] = [{**x, "path": str(base / x["path"])} if isinstance(x, dict) and isinstance(x.get("path"), str)
                             else str(base / x) if isinstance(x, str) else x for x in d["data"]]
        return cls(**d)

    @classmethod
    def from_file(cls, path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} not found")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"{path} is YAML but PyYAML is not installed; use a .json config") from None
            d = yaml.safe_load(text)
        else:
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d, base=path.parent.absolute())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

