"""The host loop over captured steps, at most `lookahead` steps ahead of the device.

After enqueuing step i the host records an event and a non-blocking copy of the step's stop
flag into pinned memory; before enqueuing step i + lookahead it waits for that event. So the
device always has up to `lookahead` steps queued (it never idles for the host), while the host
learns within `lookahead` steps that every row hit EOS - a short answer costs about its length,
not max_new_tokens - and `progress` reports steps the device has finished, not queued ones.
"""

from __future__ import annotations

from typing import Callable

import torch

LOOKAHEAD = 4  # steps the host may run ahead of the device


class Marks:
    """Per step: an event after it and the stop flag's value then, in a ring of `size` slots
    (slot i % size is reused by step i + size only after the host has waited for step i)."""

    def __init__(self, flag: torch.Tensor | None, size: int):
        self.flag, self.cuda = flag, flag is not None and flag.is_cuda
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=self.cuda)
        self.events: list = [None] * size

    def record(self, i: int) -> None:
        slot = i % len(self.events)
        if self.flag is not None:
            self.host[slot:slot + 1].copy_(self.flag, non_blocking=True)
        if self.cuda:
            self.events[slot] = torch.cuda.Event()
            self.events[slot].record()

    def wait(self, i: int) -> int:
        """Waits until step i is done; the flag's value after it (0 without a flag)."""
        slot = i % len(self.events)
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        return int(self.host[slot])


def run_steps(step: Callable[[], None], n: int, *, stop: torch.Tensor | None = None,
              progress: Callable[[int, int], None] | None = None, lookahead: int = LOOKAHEAD,
              marks: Marks | None = None) -> int:
    """Runs `step()` up to n times; `stop` (a device int64 [1], or None) is a flag the steps set
    to >= 0 once nothing is left to do. Returns the number of steps enqueued: n, or - once the
    host has seen the flag set after some step j - at most j + lookahead + 1. progress(i, n) is
    called as step i finishes on the device (i = 1 .. steps run; the last call is (n, n) even
    when the flag stopped the loop early). Without `stop` and `progress` nothing is waited for.
    `marks` replaces the events (a test's instrumented device)."""
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead}")
    if stop is None and progress is None:
        for _ in range(n):
            step()
        return n
    marks = marks if marks is not None else Marks(stop, lookahead)
    ran, reported = n, 0
    for i in range(n):
        if i >= lookahead:
            flag = marks.wait(i - lookahead)
            reported = i - lookahead + 1
            if progress is not None:
                progress(reported, n)
            if stop is not None and flag >= 0:
                ran = i
                break
        step()
        marks.record(i)
    for j in range(reported, ran):  # the steps still queued
        marks.wait(j)
        if progress is not None:
            progress(j + 1, n)
    if progress is not None and ran < n:  # stopped early: the bar completes
        progress(n, n)
    return ran
