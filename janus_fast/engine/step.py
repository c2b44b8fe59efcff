"""One decode step, run eagerly or replayed as one CUDA graph, and the buckets that keep them.

A step is a function of static buffers only (no arguments, no result): everything it reads and
writes lives in tensors allocated once per bucket, so the same step can be captured once and
replayed for every token of every call that lands in the bucket.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from .. import ops


def graphs_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Capture only where every op of the step has a fast, sync-free backend: CUDA tensors of a
    dtype the kernels take, with Triton installed (the reference sampler reads its random state
    on the host, which capture forbids)."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16, torch.float32)
            and ops.backends()["triton"] is not None)


class Step:
    """`fn()` eagerly, or captured as one CUDA graph at construction and replayed on each call.

    Capture warms up once on a side stream (compiling the Triton kernels) and then records `fn`;
    both leave the buffers in a state the caller resets before each generation."""

    def __init__(self, fn: Callable[[], None], capture: bool):
        self.fn, self.graph = fn, None
        if capture:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                fn()

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self) -> None:
        if self.graph is None:
            self.fn()
        else:
            self.graph.replay()


class Buckets:
    """The buffers and step of each bucket, most recent last; the oldest is dropped past `limit`
    (a bucket holds a whole KV cache). `built` counts buckets made, so tests see reuse."""

    def __init__(self, limit: int = 2):
        self.limit, self.built = limit, 0
        self._items: OrderedDict = OrderedDict()

    def get(self, key, build: Callable[[], object]):
        """The bucket for `key`, made by `build()` on first use."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        while len(self._items) >= self.limit:
            self._items.popitem(last=False)
        self._items[key] = bucket = build()
        self.built += 1
        return bucket

    def clear(self) -> None:
        self._items.clear()


CAPACITY_MULTIPLE = 64  # cache capacities are rounded up to this, so nearby lengths share a bucket


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
