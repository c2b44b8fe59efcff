"""The training configuration (a JSON file, or YAML when PyYAML is installed) and the three
stages' freezing recipes (the Janus / Janus-Pro reports)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .dataset import data_files
from .distributed import ACTIVATION_CHECKPOINTING

# Stage I trains the adaptors and the image head; stage II everything but the two visual
# encoders; stage III (SFT) also the SigLIP encoder. The VQ tokenizer is always frozen.
FROZEN_PREFIXES = {
    1: None,  # see TRAINED_IN_STAGE_1
    2: ("vision_model.", "gen_vision_model."),
    3: ("gen_vision_model.",),
}
TRAINED_IN_STAGE_1 = ("aligner.", "gen_aligner.", "gen_head.")


def is_trained(name: str, stage: int) -> bool:
    """Whether parameter `name` (a JanusPro state-dict key) is trained in `stage`."""
    if stage == 1:
        return name.startswith(TRAINED_IN_STAGE_1)
    return not name.startswith(FROZEN_PREFIXES[stage])


def apply_stage(model: nn.Module, stage: int) -> list[str]:
    """Set requires_grad per the stage's recipe; returns the trained parameter names."""
    if stage not in FROZEN_PREFIXES:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_trained(name, stage))
        if p.requires_grad:
            trained.append(name)
    return trained


@dataclass
class TrainConfig:
    data: str | list  # JSONL file(s), optionally weighted (see janus_fast.training.dataset.data_files)
    output_dir: str
    model: str = "random:tiny"  # a release directory, or random:tiny|1b|7b (random weights)
    stage: int = 3
    steps: int = 100
    row_tokens: int = 4096  # the longest sample, in tokens
    rows_per_batch: int = 1  # a micro-batch holds up to rows_per_batch x row_tokens tokens (per rank)
    grad_accum: int = 1  # micro-batches per optimizer step (per rank)
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    max_grad_norm: float = 1.0  # 0 turns clipping off
    mixed_precision: str = "bf16"  # "bf16" (fp32 master weights, bf16 compute; the device must have bf16) or "fp32"
    # "selective" (keep GEMM and attention outputs, recompute norms and SiLU·mul), "full" (keep each
    # layer's inputs, recompute the layer) or "none"; true/false are the former "full"/"none"
    activation_checkpointing: str = "selective"
    uncond_prob: float = 0.1  # text-to-image prompts replaced by the unconditional prompt
    image_loss_weight: float = 1.0
    seed: int = 0
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    vq_cache_dir: str | None = None  # default: <output_dir>/vq_cache
    device: str | None = None  # default: cuda (this rank's) if available, else cpu
    progress: bool = True
    # Data loading (janus_fast.training.loader)
    pack_window: int = 1024  # samples packed together (best-fit), >= 1
    packing: str = "best_fit"  # "best_fit" or "next_fit" (in stream order; for comparison)
    gen_image_fit: str = "crop"  # non-square text-to-image targets: centre "crop" or "letterbox"
    loader_workers: int = 2  # worker processes, >= 0 (0: in a background thread of the trainer)
    loader_timeout: float = 300.0  # seconds (> 0) a worker may hold a task before the run stops, naming it
    prefetch_steps: int = 2  # optimizer steps prepared ahead, >= 1

    def __post_init__(self):
        checks = dict(steps=self.steps >= 1, row_tokens=self.row_tokens >= 1, rows_per_batch=self.rows_per_batch >= 1,
                      grad_accum=self.grad_accum >= 1, lr=self.lr > 0, warmup_steps=self.warmup_steps >= 0,
                      uncond_prob=0 <= self.uncond_prob <= 1, save_every=self.save_every >= 0,
                      keep_checkpoints=self.keep_checkpoints >= 1, max_grad_norm=self.max_grad_norm >= 0,
                      min_lr_ratio=0 <= self.min_lr_ratio <= 1, pack_window=self.pack_window >= 1,
                      packing=self.packing in ("best_fit", "next_fit"), gen_image_fit=self.gen_image_fit in ("crop", "letterbox"),
                      loader_workers=self.loader_workers >= 0, loader_timeout=self.loader_timeout > 0,
                      prefetch_steps=self.prefetch_steps >= 1)
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid training config values: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")
        data_files(self.data)  # the data entries' shapes and weights (ValueError naming them)
        if self.stage not in FROZEN_PREFIXES:
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage!r}")
        if self.mixed_precision not in ("bf16", "fp32"):
            raise ValueError(f"mixed_precision must be 'bf16' or 'fp32', got {self.mixed_precision!r}")
        if isinstance(self.activation_checkpointing, bool):
            self.activation_checkpointing = "full" if self.activation_checkpointing else "none"
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"activation_checkpointing must be one of {', '.join(map(repr, ACTIVATION_CHECKPOINTING))}, "
                             f"got {self.activation_checkpointing!r}")
        self.betas = tuple(self.betas)

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
                if isinstance(value, str) and not value.startswith("random:") and not Path(value).is_absolute():
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
