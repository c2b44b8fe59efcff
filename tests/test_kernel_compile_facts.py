"""Compile facts of every Triton kernel outside attention (sampling, VQ, the fused cross-entropy,
the decode layer, the training layer's norm, RoPE and SiLU·mul with their backward), at the
launches their host functions really make, without a GPU.

Each launcher in kernels/ is called as janus_fast.ops and the model call it, at Janus-Pro's shapes,
on meta tensors (a GPU's aligned pointers, no data), with a stand-in Triton driver that reports an
sm_80 (A100) or sm_90 (H100/H200) GPU. Triton's own binder then specialises every argument as at a
real launch (pointer alignment, integer divisibility and 1s, constexprs, num_warps, maxnreg); a JIT
cache hook records that specialisation and skips the launch, and each distinct one is compiled to
a cubin with Triton's bundled ptxas. The test fails on what the GPU compiler rejects, on any
register spill (local memory in the cubin's resource usage, or a local load or store in its SASS)
and on shared memory over the architecture's limit. CI runs it under triton 3.9 and 3.6 (the GPU machine's, through
scripts/triton36.sh).

`python -m tests.test_kernel_compile_facts [80|90]` prints the table.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from tests.helpers import FULL, compile_facts_per_arch

SM_COUNT = {80: 108, 90: 132}  # A100, H100/H200: what the launchers size their grids by
SMEM_LIMIT = {80: 166912, 90: 232448}  # max dynamic shared memory per block (bytes)
MODELS = ("1b",) + (("7b",) if FULL else ())


class _Driver:
    """Just enough of Triton's CUDA driver for JITFunction.run to bind and specialise arguments."""

    def __init__(self, cap: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", cap, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def recording(cap: int, launches: list):
    """Inside, a Triton launch appends (kernel, signature, constexprs, attrs, options) to
    `launches` instead of compiling and running."""
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    options = {}
    run = JITFunction.run

    def run_recording_options(self, *args, grid, warmup, **kwargs):
        options.clear()
        options.update({k: v for k, v in kwargs.items() if k not in self.arg_names})
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def hook(*, fn, compile, **_):
        launches.append((fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0],
                         dict(options)))
        return True  # compiled later, for the target asked; nothing is launched

    saved = (driver._active, knobs.runtime.jit_cache_hook)  # (_active: None until a real driver is asked for)
    driver.set_active(_Driver(cap))
    knobs.runtime.jit_cache_hook = hook
    JITFunction.run = run_recording_options
    try:
        yield
    finally:
        JITFunction.run = run
        driver.set_active(saved[0])
        knobs.runtime.jit_cache_hook = saved[1]


def _model_launches(cap: int, model: str) -> None:
    """Calls every non-attention launcher as the model and janus_fast.ops do, on meta tensors."""
    import torch

    import janus_fast.kernels.cross_entropy as CE
    import janus_fast.kernels.decode_layer as DL
    import janus_fast.kernels.rms_norm as RN
    import janus_fast.kernels.rope as RO
    import janus_fast.kernels.sampling as S
    import janus_fast.kernels.silu_mul as SM
    import janus_fast.kernels.vq as Q
    from janus_fast.models.config import JanusProConfig
    from janus_fast.ops import sampling as ops_sampling

    cfg = getattr(JanusProConfig, f"janus_pro_{model}")()
    lm, vq = cfg.language, cfg.vq
    meta = dict(device="meta")
    bf16 = dict(meta, dtype=torch.bfloat16)
    cuda = torch.device("meta")

    # cfg_sample: image steps (parallel 1 and 16, V = the codebook) and text steps (B 1, the LLM
    # vocabulary, split across programs: every phase), greedy, unfiltered and filtered, from the
    # engine's device random state; one eager draw with the host seed. The full tier adds each
    # filter alone, fp32 text logits and a batch of 4 questions.
    settings = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 50, 0.9)] + ([(1.0, 50, 1.0), (1.0, 0, 0.9)] if FULL else [])
    batches = [(1, vq.codebook_size, torch.bfloat16), (16, vq.codebook_size, torch.bfloat16),
               (1, lm.vocab_size, torch.bfloat16)]
    batches += [(1, lm.vocab_size, torch.float32), (4, lm.vocab_size, torch.bfloat16)] if FULL else []
    for b, v, dtype in batches:
        logits = torch.empty(2 * b, v, dtype=dtype, **meta)
        for temperature, top_k, top_p in settings:
            filtered = temperature != 0 and (0 < top_k < v or top_p < 1.0)
            splits = ops_sampling.row_splits(b, v, cuda, filtered)
            work = torch.empty(b, ops_sampling.SLOT_WIDTH, dtype=torch.int64, **meta)
            S.cfg_sample(logits, 5.0, temperature, top_k, top_p, torch.empty(3, dtype=torch.int64, **meta),
                         "interleaved", advance=True, return_ids=True, splits=splits, work=work)
    S.cfg_sample(torch.empty(32, vq.codebook_size, **bf16), 5.0, 1.0, 0, 1.0,
                 torch.tensor([1, 0], dtype=torch.int64), "interleaved")  # an eager draw: the seed by value
    # VQ: the codebook prepared once, a batch of 16 images quantised and looked up, bf16 (and fp32)
    n = 16 * vq.num_tokens
    for dtype in (torch.bfloat16, torch.float32) if FULL else (torch.bfloat16,):
        codebook = torch.empty(vq.codebook_size, vq.codebook_dim, dtype=dtype, **meta)
        cbt, sq = Q.prepare_codebook(codebook, True)
        Q.vq_quantize(torch.empty(n, vq.codebook_dim, dtype=dtype, **meta), cbt, sq, True)
        Q.vq_lookup(torch.empty(n, dtype=torch.int64, **meta), codebook, True, (16, vq.codebook_dim, 24, 24))
    # the fused linear cross-entropy: the training batch against lm_head and gen_head, with and
    # without gradients
    x = torch.empty(4 * 4096, lm.hidden_size, **bf16)
    for vocab in (lm.vocab_size, vq.codebook_size):
        target = torch.empty(x.shape[0], dtype=torch.int64, **meta)
        for grad in (True, False):
            CE.linear_cross_entropy(x, torch.empty(vocab, lm.hidden_size, **bf16), None, target, -100, True, grad,
                                    grad, None)
    # the decode layer at 32 rows (16 images' pairs): RMSNorm with and without the residual, RoPE +
    # the cache write on views of the fused QKV projection, SiLU·mul on the halves of gate/up
    rows, d, hq, hkv = 32, lm.hidden_size // lm.num_attention_heads, lm.num_attention_heads, lm.num_key_value_heads
    h = torch.empty(rows, lm.hidden_size, **bf16)
    w = torch.empty(lm.hidden_size, **bf16)
    RN.rms_norm(h, w, 1e-6, residual=torch.empty_like(h))
    RN.rms_norm(h, w, 1e-6)
    qkv = torch.empty(rows, (hq + 2 * hkv) * d, **bf16)
    q, k, v = (t.view(rows, heads, d) for t, heads in zip(qkv.split([hq * d, hkv * d, hkv * d], -1), (hq, hkv, hkv)))
    cache = torch.empty(rows, 1024, hkv, d, **bf16)
    table = torch.empty(16384, d, **bf16)
    DL.rope_kv_write(q, k, v, table, table, torch.empty(rows, dtype=torch.int32, **meta), cache, cache)
    gate_up = torch.empty(rows, 2 * lm.intermediate_size, **bf16)
    SM.silu_mul(gate_up[:, :lm.intermediate_size], gate_up[:, lm.intermediate_size:])
    # the training layer on a micro-batch of 4 x 4096 tokens (models/packed_layer.py): the norm
    # with fp32 master weights and its backward (the full tier adds the first layer's norm without
    # the residual, its backward without the residual's gradient, and a frozen norm's), RoPE of
    # the fused QKV rows at packed positions and its backward, SiLU·mul's backward on the fused
    # gate/up rows
    t, inter = 4 * 4096, lm.intermediate_size
    x, w32 = torch.empty(t, lm.hidden_size, **bf16), torch.empty(lm.hidden_size, dtype=torch.float32, **meta)
    RN.rms_norm(x, w32, 1e-6, residual=torch.empty_like(x))
    for dh_in, weight_grad in ((True, True),) + (((False, True), (True, False)) if FULL else ()):
        RN.rms_norm_backward(x, x, w32, 1e-6, torch.empty_like(x) if dh_in else None, weight_grad)
    if FULL:
        RN.rms_norm(x, w32, 1e-6)
    table, positions = torch.empty(4096, d, dtype=torch.float32, **meta), torch.empty(t, dtype=torch.int64, **meta)
    q, k, v = RO.rope_qkv(torch.empty(t, (hq + 2 * hkv) * d, **bf16), positions, table, table, hq, hkv)
    RO.rope_qkv_backward(q, k, v, positions, table, table)
    gate_up = torch.empty(t, 2 * inter, **bf16)
    SM.silu_mul_backward(torch.empty(t, inter, **bf16), gate_up[:, :inter], gate_up[:, inter:], fused=True)


def launches(cap: int) -> list[tuple[str, object, dict, dict, dict, dict]]:
    """(name, kernel, signature, constexprs, attrs, options) of every distinct launch on sm_<cap>."""
    from janus_fast.ops import sampling as ops_sampling

    recorded: list = []
    sm_count = ops_sampling._sm_count
    ops_sampling._sm_count = lambda device: SM_COUNT[cap]
    import janus_fast.kernels.vq as Q

    slots, Q._slots = Q._slots, lambda device: 2 * SM_COUNT[cap]
    import janus_fast.kernels.rms_norm as RN

    norm_sms, RN._sm_count = RN._sm_count, lambda device: SM_COUNT[cap]
    try:
        with recording(cap, recorded):
            for model in MODELS:
                _model_launches(cap, model)
    finally:
        ops_sampling._sm_count, Q._slots, RN._sm_count = sm_count, slots, norm_sms
    distinct = {}
    for fn, sig, consts, attrs, options in recorded:
        key = repr((fn.__name__, sorted(sig.items()), sorted(consts.items()), sorted(attrs.items()),
                    sorted(options.items())))
        distinct.setdefault(key, (fn, sig, consts, attrs, options))
    out = []
    for fn, sig, consts, attrs, options in distinct.values():
        names = {fn.arg_names[path[0]]: value for path, value in consts.items() if len(path) == 1}
        shown = {k: v for k, v in names.items() if isinstance(v, (bool, int)) and k.isupper()}
        label = fn.__name__.strip("_").removesuffix("_kernel") + " " + " ".join(
            f"{k}={int(v)}" for k, v in shown.items())
        out.append((label, fn, sig, consts, attrs, options))
    return out


def _local_memory_instructions(cubin: bytes) -> int:
    """Local-memory loads and stores (LDL/STL) in the cubin's SASS: spill traffic. (A stack
    frame nothing reads or writes - NVPTX sometimes declares an unused 1-byte depot, which
    ptxas rounds to 8 bytes of STACK - moves no bytes and is reported, not failed.)"""
    import tempfile

    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.remove(f.name)
    return sum(1 for line in sass.splitlines() if " LDL" in line or " STL" in line)


def compile_facts(cap: int) -> list[dict]:
    """Registers, local memory (bytes and instructions), stack frame and shared memory of every
    distinct launch for sm_<cap> (run with the interpreter off)."""
    return compile_rows(cap, launches(cap))


def compile_rows(cap: int, jobs) -> list[dict]:
    """The facts of each (label, JITFunction, signature, constexprs, attrs, options) job compiled
    for sm_<cap>: the rows this file and test_verify_compile_facts.py check."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tests.test_compile_facts import _resource_usage

    facts = []
    for label, fn, sig, consts, attrs, options in jobs:
        compiled = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", cap, 32), options=options)
        usage = _resource_usage(compiled.asm["cubin"])
        facts.append({"name": label, "warps": compiled.metadata.num_warps, "regs": usage["reg"],
                      "local": usage["local"], "local_insts": _local_memory_instructions(compiled.asm["cubin"]),
                      "stack": usage["stack"], "shared": compiled.metadata.shared})
    return facts


def compile_env():
    return {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}  # (3.9's default, said)


@pytest.fixture(scope="module")
def _all_facts():
    return compile_facts_per_arch("tests.test_kernel_compile_facts", compile_env())


@pytest.mark.parametrize("cap", [80, 90])
def test_launched_configs_compile_without_spills(cap, _all_facts):
    rows = _all_facts[cap]
    assert not isinstance(rows, str), f"compiling the launched configs for sm_{cap} failed:\n{rows}"
    kernels = {r["name"].split()[0] for r in rows}
    assert kernels >= {"cfg_sample", "cfg_sample_split", "vq_lookup", "prepare_codebook", "vq_quantize",
                       "cross_entropy_rows", "rms_norm", "rope_kv", "silu_mul", "rms_norm_bwd", "rope_qkv",
                       "silu_mul_bwd"}, kernels
    spilling = [(r["name"], r["regs"], r["local"], r["local_insts"]) for r in rows if r["local"] or r["local_insts"]]
    assert not spilling, f"sm_{cap}: launches use local memory (name, regs, bytes, LDL/STL): {spilling}"
    too_big = [(r["name"], r["shared"]) for r in rows if r["shared"] > SMEM_LIMIT[cap]]
    assert not too_big, f"sm_{cap}: launches exceed {SMEM_LIMIT[cap]} bytes of shared memory: {too_big}"


if __name__ == "__main__":
    os.environ.update(compile_env())
    for cap in [int(a) for a in sys.argv[1:]] or [80, 90]:
        print(f"sm_{cap}")
        for r in compile_facts(cap):
            print(f"  {r['name']:<96} warps {r['warps']:>2}  regs {r['regs']:>3}  local {r['local']:>3} B"
                  f" {r['local_insts']:>2} LDL/STL  stack {r['stack']:>2} B  smem {r['shared'] / 1024:5.1f} KiB")
