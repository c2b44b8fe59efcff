"""Compile facts of speculative Jacobi decoding's kernels, without a GPU: the verification sampler
(kernels/sampling_verify.py) at the launches its host function really makes for Janus-Pro (recorded
on meta tensors as tests/test_kernel_compile_facts.py records them) and the verify attention
(kernels/attention_verify.py) at every tile its launcher picks, built to cubins for sm_80 and
sm_90 with Triton's bundled ptxas and checked free of local memory (bytes, or LDL/STL in the
SASS), with shared memory within the architecture's limit. Run it under both Tritons (the GPU's 3.6 and this machine's 3.9):
`TRITON36_DIR=/work/.triton36 bash scripts/triton36.sh python -m pytest tests/test_verify_compile_facts.py`.

`python -m tests.test_verify_compile_facts [80|90]` prints the table.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.helpers import DEVICE, FULL, compile_facts_per_arch
from tests.test_compile_facts import SMEM_LIMIT
from tests.test_kernel_compile_facts import compile_env, compile_rows

# (images, window): Janus-Pro x1 and x16 at the default window (and a short window in the full tier)
# (images, window): Janus-Pro x1 and x16 at the default window (and a short window in the full tier)
SAMPLER_SHAPES = [(1, 16), (16, 16)] + ([(4, 3)] if FULL else [])
SETTINGS = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 50, 0.9)] + ([(1.0, 50, 1.0), (1.0, 0, 0.9)] if FULL else [])
VOCAB, TOKENS = 16384, 576  # Janus-Pro's image tokens
# (head_dim, dtype, windows, query heads per kv head): Janus-Pro's MHA at the default window; the
# full tier adds short windows, GQA (up to 64 rows a block), 256-wide heads and fp32
ATTENTION_SHAPES = [(128, "bf16", (16,), (1,))] + (
    [(128, "bf16", (3, 16), (4,)), (256, "bf16", (16, 3), (1, 4)), (128, "fp32", (16, 3), (1, 4))] if FULL else [])


def _sampler_launches(cap: int) -> list:
    """sjd_verify's launches as ops.sjd_verify makes them (on meta tensors: a GPU's aligned
    pointers, no data), recorded by tests.test_kernel_compile_facts.recording."""
    import torch

    import janus_fast.kernels.sampling_verify as S
    from tests.test_kernel_compile_facts import recording

    recorded: list = []
    meta = dict(device="meta")
    with recording(cap, recorded):
        for b, w in SAMPLER_SHAPES:
            state = [torch.empty(b, TOKENS + w, dtype=torch.int64, **meta),
                     torch.empty(b, TOKENS + w, dtype=torch.int8, **meta),
                     torch.empty(b, w, VOCAB, dtype=torch.float32, **meta), torch.empty(b, 2, dtype=torch.int64, **meta),
                     torch.empty(2 * b, dtype=torch.int32, **meta), torch.empty(2 * b, w, dtype=torch.int64, **meta)]
            for temperature, top_k, top_p in SETTINGS:
                S.sjd_verify(torch.empty(2 * b, w, VOCAB, dtype=torch.bfloat16, **meta), *state, 5.0, temperature,
                             top_k, top_p, torch.empty(3, dtype=torch.int64, **meta), 24)
    names = {}
    for fn, sig, consts, attrs, options in recorded:
        flags = {fn.arg_names[path[0]]: v for path, v in consts.items() if len(path) == 1}
        label = "sjd_verify " + " ".join(f"{k}={int(v)}" for k, v in flags.items()
                                         if k in ("W", "GREEDY", "TOP_K", "TOP_P", "ROWS", "COMMIT"))
        names.setdefault(label, (fn, sig, consts, attrs, options))
    return [(label, *job) for label, job in names.items()]


def compile_facts(cap: int) -> list[dict]:
    """Registers, local memory (bytes and LDL/STL instructions) and shared memory of every config
    for sm_<cap> (run with the interpreter off)."""
    import janus_fast.kernels.attention_verify as A
    from tests.test_compile_facts import _signature

    jobs = _sampler_launches(cap)
    for head_dim, dtype, windows, groups in ATTENTION_SHAPES:
        for spec in A.compile_specs(f"sm{cap}", head_dim, dtype, windows, groups):
            sig = _signature(spec.kernel, spec.meta, spec.dtype)
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(spec.kernel.arg_names)
                     if sig[n].startswith("*") or n.startswith("stride_")}
            jobs.append((f"verify_attention {spec.label}", spec.kernel, sig, spec.meta, attrs, dict(spec.options)))
    return compile_rows(cap, jobs)


@pytest.fixture(scope="module")
def _all_facts():
    return compile_facts_per_arch("tests.test_verify_compile_facts", compile_env())


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the other tests compile and run the kernels")
@pytest.mark.parametrize("cap", [80, 90])
def test_shipped_configs_compile_without_spills(cap, _all_facts):
    rows = _all_facts[cap]
    assert not isinstance(rows, str), f"compiling the SJD kernels for sm_{cap} failed:\n{rows}"
    names = [r["name"] for r in rows]
    assert {n.split()[0] for n in names} == {"verify_attention", "sjd_verify"}
    assert {"GREEDY=1", "TOP_K=1", "TOP_P=1"} <= {f for n in names for f in n.split()}, names
    spilling = [(r["name"], r["regs"], r["local"], r["local_insts"]) for r in rows if r["local"] or r["local_insts"]]
    assert not spilling, f"sm_{cap}: configs use local memory (name, regs, bytes, LDL/STL): {spilling}"
    too_big = [(r["name"], r["shared"]) for r in rows if r["shared"] > SMEM_LIMIT[cap]]
    assert not too_big, f"sm_{cap}: configs exceed {SMEM_LIMIT[cap]} bytes of shared memory: {too_big}"


if __name__ == "__main__":
    os.environ.update(compile_env())
    for cap in [int(a) for a in sys.argv[1:]] or [80, 90]:
        print(f"sm_{cap}")
        for r in compile_facts(cap):
            print(f"  {r['name']:<60} warps {r['warps']:>2}  regs {r['regs']:>3}  local {r['local']:>3} B"
                  f" {r['local_insts']:>2} LDL/STL  stack {r['stack']:>2} B  smem {r['shared'] / 1024:5.1f} KiB")
