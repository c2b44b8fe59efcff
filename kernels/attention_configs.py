"""Launch configurations of the Triton attention kernels, per GPU architecture and tile width.

A table maps (arch, width) to rows (BLOCK_M, BLOCK_N, num_warps, num_stages). Widths: "narrow"
(16-bit, head_dim <= 128), "wide" (16-bit, head_dim > 128) and "fp32" (exact fp32 dots on the CUDA
cores, a correctness path: small tiles are the ones that fit in registers). A key
(arch, width, "causal"), where present, replaces (arch, width) for causal launches. Every shipped row compiles for its
architecture without register spills and within shared memory (A100 163 KiB, H100 227 KiB):
tests/test_compile_facts.py compiles each one (shipped_compile_specs) and checks, without a GPU.

The autotuner keys on the head dim, causality, varlen, and power-of-two buckets of max_seqlen_q,
max_seqlen_k and batch x heads (tune_buckets): short and long sequences, few and many heads want
different tiles, while a bucket keeps varlen training from re-tuning at every new max length.
Each key is pruned to this GPU's table; a single survivor skips the benchmark on every Triton
version (the interpreter always lands there); winners are cached on disk. The fused backward's
fp32 dQ accumulator is reset to zero around the benchmark's runs (autotune(reset_to_zero=...)):
its atomics would otherwise add every timed run into the first call's dQ.
"""
import dataclasses
import functools

import torch
import triton
from triton.runtime.autotuner import Autotuner

TUNE_KEY = ["HEAD_D", "CAUSAL", "IS_VARLEN", "tune_q", "tune_k", "tune_bh"]


def _configs(table):
    """{(arch, width): [(BLOCK_M, BLOCK_N, num_warps, num_stages), ...]} -> the same keys with Configs."""
    return {tag: [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in rows]
            for tag, rows in table.items()}


_INTERP = {("interp", w): [(32, 16, 4, 1)] for w in ("narrow", "wide", "fp32")}
_INTERP_KV = {("interp", w): [(16, 32, 4, 1)] for w in ("narrow", "wide", "fp32")}

# Forward (pointer loads): sm_80, and sm_90 when TMA / warp specialisation are unavailable.
FWD = _configs({
    ("sm90", "narrow"): [(128, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3)],
    ("sm90", "wide"): [(64, 32, 8, 2), (32, 32, 4, 2)],
    ("sm90", "fp32"): [(16, 16, 8, 2)],
    ("sm80", "narrow"): [(128, 64, 8, 3), (64, 32, 4, 3)],
    ("sm80", "wide"): [(64, 32, 8, 2)],
    ("sm80", "fp32"): [(16, 16, 8, 2)],
    **_INTERP,
})
# sm_90 forward (TMA, kernels/attention_fwd_sm90.py), 16-bit head_dim <= 128: one config, no
# autotuning. 128x128 tiles on 8 warps (two warpgroups of 64 rows), two TMA stages; the edge
# blocks go 64 keys at a time (BLOCK_N // 2). The interpreter's 32x32 keeps its edge steps >= 16
# keys (tl.dot's minimum). D > 128 takes the pointer kernel (the previous TMA kernel spilled there).
FWD_SM90 = _configs({
    ("sm90", "narrow"): [(128, 128, 8, 2)],
    **{("interp", w): [(32, 32, 4, 1)] for w in ("narrow", "wide", "fp32")},
})
# Fused (5-GEMM) backward: BLOCK_N keys stay resident, BLOCK_M query rows stream. dK, dV and the
# transposed P / dP tiles all live in registers. On sm_90 (D128, 8 warps), 32x128 spills 56 B
# on Triton 3.6 even without software pipelining (2 stages spill on 3.9 too); 64x128 spills
# 120 B even at 1 stage, 64x64 104-168 B, and 4 warps spill more (FA3 keeps dQ's tile in
# shared memory, which Triton does not let us choose).
BWD_FUSED = _configs({
    ("sm90", "narrow"): [(16, 128, 8, 2), (32, 64, 8, 2)],
    ("sm90", "wide"): [(16, 32, 8, 2)],
    ("sm90", "fp32"): [(16, 16, 8, 3)],  # 1-2 stages: 8-32 B of local memory on Triton 3.6 or 3.9, D128 or 256
    ("sm80", "narrow"): [(32, 64, 8, 2), (16, 64, 8, 2)],
    ("sm80", "wide"): [(16, 32, 8, 2)],
    ("sm80", "fp32"): [(16, 16, 8, 2)],
    **_INTERP_KV,
})
# Deterministic backward, dK/dV kernel: BLOCK_N keys stay resident, BLOCK_M query rows stream
# (16x128 with 3 stages spills 8 B on Triton 3.6).
BWD_DKDV = _configs({
    ("sm90", "narrow"): [(16, 128, 8, 2)],
    ("sm90", "wide"): [(16, 32, 8, 2)],
    ("sm90", "fp32"): [(16, 16, 8, 1)],
    ("sm80", "narrow"): [(32, 64, 8, 2), (16, 64, 8, 2)],
    ("sm80", "wide"): [(16, 32, 8, 2)],
    ("sm80", "fp32"): [(16, 16, 8, 2)],
    **_INTERP_KV,
})
# Deterministic backward, dQ kernel: BLOCK_M query rows stay resident, BLOCK_N keys stream
# (D256 64x16 spills 120 B on Triton 3.6).
BWD_DQ = _configs({
    ("sm90", "narrow"): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3)],
    ("sm90", "wide"): [(32, 32, 4, 2)],
    ("sm90", "fp32"): [(16, 16, 4, 2)],
    ("sm80", "narrow"): [(64, 32, 4, 2)],
    ("sm80", "wide"): [(32, 32, 4, 2)],
    ("sm80", "fp32"): [(16, 16, 4, 2)],
    **_INTERP,
})


@functools.lru_cache(maxsize=None)
def arch(device_index):
    """"sm90" (Hopper and newer), "sm80" (Ampere/Ada) or "interp" (the Triton interpreter)."""
    if triton.knobs.runtime.interpret:
        return "interp"
    major, _ = torch.cuda.get_device_capability(device_index)
    return "sm90" if major >= 9 else "sm80"


def tag(q, block_d):
    width = "fp32" if q.element_size() == 4 else "wide" if block_d > 128 else "narrow"
    return arch(q.device.index if q.is_cuda else -1), width


def rows(table, arch_name, width, causal):
    """The configs of `table` for one launch: (arch, width, "causal") first if causal."""
    causal_rows = table.get((arch_name, width, "causal")) if causal else None
    return causal_rows if causal_rows is not None else table.get((arch_name, width), [])


def delta_block_m(block_d):
    """Rows per program of the backward's delta kernel: two [rows, BLOCK_D] fp32 tiles on 4 warps
    (64 x 256 spills 8 B on Triton 3.6)."""
    return 64 if block_d <= 128 else 32


def _bucket(n):
    return triton.next_power_of_2(max(int(n), 16))  # >= 16: no specialisation on 1 or odd values


def tune_buckets(max_q, max_k, batch_heads):
    """The tune_q, tune_k, tune_bh kernel arguments (only read by the autotuner's key)."""
    return dict(tune_q=_bucket(max_q), tune_k=_bucket(max_k), tune_bh=_bucket(batch_heads))


class _ArchAutotuner(Autotuner):
    """triton's Autotuner that benchmarks only a real choice: a key pruned to one config launches
    it without a timed run (Triton 3.6 would benchmark a lone survivor: time spent for nothing,
    and in the interpreter, which has no benchmarker, an error). A key first met inside a CUDA
    graph capture, where a benchmark cannot run, keeps its table's first config."""

    def prune_configs(self, kwargs):
        self.survivors = super().prune_configs(kwargs)
        if len(self.survivors) > 1 and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            self.survivors = self.survivors[:1]
        return self.survivors

    def _bench(self, *args, config, **meta):
        if len(self.survivors) == 1:
            return [0.0, 0.0, 0.0]
        return super()._bench(*args, config=config, **meta)


def autotune(table, tensor_arg="Q", reset_to_zero=None):
    """An autotuner over all of `table`, pruned at the first call of each key to the configs of
    this GPU's architecture and tile width (by identity: equal configs may sit under two tags).
    The benchmark re-runs the kernel on the real arguments: outputs it accumulates into (atomics)
    must be named in reset_to_zero, so the launch that counts starts from zero again."""
    def prune(configs, nargs, **kwargs):
        args = {**nargs, **kwargs}
        mine = {id(c) for c in rows(table, *tag(args[tensor_arg], args["BLOCK_D"]), args["CAUSAL"])}
        return [c for c in configs if id(c) in mine]

    union = [c for rows in table.values() for c in rows]

    def decorator(fn):
        return _ArchAutotuner(fn, fn.arg_names, union, TUNE_KEY, reset_to_zero, None,
                              prune_configs_by={"early_config_prune": prune}, cache_results=True)
    return decorator


# --------------------------------------------------------------------------------------------
# What the compile-facts test builds
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CompileSpec:
    name: str
    kernel: object
    meta: dict
    options: dict
    dtype: str = "bf16"

    @property
    def label(self):
        m = self.meta
        tiles = f"{m.get('BLOCK_M', m.get('BLOCK_H', ''))}x{m.get('BLOCK_N', '')}"
        return (f"D{m.get('HEAD_D', '-')} {self.dtype} {tiles} w{self.options['num_warps']} "
                f"s{self.options['num_stages']}" + (" causal" if m.get("CAUSAL") else "")
                + (" split" if m.get("SPLIT") else ""))


# narrow: causal varlen at head_dim 128 (the LLM); wide and fp32: causal dense at 256. Causal
# is the worst case for registers (the diagonal tiles' masks); the sm_90 forward is compiled both
# ways (its causal form is the one the warp-specialisation pass may reject).
_SHAPES = {"narrow": [(128, 128, "bf16")], "wide": [(256, 256, "bf16")], "fp32": [(256, 256, "fp32")]}


def _table_specs(name, kernel, table, arch_name, causal=True, **extra):
    for width, shapes in _SHAPES.items():
        for config in rows(table, arch_name, width, causal):
            for d, block_d, dtype in shapes:
                meta = dict(HEAD_D=d, BLOCK_D=block_d, CAUSAL=causal, IS_VARLEN=width == "narrow",
                            DOT_PREC="ieee" if dtype == "fp32" else "tf32", **config.kwargs, **extra)
                yield CompileSpec(name, kernel, meta, dict(num_warps=config.num_warps, num_stages=config.num_stages),
                                  dtype)


def shipped_compile_specs(arch_name, full=True):
    """Every kernel and config the launchers can run on `arch_name` ("sm80" / "sm90"); full=False
    keeps the decode kernels to the Janus head dim (128, bf16)."""
    from . import attention_bwd as bwd
    from . import attention_decode as dec
    from . import attention_fwd as fwd
    from . import attention_fwd_sm90 as fwd_sm90

    yield from _table_specs("fwd", fwd._attn_fwd_kernel, FWD, arch_name)
    if arch_name == "sm90" and fwd_sm90.available():
        yield from _table_specs("fwd_sm90", fwd_sm90._attn_fwd_tma_kernel, FWD_SM90, arch_name, causal=False)
        yield from _table_specs("fwd_sm90", fwd_sm90._attn_fwd_tma_kernel, FWD_SM90, arch_name)
    yield from _table_specs("bwd_fused", bwd._attn_bwd_fused_kernel, BWD_FUSED, arch_name, ATOMIC_DQ=True)
    yield from _table_specs("bwd_dkdv", bwd._attn_bwd_dkdv_kernel, BWD_DKDV, arch_name, ATOMIC_DQ=False)
    yield from _table_specs("bwd_dq", bwd._attn_bwd_dq_kernel, BWD_DQ, arch_name)
    for d in (96, 256):
        block_d = 128 if d <= 128 else 256
        yield CompileSpec("bwd_delta", bwd._bwd_delta_kernel,
                          dict(HEAD_D=d, BLOCK_D=block_d, IS_VARLEN=True, BLOCK_M=delta_block_m(block_d), ZERO_DQ=True),
                          dict(num_warps=4, num_stages=3))
    yield CompileSpec("bwd_dq_convert", bwd._bwd_dq_convert_kernel, dict(BLOCK=1024), dict(num_warps=4, num_stages=1))
    for d, dtype in ((128, "bf16"), (256, "bf16"), (128, "fp32")) if full else ((128, "bf16"),):
        yield from dec.compile_specs(arch_name, d, dtype, full)
