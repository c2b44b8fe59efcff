"""The `janus-fast train` subcommand (registered by janus_fast/cli.py)."""

from __future__ import annotations

import os
import sys

HELP = ("train / fine-tune Janus-Pro on a JSONL dataset (packed multi-task batches); under torchrun "
        "--nproc_per_node N it shards with FSDP2; a run resumes from the latest checkpoint in its output_dir")


def add_train_command(command) -> None:
    """Register `train` through the CLI's `command(name, help)` subparser factory."""
    t = command("train", HELP)
    t.add_argument("--config", required=True, help="training config, JSON or YAML (see examples/train_tiny.json)")
    t.add_argument("--steps", type=int, default=None, help="override the config's steps")
    t.add_argument("--output-dir", default=None, help="override the config's output_dir")
    t.add_argument("--device", default=None, help="override the config's device (cuda or cpu)")
    t.set_defaults(func=run_train_command)


def run_train_command(args) -> None:
    """Bad configs and samples raise ValueError / OSError naming the key or sample: the CLI
    prints them as one line."""
    import dataclasses

    from .config import TrainConfig
    from .trainer import Trainer

    config = TrainConfig.from_file(args.config)
    overrides = {k: v for k, v in (("steps", args.steps), ("output_dir", args.output_dir),
                                   ("device", args.device)) if v is not None}
    trainer = Trainer(dataclasses.replace(config, **overrides))
    start = trainer.step
    history = trainer.fit()
    trainer.topology.close()
    if trainer.topology.main and history:
        first = history[min(start, len(history) - 1)]
        print(f"trained steps {start + 1}..{trainer.step}: loss {first['loss']:.4f} -> {history[-1]['loss']:.4f}; "
              f"checkpoints, metrics.jsonl and loss_curve.png in {trainer.output_dir}", file=sys.stderr)
    if trainer.topology.distributed:
        # Everything is written and the group is left: end the worker without the interpreter's
        # teardown, where gloo work objects that FSDP2 still references can be destroyed after
        # the GIL is gone and abort the process (std::terminate, pytorch/pytorch PR 179291) -
        # a finished run would otherwise fail now and then.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
