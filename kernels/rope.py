"""Triton kernel of rotary embeddings for training: the q and k heads of one fused QKV projection
rotated at packed position ids, forward and backward in one kernel.

Forward, token t at position p = positions[t], head x = (x1, x2) (the two halves of D):
    out1 = x1 · cos[p, :D/2] − x2 · sin[p, :D/2],   out2 = x2 · cos[p, D/2:] + x1 · sin[p, D/2:]
(rotate-half), q and k heads of the fused row rotated, v heads copied: the row [q | k | v] of
qkv [T, (Hq + 2·Hkv)·D] becomes q [T, Hq, D], k and v [T, Hkv, D]. Backward: the transposed
rotation, dx1 = dy1 · cos1 + dy2 · sin2, dx2 = dy2 · cos2 − dy1 · sin1, from dq, dk and dv back
into one fused row (the gradient of the QKV projection's output). fp32, rounded once.

Config (fixed, no autotuning): a program covers one token and BLOCK_H heads, ~1024 elements per
half; see `rope_config`, which the compile-facts test reads too.
"""
import torch
import triton
import triton.language as tl


def rope_config(heads: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_H, HALF, num_warps) for `heads` heads of size d per token."""
    half = triton.next_power_of_2(d // 2)
    block_h = min(triton.next_power_of_2(heads), max(1024 // half, 1))
    return block_h, half, 4 if block_h * half >= 512 else 1


@triton.jit
def _rope_qkv_kernel(fused_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, stride_fused, stride_tab,
                     HQ, HKV, D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                     BACKWARD: tl.constexpr):
    """Program (t, block of heads): heads h < HQ are q heads, then HKV k heads, then HKV v heads.
    Forward reads the fused row and writes q/k/v; BACKWARD reads dq/dk/dv and writes the fused row."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, HALF)
    is_q = heads < HQ
    is_k = (heads >= HQ) & (heads < HQ + HKV)
    is_v = (heads >= HQ + HKV) & (heads < HQ + 2 * HKV)
    cols = i < D // 2
    pos = tl.load(pos_ptr + t).to(tl.int64)
    c1 = tl.load(cos_ptr + pos * stride_tab + i, mask=cols, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + pos * stride_tab + D // 2 + i, mask=cols, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + pos * stride_tab + i, mask=cols, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + pos * stride_tab + D // 2 + i, mask=cols, other=0.0).to(tl.float32)[None, :]
    fused = fused_ptr + t * stride_fused + heads[:, None] * D + i[None, :]
    q = q_ptr + (t * HQ + heads[:, None]) * D + i[None, :]
    k = k_ptr + (t * HKV + heads[:, None] - HQ) * D + i[None, :]
    v = v_ptr + (t * HKV + heads[:, None] - HQ - HKV) * D + i[None, :]
    mq, mk, mv = is_q[:, None] & cols[None, :], is_k[:, None] & cols[None, :], is_v[:, None] & cols[None, :]
    rotate = (is_q | is_k)[:, None]
    if BACKWARD:
        x1 = tl.where(mq, tl.load(q, mask=mq), tl.where(mk, tl.load(k, mask=mk), tl.load(v, mask=mv))).to(tl.float32)
        x2 = tl.where(mq, tl.load(q + D // 2, mask=mq),
                      tl.where(mk, tl.load(k + D // 2, mask=mk), tl.load(v + D // 2, mask=mv))).to(tl.float32)
        o1 = tl.where(rotate, x1 * c1 + x2 * s2, x1)
        o2 = tl.where(rotate, x2 * c2 - x1 * s1, x2)
        m = mq | mk | mv
        tl.store(fused, o1.to(fused_ptr.dtype.element_ty), mask=m)
        tl.store(fused + D // 2, o2.to(fused_ptr.dtype.element_ty), mask=m)
    else:
        m = mq | mk | mv
        x1 = tl.load(fused, mask=m).to(tl.float32)
        x2 = tl.load(fused + D // 2, mask=m).to(tl.float32)
        o1 = tl.where(rotate, x1 * c1 - x2 * s1, x1).to(q_ptr.dtype.element_ty)
        o2 = tl.where(rotate, x2 * c2 + x1 * s2, x2).to(q_ptr.dtype.element_ty)
        tl.store(q, o1, mask=mq)
        tl.store(q + D // 2, o2, mask=mq)
        tl.store(k, o1, mask=mk)
        tl.store(k + D // 2, o2, mask=mk)
        tl.store(v, o1, mask=mv)
        tl.store(v + D // 2, o2, mask=mv)


def _launch(fused, q, k, v, positions, cos, sin, backward: bool) -> None:
    t, hq, d = q.shape
    hkv = k.shape[1]
    if not t:
        return
    block_h, half, warps = rope_config(hq + 2 * hkv, d)
    grid = (t, triton.cdiv(hq + 2 * hkv, block_h))
    _rope_qkv_kernel[grid](fused, q, k, v, positions, cos, sin, fused.stride(0), cos.stride(0), hq, hkv, D=d,
                           HALF=half, BLOCK_H=block_h, BACKWARD=backward, num_warps=warps)


def rope_qkv(qkv, positions, cos, sin, num_heads, num_kv_heads):
    """qkv [T, (Hq + 2·Hkv)·D] (rows may be strided, columns contiguous), positions int [T], tables
    [S, D] with contiguous rows -> (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) contiguous."""
    t = qkv.shape[0]
    d = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    q = torch.empty((t, num_heads, d), dtype=qkv.dtype, device=qkv.device)
    k, v = (torch.empty((t, num_kv_heads, d), dtype=qkv.dtype, device=qkv.device) for _ in range(2))
    _launch(qkv, q, k, v, positions, cos, sin, backward=False)
    return q, k, v


def rope_qkv_backward(dq, dk, dv, positions, cos, sin):
    """dq [T, Hq, D], dk/dv [T, Hkv, D] contiguous -> the gradient of qkv [T, (Hq + 2·Hkv)·D]."""
    t, hq, d = dq.shape
    dqkv = torch.empty((t, (hq + 2 * dk.shape[1]) * d), dtype=dq.dtype, device=dq.device)
    _launch(dqkv, dq, dk, dv, positions, cos, sin, backward=True)
    return dqkv
