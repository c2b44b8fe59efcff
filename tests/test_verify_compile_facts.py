"""Compile facts of speculative Jacobi decoding's kernels, without a GPU: the verify attention
(kernels/attention_verify.py) and the verification sampler (kernels/sampling_verify.py), built to
cubins for sm_80 and sm_90 with Triton's bundled ptxas exactly as their launchers configure them,
and checked free of register spills (local memory or a stack frame) with shared memory within
the architecture's limit. Run it under both Tritons (the GPU's 3.6 and this machine's 3.9):
`TRITON36_DIR=/work/.triton36 bash scripts/triton36.sh python -m pytest tests/test_verify_compile_facts.py`.

`python -m tests.test_verify_compile_facts [80|90]` prints the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import DEVICE, FULL
from tests.test_compile_facts import SMEM_LIMIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (images, window): Janus-Pro x1 and x16 at the default window (and a short window in the full tier)
SAMPLER_SHAPES = [(1, 16), (16, 16)] + ([(4, 3)] if FULL else [])
FILTERS = [(False, False, False), (False, True, True), (False, True, False), (False, False, True),
           (True, False, False)]  # (greedy, top_k, top_p)
VOCAB = 16384  # Janus-Pro's image tokens
# (head_dim, dtype, windows, query heads per kv head): Janus-Pro's MHA at the default window; the
# full tier adds short windows, GQA (up to 64 rows a block), 256-wide heads and fp32
ATTENTION_SHAPES = [(128, "bf16", (16,), (1,))] + (
    [(128, "bf16", (3, 16), (4,)), (256, "bf16", (16, 3), (1, 4)), (128, "fp32", (16, 3), (1, 4))] if FULL else [])


def _sampler_specs():
    import triton

    import janus_fast.kernels.sampling_verify as S

    for b, w in SAMPLER_SHAPES:
        _, meta = S.launch_meta(b * w, VOCAB, interpreted=False)
        for greedy, top_k, top_p in FILTERS:
            name = f"sjd_verify {b}x{w}x{VOCAB} " + ("greedy" if greedy else f"top_k={int(top_k)} top_p={int(top_p)}")
            yield name, S._sjd_verify_kernel, dict(meta, W=w, WP=triton.next_power_of_2(w), GREEDY=greedy,
                                                   SCALE=True, TOP_K=top_k, TOP_P=top_p,
                                                   COMMIT=S.commit_block(b, False))


def _sampler_signature(fn, meta):
    ptrs = {"logits_ptr": "*bf16", "tokens_ptr": "*i64", "point_ptr": "*i8", "q_ptr": "*fp32", "progress_ptr": "*i64",
            "lengths_ptr": "*i32", "next_ptr": "*i64", "accepted_ptr": "*i8", "seed_ptr": "*i64"}
    floats = ("cfg_weight", "temperature", "top_p", "mass_scale")
    return {n: "constexpr" if n in meta else ptrs.get(n, "fp32" if n in floats else "i32") for n in fn.arg_names}


def compile_facts(cap: int) -> list[dict]:
    """Registers, spills and shared memory of every shipped config for sm_<cap> (interpreter off)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import janus_fast.kernels.attention_verify as A
    from tests.test_compile_facts import _resource_usage, _signature

    jobs = []
    for head_dim, dtype, windows, groups in ATTENTION_SHAPES:
        for spec in A.compile_specs(f"sm{cap}", head_dim, dtype, windows, groups):
            sig = _signature(spec.kernel, spec.meta, spec.dtype)
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(spec.kernel.arg_names)
                     if sig[n].startswith("*") or n.startswith("stride_")}
            jobs.append((f"verify_attention {spec.label}", spec.kernel, spec.meta, sig, dict(spec.options), attrs))
    for name, fn, meta in _sampler_specs():
        constexprs = {k: v for k, v in meta.items() if k not in ("num_warps", "maxnreg")}
        options = {"num_warps": meta["num_warps"], "num_stages": 1, "enable_fp_fusion": False,
                   "maxnreg": meta["maxnreg"]}
        jobs.append((name, fn, constexprs, _sampler_signature(fn, constexprs), options, None))
    facts = []
    for name, fn, constexprs, sig, options, attrs in jobs:
        source = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs) if attrs else ASTSource(fn, sig, constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", cap, 32), options=options)
        usage = _resource_usage(compiled.asm["cubin"])
        facts.append({"name": name, "warps": options["num_warps"], "regs": usage["reg"],
                      "spill_bytes": usage["local"] + usage["stack"], "shared": compiled.metadata.shared})
    return facts


def _env():
    return {**os.environ, "TRITON_INTERPRET": "0"}


@pytest.fixture(scope="module")
def _all_facts():
    """Both architectures compile at once (two processes: CI has two cores)."""
    jobs = {cap: subprocess.Popen(
        [sys.executable, "-c", f"import json, tests.test_verify_compile_facts as t; "
                               f"print(json.dumps(t.compile_facts({cap})))"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cap in (80, 90)}
    results = {}
    for cap, job in jobs.items():
        out, err = job.communicate()
        results[cap] = json.loads(out.strip().splitlines()[-1]) if job.returncode == 0 else err[-4000:]
    return results


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the other tests compile and run the kernels")
@pytest.mark.parametrize("cap", [80, 90])
def test_shipped_configs_compile_without_spills(cap, _all_facts):
    rows = _all_facts[cap]
    assert not isinstance(rows, str), f"compiling the SJD kernels for sm_{cap} failed:\n{rows}"
    assert {r["name"].split()[0] for r in rows} == {"verify_attention", "sjd_verify"}
    spilling = [(r["name"], r["regs"], r["spill_bytes"]) for r in rows if r["spill_bytes"]]
    assert not spilling, f"sm_{cap}: configs spill registers (name, regs, bytes): {spilling}"
    too_big = [(r["name"], r["shared"]) for r in rows if r["shared"] > SMEM_LIMIT[cap]]
    assert not too_big, f"sm_{cap}: configs exceed {SMEM_LIMIT[cap]} bytes of shared memory: {too_big}"


if __name__ == "__main__":
    os.environ.update(_env())
    for cap in [int(a) for a in sys.argv[1:]] or [80, 90]:
        print(f"sm_{cap}")
        for r in compile_facts(cap):
            print(f"  {r['name']:<48} warps {r['warps']:>2}  regs {r['regs']:>3}  spill {r['spill_bytes']:>4} B  "
                  f"smem {r['shared'] / 1024:6.1f} KiB")
