"""Compile facts of every shipped attention config, without a GPU.

Each config the autotuner may pick is compiled to a cubin for sm_80 (A100) and sm_90 (H100) with
Triton's bundled ptxas, as the launchers specialise it (16-byte aligned pointers, strides divisible
by 16). The test asserts what decides speed and can be checked on a CPU:
  - no register spills: the cubin's resource usage has no local memory and no stack frame;
  - shared memory within the architecture's per-block limit (A100 163 KiB, H100 227 KiB);
  - on sm_90, the IR features of the Hopper paths (TMA loads, warp specialisation, the 5-GEMM
    backward's structure).
A regression in any of them fails here, long before a benchmark on a GPU would show it.

`python -m tests.test_compile_facts [80|90]` (from the repository root) prints the table
(registers, spills, shared memory, features) for every config.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

from tests.helpers import FULL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMEM_LIMIT = {80: 166912, 90: 232448}  # max dynamic shared memory per block (bytes), A100 / H100
FP32_ARGS = ("LSE", "DELTA", "PART_O", "PART_LSE", "DQ_ACC")


def _signature(fn, meta, dtype):
    """Argument types as the launchers pass them: tensors in `dtype` except the fp32 statistics."""
    def kind(name):
        if name in meta:
            return "constexpr"
        if not name.isupper():
            return "fp32" if name.endswith("scale") else "i32"
        if name.startswith(("CU_", "SEQLENS")):
            return "*i32"
        return "*fp32" if name in FP32_ARGS else f"*{dtype}"
    return {n: kind(n) for n in fn.arg_names}


def _resource_usage(cubin: bytes) -> dict:
    """REG/STACK/LOCAL/SHARED of the cubin's one kernel, read by Triton's bundled cuobjdump."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(f.name)
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    return {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", line)}


def _features(ttir: str, ttgir: str) -> dict:
    return {
        "gemms": len(re.findall(r"= tt\.dot ", ttir)),  # in the source, before pipelining splits them
        "wgmma": len(re.findall(r"ttng\.warp_group_dot ", ttgir)),
        "tma_loads": ttgir.count("ttng.async_tma_copy_global_to_local"),
        "warp_specialize": "ttg.warp_specialize" in ttgir,
        "atomics": ttgir.count("tt.atomic_rmw"),
    }


def compile_facts(cap: int, specs=None, full: bool = True) -> list[dict]:
    """Compile every shipped config (or `specs`) for sm_<cap>; one dict of facts per config. Run
    with the interpreter off (see _facts_in_subprocess)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from janus_fast.kernels import attention_configs as C

    facts = []
    for spec in specs if specs is not None else C.shipped_compile_specs(f"sm{cap}", full):
        fn = spec.kernel.fn if isinstance(spec.kernel, triton.runtime.Autotuner) else spec.kernel
        sig = _signature(fn, spec.meta, spec.dtype)
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if sig[n].startswith("*") or n.startswith("stride_")}
        compiled = triton.compile(ASTSource(fn, sig, constexprs=spec.meta, attrs=attrs),
                                  target=GPUTarget("cuda", cap, 32), options=spec.options)
        usage = _resource_usage(compiled.asm["cubin"])
        facts.append({"name": spec.name, "config": spec.label, "regs": usage["reg"],
                      "spill_bytes": usage["local"] + usage["stack"],
                      "shared": compiled.metadata.shared, **_features(compiled.asm["ttir"], compiled.asm["ttgir"])})
    return facts


def _target_error(cap: int) -> str | None:
    """None if this Triton can compile a kernel (the small dQ conversion) for sm_<cap>, else why not."""
    code = ("import triton\nfrom triton.backends.compiler import GPUTarget\nfrom triton.compiler import ASTSource\n"
            "from janus_fast.kernels.attention_bwd import _bwd_dq_convert_kernel as k\n"
            "sig = {'DQ_ACC': '*fp32', 'DQ': '*bf16', 'n': 'i32', 'sm_scale': 'fp32', 'BLOCK': 'constexpr'}\n"
            f"triton.compile(ASTSource(k, sig, constexprs={{'BLOCK': 1024}}), target=GPUTarget('cuda', {cap}, 32))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_compile_env(), capture_output=True, text=True)
    return None if result.returncode == 0 else (result.stderr.strip().splitlines() or ["no output"])[-1]


def _compile_env():
    return {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}


def _start_compiles(cap: int) -> subprocess.Popen:
    # conftest switched the interpreter on in this process; compiling needs it off
    code = f"import json, tests.test_compile_facts as t; print(json.dumps(t.compile_facts({cap}, full={FULL})))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_compile_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def _all_facts():
    """Both architectures compile at once (two processes: CI has two cores)."""
    started = {}
    for cap in (80, 90):
        reason = _target_error(cap)
        started[cap] = reason if reason is not None else _start_compiles(cap)
    results = {}
    for cap, job in started.items():
        if isinstance(job, str):
            results[cap] = job
            continue
        out, err = job.communicate()
        results[cap] = json.loads(out.strip().splitlines()[-1]) if job.returncode == 0 else RuntimeError(err[-4000:])
    return results


@pytest.fixture(params=[80, 90], ids=["sm80", "sm90"])
def facts(request, _all_facts):
    cap, rows = request.param, _all_facts[request.param]
    if isinstance(rows, str):
        pytest.skip(f"this Triton cannot compile for sm_{cap}: {rows}")
    if isinstance(rows, Exception):
        pytest.fail(f"compiling the shipped configs for sm_{cap} failed:\n{rows}")
    return cap, rows


def test_no_spills_and_shared_memory_fits(facts):
    cap, rows = facts
    spilling = [(r["name"], r["config"], r["spill_bytes"]) for r in rows if r["spill_bytes"]]
    assert not spilling, f"sm_{cap}: configs spill registers to local memory: {spilling}"
    too_big = [(r["name"], r["config"], r["shared"]) for r in rows if r["shared"] > SMEM_LIMIT[cap]]
    assert not too_big, f"sm_{cap}: configs exceed {SMEM_LIMIT[cap]} bytes of shared memory: {too_big}"


def test_backward_structure(facts):
    """The default backward is one kernel with one loop of 5 GEMMs whose dQ goes out by atomics;
    the deterministic kernels use none and need 4 + 3 GEMMs per block pair (in two loops each:
    causal diagonal and the rest)."""
    _, rows = facts
    fused = [r for r in rows if r["name"] == "bwd_fused"]
    assert fused and all(r["gemms"] == 5 and r["atomics"] >= 1 for r in fused), fused
    assert all(r["gemms"] == 2 * 4 and r["atomics"] == 0 for r in rows if r["name"] == "bwd_dkdv")
    assert all(r["gemms"] == 2 * 3 and r["atomics"] == 0 for r in rows if r["name"] == "bwd_dq")


def test_sm90_forward_uses_tma_and_warp_specialisation(facts):
    cap, rows = facts
    if cap != 90:
        pytest.skip("TMA and warp specialisation are sm_90 features")
    hopper = [r for r in rows if r["name"] == "fwd_sm90"]
    if not hopper:
        pytest.skip("this Triton lacks tensor descriptors or warp_specialize: the launcher uses the fallback")
    assert all(r["tma_loads"] >= 1 and r["warp_specialize"] and r["wgmma"] >= 2 for r in hopper), hopper
    # causal too: the mask and contract 1's stand-ins live in the one specialised loop
    assert {r["config"].endswith("causal") for r in hopper} == {False, True}, hopper
    # the LLM's tiles (head_dim 128, 16-bit) run on Hopper's warpgroup MMA
    assert all(r["wgmma"] >= 1 for r in rows if r["name"] in ("fwd", "bwd_fused", "bwd_dkdv", "bwd_dq")
               and r["config"].startswith("D128 bf16"))


if __name__ == "__main__":
    os.environ.update(_compile_env())  # before triton is imported by compile_facts
    for cap in [int(a) for a in sys.argv[1:]] or [80, 90]:
        print(f"sm_{cap}")
        for r in compile_facts(cap):
            print(f"  {r['name']:<12} {r['config']:<34} regs {r['regs']:>3}  spill {r['spill_bytes']:>4} B  "
                  f"smem {r['shared'] / 1024:6.1f} KiB  tma {r['tma_loads']:>2}  ws {int(r['warp_specialize'])}  "
                  f"gemms {r['gemms']}  wgmma {r['wgmma']:>2}  atomics {r['atomics']}")
