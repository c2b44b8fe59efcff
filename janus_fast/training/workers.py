"""Loader worker processes: tasks in, results out, and never a silent hang.

Each worker has its own task queue, so the pool knows which tasks a worker holds: a worker that
dies (killed, out of memory, a crash in a decoder) or sends nothing for `timeout` seconds while it
holds a task raises WorkerError naming the worker and its task (the samples' file:line). A task's
own exception (DatasetError naming a sample) is raised as is. With 0 workers tasks run inline.

Workers are forked (as torch's DataLoader does): they inherit the loader's read-only state (file
indexes, tokenizer) without pickling, and never touch CUDA.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from collections import deque
from multiprocessing.reduction import ForkingPickler


class WorkerError(OSError):
    """A loader worker died (often the system's out-of-memory killer) or stalled (a hung file
    system); the message names it and the samples it held. An OSError, so the CLI prints it as
    one line."""


class Cancelled(Exception):
    """The pool's `stop` event was set while waiting for a result."""


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _worker(state, tasks, results, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    import torch

    torch.set_num_threads(1)
    while True:
        try:
            item = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the main process is gone
                return
            continue
        if item is None:  # closing: results nobody will read must not hold the exit up
            results.cancel_join_thread()
            return
        ticket, task = item
        try:
            results.put((ticket, True, task.run(state)))
        except Exception as e:  # noqa: BLE001 - sent to the main process, which raises it
            try:  # the queue pickles in a background thread, where a failure would be lost
                ForkingPickler.dumps(e)
            except Exception:  # noqa: BLE001 - an exception that does not pickle: its text and traceback
                e = RuntimeError(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            results.put((ticket, False, e))


class WorkerPool:
    """`n` worker processes running `task.run(state)`; tasks need a `describe()` for messages.
    `stop` (a threading.Event) ends a wait for a result with Cancelled."""

    def __init__(self, state, n: int, timeout: float, stop=None):
        self.state, self.timeout, self.stop = state, timeout, stop
        self._next, self._done, self._held = 0, {}, {}
        self._procs, self._queues, self._results = [], [], None
        if n > 0:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self._results = ctx.Queue()
            for _ in range(n):
                tasks = ctx.Queue()
                p = ctx.Process(target=_worker, args=(state, tasks, self._results, os.getpid()), daemon=True,
                                name="janus-fast-loader")
                p.start()
                self._procs.append(p)
                self._queues.append(tasks)
            self._held = {i: deque() for i in range(n)}

    def submit(self, task) -> int:
        ticket = self._next
        self._next += 1
        if not self._procs:
            try:
                self._done[ticket] = (True, task.run(self.state))
            except Exception as e:  # noqa: BLE001 - raised by result(), in submission order
                self._done[ticket] = (False, e)
            return ticket
        worker = ticket % len(self._procs)
        self._held[worker].append([ticket, task, None])  # [ticket, task, when its wait began]
        self._queues[worker].put((ticket, task))
        return ticket

    def result(self, ticket: int):
        """The task's result (waiting for it), or its exception raised."""
        while ticket not in self._done:
            if self.stop is not None and self.stop.is_set():
                raise Cancelled
            worker = ticket % len(self._procs)
            try:
                got, ok, value = self._results.get(timeout=min(1.0, self.timeout))
            except queue.Empty:
                self._check(worker)
                continue
            except (EOFError, OSError) as e:  # a result cut off by its worker's death
                for w, held in self._held.items():
                    if held:
                        self._check(w)
                raise WorkerError(f"a loader worker's result could not be read ({type(e).__name__}: {e})") from None
            self._done[got] = (ok, value)
            held = self._held[got % len(self._procs)]
            held.popleft()  # a worker answers its tasks in order
            if held:
                held[0][2] = time.monotonic()  # its next task starts now
        ok, value = self._done.pop(ticket)
        if not ok:
            raise value
        return value

    def _check(self, worker: int) -> None:
        oldest = self._held[worker][0]
        if oldest[2] is None:
            oldest[2] = time.monotonic()
        _, task, started = oldest
        proc = self._procs[worker]
        if not proc.is_alive():
            raise WorkerError(f"loader worker {worker} (pid {proc.pid}) died ({_describe_exit(proc.exitcode)}) "
                              f"while {task.describe()}")
        if time.monotonic() - started > self.timeout:
            raise WorkerError(f"loader worker {worker} (pid {proc.pid}) sent nothing for {self.timeout:.0f} s "
                              f"(loader_timeout) while {task.describe()}")

    def close(self) -> None:
        for tasks in self._queues:
            try:
                tasks.put(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 2
        for i, p in enumerate(self._procs):
            if self._held[i]:  # busy on results nobody will read (or stuck): no need to wait
                p.kill()
            p.join(timeout=max(deadline - time.monotonic(), 0))  # idle ones leave at once
            if p.is_alive():
                p.kill()
                p.join()
        for q in [*self._queues, *([self._results] if self._results is not None else [])]:
            q.cancel_join_thread()
            q.close()
        self._procs, self._queues, self._results = [], [], None
