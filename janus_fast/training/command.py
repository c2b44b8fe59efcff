"""The `janus-fast train` and `janus-fast export` subcommands (registered by janus_fast/cli.py)."""

from __future__ import annotations

import math
import os
import re
import sys

HELP = ("train / fine-tune Janus-Pro on a JSONL dataset (packed multi-task batches); under torchrun "
        "--nproc_per_node N it shards with FSDP2; a run resumes from the newest checkpoint in its output_dir")
EXPORT_HELP = ("write a training checkpoint as a release directory (config.json, safetensors, tokenizer) "
               "that JanusPro.from_pretrained and the other commands load")


def add_train_command(command) -> None:
    """Register `train` and `export` through the CLI's `command(name, help)` subparser factory."""
    from .export import DTYPES

    t = command("train", HELP)
    t.add_argument("--config", required=True, help="training config, JSON or YAML (see examples/train_tiny.json)")
    t.add_argument("--steps", type=int, default=None, help="override the config's steps")
    t.add_argument("--grad-accum", type=int, default=None,
                   help="override the config's grad_accum (keep processes x grad_accum when resuming)")
    t.add_argument("--output-dir", default=None, help="override the config's output_dir")
    t.add_argument("--device", default=None, help="override the config's device (cuda or cpu)")
    t.set_defaults(func=run_train_command)

    e = command("export", EXPORT_HELP)
    e.add_argument("checkpoint", help="a run's output_dir (its newest valid checkpoint) or a checkpoint-N folder")
    e.add_argument("--out", required=True, help="the release directory to write (new, empty, or a Janus checkpoint)")
    e.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast the weights (default: as trained, float32)")
    e.add_argument("--max-shard-size", default="5GB",
                   help="largest weight file; also the most read into memory at once")
    e.set_defaults(func=run_export_command)


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "nan"


def run_train_command(args) -> None:
    """Bad configs and samples raise ValueError / OSError naming the key or sample: the CLI
    prints them as one line. A collective that failed (a rank died or stalled past
    collective_timeout) is one line too, naming this rank."""
    import dataclasses

    from .config import TrainConfig
    from .trainer import Trainer

    config = TrainConfig.from_file(args.config)
    overrides = {k: v for k, v in (("steps", args.steps), ("grad_accum", args.grad_accum),
                                   ("output_dir", args.output_dir), ("device", args.device)) if v is not None}
    config = dataclasses.replace(config, **overrides)
    try:
        trainer = Trainer(config)
        _train(trainer)
    except RuntimeError as e:
        if getattr(args, "debug", False) or not _collective_failure(e):
            raise
        first = re.sub(r"^\[[^\]]*\] ", "", str(e).strip().splitlines()[0])  # gloo's [file.cc:line] prefix
        print(f"janus-fast train: error: rank {os.environ.get('RANK', 0)}: a collective failed ({first}); another "
              f"rank died or stalled (collective_timeout {config.collective_timeout:g} s)", file=sys.stderr)
        _exit(2)
    if trainer.topology.distributed:
        trainer.topology.close()
        _exit(0)


def _collective_failure(e: RuntimeError) -> bool:
    """Whether `e` is a collective that failed for want of a peer: torch raises DistError for
    some, a plain RuntimeError from gloo's transport for others (a timeout, a closed connection)."""
    import torch.distributed as dist

    if isinstance(e, dist.DistError):
        return True
    message = str(e)
    return dist.is_initialized() and bool(re.search(r"gloo|nccl|Timed out|[Cc]onnection (closed|reset|refused)",
                                                    message))


def _train(trainer) -> None:
    main = trainer.topology.main
    try:
        if trainer.complete:
            if main:
                print(f"the run in {trainer.output_dir} is already complete (step {trainer.step} of "
                      f"{trainer.config.steps}); raise steps to train further, or choose a new output_dir",
                      file=sys.stderr)
            return
        start = trainer.step
        history = trainer.fit()
        if main and history:
            first = history[min(start, len(history) - 1)]
            print(f"trained steps {start + 1}..{trainer.step}: loss {_number(first['loss'])} -> "
                  f"{_number(history[-1]['loss'])}; checkpoints, metrics.jsonl and loss_curve.png in "
                  f"{trainer.output_dir} (`janus-fast export {trainer.output_dir} --out DIR` writes a release "
                  "directory)", file=sys.stderr)
    finally:
        trainer.close()


def _exit(status: int) -> None:
    """End a torchrun worker, once everything is written and the group is left, without the
    interpreter's teardown: finished runs used to abort there now and then (SIGABRT, the pattern
    of pytorch/pytorch PR 179291: gloo work objects still referenced at finalization are destroyed
    without the GIL). Not reproduced with torch 2.13 (37 runs without this, some without
    destroy_process_group), so the cause is unconfirmed and the workaround stays."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise SystemExit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_export_command(args) -> None:
    from .export import DTYPES, export_release

    written = export_release(args.checkpoint, args.out, dtype=DTYPES[args.dtype] if args.dtype else None,
                             max_shard_size=args.max_shard_size)
    print(f"exported {written} to {args.out} ({args.dtype or 'float32'} weights, config.json, tokenizer)",
          file=sys.stderr)
