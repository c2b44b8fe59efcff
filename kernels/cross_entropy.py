"""Triton fused linear + cross-entropy: loss and gradients without the [N, V] logits.

Maths, for hidden rows x [N, H], weight W [V, H], bias b [V], targets t [N]:
    z_n   = x_n Wᵀ + b                                (one chunk of C rows at a time, [C, V])
    lse_n = log Σ_v exp(z_nv)                         (fp32, online over BLOCK_V tiles)
    ℓ_n   = lse_n − z_{n,t_n}   for valid rows (t_n != ignore_index), 0 for ignored rows
    loss  = Σ ℓ_n  (reduction "sum")   or   Σ ℓ_n / max(#valid, 1)  ("mean")
    dz_n  = (softmax(z_n) − onehot(t_n)) · s,  s = 1 or 1/max(#valid, 1); 0 for ignored rows
    dx    = dz W,   dW = Σ_chunks dzᵀ x,   db = Σ_n dz_n

The loss is a scalar at the end of the graph, so (as Liger-Kernel does) the gradients are
computed in the forward pass, chunk by chunk: the chunk's logits come from one GEMM in the
input dtype (cuBLAS accumulates in fp32), the kernel below turns them in place into dz (fp32
arithmetic, one program per row, two passes over V), then two GEMMs give dx for the chunk and
add dzᵀx into an fp32 dW. Only one chunk of logits (C x V, C ~ N·H/V) ever exists. The #valid
count stays on the device (no host sync); the host loop over chunks depends on shapes only.
A target outside [0, V) that is not ignore_index (the ops layer rejects those where value checks
run) gives a NaN loss rather than reading outside the row.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, stride_row, target_ptr, loss_ptr, n_valid_ptr, V, ignore_index,
                               MEAN: tl.constexpr, GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row r of a logits chunk: loss_ptr[r] = lse − z_t (0 if ignored); with GRAD, the row is
    overwritten by dz = (softmax − onehot)·s in the logits dtype. fp32 throughout."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(target_ptr + row).to(tl.int64)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < V)
    cols = tl.arange(0, BLOCK_V)
    # Pass 1: per-lane running max m and Σ exp(z − m), and the target's logit. m starts finite so
    # that exp(m − m_new) never meets −inf − (−inf); a −inf logit contributes exp(−inf) = 0.
    m = tl.full([BLOCK_V], -1e30, tl.float32)
    acc = tl.zeros([BLOCK_V], tl.float32)
    z_target = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        v = start + cols
        z = tl.load(base + v, mask=v < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        acc = acc * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
        z_target += tl.where(v == target, z, 0.0)
    row_max = tl.max(m, axis=0)
    total = tl.sum(acc * tl.exp(m - row_max), axis=0)
    lse = row_max + tl.log(total)
    loss = lse - tl.sum(z_target, axis=0)
    loss = tl.where(ignored, 0.0, tl.where(in_range, loss, float("nan")))
    tl.store(loss_ptr + row, loss)
    if GRAD:
        scale = 1.0
        if MEAN:
            scale = 1.0 / tl.maximum(tl.load(n_valid_ptr).to(tl.float32), 1.0)
        scale = tl.where(ignored, 0.0, scale)
        # Pass 2: dz = (exp(z − lse) − [v == t]) · s, written over the logits.
        for start in range(0, V, BLOCK_V):
            v = start + cols
            z = tl.load(base + v, mask=v < V, other=0.0).to(tl.float32)
            g = (tl.exp(z - lse) - tl.where(v == target, 1.0, 0.0)) * scale
            tl.store(base + v, g.to(logits_ptr.dtype.element_ty), mask=v < V)


def default_chunk_size(n: int, hidden: int, vocab: int) -> int:
    """Rows per chunk, a power of two: at least Liger's rule (the chunk's logits about as large as
    the hidden rows [N, H]) and at least what fills 256 MiB of bf16 logits, at most 4096 rows.
    Each chunk re-reads and re-writes the fp32 dW (8·V·H bytes: 1.6 GB for Janus-Pro-1B's
    lm_head), so fewer, larger chunks move fewer bytes: 16 chunks instead of 32 at 16k tokens."""
    liger = triton.next_power_of_2(triton.cdiv(n, triton.cdiv(vocab, hidden)))
    by_bytes = 1 << max(0, ((256 << 20) // (2 * vocab)).bit_length() - 1)
    return max(1, min(4096, triton.next_power_of_2(n), max(liger, by_bytes)))


def _add_weight_grad(dw32: torch.Tensor, dz: torch.Tensor, x: torch.Tensor, product: list) -> None:
    """dw32 += dzᵀ x with the chunk's product kept in fp32. CUDA GEMMs take fp16/bf16 operands
    into an fp32 result directly (mm with out_dtype, into a buffer reused across chunks; addmm's
    out_dtype form would need dw32 in the operands' dtype); elsewhere the product is rounded to
    the operands' dtype once, then added."""
    if dz.dtype in (torch.float32, torch.float64):
        dw32.addmm_(dz.t(), x)
    elif dz.is_cuda:
        if not product:
            product.append(torch.empty_like(dw32))
        dw32.add_(torch.mm(dz.t(), x, out_dtype=torch.float32, out=product[0]))
    else:
        dw32.add_(dz.t() @ x)


def linear_cross_entropy(x, weight, bias, target, ignore_index, mean, input_grad, weight_grad, chunk_size):
    """(loss fp32 [], dx [N, H] or [0], dW fp32 [V, H] or [0], db fp32 [V] or [0]); see the module
    docstring. dx/dW/db are already scaled for `mean`: the backward only multiplies by dloss."""
    n, h = x.shape
    v = weight.shape[0]
    grad = input_grad or weight_grad
    valid = target != ignore_index
    n_valid = valid.sum()
    losses = torch.empty(n, dtype=torch.float32, device=x.device)
    dx = torch.empty((n, h) if input_grad else (0,), dtype=x.dtype, device=x.device)
    dw = torch.zeros((v, h) if weight_grad else (0,), dtype=torch.float32, device=x.device)
    db = torch.zeros((v,) if weight_grad and bias is not None else (0,), dtype=torch.float32, device=x.device)
    chunk = chunk_size or default_chunk_size(n, h, v)
    block_v = min(4096, triton.next_power_of_2(v))
    product = []  # the fp32 dzᵀx buffer of the CUDA path, allocated on first use
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        xc = x[start:end]
        logits = xc @ weight.t() if bias is None else torch.addmm(bias, xc, weight.t())
        _cross_entropy_rows_kernel[(end - start,)](
            logits, logits.stride(0), target[start:end], losses[start:end], n_valid, v, ignore_index,
            MEAN=bool(mean), GRAD=grad, BLOCK_V=block_v, num_warps=8)
        if input_grad:
            torch.mm(logits, weight, out=dx[start:end])
        if weight_grad:
            _add_weight_grad(dw, logits, xc, product)
            if bias is not None:
                db += logits.sum(0, dtype=torch.float32)
    loss = losses.sum()
    if mean:
        loss = loss / n_valid.clamp(min=1)
    return loss, dx, dw, db
