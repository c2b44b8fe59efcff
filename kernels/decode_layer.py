"""Triton kernel of the decode step's RoPE + KV-cache write (the norm and SiLU·mul of a decode
layer are kernels/rms_norm.py and kernels/silu_mul.py). It reads its inputs once and writes its
outputs once; the arithmetic is fp32, each result rounded once to the output dtype (where torch
rounds after every op, this rounds once: as close or closer to the float64 reference).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, out_ptr,
                    stride_q, stride_k, stride_v, stride_tab, stride_cb, stride_cs,
                    HQ, HKV, D: tl.constexpr, HALF: tl.constexpr):
    """Program (b, h): h < HQ rotates query head h into out[b, h]; otherwise it rotates key head
    h - HQ into k_cache[b, pos] and copies value head h - HQ into v_cache[b, pos], pos =
    positions[b]. Rotation x·cos + rotate_half(x)·sin in fp32, rounded once."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, HALF)
    mask = i < D // 2
    pos = tl.load(pos_ptr + b).to(tl.int64)
    c1 = tl.load(cos_ptr + pos * stride_tab + i, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * stride_tab + D // 2 + i, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * stride_tab + i, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * stride_tab + D // 2 + i, mask=mask, other=0.0).to(tl.float32)
    if h < HQ:
        src = q_ptr + b * stride_q + h * D
        dst = out_ptr + (b * HQ + h) * D
    else:
        kh = h - HQ
        src = k_ptr + b * stride_k + kh * D
        dst = kc_ptr + b * stride_cb + pos * stride_cs + kh * D
        v1 = tl.load(v_ptr + b * stride_v + kh * D + i, mask=mask)
        v2 = tl.load(v_ptr + b * stride_v + kh * D + D // 2 + i, mask=mask)
        vdst = vc_ptr + b * stride_cb + pos * stride_cs + kh * D
        tl.store(vdst + i, v1.to(vc_ptr.dtype.element_ty), mask=mask)
        tl.store(vdst + D // 2 + i, v2.to(vc_ptr.dtype.element_ty), mask=mask)
    x1 = tl.load(src + i, mask=mask).to(tl.float32)
    x2 = tl.load(src + D // 2 + i, mask=mask).to(tl.float32)
    # rotate_half(x) = (-x2, x1)
    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2
    tl.store(dst + i, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + D // 2 + i, o2.to(out_ptr.dtype.element_ty), mask=mask)


def rope_kv_write(q, k, v, cos, sin, positions, k_cache, v_cache):
    """q [B, Hq, D], k/v [B, Hkv, D] (heads and dims contiguous, rows strided), cos/sin [S, D],
    positions int32 [B], caches [B, S_max, Hkv, D] contiguous in (Hkv, D). -> rotated q."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    if b:
        _rope_kv_kernel[(b, hq + hkv)](q, k, v, cos, sin, positions, k_cache, v_cache, out,
                                       q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
                                       k_cache.stride(0), k_cache.stride(1), hq, hkv, D=d,
                                       HALF=triton.next_power_of_2(d // 2), num_warps=1)
    return out
