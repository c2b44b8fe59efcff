"""Compile facts of every shipped attention config, without a GPU.

Each config the autotuner may pick is compiled to a cubin for sm_80 (A100) and sm_90 (H100) with
Triton's bundled ptxas twice: at the test's shapes (16-byte aligned pointers, strides divisible
by 16: attention_configs.shipped_compile_specs) and at the arguments the launchers really pass for
Janus's calls (LAUNCH_CASES: the launchers run with recording stand-ins for their kernels, and
Triton's own binder turns each launch into the signature, constants and divisibility attributes a
GPU launch compiles, e.g. a GQA group of 1 becomes a constant). The test asserts what decides speed
and can be checked on a CPU:
  - no register spills: the cubin's resource usage has no local memory and no stack frame;
  - shared memory within the architecture's per-block limit (A100 163 KiB, H100 227 KiB);
  - on sm_90, the IR features of the Hopper paths (TMA loads, warpgroup MMAs, the forward's
    plain and edge key loops and 128-key tiles, the 5-GEMM backward's structure).
A regression in any of them fails here, long before a benchmark on a GPU would show it.

`python -m tests.test_compile_facts [80|90]` (from the repository root) prints the table
(registers, spills, shared memory, features) for every config; under Triton 3.6, the GPU
machine's version: `bash scripts/triton36.sh python -m tests.test_compile_facts`. The quick tier
compiles QUICK_LAUNCH_CASES, the full tier (JANUS_FAST_FULL_TESTS=1) every case.
"""

from __future__ import annotations

import contextlib
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


def _dot_loops(ttir: str) -> list[list[int]]:
    """[tt.dot count, 2-D selects] of each innermost scf.for that holds a dot, in source order:
    a loop of plain blocks has no 2-D select (no mask, no bookkeeping)."""
    loops, stack = [], []  # stack: [indent, body, holds a loop]
    for line in ttir.splitlines():
        indent = len(line) - len(line.lstrip())
        if stack and indent <= stack[-1][0] and line.strip().startswith("}"):
            _, body, nested = stack.pop()
            if not nested and "tt.dot " in body:
                loops.append([body.count("tt.dot "), len(re.findall(r"arith\.select .*tensor<\d+x\d+x", body))])
            if stack:
                stack[-1][1] += body
        elif "scf.for" in line and line.rstrip().endswith("{"):
            if stack:
                stack[-1][2] = True
            stack.append([indent, "", False])
        elif stack:
            stack[-1][1] += line + "\n"
    return loops


def _features(ttir: str, ttgir: str, ptx: str) -> dict:
    return {
        "dot_loops": _dot_loops(ttir),
        "gemms": len(re.findall(r"= tt\.dot ", ttir)),  # in the source, before pipelining splits them
        "wgmma": len(re.findall(r"ttng\.warp_group_dot ", ttgir)),
        "tma_loads": ttgir.count("ttng.async_tma_copy_global_to_local"),
        "warp_specialize": "ttg.warp_specialize" in ttgir,
        "atomics": ttgir.count("tt.atomic_rmw"),
        "mma_sync": len(re.findall(r"\bmma\.sync\.", ptx)),
        "wait_groups": sorted({int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)}),
    }


def _table_jobs(cap: int, full: bool):
    """The shipped configs at the test's shapes (attention_configs.shipped_compile_specs), typed
    as the launchers pass them: 16-byte aligned pointers, strides divisible by 16."""
    import triton

    from janus_fast.kernels import attention_configs as C

    for spec in C.shipped_compile_specs(f"sm{cap}", full):
        fn = spec.kernel.fn if isinstance(spec.kernel, triton.runtime.Autotuner) else spec.kernel
        sig = _signature(fn, spec.meta, spec.dtype)
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if sig[n].startswith("*") or n.startswith("stride_")}
        yield dict(name=spec.name, case="table", label=spec.label, fn=fn, signature=sig, constexprs=spec.meta,
                   attrs=attrs, options=spec.options)


def compile_facts(cap: int, jobs=None, full: bool = True) -> list[dict]:
    """Compile every shipped config at the test's shapes and at the launchers' arguments (or
    `jobs`) for sm_<cap>; one dict of facts per compile. Run with the interpreter off (see
    _start_compiles)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    facts = []
    if jobs is None:
        jobs = [*_table_jobs(cap, full), *launch_compile_jobs(cap, None if full else QUICK_LAUNCH_CASES)]
    for job in jobs:
        compiled = triton.compile(ASTSource(job["fn"], job["signature"], constexprs=job["constexprs"],
                                            attrs=job["attrs"]),
                                  target=GPUTarget("cuda", cap, 32), options=job["options"])
        usage = _resource_usage(compiled.asm["cubin"])
        facts.append({"name": job["name"], "case": job["case"], "config": job["label"], "regs": usage["reg"],
                      "spill_bytes": usage["local"] + usage["stack"], "shared": compiled.metadata.shared,
                      **_features(compiled.asm["ttir"], compiled.asm["ttgir"], compiled.asm["ptx"])})
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


# --------------------------------------------------------------------------- at the launchers' arguments

# Calls made through the real launchers, whose launches are compiled as Triton compiles them on
# the GPU: Janus's shapes and layouts (SigLIP's q/k/v are views of one qkv projection) and the
# specialisations a launch brings (a GQA group or batch of 1 becomes a constant, lengths that are
# not a multiple of 16 lose their divisibility). kind "dense" (shape B, Sq, Sk), "varlen" (shape:
# q and k lengths) or "decode" (shape B, S_max); heads (Hq, Hkv); hopper_path=False: the pointer
# forward that serves sm_90 when the TMA kernel cannot.
LAUNCH_CASES = {
    "LLM prefill": dict(shape=(1, 600, 600), heads=(16, 16), d=128, causal=True),
    "LLM prefill, fallback": dict(shape=(1, 600, 600), heads=(16, 16), d=128, causal=True, hopper_path=False),
    "LLM training": dict(kind="varlen", shape=([1000, 2048, 1040],) * 2, heads=(16, 16), d=128, causal=True,
                         backward=True),
    "SigLIP": dict(shape=(1, 576, 576), heads=(16, 16), d=64, layout="qkv"),
    "GQA": dict(shape=(2, 1000, 1000), heads=(32, 8), d=128, causal=True, backward=True),
    "D256": dict(shape=(1, 300, 300), heads=(4, 4), d=256, backward=True),
    "fp32": dict(shape=(1, 129, 140), heads=(2, 1), d=128, dtype="fp32", causal=True, backward=True),
    "decode": dict(kind="decode", shape=(32, 616), heads=(16, 16), d=128),
}
QUICK_LAUNCH_CASES = {name: LAUNCH_CASES[name] for name in ("LLM training", "SigLIP", "decode")}
KERNEL_NAMES = {"_attn_fwd_kernel": "fwd", "_attn_fwd_tma_kernel": "fwd_sm90", "_attn_bwd_fused_kernel": "bwd_fused",
                "_attn_bwd_dkdv_kernel": "bwd_dkdv", "_attn_bwd_dq_kernel": "bwd_dq", "_bwd_delta_kernel": "bwd_delta",
                "_bwd_dq_convert_kernel": "bwd_dq_convert", "_decode_split_kernel": "decode",
                "_decode_combine_kernel": "decode_combine"}


class _Recorder:
    """Stands in for a kernel in its module: records each launch's arguments instead of running."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, self.kernel, args, kwargs))


def _case_tensors(kind="dense", shape=(), heads=(), d=0, dtype="bf16", layout="contiguous", **_):
    import torch

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    (hq, hkv), rows = heads, shape[1:]
    if kind == "varlen":
        rows = [(sum(n),) for n in shape]
    elif kind == "decode":
        return (torch.empty(shape[0], hq, d, dtype=dt),
                *(torch.empty(shape[0], shape[1], hkv, d, dtype=dt) for _ in range(2)))
    else:
        rows = [(shape[0], n) for n in rows]
    if layout == "qkv":
        return torch.empty(*rows[0], 3, hq, d, dtype=dt).unbind(-3)
    return (torch.empty(*rows[0], hq, d, dtype=dt), *(torch.empty(*rows[1], hkv, d, dtype=dt) for _ in range(2)))


def _launch_case(K, kind="dense", shape=(), d=0, causal=False, backward=False, **tensors):
    """Make the launcher calls of one case (forward, and both backwards if `backward`)."""
    import torch

    q, k, v = _case_tensors(kind, shape, d=d, **tensors)
    scale = d ** -0.5
    if kind == "decode":
        K.decode_attention(q, k, v, torch.full((shape[0],), shape[1], dtype=torch.int32), scale)
        return
    if kind == "varlen":
        cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32) for n in shape)
        lengths = (cu_q, cu_k, max(shape[0]), max(shape[1]))
        out, lse = K.varlen_attention_forward(q, k, v, *lengths, causal, scale)
    else:
        lengths = ()
        out, lse = K.attention_forward(q, k, v, causal, scale)
    for deterministic in (False, True) if backward else ():
        backward_fn = K.varlen_attention_backward if kind == "varlen" else K.attention_backward
        backward_fn(torch.empty_like(q), q, k, v, out, lse, *lengths, causal, scale, deterministic)


@contextlib.contextmanager
def _patched(*changes):
    """Set (object, attribute, value) for the duration; restored after."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    try:
        for obj, name, value in changes:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def recorded_launches(cap: int, cases=None) -> list[tuple]:
    """(case, kernel name, JITFunction, args, kwargs) of every launch the launchers make for
    LAUNCH_CASES on sm_<cap>, an autotuned kernel once per config its pruning keeps. Nothing runs:
    the launchers' kernels are replaced by recorders, the architecture and SM count are the
    target's, and the sm_90 forward's run-time self-check is skipped."""
    import triton

    from janus_fast.kernels import attention as K
    from janus_fast.kernels import attention_common, attention_configs, attention_decode

    log, case_now = [], {}
    changes = [(attention_configs, "arch", lambda index: f"sm{cap}"), (attention_decode, "arch", lambda index: f"sm{cap}"),
               (K, "_sm90_self_check", lambda *args: None),
               (K, "_on_hopper", lambda q: cap == 90 and case_now.get("hopper_path", True))]
    changes += [(module, "num_sms", lambda index: 132 if cap == 90 else 108)
                for module in (K, attention_common)]  # (decode splits are fixed: no SM count)
    for module in (K, K.fwd_sm90, attention_decode):  # the launchers' kernels, not the device helpers
        for name, value in list(vars(module).items()):
            if name.endswith("_kernel") and isinstance(value, (triton.runtime.Autotuner, triton.runtime.JITFunction)):
                changes.append((module, name, _Recorder(name, value, log)))
    launches = []
    with _patched(*changes):
        for case, call in (cases or LAUNCH_CASES).items():
            log.clear()
            case_now.clear()
            case_now.update(call)
            _launch_case(K, **call)
            for name, kernel, args, kwargs in log:
                if isinstance(kernel, triton.runtime.Autotuner):
                    kernel.nargs = dict(zip(kernel.arg_names, args))
                    for config in kernel.prune_configs(kwargs):
                        launches.append((case, name, kernel.fn, args, {**kwargs, **config.all_kwargs()}))
                else:
                    launches.append((case, name, kernel, args, kwargs))
    return launches


def launch_compile_jobs(cap: int, cases=None) -> list[dict]:
    """The recorded launches as Triton's launcher would compile them (its binder's signature,
    constants and divisibility attributes, the launch's options), one job per distinct compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from janus_fast.kernels.attention_configs import CompileSpec

    backend = make_backend(GPUTarget("cuda", cap, 32))
    jobs = {}
    for case, name, fn, args, kwargs in recorded_launches(cap, cases):
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        key = (fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
               repr(sorted(attrs.items())), repr(options))
        if key in jobs:
            continue
        meta = {fn.arg_names[path[0]]: value for path, value in constexprs.items()}
        dtype = signature[fn.arg_names[0]].lstrip("*")
        label = CompileSpec(name, fn, meta, options.__dict__, dtype).label
        jobs[key] = dict(name=KERNEL_NAMES.get(name, name), case=case, label=f"{case}: {label}", fn=fn,
                         signature=signature, constexprs=constexprs, attrs=attrs, options=options.__dict__)
    return list(jobs.values())


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
    """Every shipped config at the test's shapes (case "table") and at the launchers' arguments."""
    cap, rows = facts
    assert {r["case"] for r in rows} >= {"table", *QUICK_LAUNCH_CASES}, "a launch case compiled nothing"
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


def test_sm90_two_pass_backward_is_all_warpgroup_mma(facts):
    """What backend="auto" weighs on Hopper (README): at head_dim 128, 16-bit, the two-pass
    backward's GEMMs all run on wgmma, while the fused kernel's small query tiles put dQ's on
    mma.sync (measured against each other on the GPU, not assumed)."""
    cap, rows = facts
    if cap != 90:
        pytest.skip("warpgroup MMAs are sm_90 features")
    d128 = [r for r in rows if re.search(r"\bD128 bf16", r["config"])]
    two_pass = [r for r in d128 if r["name"] in ("bwd_dkdv", "bwd_dq")]
    assert {r["name"] for r in two_pass} == {"bwd_dkdv", "bwd_dq"}, two_pass
    assert all(r["mma_sync"] == 0 and r["wgmma"] == r["gemms"] for r in two_pass), two_pass
    fused = [r for r in d128 if r["name"] == "bwd_fused"]
    assert fused and all(r["mma_sync"] >= 1 for r in fused), fused  # (else the README's comparison is stale)


def test_sm90_forward_structure(facts):
    """The Hopper forward: TMA loads, warpgroup MMAs, 128-key tiles at head_dim 128, and two key
    loops: the plain one (full blocks: no mask, no contract-1 bookkeeping, so no 2-D select) and
    the edge one (diagonal and ragged blocks), compiled causal and not."""
    cap, rows = facts
    if cap != 90:
        pytest.skip("TMA and warpgroup MMAs are sm_90 features")
    hopper = [r for r in rows if r["name"] == "fwd_sm90"]
    if not hopper:
        pytest.skip("this Triton lacks tensor descriptors: the launcher uses the pointer-load kernel")
    assert all(r["tma_loads"] >= 1 and r["wgmma"] >= 4 for r in hopper), hopper
    assert all(len(r["dot_loops"]) == 2 and r["dot_loops"][0] == [2, 0] and r["dot_loops"][1][1] >= 1
               for r in hopper), [(r["config"], r["dot_loops"]) for r in hopper]
    assert {r["config"].endswith("causal") for r in hopper} == {False, True}, hopper
    tiles = {int(m.group(1)) for r in hopper if (m := re.search(r"\bD128 bf16 \d+x(\d+) ", r["config"]))}
    assert tiles and min(tiles) >= 128, tiles
    # the LLM's tiles (head_dim 128, 16-bit) run on Hopper's warpgroup MMA
    assert all(r["wgmma"] >= 1 for r in rows if r["name"] in ("fwd", "bwd_fused", "bwd_dkdv", "bwd_dq")
               and re.search(r"\bD128 bf16", r["config"]))


if __name__ == "__main__":
    os.environ.update(_compile_env())  # before triton is imported by compile_facts
    for cap in [int(a) for a in sys.argv[1:]] or [80, 90]:
        print(f"sm_{cap}")
        for r in compile_facts(cap, full=FULL):
            print(f"  {r['name']:<14} {r['config']:<52} regs {r['regs']:>3}  spill {r['spill_bytes']:>4} B  "
                  f"smem {r['shared'] / 1024:6.1f} KiB  tma {r['tma_loads']:>2}  ws {int(r['warp_specialize'])}  "
                  f"gemms {r['gemms']}  wgmma {r['wgmma']:>2}  mma.sync {r['mma_sync']:>3}  "
                  f"wait_group {r['wait_groups']}  atomics {r['atomics']}  loops {r['dot_loops']}")
