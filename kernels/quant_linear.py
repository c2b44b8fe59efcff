"""Weight-only quantized linear layer: y = x Wᵀ + bias with W stored as int8 (or fp8 e4m3) and
one fp32 scale per output channel, W[n, :] = qweight[n, :] · scale[n].

The weight tile is loaded in its stored 1-byte format and converted in registers to the
activations' dtype (exact: |q| <= 127 and e4m3 values are representable in fp16/bf16), so no
dequantized copy of W ever exists in memory and a step reads half the bytes of a bf16 weight.
Two tilings, from static shapes only (CUDA-graph safe, never autotuned):
  decode   M <= 64 rows (the batch of a decode step): one M tile padded to 16/32/64, narrow N tiles
           (16 or 32 output channels) so a 4096-wide layer still spreads over every SM, 128-wide K
           slices four stages deep: a stream over the weight.
  prefill  M > 64 (prompt tokens): 128x128 tiles, an ordinary tensor-core GEMM whose weight
           operand is converted on its way from shared memory.
"""
import torch
import triton
import triton.language as tl

from .attention_common import num_sms
from .attention_configs import arch

DECODE_MAX_M = 64

# Decode: (BLOCK_K, num_stages) and num_warps by BLOCK_M; prefill: (BLOCK_M, BLOCK_N, BLOCK_K,
# num_warps, num_stages). "fp32": float32 activations (exact dots on the CUDA cores, the
# correctness path: smaller tiles, the ones that fit in registers). Chosen by compile facts: every
# row compiles without spills on sm_80 / sm_90 under Triton 3.6 and 3.9, where 256-wide K slices
# with 4 warps spill under 3.6 (tests/test_quant_compile_facts.py).
DECODE = {
    ("sm90", "16bit"): (128, 4), ("sm80", "16bit"): (128, 4),
    ("sm90", "fp32"): (32, 2), ("sm80", "fp32"): (32, 2),
    ("interp", "16bit"): (32, 1), ("interp", "fp32"): (32, 1),
}
DECODE_WARPS = {"16bit": {16: 4, 32: 4, 64: 8}, "fp32": {16: 4, 32: 8, 64: 8}}
PREFILL = {
    ("sm90", "16bit"): (128, 128, 32, 8, 4), ("sm80", "16bit"): (128, 128, 32, 8, 3),
    ("sm90", "fp32"): (32, 32, 32, 8, 2), ("sm80", "fp32"): (32, 32, 32, 8, 2),
    ("interp", "16bit"): (32, 32, 32, 4, 1), ("interp", "fp32"): (32, 32, 32, 4, 1),
}


@triton.jit
def _quant_linear_kernel(X, W, SCALE, BIAS, OUT, M, N, K, stride_xm, stride_wn, stride_om,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """Program (m tile, n tile): acc[m, n] = sum_k x[m, k] · q[n, k] over BLOCK_K slices in order
    (fp32 accumulation; the quantized weight converted to x's dtype in registers, exactly), then
    out = acc · scale[n] (+ bias[n]) rounded once to the output dtype. M tiles vary fastest, so
    the programs sharing a weight tile run together and it is read from HBM about once."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out = acc * tl.load(SCALE + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :], out.to(OUT.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _decode_config(arch_name: str, fp32: bool, block_m: int, block_n: int) -> dict:
    width = "fp32" if fp32 else "16bit"
    block_k, stages = DECODE[(arch_name, width)]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=DECODE_WARPS[width][block_m],
                num_stages=stages)


def _prefill_config(arch_name: str, fp32: bool) -> dict:
    block_m, block_n, block_k, warps, stages = PREFILL[(arch_name, "fp32" if fp32 else "16bit")]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)


def launch_config(arch_name: str, m: int, n: int, fp32: bool, sms: int) -> dict:
    """The tiles and launch options for an [m, K] x [n, K]ᵀ product on `arch_name`, from static
    shapes only. Decode (m <= 64): BLOCK_M the smallest of 16/32/64 holding m; BLOCK_N 32 where
    that still gives two programs per SM, else 16."""
    if m > DECODE_MAX_M:
        return _prefill_config(arch_name, fp32)
    block_n = 32 if triton.cdiv(n, 32) >= 2 * sms else 16
    return _decode_config(arch_name, fp32, max(16, triton.next_power_of_2(m)), block_n)


def quantized_linear(x, qweight, scale, bias):
    """x [M, K] (rows strided, columns contiguous) against qweight [N, K] (int8 or float8_e4m3fn,
    rows contiguous), scale fp32 [N], bias [N] or None -> [M, N] in x.dtype."""
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    index = x.device.index if x.is_cuda else -1
    cfg = launch_config(arch(index), m, n, x.dtype == torch.float32, num_sms(index))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _quant_linear_kernel[grid](x, qweight, scale, bias if bias is not None else scale, out, m, n, k,
                               x.stride(0), qweight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                               DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32", **cfg)
    return out


def compile_specs(arch_name: str, full: bool = True):
    """(name, kernel, constexprs, options, argument dtypes) of the configs the launcher runs on
    `arch_name`, for tests/test_quant_compile_facts.py: int8 weights (and e4m3 on sm_90) with
    bf16 and fp32 activations at every decode tile (BLOCK_M 16/32/64 x BLOCK_N 16/32) and the
    prefill tile. full=False keeps the Janus launches: bf16 at 16x16 (1B, one image), 32x32
    (7B, 16 images) and the prefill tile; e4m3 at 32x32."""
    weights = ["i8"] + (["fp8e4nv"] if arch_name == "sm90" else [])
    for wdtype in weights:
        for xdtype in ("bf16", "fp32") if full else ("bf16",):
            fp32 = xdtype == "fp32"
            if full:
                decode = [(m, n) for m in (16, 32, 64) for n in (16, 32)]
            else:
                decode = [(16, 16), (32, 32)] if wdtype == "i8" else [(32, 32)]
            configs = [("decode", _decode_config(arch_name, fp32, m, n)) for m, n in decode]
            if full or wdtype == "i8":
                configs.append(("prefill", _prefill_config(arch_name, fp32)))
            for tiling, cfg in configs:
                options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
                meta = dict(cfg, HAS_BIAS=True, DOT_PREC="ieee" if fp32 else "tf32")
                label = f"{tiling} {wdtype} x {xdtype} {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}"
                yield (f"quant_linear {label}", _quant_linear_kernel, meta, options,
                       {"X": xdtype, "W": wdtype, "SCALE": "fp32", "BIAS": xdtype, "OUT": xdtype})
