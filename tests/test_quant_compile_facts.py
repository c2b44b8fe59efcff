"""Compile facts of the quantized kernels, without a GPU.

Every config the quantized launchers run - the weight-only linear layer's decode and prefill
tiles (kernels.quant_linear), the quantizing RoPE + cache write and the decode attention over a
quantized cache (kernels.decode_layer / kernels.attention_decode with their cache-format
constexprs) - is built to a cubin for sm_80 and sm_90 with Triton's bundled ptxas, as the
launchers specialise it (16-byte aligned pointers, strides divisible by 16). The test fails on
what the GPU compiler rejects, on any register spill (local memory or a stack frame) and on shared
memory past the architecture's per-block limit. fp8 (e4m3) weights and caches are compiled for
sm_90 only: Triton has no e4m3 conversion before sm_89, which is why the ops refuse it there.

`python -m tests.test_quant_compile_facts [80|90]` prints the table.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.helpers import DEVICE, FULL, compile_facts_per_arch

SMEM_LIMIT = {80: 166912, 90: 232448}  # max dynamic shared memory per block (bytes), A100 / H100


def _specs(cap: int):
    from janus_fast.kernels import attention_decode, decode_layer, quant_linear

    arch_name = f"sm{cap}"
    yield from quant_linear.compile_specs(arch_name, FULL)
    yield from decode_layer.quantized_compile_specs(arch_name)
    yield from attention_decode.quantized_compile_specs(arch_name, FULL)


def _signature(fn, meta: dict, dtypes: dict) -> dict:
    """Pointers in the dtype the spec names for them, fp32 for scalars named *scale, int32 for
    the other scalars."""
    def kind(name):
        if name in meta:
            return "constexpr"
        if name in dtypes:
            return f"*{dtypes[name]}"
        return "fp32" if name.endswith("scale") else "i32"
    return {n: kind(n) for n in fn.arg_names}


def compile_facts(cap: int) -> list[dict]:
    """Registers, spill bytes and shared memory of every config for sm_<cap> (run with the
    interpreter off)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tests.test_compile_facts import _resource_usage

    facts = []
    for name, fn, meta, options, dtypes in _specs(cap):
        sig = _signature(fn, meta, dtypes)
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if sig[n].startswith("*") or n.startswith("stride")}
        compiled = triton.compile(ASTSource(fn, sig, constexprs=meta, attrs=attrs),
                                  target=GPUTarget("cuda", cap, 32), options=options)
        usage = _resource_usage(compiled.asm["cubin"])
        facts.append({"name": name, "warps": options["num_warps"], "stages": options.get("num_stages", 1),
                      "regs": usage["reg"], "spill_bytes": usage["local"] + usage["stack"],
                      "shared": compiled.metadata.shared})
    return facts


def _env():
    return {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}


@pytest.fixture(scope="module")
def _all_facts():
    """Both architectures compile at once (two processes: CI has two cores)."""
    return compile_facts_per_arch("tests.test_quant_compile_facts", _env())


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the other tests compile and run the kernels")
@pytest.mark.parametrize("cap", [80, 90])
def test_quantized_configs_compile_without_spills(cap, _all_facts):
    rows = _all_facts[cap]
    assert not isinstance(rows, str), f"compiling the quantized configs for sm_{cap} failed:\n{rows}"
    assert len(rows) == len(list(_specs(cap)))
    spilling = [(r["name"], r["regs"], r["spill_bytes"]) for r in rows if r["spill_bytes"]]
    assert not spilling, f"sm_{cap}: configs spill registers (name, regs, bytes): {spilling}"
    too_big = [(r["name"], r["shared"]) for r in rows if r["shared"] > SMEM_LIMIT[cap]]
    assert not too_big, f"sm_{cap}: configs exceed {SMEM_LIMIT[cap]} bytes of shared memory: {too_big}"
    # fp8 weights and caches exist on sm_90 only (Triton converts e4m3 from sm_89 on)
    assert any("fp8" in r["name"] for r in rows) == (cap == 90)


if __name__ == "__main__":
    os.environ.update(_env())
    for cap in [int(a) for a in sys.argv[1:]] or [80, 90]:
        print(f"sm_{cap}")
        for r in compile_facts(cap):
            print(f"  {r['name']:<46} warps {r['warps']:>2}  stages {r['stages']}  regs {r['regs']:>3}  "
                  f"spill {r['spill_bytes']:>3} B  smem {r['shared'] / 1024:6.1f} KiB")
