"""Prefill: the prompts, packed without padding, through the LLM in one varlen pass, their keys
and values written straight into the rows of a static KV cache that decode them.

Every index is built on the host from the prompts' lengths (known there), so the pass itself
reads nothing back from the device: no host sync.
"""

from __future__ import annotations

import torch

from .. import ops
from ..models.llama import KVCache, LlamaModel


def prefill(lm: LlamaModel, embeds: torch.Tensor, lengths: list[int], cache: KVCache,
            rows_of: list[list[int]]) -> torch.Tensor:
    """Run packed sequences through `lm` and fill `cache`; returns the final-normed hidden state
    of each cache row's last prompt token, [cache rows, H].

    embeds [sum(lengths), H]: sequence s is embeds[cu[s]:cu[s + 1]], cu the prefix sums of
    `lengths` (each >= 1). rows_of[s] lists the cache rows that continue sequence s: its keys and
    values are written to slots 0 .. lengths[s]-1 of each, and their seqlens set to lengths[s].
    A sequence shared by several rows (the copies of one prompt) is computed once. Every cache
    row must be listed exactly once."""
    n_rows = cache.batch_size
    owners = sorted(r for rows in rows_of for r in rows)
    if owners != list(range(n_rows)):
        raise ValueError(f"rows_of must list each of the {n_rows} cache rows exactly once, got {rows_of}")
    if any(n < 1 for n in lengths) or len(lengths) != len(rows_of):
        raise ValueError(f"need one length >= 1 per sequence, got {lengths} for {len(rows_of)} sequences")
    if max(lengths) > cache.capacity:
        raise ValueError(f"a prompt of {max(lengths)} tokens does not fit the cache's {cache.capacity} slots")
    cu, positions, token, row, slot = [0], [], [], [], []
    seq_of_row, length_of_row = [0] * n_rows, [0] * n_rows
    for s, (n, rows) in enumerate(zip(lengths, rows_of)):
        positions += range(n)
        for r in rows:
            token += range(cu[-1], cu[-1] + n)
            row += [r] * n
            slot += range(n)
            seq_of_row[r], length_of_row[r] = s, n
        cu.append(cu[-1] + n)
    device = embeds.device

    def on_device(values, dtype=torch.long):  # host-to-device copies: no sync
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    positions_t, token_t, row_t, slot_t = (on_device(v) for v in (positions, token, row, slot))
    cu_t = on_device(cu, torch.int32)
    last = on_device([cu[s + 1] - 1 for s in seq_of_row])
    longest = max(lengths)

    def keep_kv(layer: int, k, v) -> None:
        cache.write(layer, (row_t, slot_t), k[token_t], v[token_t])

    with ops.no_value_checks():  # cu_seqlens are built above: no per-layer device reads
        h = lm.forward_packed(embeds, positions_t, cu_t, longest, keep_kv)
    cache.seqlens.copy_(torch.tensor(length_of_row, dtype=torch.int32), non_blocking=True)
    cache.max_seqlen = longest
    return h[last]
