"""Attention benchmarks: our Triton kernels against SDPA (flash / cuDNN / efficient) and
FlexAttention, side by side in one run, at the Janus shapes of issue 4 (bf16).

Metrics in extra_info: tflops (forward FLOPs 4·Sq·Sk·D per head, halved when causal; forward +
backward counted as 3.5x forward) or, for decode, gbps (KV cache bytes read at the valid lengths
plus q and out). Each case is its own pytest-benchmark group, so peers sit next to each other:

    pytest benchmarks/bench_attention.py --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import cuda_graph, record

DTYPE = torch.bfloat16

# name: (B, H, S, D, causal)
DENSE = {
    "llm7b": (4, 32, 4096, 128, True),
    "llm1b": (8, 16, 4096, 128, True),
    "siglip": (32, 16, 576, 64, False),
}
VARLEN = {"docs16": (16, 16384, 32, 128)}  # documents, tokens, heads, head_dim (causal)
DECODE = {"b32": (32, 32, 128, 616, 1024)}  # B, H, D, cached tokens, S_max of the cache buffer

SDPA_PEERS = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient")


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend

    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}[name]


def _sdpa(name, q, k, v, causal):
    """SDPA pinned to one backend; q/k/v [B, H, S, D]."""
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel(_sdpa_backend(name)):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _flex(q, k, v, mask_mod, seq_len):
    """Compiled FlexAttention; mask_mod None means no mask (no block mask to skip through)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = None if mask_mod is None else create_block_mask(mask_mod, None, None, seq_len, seq_len,
                                                                 device="cuda")
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=block_mask)


def _with_backward(fwd, inputs):
    """fwd + backward with a fixed upstream gradient."""
    dout = torch.randn_like(fwd())

    def run():
        for t in inputs:
            t.grad = None
        fwd().backward(dout)

    return run


def _available(fn, impl):
    """Run once (compiles/warms up) and return fn's result; skip the case with the reason if the
    peer cannot run it."""
    try:
        result = fn()
        torch.cuda.synchronize()
        return result
    except (RuntimeError, NotImplementedError) as e:  # e.g. cuDNN attention missing in this build/GPU
        pytest.skip(f"{impl} unavailable here: {str(e).splitlines()[0][:200]}")


def _leaf(*shape):
    return torch.randn(*shape, device="cuda", dtype=DTYPE, requires_grad=True)


def _tflops(flops):
    return lambda ms: flops / ms / 1e9


# --------------------------------------------------------------------------- dense


@pytest.mark.parametrize("impl", ("triton", *SDPA_PEERS, "flex"))
@pytest.mark.parametrize("mode", ("fwd", "fwd+bwd"))
@pytest.mark.parametrize("shape", list(DENSE))
def test_dense(benchmark, shape, mode, impl):
    from janus_fast import ops

    b, h, s, d, causal = DENSE[shape]
    benchmark.group = f"dense-{shape}-{mode}"
    if impl == "triton":  # our layout: [B, S, H, D]
        q, k, v = (_leaf(b, s, h, d) for _ in range(3))
        fwd = lambda: ops.flash_attention(q, k, v, causal=causal, backend="triton")  # noqa: E731
    else:  # peers' native layout: [B, H, S, D]
        q, k, v = (_leaf(b, h, s, d) for _ in range(3))
        if impl == "flex":
            fwd = _flex(q, k, v, (lambda b_, h_, qi, ki: qi >= ki) if causal else None, s)
        else:
            fwd = _sdpa(impl, q, k, v, causal)
    _available(fwd, impl)
    fn = fwd if mode == "fwd" else _with_backward(fwd, (q, k, v))
    _available(fn, impl)
    flops = 4 * b * h * s * s * d / (2 if causal else 1) * (1 if mode == "fwd" else 3.5)
    record(benchmark, fn, case=f"{shape} {mode}", label=impl, tflops=_tflops(flops))


# --------------------------------------------------------------------------- varlen


def _doc_lengths(n_docs, total):
    """Uneven, reproducible document lengths summing to `total`."""
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(n_docs, generator=g) + 0.2
    lengths = (weights / weights.sum() * total).floor().long()
    lengths[-1] += total - int(lengths.sum())
    return lengths


@pytest.mark.parametrize("impl", ("triton", "flex", "sdpa-flash-padded"))
@pytest.mark.parametrize("mode", ("fwd", "fwd+bwd"))
@pytest.mark.parametrize("shape", list(VARLEN))
def test_varlen(benchmark, shape, mode, impl):
    from janus_fast import ops

    n_docs, total, h, d = VARLEN[shape]
    lengths = _doc_lengths(n_docs, total)
    max_len = int(lengths.max())
    benchmark.group = f"varlen-{shape}-{mode}"
    if impl == "triton":
        cu = torch.zeros(n_docs + 1, dtype=torch.int32, device="cuda")
        cu[1:] = lengths.cumsum(0).to(device="cuda", dtype=torch.int32)
        q, k, v = (_leaf(total, h, d) for _ in range(3))

        def fwd():
            with ops.no_value_checks():  # the cu_seqlens check syncs; a training step builds them itself
                return ops.varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=True, backend="triton")
    elif impl == "flex":  # one packed sequence with a causal document mask
        doc = torch.repeat_interleave(torch.arange(n_docs), lengths).to("cuda")
        q, k, v = (_leaf(1, h, total, d) for _ in range(3))
        fwd = _flex(q, k, v, lambda b_, h_, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki), total)
    else:  # every document padded to the longest; padded rows are wasted work
        q, k, v = (_leaf(n_docs, h, max_len, d) for _ in range(3))
        fwd = _sdpa("sdpa-flash", q, k, v, True)
    _available(fwd, impl)
    fn = fwd if mode == "fwd" else _with_backward(fwd, (q, k, v))
    _available(fn, impl)
    useful = sum(4 * h * int(n) * int(n) * d / 2 for n in lengths)  # causal within each document
    record(benchmark, fn, case=f"{shape} {mode}", label=impl,
           tflops=_tflops(useful * (1 if mode == "fwd" else 3.5)))


# --------------------------------------------------------------------------- decode


@pytest.mark.parametrize("impl", ("triton", *SDPA_PEERS))
@pytest.mark.parametrize("shape", list(DECODE))
def test_decode(benchmark, shape, impl):
    from janus_fast import ops

    b, h, d, cached, s_max = DECODE[shape]
    benchmark.group = f"decode-{shape}"
    with torch.no_grad():
        k_cache, v_cache = (torch.randn(b, s_max, h, d, device="cuda", dtype=DTYPE) for _ in range(2))
        if impl == "triton":
            q = torch.randn(b, h, d, device="cuda", dtype=DTYPE)
            seqlens = torch.full((b,), cached, dtype=torch.int32, device="cuda")

            def fwd():
                with ops.no_value_checks():
                    return ops.decode_attention(q, k_cache, v_cache, seqlens, backend="triton")
        else:  # SDPA on the valid prefix of the cache, [B, H, S, D] views of the same buffer
            q = torch.randn(b, h, 1, d, device="cuda", dtype=DTYPE)
            k = k_cache[:, :cached].transpose(1, 2)
            v = v_cache[:, :cached].transpose(1, 2)
            fwd = _sdpa(impl, q, k, v, False)
        _available(fwd, impl)
        fn = _available(lambda: cuda_graph(fwd), f"{impl} under CUDA-graph capture")  # GPU time only
    moved = 2 * b * cached * h * d * k_cache.element_size() + 2 * b * h * d * k_cache.element_size()
    record(benchmark, fn, case=f"decode {shape}", label=f"{impl} (graph)", gbps=lambda ms: moved / ms / 1e6)
