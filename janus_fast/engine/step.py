"""Captured steps and the buckets that keep them.

The step interface (every kind of step - image tokens, text tokens, a multi-token verify step -
follows it):
- A *step* is a function of static tensors only: `fn(buffers)` takes no other argument and
  returns nothing. Everything it reads or writes - the KV cache, the hidden state, counters,
  random states, and its *settings* (cfg weight, temperature, top-k, top-p, stop ids, ...) - is
  a tensor allocated once, before capture, in a `buffers` object. Settings are device tensors
  the step's kernels read at run time (ops.cfg_sample_settings), so one capture serves every
  value; the host changes them only by copying new values into those tensors between runs.
- A step has no host syncs and allocates nothing whose size depends on values, so it can be
  captured once as a CUDA graph and replayed (`Step`); on the CPU, or where an op has no
  capture-safe backend, the same function runs eagerly.
- A *bucket* is the buffers of one (kind, rows, capacity) shape plus the steps made on them,
  one per step name and mode (e.g. the greedy and the sampled text step share one KV cache). A
  bucket serves any request with the same kind and rows whose cache needs at most its capacity.
- `Buckets` keeps them, most recently used last, within a byte budget (buffer bytes plus the
  captured graphs' memory), dropping the least recent first.
- The host loop runs steps through `engine.lookahead.run_steps`, which waits on an event a few
  steps back: the host reads device flags (EOS) without stalling the device, and progress
  follows finished steps.

A new kind of step (say, speculative decoding's verify step) brings its buffers class (with
`reset` for a new generation, and a `device` argument: built on the meta device without a
cache, engine.memory counts it), its step function `fn(buffers)`, and registers steps on a
bucket of its kind: `buckets.get(kind, rows, capacity, nbytes, build).step(name, fn, capture)`,
then runs them with `run_steps(step, max_steps, stop=flag, progress=...)` (engine.images is
the example).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from .. import ops

CAPACITY_MULTIPLE = 64  # cache capacities are rounded up to this, so nearby lengths share a bucket


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def graphs_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Capture only where every op of the step has a fast, sync-free backend: CUDA tensors of a
    dtype the kernels take, with Triton installed (the reference sampler reads its random state
    on the host, which capture forbids)."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16, torch.float32)
            and ops.backends()["triton"] is not None)


def tensor_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the distinct tensors an object holds (attributes, lists, tuples and dicts,
    recursively; a view counts its base storage once)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = (obj.device, storage.data_ptr()) if obj.device.type != "meta" else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes() if obj.device.type != "meta" else obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x, seen) for x in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        return sum(tensor_bytes(x, seen) for x in vars(obj).values())
    return 0


class Step:
    """`fn()` eagerly, or captured as one CUDA graph at construction and replayed on each call.

    Capture first warms up on a side stream (compiling the Triton kernels; warm=False skips it
    when the caller has just run `fn` eagerly) and then records `fn`; the warm-up leaves the
    buffers in a state the caller resets before each generation. `nbytes` is the graph's memory
    (what its private pool holds after capture; 0 when eager)."""

    def __init__(self, fn: Callable[[], None], capture: bool, warm: bool = True):
        self.fn, self.graph, self.nbytes = fn, None, 0
        if capture:
            before = torch.cuda.memory_allocated()
            if warm:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    fn()
                torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                fn()
            self.nbytes = max(torch.cuda.memory_allocated() - before, 0)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self) -> None:
        if self.graph is None:
            self.fn()
        else:
            self.graph.replay()


class Bucket:
    """The static buffers of one (kind, rows, capacity) shape and the steps made on them."""

    def __init__(self, kind: str, rows: int, capacity: int, buffers):
        self.kind, self.rows, self.capacity, self.buffers = kind, rows, capacity, buffers
        self.steps: dict[tuple[str, bool], Step] = {}
        self.buffer_bytes = tensor_bytes(buffers)

    def step(self, name: str, fn: Callable[[object], None], capture: bool) -> Step:
        """The step `name`: `fn(buffers)`, eager or captured, made on first use (under
        no_value_checks: a step reads nothing back). A capture's warm-up runs `fn` once on the
        buffers: get the step before resetting them for a generation."""
        step = self.steps.get((name, capture))
        if step is None:
            with ops.no_value_checks():
                step = self.steps[(name, capture)] = Step(lambda: fn(self.buffers), capture)
        return step

    @property
    def nbytes(self) -> int:
        return self.buffer_bytes + sum(s.nbytes for s in self.steps.values())


DEFAULT_CPU_BUDGET = 2 << 30
DEFAULT_GPU_SHARE = 0.3  # of the device's memory, by default, for buckets kept beside the newest


def default_budget(device: torch.device) -> int:
    """Bytes of buckets to keep: DEFAULT_GPU_SHARE of a GPU's memory, DEFAULT_CPU_BUDGET on the CPU."""
    if device.type == "cuda":
        return int(DEFAULT_GPU_SHARE * torch.cuda.get_device_properties(device).total_memory)
    return DEFAULT_CPU_BUDGET


class Buckets:
    """Buckets by (kind, rows), most recently used last, within `max_bytes` (default:
    default_budget of the device) of buffers and graphs; the newest bucket is kept even when it
    alone is over. A request takes the smallest bucket of its kind and rows whose capacity is
    enough. `built` counts buckets made, so tests see reuse."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes, self.built = max_bytes, 0
        self._items: OrderedDict = OrderedDict()  # (kind, rows, capacity) -> Bucket

    def find(self, kind: str, rows: int, capacity: int) -> Bucket | None:
        """The smallest kept bucket of kind and rows with at least `capacity` (now the most recent)."""
        fits = [k for k in self._items if k[:2] == (kind, rows) and k[2] >= capacity]
        if not fits:
            return None
        key = min(fits, key=lambda k: k[2])
        self._items.move_to_end(key)
        return self._items[key]

    def get(self, kind: str, rows: int, capacity: int, nbytes: int, build: Callable[[], Bucket]) -> Bucket:
        """find(), or `build()` a bucket of about `nbytes` after dropping the least recent ones
        until it fits the budget beside them."""
        bucket = self.find(kind, rows, capacity)
        if bucket is not None:
            return bucket
        budget = self.max_bytes
        while self._items and budget is not None and self.nbytes + nbytes > budget:
            self._items.popitem(last=False)
        bucket = build()
        self._items[(kind, rows, bucket.capacity)] = bucket
        self.built += 1
        if budget is None:  # the device's default, known once a bucket shows the device
            self.max_bytes = default_budget(bucket.buffers.device)
        self.trim()
        return bucket

    def trim(self) -> None:
        """Drop the least recent buckets (never the newest) while over the budget."""
        while len(self._items) > 1 and self.max_bytes is not None and self.nbytes > self.max_bytes:
            self._items.popitem(last=False)

    def drop(self, nbytes: int) -> int:
        """Drop the least recent buckets until at least nbytes are freed (or none is left):
        room for a new bucket when the device is short of memory. Returns the bytes freed."""
        freed = 0
        while self._items and freed < nbytes:
            freed += self._items.popitem(last=False)[1].nbytes
        return freed

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
