"""The training loop: packed multi-task batches, a stage's freezing recipe, AdamW on fp32 master
weights with bf16 compute, gradient accumulation, per-layer activation checkpointing, FSDP2
under torchrun, sharded checkpoints with exact resume, a progress bar and a loss-curve PNG.

Loss normalisation: every optimizer step covers world x grad_accum micro-batches; the loss is
(Σ text CE + image_loss_weight · Σ image CE) / (number of target tokens in all of them), counted
from the packing plan before any forward, so an accumulated or data-parallel step gives the
gradient of one big batch, and a resumed run (on any number of processes with the same
world x grad_accum) the same numbers as an uninterrupted one.

A non-finite loss or gradient norm stops the run (NonFiniteError naming the step) before
anything is saved, or, with skip_nonfinite_steps, skips that step's update; a checkpoint is
only written from finite weights.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import torch

from .. import ops
from .checkpoints import load_checkpoint, save_checkpoint
from .config import TrainConfig, apply_stage
from .curve import draw_loss_curve
from .distributed import Topology, all_reduce_sum, checkpoint_layers, init_distributed, shard_model
from .loader import TrainLoader
from .precision import compute_dtype
from .resume import ResumePoint, check_resumable, find_resume
from .rundir import Metrics, RunLock, clean_leftovers


class NonFiniteError(ValueError):
    """The loss or the gradient norm of a step is not finite: the run stopped, unsaved."""


def model_config(spec: str) -> dict:
    """The architecture `spec` names (a release directory's config.json, or a random size),
    read without building the model."""
    from ..checkpoint import read_config
    from ..models.random_model import random_config

    if spec.startswith("random:"):
        return random_config(spec.split(":", 1)[1]).to_dict()
    return read_config(spec)[0].to_dict()


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
    """A run on config.output_dir (its lock held until close()): the model, data, optimizer and
    step, resumed from the newest valid checkpoint there. A run already complete loads nothing
    (model None); fit() then returns its history."""

    def __init__(self, config: TrainConfig, topology: Topology | None = None):
        self.config = config
        self.topology = topo = topology or init_distributed(config.device, config.collective_timeout)
        self.output_dir = Path(config.output_dir)
        self.lock = RunLock(self.output_dir)
        try:
            self._setup(topo.from_main(self._claim_output_dir))
        except BaseException:
            self.lock.release()
            raise

    # ------------------------------------------------------------------ setup
    def _setup(self, resume: ResumePoint | None) -> None:
        config, topo = self.config, self.topology
        self.compute_dtype = compute_dtype(config.mixed_precision, topo.device)  # checked before anything loads
        if config.cpu_offload and not topo.distributed:
            raise ValueError("cpu_offload applies to FSDP2 under torchrun; a single process keeps its state on its "
                             "device")
        self.architecture = model_config(config.model)
        self.step = self.saved_step = self.skipped_in_a_row = 0
        self.history: list[dict] = []
        self.metrics = Metrics(self.output_dir)
        if resume is not None:  # checked before anything loads
            if topo.main:
                for note in resume.notes:
                    print(f"warning: {note}", file=sys.stderr)
            notes = topo.from_main(lambda: check_resumable(resume, self.identity(), config, topo.world))
            if resume.state["step"] >= config.steps:  # a complete run: nothing to load
                self.model = None
                self.step = self.saved_step = resume.state["step"]
                self.history = topo.from_main(lambda: self.metrics.read(self.step))
                return
        device = topo.device
        self.model = model = load_model(config.model, device, config.seed)
        model.train()
        self.trained = apply_stage(model, config.stage, config.stage1_gen_embed)
        # Before sharding: the loader keeps its own copy of the VQ encoder for uncached images.
        self.loader = TrainLoader(config, model, model.processor, topo)
        checkpoint_layers(model.language_model.model.layers, config.activation_checkpointing)
        if topo.distributed:
            shard_model(model, topo, self.compute_dtype, reshard_after_forward=config.reshard_after_forward,
                        cpu_offload=config.cpu_offload)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = self._optimizer()
        if resume is not None:
            self._resume(resume, notes)

    def _claim_output_dir(self) -> ResumePoint | None:
        """Rank 0: take the run's lock, remove killed writes' leftovers, pick the checkpoint."""
        self.lock.acquire()
        gone = clean_leftovers(self.output_dir)
        if gone:
            print(f"removed what interrupted writes left in {self.output_dir}: {', '.join(sorted(gone))}",
                  file=sys.stderr)
        return find_resume(self.output_dir)

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas,
                                 fused=self.topology.device.type == "cuda" and not cfg.cpu_offload)

    def identity(self) -> dict:
        """What a checkpoint must share with the run that resumes it (see resume.check_resumable)."""
        cfg = self.config
        return {"model_config": self.architecture,
                "trained": {"stage": cfg.stage, "stage1_gen_embed": cfg.stage1_gen_embed},
                "micro_batches_per_step": self.topology.world * cfg.grad_accum}

    def _resume(self, resume: ResumePoint, notes: list[str]) -> None:
        topo = self.topology
        self.loader.load_state_dict(resume.state["loader"])  # refuses changed data or packing, naming them
        load_checkpoint(resume.path, self.model, self.optimizer)
        self.step = self.saved_step = resume.state["step"]
        self.history = topo.from_main(lambda: self.metrics.read(self.step))
        if topo.main:
            self.metrics.rewrite(self.history)  # steps after the checkpoint are trained again
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
            print(f"resumed from {resume.path} at step {self.step}", file=sys.stderr)

    @property
    def complete(self) -> bool:
        return self.step >= self.config.steps

    # ------------------------------------------------------------------ the step
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
        n_text, n_image = batches.text_targets, batches.image_targets
        # FSDP averages gradients over ranks: scale by world so the result is the global mean.
        scale = topo.world / max(n_text + n_image, 1)
        sums = torch.zeros(2, dtype=torch.float64, device=topo.device)
        # The ops' value checks (cu_seqlens, target ranges) sync with the GPU in every layer: they
        # vet the packer's batches on the first step, then stay off.
        checks = contextlib.nullcontext if self.step == 0 else ops.no_value_checks
        for i, batch in enumerate(batches.micro):
            if topo.distributed and cfg.defer_grad_reduce:  # else: reduce-scatter after every micro-batch
                model.set_requires_gradient_sync(i == len(batches.micro) - 1)
            with checks():  # the backward recomputes checkpointed layers: checks stay as they were
                with self._autocast():
                    out = model(**batch.inputs, image_loss_weight=cfg.image_loss_weight)
                ((out.text_loss_sum + cfg.image_loss_weight * out.image_loss_sum) * scale).backward()
            sums += torch.stack([out.text_loss_sum.detach(), out.image_loss_sum.detach()]).double()
        norm = self._clip_gradients().to(sums)
        lr = learning_rate(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        values = torch.cat([all_reduce_sum(sums, topo), norm])
        skipped = False
        if cfg.skip_nonfinite_steps:  # read before the update, which a bad step must not make
            skipped = not torch.isfinite(values).all().item()
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # the one host sync of the step (after the optimizer's launches unless skipping is on)
        text_sum, image_sum, grad_norm = values.tolist()
        self.step += 1
        seconds = time.perf_counter() - start
        record = {"step": self.step, "loss": (text_sum + cfg.image_loss_weight * image_sum) / max(n_text + n_image, 1),
                  "text_loss": text_sum / max(n_text, 1), "image_loss": image_sum / max(n_image, 1),
                  "text_targets": n_text, "image_targets": n_image, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": batches.tokens / seconds,  # tokens of all ranks (there are no pads)
                  "padding": batches.padding}  # share of the step's token budget the packing left unused
        self._check_finite(record, skipped)
        return record

    def _clip_gradients(self) -> torch.Tensor:
        """The total gradient norm (always measured: a non-finite one stops the run), clipped to
        max_grad_norm when that is > 0."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)  # a DTensor under FSDP2
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.config.max_grad_norm, norm)
        return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).reshape(1)

    def _check_finite(self, record: dict, skipped: bool) -> None:
        bad = [f"{name} is {record[k]}" for k, name in (("loss", "the loss"), ("grad_norm", "the gradient norm"))
               if not math.isfinite(record[k])]
        if not bad:
            self.skipped_in_a_row = 0
            return
        limit = self.config.skip_nonfinite_steps
        if skipped:
            self.skipped_in_a_row += 1
            record["skipped"] = True
            if self.skipped_in_a_row <= limit:
                if self.topology.main:
                    print(f"warning: step {record['step']}: {' and '.join(bad)}: update skipped "
                          f"({self.skipped_in_a_row} of {limit} in a row allowed)", file=sys.stderr)
                return
        if self.topology.main:
            self.metrics.append(record)
        self.history.append(record)
        why = (f"{self.skipped_in_a_row} steps in a row, more than skip_nonfinite_steps={limit}" if skipped
               else "set skip_nonfinite_steps to skip such steps")
        raise NonFiniteError(f"step {record['step']}: {' and '.join(bad)} (lr {record['lr']:g}): training "
                             f"diverged and stopped ({why}); the last checkpoint is step {self.saved_step}")

    # ------------------------------------------------------------------ saving and the loop
    def _weights_finite(self) -> bool:
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]
        flags = [torch.isfinite(p).all() for p in local if p.numel()]
        return self.topology.all_true(torch.stack(flags).all() if flags else torch.tensor(True))

    def save(self) -> Path:
        if not self._weights_finite():
            raise NonFiniteError(f"step {self.step}: the weights are not finite; not saving them (the last "
                                 f"checkpoint is step {self.saved_step})")
        state = {"loader": self.loader.state_dict(), "config": self.config.to_dict(), "world": self.topology.world,
                 **self.identity()}
        path = save_checkpoint(self.output_dir, self.step, self.model, self.optimizer, state, self.topology,
                               keep=self.config.keep_checkpoints)
        self.saved_step = self.step
        return path

    def _report(self, record: dict, bar) -> None:
        self.history.append(record)
        if not self.topology.main:
            return
        self.metrics.append(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        elif self.config.progress:
            print(f"step {record['step']}/{self.config.steps} loss {record['loss']:.4f} "
                  f"({record['tokens_per_s']:.0f} tokens/s)", file=sys.stderr)

    def fit(self, max_steps: int | None = None) -> list[dict]:
        """Train until config.steps (or `max_steps` more steps, to stop early), saving every
        save_every steps and at the end; returns the loss history (of every step so far)."""
        cfg = self.config
        stop = cfg.steps if max_steps is None else min(cfg.steps, self.step + max_steps)
        if self.step >= stop:
            return self.history
        bar = _progress_bar(cfg, self.step, cfg.progress and self.topology.main)
        try:
            while self.step < stop:
                self._report(self.train_step(), bar)
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

    def close(self) -> None:
        """Stop the loader's workers and release the output directory's lock (the process group
        stays: Topology.close)."""
        if getattr(self, "loader", None) is not None:
            self.loader.close()
        self.lock.release()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def train(config: TrainConfig, max_steps: int | None = None) -> list[dict]:
    """Build a Trainer from `config` (resuming from output_dir's newest checkpoint) and run it."""
    with Trainer(config) as trainer:
        return trainer.fit(max_steps)
