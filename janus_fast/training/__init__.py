"""Training Janus-Pro: packed multi-task batches (text, understanding, text-to-image), both
losses through the fused linear + cross-entropy op, the three stages' freezing recipes, AdamW
with bf16 compute on fp32 master weights, FSDP2 under torchrun, sharded atomic checkpoints with
exact resume on any number of processes. `janus-fast train --config FILE` runs it (see
examples/train_tiny.json); `janus-fast export` turns a checkpoint into a release directory."""

from .config import TrainConfig, apply_stage
from .trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "apply_stage", "train"]
