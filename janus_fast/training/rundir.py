"""A run's output directory: one live run at a time (an exclusive lock), the leftovers of killed
writes removed at the start, and metrics.jsonl (one JSON object per step, strict JSON).

Every file and folder here is created with the umask's modes (0644 / 0755 under umask 022)."""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import socket
import time
from pathlib import Path

from ..checkpoint import atomic_write_text
from .checkpoints import clean_staging

LOCK_NAME = ".train.lock"
METRICS = "metrics.jsonl"
# the temporary files of checkpoint.atomic_write (".<name>.<random><suffix>") for the run's files
_ATOMIC_TMP = re.compile(r"\.(latest|metrics\.jsonl|loss_curve\.png)\.[A-Za-z0-9_]+(\.png|\.jsonl)?")


class RunInUseError(OSError):
    """Another live process holds the output directory's lock."""


_HELD: set[int] = set()  # this process's lock descriptors


def _close_held_locks() -> None:
    """In a forked child (a loader worker): drop the inherited lock descriptors, so that the lock
    goes with the process that took it, not with a worker that outlives it."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


class RunLock:
    """An exclusive fcntl.flock on <output_dir>/.train.lock, held while this object lives: the
    kernel releases it when the process exits or dies, so a crashed run never blocks the next
    (forked children do not keep it: see _close_held_locks)."""

    _fork_hook = False

    def __init__(self, output_dir):
        self.path = Path(output_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise RunInUseError(f"{self.path.parent} is in use by another training run ({holder}); wait for it to "
                                "finish, or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        if not RunLock._fork_hook:
            os.register_at_fork(after_in_child=_close_held_locks)
            RunLock._fork_hook = True
        self.fd = fd
        _HELD.add(fd)
        return self

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()


def clean_leftovers(output_dir) -> list[str]:
    """Remove the staging folders of killed checkpoint saves and the temporary files of killed
    atomic writes (only with the lock held: a live run's are not leftovers)."""
    output_dir = Path(output_dir)
    gone = clean_staging(output_dir)
    for name in os.listdir(output_dir) if output_dir.is_dir() else []:
        if _ATOMIC_TMP.fullmatch(name):
            (output_dir / name).unlink(missing_ok=True)
            gone.append(name)
    return gone


def json_safe(record: dict) -> dict:
    """Non-finite floats as null: JSON has no NaN or Infinity."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


class Metrics:
    """metrics.jsonl: each step's record appended as one line by one write() (a kill leaves
    whole lines); on resume the file is cut back to the checkpoint's step."""

    def __init__(self, output_dir):
        self.path = Path(output_dir) / METRICS

    def read(self, upto: int) -> list[dict]:
        """The records of steps 1..upto (later or unreadable lines are dropped)."""
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= upto:
                rows.append(row)
        return rows

    def rewrite(self, rows: list[dict]) -> None:
        atomic_write_text(self.path, "".join(self._line(r) for r in rows))

    def append(self, row: dict) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, self._line(row).encode("utf-8"))
        finally:
            os.close(fd)

    @staticmethod
    def _line(row: dict) -> str:
        return json.dumps(json_safe(row), allow_nan=False) + "\n"
