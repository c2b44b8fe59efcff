"""The training loop: packed multi-task batches, a stage's freezing recipe, AdamW on fp32 master
weights with bf16 compute, gradient accumulation, per-layer activation checkpointing, FSDP2
under torchrun, atomic checkpoints with exact resume, a progress bar and a loss-curve PNG.

Loss normalisation: every optimizer step covers world x grad_accum micro-batches; the loss is
(Σ text CE + image_loss_weight · Σ image CE) / (number of target tokens in all of them), counted
from the packing plan before any forward, so an accumulated or data-parallel step gives the
gradient of one big batch, and a resumed run the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from .. import ops
from .checkpoints import atomic_write_text, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, apply_stage
from .curve import draw_loss_curve
from .distributed import Topology, all_reduce_sum, checkpoint_layers, init_distributed, shard_model
from .loader import TrainLoader
from .precision import compute_dtype


def load_model(spec: str, device: torch.device, seed: int):
    """fp32 master weights: a release directory, or random:tiny|1b|7b."""
    from ..models.janus_pro import JanusPro
    from ..models.random_model import random_model

    if spec.startswith("random:"):
        return random_model(spec.split(":", 1)[1], device=device, dtype=torch.float32, seed=seed)
    model = JanusPro.from_pretrained(spec, dtype=torch.float32, device=device)
    if model.processor is None:
        raise ValueError(f"{spec} has no tokenizer.json: training needs the release's tokenizer")
    return model


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _progress_bar(config: TrainConfig, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print("tqdm is not installed: printing one line per step instead of a progress bar", file=sys.stderr)
        return None
    return tqdm(total=config.steps, initial=initial, desc="training", unit="step", dynamic_ncols=True)


class Trainer:
    def __init__(self, config: TrainConfig, topology: Topology | None = None):
        self.config = config
        self.topology = topology or init_distributed(config.device)
        self.output_dir = Path(config.output_dir)
        device = self.topology.device
        self.compute_dtype = compute_dtype(config.mixed_precision, device)  # checked before anything loads
        self.model = model = load_model(config.model, device, config.seed)
        model.train()
        self.trained = apply_stage(model, config.stage)
        # Before sharding: the loader keeps its own copy of the VQ encoder for uncached images.
        self.loader = TrainLoader(config, model, model.processor, self.topology)
        checkpoint_layers(model.language_model.model.layers, config.activation_checkpointing)
        if self.topology.distributed:
            shard_model(model, self.topology, self.compute_dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas,
                                           fused=device.type == "cuda")
        self.params = params
        self.step = 0
        self.history: list[dict] = []
        resume = latest_checkpoint(self.output_dir)
        if resume is not None:
            state = load_checkpoint(resume, model, self.optimizer)
            self.step, self.history = int(state["step"]), list(state["history"])
            self.loader.load_state_dict(state["loader"])
            if self.topology.main:
                print(f"resumed from {resume} at step {self.step}", file=sys.stderr)

    def _autocast(self):
        # FSDP2's MixedPrecisionPolicy already hands the layers bf16 weights; one process autocasts.
        if self.compute_dtype == torch.float32 or self.topology.distributed:
            return contextlib.nullcontext()
        return torch.autocast(self.topology.device.type, dtype=self.compute_dtype)

    def train_step(self) -> dict:
        """One optimizer step over world x grad_accum micro-batches; returns its metrics."""
        cfg, topo, model = self.config, self.topology, self.model
        start = time.perf_counter()
        batches = self.loader.next_step()  # built in the background; counts over all ranks
        n_text, n_image, tokens = batches.text_targets, batches.image_targets, batches.tokens
        # FSDP averages gradients over ranks: scale by world so the result is the global mean.
        scale = topo.world / max(n_text + n_image, 1)
        mine = batches.micro
        sums = torch.zeros(2, dtype=torch.float64, device=topo.device)
        # The ops' value checks (cu_seqlens, target ranges) sync with the GPU in every layer: they
        # vet the packer's batches on the first step, then stay off.
        checks = contextlib.nullcontext if self.step == 0 else ops.no_value_checks
        for i, batch in enumerate(mine):
            if topo.distributed:  # reduce-scatter once, after the last micro-batch
                model.set_requires_gradient_sync(i == len(mine) - 1)
            with checks():  # the backward recomputes checkpointed layers: checks stay as they were
                with self._autocast():
                    out = model(**batch.inputs, image_loss_weight=cfg.image_loss_weight)
                ((out.text_loss_sum + cfg.image_loss_weight * out.image_loss_sum) * scale).backward()
            sums += torch.stack([out.text_loss_sum.detach(), out.image_loss_sum.detach()]).double()
        norm = sums.new_full((1,), float("nan"))
        if cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).reshape(1).to(sums)
        lr = learning_rate(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # the one host sync of the step, after the optimizer's launches
        text_sum, image_sum, grad_norm = torch.cat([all_reduce_sum(sums, topo), norm]).tolist()
        self.step += 1
        seconds = time.perf_counter() - start
        return {"step": self.step, "loss": (text_sum + cfg.image_loss_weight * image_sum) / max(n_text + n_image, 1),
                "text_loss": text_sum / max(n_text, 1), "image_loss": image_sum / max(n_image, 1),
                "text_targets": n_text, "image_targets": n_image, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": tokens / seconds,  # tokens of all ranks (there are no pads)
                "padding": batches.padding}  # share of the step's token budget the packing left unused

    def save(self) -> Path | None:
        state = {"loader": self.loader.state_dict(), "history": self.history, "config": self.config.to_dict()}
        path = save_checkpoint(self.output_dir, self.step, self.model, self.optimizer, state, self.topology,
                               keep=self.config.keep_checkpoints)
        if self.topology.main:
            atomic_write_text(self.output_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
        return path

    def fit(self, max_steps: int | None = None) -> list[dict]:
        """Train until config.steps (or `max_steps` more steps, to stop early), saving every
        save_every steps and at the end; returns the loss history."""
        cfg = self.config
        stop = cfg.steps if max_steps is None else min(cfg.steps, self.step + max_steps)
        if self.topology.main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        bar = _progress_bar(cfg, self.step, cfg.progress and self.topology.main)
        try:
            while self.step < stop:
                record = self.train_step()
                self.history.append(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                elif cfg.progress and self.topology.main:
                    print(f"step {record['step']}/{cfg.steps} loss {record['loss']:.4f} "
                          f"({record['tokens_per_s']:.0f} tokens/s)", file=sys.stderr)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < stop:
                    self.save()
        finally:
            self.loader.close()
            if bar is not None:
                bar.close()
        self.save()
        if self.topology.main:
            curve = draw_loss_curve(self.history, self.output_dir / "loss_curve.png")
            if curve is not None and cfg.progress:
                print(f"loss curve: {curve}", file=sys.stderr)
        return self.history


def train(config: TrainConfig, max_steps: int | None = None) -> list[dict]:
    """Build a Trainer from `config` (resuming from output_dir's latest checkpoint) and run it."""
    return Trainer(config).fit(max_steps)
