"""Device helpers shared by the attention kernels: sequence bounds, causal ranges, masked tiles."""
import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _seq_bounds(cu_q, cu_k, b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(start_q, len_q, start_k, len_k) of sequence b: packed offsets or 0/full lengths."""
    if IS_VARLEN:
        start_q = tl.load(cu_q + b)
        len_q = tl.load(cu_q + b + 1) - start_q
        start_k = tl.load(cu_k + b)
        len_k = tl.load(cu_k + b + 1) - start_k
    else:
        start_q = 0
        len_q = seqlen_q
        start_k = 0
        len_k = seqlen_k
    return start_q, len_q, start_k, len_k


@triton.jit
def _query_head(bh, cu_q, cu_k, n_heads_q, group, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(b as int64, h, hk, start_q, len_q, start_k, len_k) of the (batch x query head) index bh:
    its sequence's bounds and the kv head its query head reads (GQA group `group`)."""
    b = bh // n_heads_q
    h = bh % n_heads_q
    start_q, len_q, start_k, len_k = _seq_bounds(cu_q, cu_k, b, seqlen_q, seqlen_k, IS_VARLEN)
    return b.to(tl.int64), h, h // group, start_q, len_q, start_k, len_k


@triton.jit
def _causal_ranges(m0, len_q, len_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key-block ranges for query rows [m0, m0+BLOCK_M): [0, full) needs no mask, [full, end) does.

    Causal rows see keys j <= i + len_k - len_q; blocks past the last visible key are skipped.
    """
    full_k = len_k // BLOCK_N * BLOCK_N
    if CAUSAL:
        off = len_k - len_q
        end = tl.minimum(len_k, tl.maximum(m0 + BLOCK_M + off, 0))
        # a key block is visible to every row when its last key <= m0 + off
        full = tl.minimum(tl.maximum(m0 + off + 1, 0) // BLOCK_N * BLOCK_N, full_k)
    else:
        end = len_k
        full = full_k
    return full, end


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, zero outside rows < n_rows (if CHECK_ROWS) and d < HEAD_D.

    Masks are only emitted where needed: a mask that varies along d blocks vectorised loads.
    """
    if CHECK_ROWS:
        if HEAD_D == BLOCK_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_D), other=0.0)
    else:
        if HEAD_D == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_D, other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, offs_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a [rows, BLOCK_D] tile where rows < n_rows and d < HEAD_D."""
    if HEAD_D == BLOCK_D:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_D))


@triton.jit
def _heavy_first(CAUSAL: tl.constexpr):
    """Query-block index of this program. Causal blocks further down see more keys: launch them
    first so the short ones fill the tail of the last wave."""
    if CAUSAL:
        return tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        return tl.program_id(0)


@triton.jit
def _first_nonfinite_row(v, rows):
    """[BLOCK_D]: per column of the tile v, the smallest row index in `rows` holding NaN or +-inf
    (2**31 - 1 if none)."""
    finite = tl.abs(v) < float("inf")  # False for NaN and +-inf
    return tl.min(tl.where(finite, 2147483647, rows[:, None]), 0)


@triton.jit
def _causal_safe_values(v, cols, offs_m, causal_off):
    """(v with non-finite entries zeroed, [BLOCK_M, BLOCK_D] mask of elements that see one).

    In a diagonal block a key j is invisible to some rows (j > i + off): P = 0 there, but the
    dot's 0 * NaN would still poison them, so non-finite values are taken out of the product.
    Rows see a prefix of the keys, so element (i, d) saw a non-finite value iff the first
    non-finite row of column d is visible to row i; those elements become NaN (contract 1).
    Keys past len_k were loaded as 0 and never count."""
    seen_bad = _first_nonfinite_row(v, cols)[None, :] <= offs_m[:, None] + causal_off
    return tl.where(tl.abs(v) < float("inf"), v, 0.0), seen_bad


# --------------------------------------------------------------------------------------------
# Host-side helpers of the launchers
# --------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634  # scores are pre-multiplied by scale * log2(e) so the kernels use exp2


def block_d_for(head_dim):
    if head_dim > 256:
        raise ValueError(f"head_dim must be <= 256 for the triton attention kernels, got {head_dim}")
    return max(16, triton.next_power_of_2(head_dim))


def check_runnable(q):
    # The interpreter's tl.dot on bf16 returns garbage: refuse rather than answer wrongly.
    if triton.knobs.runtime.interpret and q.dtype == torch.bfloat16:
        raise TypeError("bfloat16 attention does not run in the Triton interpreter (TRITON_INTERPRET=1); "
                        "use float16/float32 on the CPU or run on a CUDA GPU")


def dot_precision(dtype):
    # fp32 inputs get exact fp32 dots (tf32 would miss the fp32 tolerance); 16-bit dtypes ignore it
    return "ieee" if dtype == torch.float32 else "tf32"


def last_dim_contiguous(t):
    # Autograd may hand a broadcast gradient (stride(-1) == 0); the kernels need unit stride there.
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def num_sms(device_index):
    if triton.knobs.runtime.interpret:
        return 8  # small, so CPU tests still exercise several splits
    return torch.cuda.get_device_properties(device_index).multi_processor_count
