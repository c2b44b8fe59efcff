"""The `janus-fast train` subcommand (registered by janus_fast/cli.py)."""

from __future__ import annotations

import sys


def add_train_command(subparsers) -> None:
    t = subparsers.add_parser("train", help="train / fine-tune Janus-Pro on a JSONL dataset (packed, multi-task)",
                              description="Train from a config file (JSON, or YAML with PyYAML); run it under "
                                          "torchrun --nproc_per_node N for FSDP2 over N processes. A run "
                                          "resumes from the latest checkpoint in its output_dir.")
    t.add_argument("--config", required=True, help="training config (see examples/train_tiny.json)")
    t.add_argument("--steps", type=int, default=None, help="override the config's steps")
    t.add_argument("--output-dir", default=None, help="override the config's output_dir")
    t.add_argument("--device", default=None, help="override the config's device")
    t.set_defaults(func=run_train_command)


def run_train_command(args) -> None:
    import dataclasses

    from .config import TrainConfig
    from .data import DatasetError
    from .trainer import Trainer

    try:
        config = TrainConfig.from_file(args.config)
        overrides = {k: v for k, v in (("steps", args.steps), ("output_dir", args.output_dir),
                                       ("device", args.device)) if v is not None}
        config = dataclasses.replace(config, **overrides)
        trainer = Trainer(config)
    except (DatasetError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    start = trainer.step
    history = trainer.fit()
    if trainer.topology.main and history:
        first = history[min(start, len(history) - 1)]
        print(f"trained steps {start + 1}..{trainer.step}: loss {first['loss']:.4f} -> {history[-1]['loss']:.4f}; "
              f"checkpoints, metrics.jsonl and loss_curve.png in {config.output_dir}", file=sys.stderr)
