"""Triton kernels of the fused decode layer: residual add + RMSNorm, RoPE + KV-cache write, and
SiLU·mul. Each reads its inputs once and writes its outputs once; all arithmetic is fp32, each
result is rounded once to the output dtype (where torch rounds after every op, these round
once: they are as close or closer to the float64 reference).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, stride_x, stride_r, N, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """Row i: h = x + r (rounded to the dtype, as torch adds), y = round(round(h / sqrt(mean(h²)
    + eps)) · w); the mean accumulates in fp32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
        tl.store(h_ptr + row * N + cols, h, mask=mask)
    h32 = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h32 * h32, axis=0) / N + eps)
    normed = (h32 * rstd).to(h.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x, weight, eps, residual=None):
    """(y, h) for x [M, N] (rows may be strided, columns contiguous); h is None without residual."""
    m, n = x.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h = torch.empty((m, n), dtype=x.dtype, device=x.device) if residual is not None else None
    if m:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(m,)](x, residual if residual is not None else x, weight, y, h if h is not None else y,
                               x.stride(0), (residual if residual is not None else x).stride(0), n, float(eps),
                               HAS_RESIDUAL=residual is not None, BLOCK=block,
                               num_warps=min(max(block // 256, 1), 16))
    return y, h


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, out_ptr,
                    stride_q, stride_k, stride_v, stride_tab, stride_cb, stride_cs, per_row,
                    HQ, HKV, D: tl.constexpr, HALF: tl.constexpr):
    """Program (b, h): h < HQ rotates query head h of token b into out[b, h]; otherwise it rotates
    key head h - HQ into k_cache[c, pos] and copies value head h - HQ into v_cache[c, pos], pos =
    positions[b], c = b // per_row (per_row consecutive tokens share a cache row). Rotation
    x·cos + rotate_half(x)·sin in fp32, rounded once."""
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
    if h < HQ:
        src = q_ptr + b * stride_q + h * D
        dst = out_ptr + (b * HQ + h) * D
    else:
        kh = h - HQ
        src = k_ptr + b * stride_k + kh * D
        dst = kc_ptr + row * stride_cb + pos * stride_cs + kh * D
        v1 = tl.load(v_ptr + b * stride_v + kh * D + i, mask=mask)
        v2 = tl.load(v_ptr + b * stride_v + kh * D + D // 2 + i, mask=mask)
        vdst = vc_ptr + row * stride_cb + pos * stride_cs + kh * D
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
    """q [M, Hq, D], k/v [M, Hkv, D] (heads and dims contiguous, rows strided), cos/sin [S, D],
    positions int32 [M], caches [B, S_max, Hkv, D] contiguous in (Hkv, D), M a multiple of B:
    token m goes to cache row m // (M // B). -> rotated q."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    if b:
        _rope_kv_kernel[(b, hq + hkv)](q, k, v, cos, sin, positions, k_cache, v_cache, out,
                                       q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
                                       k_cache.stride(0), k_cache.stride(1), b // k_cache.shape[0], hq, hkv, D=d,
                                       HALF=triton.next_power_of_2(d // 2), num_warps=1)
    return out


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, stride_g, stride_u, N, BLOCK: tl.constexpr):
    """out = silu(g) · u = g / (1 + exp(-g)) · u in fp32, rounded once."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    out = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * N + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate, up):
    """gate/up [M, N] (rows may be strided, columns contiguous) -> [M, N] contiguous."""
    m, n = gate.shape
    out = torch.empty((m, n), dtype=gate.dtype, device=gate.device)
    if m and n:
        block = min(triton.next_power_of_2(n), 1024)  # an 11008-wide row spreads over 11 programs
        _silu_mul_kernel[(m, triton.cdiv(n, block))](gate, up, out, gate.stride(0), up.stride(0), n, BLOCK=block,
                                                     num_warps=4)
    return out
