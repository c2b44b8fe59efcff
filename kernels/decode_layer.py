"""Triton kernel of the decode step's RoPE + KV-cache write, plain or into a quantized cache (the
norm and SiLU·mul of a decode layer are kernels/rms_norm.py and kernels/silu_mul.py). It reads its
inputs once and writes its outputs once; the arithmetic is fp32, each result rounded once to the
output dtype (where torch rounds after every op, this rounds once: as close or closer to the
float64 reference).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _round_to_e4m3(x):
    """x (fp32, |x| <= 448) rounded to the nearest e4m3 value, ties to even, in fp32 arithmetic:
    the step of x's binade is 2^(exponent - 3) (2^-9 below the smallest normal, 2^-6). The
    conversion to e4m3 after it is then exact - as the GPU rounds, and right in the interpreter
    too, whose own fp32 -> e4m3 conversion drops the carry into the exponent (125.9 -> 64)."""
    a = tl.abs(x)
    exponent = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((exponent + 124) << 23).to(tl.float32, bitcast=True)
    y = a / step
    r = tl.floor(y + 0.5)
    r = tl.where((r - y == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)
    return tl.where(x < 0, -r * step, r * step)


@triton.jit
def _store_head(dst, scale_dst, x1, x2, i, mask, QUANTIZED: tl.constexpr, HALF_D: tl.constexpr):
    """Store one head (its fp32 halves x1, x2) at dst: rounded once to the cache dtype, or
    (QUANTIZED) as ops.reference.quantize_rows does - scale = max|x| / QMAX (0 for zeros),
    x / scale rounded half away from zero for int8, to nearest even for e4m3, within +-QMAX -
    with its scale at scale_dst."""
    if QUANTIZED:
        if dst.dtype.element_ty == tl.int8:
            qmax = 127.0
        else:
            qmax = 448.0
        scale = tl.maximum(tl.max(tl.abs(x1), 0), tl.max(tl.abs(x2), 0)) / qmax
        div = tl.where(scale > 0, scale, 1.0)
        x1 = tl.minimum(tl.maximum(x1 / div, -qmax), qmax)
        x2 = tl.minimum(tl.maximum(x2 / div, -qmax), qmax)
        if dst.dtype.element_ty == tl.int8:
            x1 = tl.where(x1 >= 0, tl.floor(x1 + 0.5), tl.ceil(x1 - 0.5))
            x2 = tl.where(x2 >= 0, tl.floor(x2 + 0.5), tl.ceil(x2 - 0.5))
        else:
            x1 = _round_to_e4m3(x1)
            x2 = _round_to_e4m3(x2)
        tl.store(scale_dst, scale)
    tl.store(dst + i, x1.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF_D + i, x2.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, out_ptr, ks_ptr, vs_ptr,
                    stride_q, stride_k, stride_v, stride_tab, stride_cb, stride_cs, stride_sb, stride_ss, per_row,
                    HQ, HKV, D: tl.constexpr, HALF: tl.constexpr, QUANTIZED: tl.constexpr = False):
    """Program (b, h): h < HQ rotates query head h of token b into out[b, h]; otherwise it rotates
    key head h - HQ into k_cache[c, pos] and copies value head h - HQ into v_cache[c, pos], pos =
    positions[b], c = b // per_row (per_row consecutive tokens share a cache row). Rotation
    x·cos + rotate_half(x)·sin in fp32, rounded once. QUANTIZED: the cache heads are quantized
    (_store_head) and their scales go to ks/vs[c, pos, h - HQ]."""
    b = tl.program_id(0).to(tl.int64)
    row = b // per_row
    h = tl.program_id(1)
    i = tl.arange(0, HALF)
    mask = i < D // 2
    pos = tl.load(pos_ptr + b).to(tl.int64)
    c1 = tl.load(cos_ptr + pos * stride_tab + i, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * stride_tab + D // 2 + i, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * stride_tab + i, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * stride_tab + D // 2 + i, mask=mask, other=0.0).to(tl.float32)
    kh = h - HQ
    if h < HQ:
        src = q_ptr + b * stride_q + h * D
    else:
        src = k_ptr + b * stride_k + kh * D
        v1 = tl.load(v_ptr + b * stride_v + kh * D + i, mask=mask, other=0.0).to(tl.float32)
        v2 = tl.load(v_ptr + b * stride_v + kh * D + D // 2 + i, mask=mask, other=0.0).to(tl.float32)
        _store_head(vc_ptr + row * stride_cb + pos * stride_cs + kh * D, vs_ptr + row * stride_sb + pos * stride_ss + kh,
                    v1, v2, i, mask, QUANTIZED, D // 2)
    x1 = tl.load(src + i, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + D // 2 + i, mask=mask, other=0.0).to(tl.float32)
    # rotate_half(x) = (-x2, x1)
    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2
    if h < HQ:
        _store_head(out_ptr + (b * HQ + h) * D, out_ptr, o1, o2, i, mask, False, D // 2)
    else:
        _store_head(kc_ptr + row * stride_cb + pos * stride_cs + kh * D, ks_ptr + row * stride_sb + pos * stride_ss + kh,
                    o1, o2, i, mask, QUANTIZED, D // 2)


def rope_kv_write(q, k, v, cos, sin, positions, k_cache, v_cache, k_scale=None, v_scale=None):
    """q [M, Hq, D], k/v [M, Hkv, D] (heads and dims contiguous, rows strided), cos/sin [S, D],
    positions int32 [M], caches [B, S_max, Hkv, D] contiguous in (Hkv, D), M a multiple of B:
    token m goes to cache row m // (M // B); a quantized cache (int8 / float8_e4m3fn) comes with
    k_scale/v_scale fp32 [B, S_max, Hkv] (same strides). -> rotated q."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    quantized = k_scale is not None
    scales = (k_scale, v_scale) if quantized else (out, out)  # (unused without a quantized cache)
    if b:
        _rope_kv_kernel[(b, hq + hkv)](q, k, v, cos, sin, positions, k_cache, v_cache, out, *scales,
                                       q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
                                       k_cache.stride(0), k_cache.stride(1),
                                       *(k_scale.stride()[:2] if quantized else (0, 0)), b // k_cache.shape[0],
                                       hq, hkv, D=d, HALF=triton.next_power_of_2(d // 2), QUANTIZED=quantized,
                                       num_warps=1)
    return out


def quantized_compile_specs(arch_name: str):
    """The quantizing cache write as launched for Janus (head_dim 128, bf16 activations), for
    tests/test_quant_compile_facts.py: int8 caches, and e4m3 ones on sm_90 (sm_89+)."""
    for cache in ["i8"] + (["fp8e4nv"] if arch_name == "sm90" else []):
        dtypes = {n: "bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
        dtypes.update(cos_ptr="fp32", sin_ptr="fp32", pos_ptr="i32", kc_ptr=cache, vc_ptr=cache, ks_ptr="fp32", vs_ptr="fp32")
        yield (f"rope_kv_write {cache} cache", _rope_kv_kernel, dict(D=128, HALF=64, QUANTIZED=True),
               {"num_warps": 1, "num_stages": 1}, dtypes)
