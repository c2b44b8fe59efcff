"""Triton kernels of Llama RMSNorm, optionally fused with the residual add before it: forward and
backward. All statistics are fp32; each result is rounded once to its dtype.

Forward, row i: h = x + r (rounded to the dtype, as torch adds), n = h / sqrt(mean(h²) + eps),
rounded to the dtype before the weight (the Llama convention), y = round(n · w).
Backward, with rstd = 1 / sqrt(mean(h²) + eps) recomputed from h (the kernel reads the row anyway):
    g = dy · w,   dh = rstd · (g − n · mean(g · n)) + dh_in,   dw = Σ_rows dy · n
(n unrounded, in fp32). dh_in is the gradient reaching h itself (the next residual), so one launch
gives the gradient of x and of the residual. dw: each program sums its block of rows into one fp32
partial row; the partials are summed in a fixed order (deterministic: no atomics).

Configs are fixed by the row width (no autotuning): one program per row in the forward, a whole
row in registers; see `row_config`, which the compile-facts test reads too.
"""
import torch
import triton
import triton.language as tl


def row_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of n elements: the row rounded up to a power of two, about 8
    elements per thread (2048 columns: 8 warps)."""
    block = triton.next_power_of_2(n)
    return block, min(max(block // 256, 1), 16)


def _sm_count(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def backward_programs(m: int, device: torch.device) -> int:
    """Programs of the backward: two per SM on a GPU (each keeps one fp32 partial dw row), a few
    in the interpreter."""
    sms = _sm_count(device)
    return max(min(m, 2 * sms if sms else 4), 1)


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


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, h_ptr, w_ptr, dh_in_ptr, dh_ptr, dw_part_ptr, stride_dy, stride_h, stride_dh_in,
                         M, N, eps, rows_per_program,
                         HAS_DH_IN: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """Rows [pid·rows_per_program, ...): dh = rstd · (g − n · mean(g · n)) (+ dh_in), g = dy · w,
    n = h · rstd, all fp32; the program's Σ dy · n goes to row pid of the fp32 partials."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program  # an int64 loop: row * stride never overflows
    end = tl.minimum(start + rows_per_program, M)
    for row in range(start, end):
        h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / N + eps)
        n = h * rstd
        g = dy * w
        dh = rstd * (g - n * (tl.sum(g * n, axis=0) / N))
        if HAS_DH_IN:
            dh += tl.load(dh_in_ptr + row * stride_dh_in + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dh_ptr + row * N + cols, dh.to(dh_ptr.dtype.element_ty), mask=mask)
        if WEIGHT_GRAD:
            dw += dy * n
    if WEIGHT_GRAD:
        tl.store(dw_part_ptr + pid * N + cols, dw, mask=mask)


def rms_norm(x, weight, eps, residual=None):
    """(y, h) for x [M, N] (rows may be strided, columns contiguous); h is None without residual."""
    m, n = x.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h = torch.empty((m, n), dtype=x.dtype, device=x.device) if residual is not None else None
    if m:
        block, warps = row_config(n)
        _rms_norm_kernel[(m,)](x, residual if residual is not None else x, weight, y, h if h is not None else y,
                               x.stride(0), (residual if residual is not None else x).stride(0), n, float(eps),
                               HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=warps)
    return y, h


def rms_norm_backward(dy, h, weight, eps, dh_in=None, weight_grad=True):
    """(dh [M, N] in h's dtype, dw [N] in weight's dtype, or an empty tensor without weight_grad)
    for dy/h/dh_in [M, N] (rows may be strided, columns contiguous)."""
    m, n = h.shape
    dh = torch.empty((m, n), dtype=h.dtype, device=h.device)
    programs = backward_programs(m, h.device)
    rows = triton.cdiv(m, programs)
    programs = triton.cdiv(m, rows) if m else 0
    partial = torch.empty((programs, n) if weight_grad else (0,), dtype=torch.float32, device=h.device)
    if m:
        block, warps = row_config(n)
        _rms_norm_bwd_kernel[(programs,)](dy, h, weight, dh_in if dh_in is not None else dy, dh, partial,
                                          dy.stride(0), h.stride(0), (dh_in if dh_in is not None else dy).stride(0),
                                          m, n, float(eps), rows, HAS_DH_IN=dh_in is not None,
                                          WEIGHT_GRAD=weight_grad, BLOCK=block, num_warps=warps)
    if not weight_grad:
        return dh, partial
    dw = partial.sum(0) if m else torch.zeros(n, dtype=torch.float32, device=h.device)
    return dh, dw.to(weight.dtype)
