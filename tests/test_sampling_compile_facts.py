"""Compile facts of the shipped sampling and VQ Triton configs, without a GPU.

The interpreter does not compile, so each config the launchers pick (kernels.sampling.launch_config
for cfg_sample; the split-row kernel; kernels.vq's lookup, prepare and quantize tiles) is built
to a cubin for sm_80 and sm_90 with Triton's bundled ptxas, as the launchers specialise it. The
test fails on what the GPU compiler rejects and on any register spill (local memory or a stack
frame in the cubin's resource usage, read as tests/test_compile_facts.py reads it).

`python -m tests.test_sampling_compile_facts [80|90]` prints the table.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.helpers import DEVICE, FULL, compile_facts_per_arch

# (B, V): the image shape kept on the chip, a text row streamed; the full tier adds every
# other tiling class (packed short rows, 8192/4096-token on-chip rows)
SHAPES = [(32, 16384), (2, 102400)] + ([(32, 8000), (1, 3000), (32, 1000), (64, 100)] if FULL else [])
FILTERS = [(True, True), (True, False), (False, True), (False, False)]


def _specs():
    """(name, kernel, constexprs incl. num_warps/maxnreg, argument types) of every config."""
    import janus_fast.kernels.sampling as S
    import janus_fast.kernels.vq as Q

    ptrs = {"logits_ptr": "*bf16", "tokens_ptr": "*i64", "ids_ptr": "*i64", "seed_ptr": "*i64", "work_ptr": "*i64",
            "idx_ptr": "*i64", "cb_ptr": "*bf16", "out_ptr": "*i64", "cbt_ptr": "*fp32", "sq_ptr": "*fp32",
            "z_ptr": "*fp32"}
    floats = ("cfg_weight", "temperature", "top_p", "mass_scale")
    common = dict(INTERLEAVED=True, SCALE=True, ADVANCE=True, WRITE_IDS=True, HOST_SEED=False)
    specs = []
    for b, v in SHAPES:
        _, tiling = S.launch_config(b, v, interpreted=False)
        for top_k, top_p in FILTERS:
            specs.append((f"cfg_sample {b}x{v} top_k={int(top_k)} top_p={int(top_p)}", S._cfg_sample_kernel,
                          dict(common, GREEDY=False, TOP_K=top_k, TOP_P=top_p, **tiling)))
        specs.append((f"cfg_sample {b}x{v} greedy", S._cfg_sample_kernel,
                      dict(common, GREEDY=True, TOP_K=False, TOP_P=False, **tiling)))
    split = dict(common, SPLITS=25, BLOCK=S.SPLIT_BLOCK, SELECT=S.SPLIT_SELECT, num_warps=8)
    specs.append(("cfg_sample split", S._cfg_sample_split_kernel,
                  dict(split, GREEDY=False, TOP_K=False, TOP_P=False, PHASE=0, K_PASSES=0, P_PASSES=0)))
    for k_passes, p_passes in ((4, 4), (0, 4)) if FULL else ((4, 4),):  # every phase of a filtered row
        for phase in range(k_passes + p_passes + 2):
            specs.append((f"cfg_sample split K{k_passes}P{p_passes} phase {phase}", S._cfg_sample_split_kernel,
                          dict(split, GREEDY=False, TOP_K=k_passes > 0, TOP_P=p_passes > 0, PHASE=phase,
                               K_PASSES=k_passes, P_PASSES=p_passes)))
    d = 8  # Janus' codebook dimension
    specs.append(("vq_lookup D8", Q._vq_lookup_kernel, dict(L2_NORM=True, CHANNELS_FIRST=True, **Q.lookup_blocks(d))))
    specs.append(("vq_prepare D8", Q._prepare_codebook_kernel, dict(L2_NORM=True, BLOCK_K=Q.PREPARE_BLOCK_K, D_PAD=d)))
    for split in (False, True):
        specs.append((f"vq_quantize D8 split={int(split)}", Q._vq_quantize_kernel,
                      dict(D=d, L2_NORM=True, SPLIT=split, D_PAD=d, **Q.QUANTIZE_BLOCKS)))

    def signature(fn, meta):
        return {n: "constexpr" if n in meta else ptrs.get(n, "fp32" if n in floats else
                                                        "i64" if n.endswith("_value") else "i32") for n in fn.arg_names}
    return [(name, fn, meta, signature(fn, meta)) for name, fn, meta in specs]


def compile_facts(cap: int) -> list[dict]:
    """Registers and spill bytes of every config for sm_<cap> (run with the interpreter off)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tests.test_compile_facts import _resource_usage

    facts = []
    for name, fn, meta, sig in _specs():
        constexprs = {k: v for k, v in meta.items() if k not in ("num_warps", "maxnreg")}
        options = {"num_warps": meta.get("num_warps", 4), "num_stages": 1, "enable_fp_fusion": False}
        if "maxnreg" in meta:
            options["maxnreg"] = meta["maxnreg"]
        compiled = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", cap, 32),
                                  options=options)
        usage = _resource_usage(compiled.asm["cubin"])
        facts.append({"name": name, "warps": options["num_warps"], "regs": usage["reg"],
                      "spill_bytes": usage["local"] + usage["stack"]})
    return facts


def _env():
    return {**os.environ, "TRITON_INTERPRET": "0"}


@pytest.fixture(scope="module")
def _all_facts():
    """Both architectures compile at once (two processes: CI has two cores)."""
    return compile_facts_per_arch("tests.test_sampling_compile_facts", _env())


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the other tests compile and run the kernels")
@pytest.mark.parametrize("cap", [80, 90])
def test_shipped_configs_compile_without_spills(cap, _all_facts):
    rows = _all_facts[cap]
    assert not isinstance(rows, str), f"compiling the sampling/VQ configs for sm_{cap} failed:\n{rows}"
    assert len(rows) == len(_specs())
    spilling = [(r["name"], r["regs"], r["spill_bytes"]) for r in rows if r["spill_bytes"]]
    assert not spilling, f"sm_{cap}: configs spill registers (name, regs, bytes): {spilling}"


if __name__ == "__main__":
    os.environ.update(_env())
    for cap in [int(a) for a in sys.argv[1:]] or [80, 90]:
        print(f"sm_{cap}")
        for r in compile_facts(cap):
            print(f"  {r['name']:<42} warps {r['warps']:>2}  regs {r['regs']:>3}  spill {r['spill_bytes']:>3} B")
