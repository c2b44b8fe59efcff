"""Compile facts of the Llama layer ops' Triton kernels (RMSNorm, RoPE, SiLU·mul: forward and
backward; the decode step's RoPE + KV-cache write), without a GPU.

The interpreter does not compile, so each kernel is built to a cubin for sm_80 and sm_90 with
Triton's bundled ptxas at the config its launcher picks for Janus-Pro's sizes (hidden 2048 / 4096,
MLP 5632 / 11008, head_dim 128 with 16 / 32 heads; the 7B sizes in the full tier), in bf16 with
fp32 master weights where the training path passes them. The test fails on what the GPU compiler
rejects and on any register spill (local memory or a stack frame in the cubin, read as
tests/test_compile_facts.py reads it). Run it on both Tritons:
`TRITON36_DIR=/work/.triton36 bash scripts/triton36.sh python -m pytest tests/test_layer_compile_facts.py -q`.

`python -m tests.test_layer_compile_facts [80|90]` prints the table.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.helpers import DEVICE, FULL, compile_facts_per_arch

# (hidden, intermediate, heads = kv heads): Janus-Pro-1B, and 7B in the full tier
SIZES = [(2048, 5632, 16)] + ([(4096, 11008, 32)] if FULL else [])
HEAD_DIM = 128


def _specs():
    """(name, kernel, constexprs incl. num_warps, pointer types) of every config."""
    import janus_fast.kernels.decode_layer as DL
    import janus_fast.kernels.rms_norm as RN
    import janus_fast.kernels.rope as RO
    import janus_fast.kernels.silu_mul as SM

    specs = []
    for hidden, inter, heads in SIZES:
        block, warps = RN.row_config(hidden)
        for residual in (True, False):
            specs.append((f"rms_norm H{hidden} residual={int(residual)}", RN._rms_norm_kernel,
                          dict(HAS_RESIDUAL=residual, BLOCK=block, num_warps=warps), {"w_ptr": "*fp32"}))
        for dh_in, weight_grad in ((True, True), (False, True)) + (((True, False),) if FULL else ()):
            specs.append((f"rms_norm_bwd H{hidden} dh_in={int(dh_in)} dw={int(weight_grad)}", RN._rms_norm_bwd_kernel,
                          dict(HAS_DH_IN=dh_in, WEIGHT_GRAD=weight_grad, BLOCK=block, num_warps=warps),
                          {"w_ptr": "*fp32", "dw_part_ptr": "*fp32"}))
        block, warps = SM.block_config(inter)
        specs.append((f"silu_mul I{inter}", SM._silu_mul_kernel, dict(BLOCK=block, num_warps=warps), {}))
        specs.append((f"silu_mul_bwd I{inter}", SM._silu_mul_bwd_kernel, dict(BLOCK=block, num_warps=warps), {}))
        block_h, half, warps = RO.rope_config(3 * heads, HEAD_DIM)
        for backward in (False, True):
            specs.append((f"rope_qkv{'_bwd' if backward else ''} {heads}x{HEAD_DIM}", RO._rope_qkv_kernel,
                          dict(D=HEAD_DIM, HALF=half, BLOCK_H=block_h, BACKWARD=backward, num_warps=warps),
                          {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i64"}))
        specs.append((f"rope_kv_write {heads}x{HEAD_DIM}", DL._rope_kv_kernel,
                      dict(D=HEAD_DIM, HALF=HEAD_DIM // 2, num_warps=1),
                      {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i32"}))
    return specs


def _signature(fn, meta, pointers):
    """bf16 tensors unless `pointers` says otherwise; ints i32, eps fp32; constexprs as given."""
    def kind(name):
        if name in meta:
            return "constexpr"
        if name.endswith("_ptr"):
            return pointers.get(name, "*bf16")
        return "fp32" if name == "eps" else "i32"
    return {n: kind(n) for n in fn.arg_names}


def compile_facts(cap: int) -> list[dict]:
    """Registers and spill bytes of every config for sm_<cap> (run with the interpreter off)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tests.test_compile_facts import _resource_usage

    facts = []
    for name, fn, meta, pointers in _specs():
        constexprs = {k: v for k, v in meta.items() if k != "num_warps"}
        sig = _signature(fn, constexprs, pointers)
        # as the launchers specialise them: 16-byte aligned pointers, row strides divisible by 16
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if sig[n].startswith("*") or n.startswith("stride_")}
        compiled = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", cap, 32), options={"num_warps": meta["num_warps"]})
        usage = _resource_usage(compiled.asm["cubin"])
        facts.append({"name": name, "warps": meta["num_warps"], "regs": usage["reg"],
                      "spill_bytes": usage["local"] + usage["stack"]})
    return facts


@pytest.fixture(scope="module")
def _all_facts():
    return compile_facts_per_arch("tests.test_layer_compile_facts")


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the other tests compile and run the kernels")
@pytest.mark.parametrize("cap", [80, 90])
def test_layer_kernels_compile_without_spills(cap, _all_facts):
    rows = _all_facts[cap]
    assert not isinstance(rows, str), f"compiling the layer kernels for sm_{cap} failed:\n{rows}"
    assert [r["name"] for r in rows] == [spec[0] for spec in _specs()]
    spilling = [(r["name"], r["regs"], r["spill_bytes"]) for r in rows if r["spill_bytes"]]
    assert not spilling, f"sm_{cap}: the layer kernels spill registers (name, regs, bytes): {spilling}"


if __name__ == "__main__":
    os.environ.update(TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    for cap in [int(a) for a in sys.argv[1:]] or [80, 90]:
        print(f"sm_{cap}")
        for r in compile_facts(cap):
            print(f"  {r['name']:<36} warps {r['warps']:>2}  regs {r['regs']:>3}  spill {r['spill_bytes']:>3} B")
