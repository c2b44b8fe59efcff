"""Shared by the training tests: the tiny config, the example dataset, metrics, and `janus-fast
train` under torchrun with CPU processes (gloo), waited for, killed or inspected."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from examples.make_dataset import make_dataset
from janus_fast import cli
from janus_fast.models.janus_pro import JanusPro
from janus_fast.training import TrainConfig

REPO = Path(__file__).resolve().parent.parent


def make_data(root: Path) -> Path:
    return make_dataset(root, n_text=2, n_understanding=2, n_generation=2, image_size=64, seed=5)


def config(data, out, **overrides) -> TrainConfig:
    base = dict(data=str(data), output_dir=str(out), model="random:tiny", steps=4, row_tokens=600, rows_per_batch=1,
                grad_accum=1, lr=3e-3, warmup_steps=1, mixed_precision="fp32", activation_checkpointing="selective",
                uncond_prob=0.5, progress=False, vq_cache_dir=str(Path(data).parent / "vq_cache"), seed=0,
                loader_workers=0)
    base.update(overrides)
    return TrainConfig(**base)


def losses(history):
    return [(r["loss"], r["text_loss"], r["image_loss"]) for r in history]


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl, parsed as strict JSON (a bare NaN or Infinity fails)."""
    def strict(name):
        raise ValueError(f"metrics.jsonl holds a bare {name}")

    return [json.loads(x, parse_constant=strict) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(a, b):
    assert len(a) == len(b)
    for x, y in zip(losses(a), losses(b)):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6)


def exported(run: Path, out: Path) -> JanusPro:
    """The run's newest checkpoint through `janus-fast export`, loaded with from_pretrained."""
    cli.main(["export", str(run), "--out", str(out)])
    return JanusPro.from_pretrained(out, dtype=None, device="cpu")


def assert_same_weights(a: JanusPro, b: JanusPro, exact: bool = False):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if exact:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


class Torchrun:
    """`janus-fast train --config FILE` under torchrun with `nproc` CPU processes (gloo); kill()
    ends every process it started."""

    def __init__(self, cfg: TrainConfig, file: Path, *extra: str, nproc: int = 2):
        file.write_text(json.dumps(dataclasses.asdict(cfg)))
        self.out = Path(cfg.output_dir)
        self.log = file.with_suffix(".log")  # a file, not a pipe: nobody reads while the run goes on
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                 "-m", "janus_fast.cli", "train", "--config", str(file), *extra],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 240) -> tuple[int, str]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            raise AssertionError(f"torchrun did not end within {timeout} s:\n{self.output()[-6000:]}") from None
        return self.proc.returncode, self.output()

    def succeed(self, timeout: float = 240) -> str:
        rc, output = self.wait(timeout)
        assert rc == 0, output[-8000:]  # the workers' tracebacks come before torchrun's summary
        return output

    def kill(self) -> None:
        """kill -9 the workers and torchrun (torchrun starts each worker in a session of its own),
        and wait until they have exited (their files closed, their locks gone)."""
        pids = [*_descendants(self.proc.pid), self.proc.pid]
        for pid in pids:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        end = time.monotonic() + 30
        while any(_running(pid) for pid in pids) and time.monotonic() < end:
            time.sleep(0.05)
        stuck = [pid for pid in pids if _running(pid)]
        assert not stuck, f"processes {stuck} still alive 30 s after kill -9"

    def wait_for(self, condition, timeout: float = 240, interval: float = 0.2) -> None:
        end = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"torchrun ended early:\n{self.output()[-6000:]}")
            if time.monotonic() > end:
                self.kill()
                raise AssertionError(f"timed out after {timeout} s waiting for the run")
            time.sleep(interval)

    def worker(self, rank: int) -> int:
        """The pid of the worker process of `rank`."""
        for pid in _descendants(self.proc.pid):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ and b"janus_fast.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        raise AssertionError(f"no worker of rank {rank} found")


def _running(pid: int) -> bool:
    """Any of the process's threads alive and not yet a zombie. (A killed multi-threaded process's
    leader turns zombie before its other threads have exited, and its files, locks included,
    close with the last of them.)"""
    def alive(stat: Path) -> bool:
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False

    return any(alive(task / "stat") for task in Path(f"/proc/{pid}/task").glob("*"))


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def latest_is(out: Path, step: int):
    """Whether `latest` names a checkpoint of `step` or later."""
    def reached() -> bool:
        try:
            return int((out / "latest").read_text().rpartition("-")[2]) >= step
        except (OSError, ValueError):
            return False
    return reached
