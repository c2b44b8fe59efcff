"""How much device memory a generation takes, and how a batch is split to fit what is free.

A bucket's bytes are counted from real tensor sizes: its buffers are built on the meta device
by their own constructors (no memory), its KV cache is rows x capacity x
`LlamaModel.kv_bytes_per_token` (which knows the cache's storage format), and the step's
transient tensors (the decode layer's activations, the head's logits) are counted by their
shapes. A batch is a list of requests (an image prompt's 2 x parallel_size rows, or one text
row): the plan puts as many whole requests in a chunk as fit, in equal chunks (the last one
padded with copies of its last request, so every chunk replays one bucket), and says so with a
MemoryPlanWarning. When not even one request fits, it raises ValueError before any launch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .step import Buckets, tensor_bytes

GiB = float(1 << 30)


class MemoryPlanWarning(UserWarning):
    """A batch was split into chunks to fit the device's free memory."""


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (also on the meta device)."""
    return sum(t.nbytes for t in (*module.parameters(), *module.buffers()))


def decode_workspace_bytes(lm, rows: int, capacity: int, head_width: int) -> int:
    """The transient tensors of a decode step, by shape: one layer's fused QKV output, attention
    output, residual and normed states, gate/up, SiLU·mul and down outputs, the attention's fp32
    split partials (at most one split per 64 keys), and the head's hidden state and logits of
    width `head_width` (also in fp32, as the sampler may read them)."""
    cfg, itemsize = lm.config, lm.embed_tokens.weight.dtype.itemsize
    hq, hkv, d, h, i = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
                        cfg.intermediate_size)
    layer = (hq + 2 * hkv) * d + hq * d + 4 * h + 2 * i + i + h
    partials = 4 * hq * (-(-capacity // 64)) * (d + 1)
    return rows * (itemsize * (layer + 2 * h + head_width) + 4 * head_width + partials)


def bucket_bytes(make_buffers: Callable[[torch.device], object], lm, rows: int, capacity: int,
                 head_width: int, tokens_per_row: int = 1) -> int:
    """Bytes of a bucket: its buffers (built on the meta device, without their cache), the KV
    cache (kv_bytes_per_token x rows x capacity, plus its RoPE table and lengths) and the step's
    transient tensors for `tokens_per_row` new tokens per row (a verify step's window)."""
    buffers = make_buffers(torch.device("meta"))
    cfg = lm.config
    cache = lm.kv_bytes_per_token() * rows * capacity + 2 * capacity * cfg.head_dim * 4 + 4 * rows
    return tensor_bytes(buffers) + cache + decode_workspace_bytes(lm, rows * tokens_per_row, capacity, head_width)


def free_bytes(device: torch.device, buckets: Buckets | None = None) -> int | None:
    """Bytes a new bucket may take on `device`: free device memory, plus what the caching
    allocator holds unused, plus what the kept buckets hold (they can be dropped); None on the
    CPU (not limited)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached + (buckets.nbytes if buckets is not None else 0)


def make_room(buckets: Buckets, device: torch.device, nbytes: int) -> None:
    """Drop kept buckets, least recent first, until a new one of nbytes fits the device's free
    memory (nothing to do on the CPU)."""
    available = free_bytes(device)
    while available is not None and available < nbytes and len(buckets):
        buckets.drop(1)
        available = free_bytes(device)


@dataclass
class MemoryPlan:
    """Requests per chunk (every chunk holds `per_chunk` requests, the last padded) and the
    bytes one chunk's bucket takes against what was free (None: not limited)."""

    requests: int
    per_chunk: int
    rows_per_request: int
    nbytes: int
    free: int | None

    @property
    def chunks(self) -> int:
        return -(-self.requests // self.per_chunk)

    def chunk_requests(self) -> list[list[int]]:
        """The request indices of each chunk, the last padded with copies of its last request."""
        out = []
        for start in range(0, self.requests, self.per_chunk):
            part = list(range(start, min(start + self.per_chunk, self.requests)))
            out.append(part + [part[-1]] * (self.per_chunk - len(part)))
        return out

    def __str__(self) -> str:
        rows = self.per_chunk * self.rows_per_request
        free = "unlimited" if self.free is None else f"{self.free / GiB:.2f} GiB free"
        return (f"{self.requests} requests in {self.chunks} chunk(s) of {self.per_chunk} ({rows} rows, "
                f"{self.nbytes / GiB:.2f} GiB each; {free})")


def plan_requests(requests: int, rows_per_request: int, nbytes_for_rows: Callable[[int], int], free: int | None,
                  what: str) -> MemoryPlan:
    """The fewest equal chunks of whole requests whose bucket fits `free`; warns when it splits,
    raises ValueError (naming `what`, the argument that sets a request's size) when one request
    alone does not fit."""
    if free is None or nbytes_for_rows(requests * rows_per_request) <= free:
        return MemoryPlan(requests, requests, rows_per_request, nbytes_for_rows(requests * rows_per_request), free)
    fit = 0
    while fit < requests and nbytes_for_rows((fit + 1) * rows_per_request) <= free:
        fit += 1
    if fit == 0:
        need = nbytes_for_rows(rows_per_request)
        raise ValueError(f"one request ({rows_per_request} rows) needs {need / GiB:.2f} GiB of KV cache and buffers "
                         f"but {free / GiB:.2f} GiB is free on the device: lower {what}, or free memory")
    chunks = -(-requests // fit)
    per_chunk = -(-requests // chunks)  # equal chunks: the least padding
    plan = MemoryPlan(requests, per_chunk, rows_per_request, nbytes_for_rows(per_chunk * rows_per_request), free)
    warnings.warn(f"janus_fast: the batch does not fit the device's free memory at once: {plan}",
                  MemoryPlanWarning, stacklevel=4)
    return plan
