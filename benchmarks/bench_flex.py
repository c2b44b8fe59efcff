"""FlexAttention, the peer that compiles: torch.compile(flex_attention, dynamic=False) once per
shape and mode (so every row times a static-shape kernel, never a dynamic-shape recompile), at
bench_attention.py's dense and varlen shapes; its cells land in the attention table.

Budget on a cold H100 (~3-4 min): 3 shapes × 2 modes, each an Inductor compile of the forward
(~20-40 s) and of the backward, then ~125 ms of timing. Its own family so that attention's
other contenders keep their 10-minute call.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import harness
from benchmarks.bench_attention import (DENSE, MODES, VARLEN, dense_flops, doc_lengths, leaf, time_training_step,
                                        varlen_flops)

TABLE = "attention"
LABEL = "flex"
# The tiny CPU run compiles only the forward of the first dense shape (Inductor's C++ build is slow on CPU).
CASES = [(kind, shape, mode) for kind, shapes in (("dense", DENSE), ("varlen", VARLEN)) for shape in shapes
         for mode in MODES][: 1 if harness.TINY else None]


def compiled_flex(q, k, v, mask_mod, seq_len: int):
    """flex_attention compiled for exactly these shapes; mask_mod None means no mask."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        harness.skip_unavailable(f"FlexAttention in torch {torch.__version__}", e)

    block_mask = None if mask_mod is None else create_block_mask(mask_mod, None, None, seq_len, seq_len,
                                                                 device=harness.DEVICE)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=block_mask)


@pytest.mark.parametrize("kind,shape,mode", CASES, ids=[f"{s} {m}" for _, s, m in CASES])
def test_flex(benchmark, kind, shape, mode):
    case = f"{shape} {mode}"
    harness.declare(case, LABEL)
    torch._dynamo.reset()  # a fresh compile per case: no shape generalisation from a previous one
    if kind == "dense":
        b, h, s, d, causal = DENSE[shape]
        q, k, v = (leaf(mode, b, h, s, d) for _ in range(3))
        fwd = compiled_flex(q, k, v, (lambda b_, h_, qi, ki: qi >= ki) if causal else None, s)
        flops = dense_flops(b, h, s, d, causal, mode)
    else:  # one packed sequence with a causal document mask
        n_docs, total, h, d = VARLEN[shape]
        lengths = doc_lengths(n_docs, total)
        doc = torch.repeat_interleave(torch.arange(n_docs), lengths).to(harness.DEVICE)
        q, k, v = (leaf(mode, 1, h, total, d) for _ in range(3))
        fwd = compiled_flex(q, k, v, lambda b_, h_, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki), total)
        flops = varlen_flops(lengths, h, d, mode)
    time_training_step(benchmark, fwd, (q, k, v), case=case, label=LABEL, mode=mode, flops=flops, ours=False)
