"""Triton kernels of SiLU·mul (the SwiGLU of a Llama MLP): forward and backward, elementwise.

Forward: out = silu(g) · u = g / (1 + exp(-g)) · u. Backward, with s = 1 / (1 + exp(-g)):
dg = dout · u · s · (1 + g · (1 − s)), du = dout · g · s. All fp32, each result rounded once.
Gate and up may be the two halves of one fused [M, 2N] projection (strided rows); with
fused=True the backward writes [dg | du] into one [M, 2N] tensor, the gradient of that projection.

Config (fixed, no autotuning): a program covers BLOCK columns of one row, so an 11008-wide row
spreads over 11 programs; see `block_config`, which the compile-facts test reads too.
"""
import torch
import triton
import triton.language as tl


def block_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of n elements."""
    return min(triton.next_power_of_2(n), 1024), 4


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


@triton.jit
def _silu_mul_bwd_kernel(do_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, stride_do, stride_g, stride_u, stride_d, N,
                         BLOCK: tl.constexpr):
    """dg = dout · u · s · (1 + g · (1 − s)), du = dout · g · s, s = sigmoid(g), in fp32; dg and du
    share the row stride stride_d (two tensors, or the halves of one)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    do = tl.load(do_ptr + row * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    dg = do * u * s * (1.0 + g * (1.0 - s))
    du = do * g * s
    tl.store(dg_ptr + row * stride_d + cols, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + row * stride_d + cols, du.to(du_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate, up):
    """gate/up [M, N] (rows may be strided, columns contiguous) -> [M, N] contiguous."""
    m, n = gate.shape
    out = torch.empty((m, n), dtype=gate.dtype, device=gate.device)
    if m and n:
        block, warps = block_config(n)
        _silu_mul_kernel[(m, triton.cdiv(n, block))](gate, up, out, gate.stride(0), up.stride(0), n, BLOCK=block,
                                                     num_warps=warps)
    return out


def silu_mul_backward(dout, gate, up, fused=False):
    """(dgate, dup) [M, N] each, or with fused=True one [M, 2N] tensor [dgate | dup]; inputs [M, N]
    with strided rows allowed."""
    m, n = gate.shape
    if fused:
        grads = torch.empty((m, 2 * n), dtype=gate.dtype, device=gate.device)
        dg, du = grads[:, :n], grads[:, n:]
    else:
        dg, du = (torch.empty((m, n), dtype=gate.dtype, device=gate.device) for _ in range(2))
    if m and n:
        block, warps = block_config(n)
        _silu_mul_bwd_kernel[(m, triton.cdiv(n, block))](dout, gate, up, dg, du, dout.stride(0), gate.stride(0),
                                                         up.stride(0), dg.stride(0), n, BLOCK=block, num_warps=warps)
    return grads if fused else (dg, du)
