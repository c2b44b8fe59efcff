"""Attention forward for Hopper (sm_90): TMA descriptors, 128x128 tiles, persistent.

Same maths, layouts and non-finite rule as kernels/attention_fwd.py (see kernels/attention.py);
what differs is how the work reaches the tensor cores:
  - Q/K/V tiles are read and O tiles written through device-side tensor descriptors
    (tl.make_tensor_descriptor), which lower to TMA copies, pipelined by the software pipeliner
    (num_stages). A descriptor spans one sequence of one head, so rows past the sequence
    (another packed sequence, the tensor's end) are filled with zeros by the hardware and never read.
  - 128 query rows x 128 keys per step for head_dim <= 128 on 8 warps: two warpgroups of 64 rows
    whose warpgroup MMAs (wgmma) and softmax interleave on the SM.
  - Key blocks every row of the tile sees completely (_causal_ranges' `full`) take the plain
    path: no mask, no bookkeeping. Only the diagonal and ragged blocks (at most two 128-key
    blocks, walked in 64-key steps to bound the registers) are masked, and only there are
    non-finite values taken out of the P V product: each column's first non-finite key row is
    tracked in the loop and the elements whose row sees it become NaN after it (contract 1).
    In full blocks a non-finite value is visible to every row and propagates by itself.
  - The grid is persistent: one program per SM walks the (query block, batch x head) tiles,
    causal ones heaviest first.
Used when the installed Triton has these features (available()) and the strides suit TMA
(tma_compatible()); the launcher falls back to the pointer-load kernel otherwise, and checks this
kernel against it once per kind of call (kernels/attention.py, _sm90_forward).

What Triton 3.6 / 3.9 let us build here (compile facts, tests/test_compile_facts.py):
  - Warp specialisation (tl.range(warp_specialize=True)) takes one loop: with a second key loop
    after it Triton 3.9's NVGPUWarpSpecialization pass fails an assertion, with the edge blocks
    as straight-line code it silently drops the specialisation (and spills 870-1950 B at
    128x128), and a single specialised loop masks and books every block (the previous form of
    this kernel, 128x64 at most). The split form without it compiles spill-free on both versions.
  - wgmma.wait_group N >= 1 inside the loop is out of reach from tl.dot: Triton's wgmma
    pipeliner (WGMMAPipeline.cpp, asyncLaunchDots) keeps a dot in flight only if its result feeds
    nothing but the loop's yield or the next dot's accumulator; Q K^T feeds the softmax and
    P V's A operand is P in registers with its accumulator rescaled by alpha, so both get
    wait_group 0, and any wait 0 in the loop suppresses the deeper waits.
"""
import functools

import torch
import triton
import triton.language as tl

from .attention_common import _causal_ranges, _first_nonfinite_row, _query_head
from .attention_configs import FWD_SM90, autotune


@functools.lru_cache(maxsize=None)
def available():
    """True if this Triton has device tensor descriptors and an allocator hook for them."""
    return hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


def tma_compatible(*tensors):
    """TMA needs 16-byte aligned bases and row/head/batch strides that are multiples of 16 bytes."""
    return all(t.data_ptr() % 16 == 0 and all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])
               for t in tensors)


def _workspace(size, alignment, stream):
    # global scratch for the descriptors the kernel builds (a few hundred bytes per program)
    return torch.empty(size, dtype=torch.int8, device="cuda")


def set_descriptor_allocator():
    """Device-side descriptors need a Triton allocator; install a torch one unless the caller set
    their own. Allocating through torch keeps the launch CUDA-graph capturable."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    if current is None or isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(_workspace)


@triton.jit
def _plain_blocks(acc, l_i, m_i, q, k_desc, v_desc, hi, qk_scale, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over key blocks [0, hi) that every row of the tile sees completely."""
    for start_n in tl.range(0, hi, BLOCK_N):
        qk = tl.dot(q, k_desc.load([start_n, 0]).T, input_precision=DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # finite: every row sees every key here
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _edge_blocks(acc, l_i, m_i, q, k_desc, v_desc, lo, hi, len_k, offs_m, causal_off, qk_scale,
                 EDGE_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over the diagonal and ragged keys [lo, hi), EDGE_N at a time: keys past
    len_k and (causal) after a row's own position are masked, non-finite values are replaced by
    0 in P V and each column's first non-finite key row is tracked; rows that see that key get
    NaN in that column at the end (contract 1)."""
    offs_n = tl.arange(0, EDGE_N)
    first_bad = tl.full([BLOCK_D], 2147483647, dtype=tl.int32)
    for start_n in tl.range(lo, hi, EDGE_N):
        cols = start_n + offs_n
        qk = tl.dot(q, k_desc.load([start_n, 0]).T, input_precision=DOT_PREC)
        visible = cols[None, :] < len_k
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + causal_off)
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key keeps m = -inf
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([start_n, 0])  # rows past len_k are zeros
        if CAUSAL:
            first_bad = tl.minimum(first_bad, _first_nonfinite_row(v, cols))
            v = tl.where(tl.abs(v) < float("inf"), v, 0.0).to(v.dtype)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    if CAUSAL:
        acc = tl.where(first_bad[None, :] <= offs_m[:, None] + causal_off, float("nan"), acc)
    return acc, l_i, m_i


@autotune(FWD_SM90)
@triton.jit
def _attn_fwd_tma_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_heads_q, group, qk_scale, n_seq,
    tune_q, tune_k, tune_bh,  # autotuning key only (attention_configs.tune_buckets)
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = softmax(s Q K^T) V and lse for every (query block, batch x head) tile; fp32 softmax
    statistics and accumulator. qk_scale = s * log2(e) > 0: the running max m is kept in scaled
    units, so p = exp2(qk * qk_scale - m) is one FMA per score. Full key blocks first
    (_plain_blocks), then the diagonal and ragged ones in half-width steps (_edge_blocks)."""
    EDGE_N: tl.constexpr = BLOCK_N // 2
    n_m = tl.cdiv(seqlen_q, BLOCK_M)
    n_bh = n_seq * n_heads_q
    for tile in tl.range(tl.program_id(0), n_m * n_bh, tl.num_programs(0), flatten=False):
        pid_m = tile // n_bh
        if CAUSAL:
            pid_m = n_m - 1 - pid_m  # heavy first: later query blocks see more keys
        b64, h, hk, start_q, len_q, start_k, len_k = _query_head(tile % n_bh, CU_Q, CU_K, n_heads_q, group,
                                                                  seqlen_q, seqlen_k, IS_VARLEN)
        q_desc = tl.make_tensor_descriptor(Q + b64 * stride_qb + start_q.to(tl.int64) * stride_qm + h * stride_qh,
                                           shape=[len_q, HEAD_D], strides=[stride_qm, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        k_base = K + b64 * stride_kb + start_k.to(tl.int64) * stride_kn + hk * stride_kh
        v_base = V + b64 * stride_vb + start_k.to(tl.int64) * stride_vn + hk * stride_vh
        k_desc = tl.make_tensor_descriptor(k_base, shape=[len_k, HEAD_D], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[len_k, HEAD_D], strides=[stride_vn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        k_edge_desc = tl.make_tensor_descriptor(k_base, shape=[len_k, HEAD_D], strides=[stride_kn, 1],
                                                block_shape=[EDGE_N, BLOCK_D])
        v_edge_desc = tl.make_tensor_descriptor(v_base, shape=[len_k, HEAD_D], strides=[stride_vn, 1],
                                                block_shape=[EDGE_N, BLOCK_D])
        o_desc = tl.make_tensor_descriptor(O + b64 * stride_ob + start_q.to(tl.int64) * stride_om + h * stride_oh,
                                           shape=[len_q, HEAD_D], strides=[stride_om, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        causal_off = len_k - len_q
        full, end = _causal_ranges(m0, len_q, len_k, BLOCK_M, BLOCK_N, CAUSAL)
        end = tl.where(m0 < len_q, end, 0)  # a block past this sequence's end does nothing
        full = tl.minimum(full, end)

        q = q_desc.load([m0, 0])
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        acc, l_i, m_i = _plain_blocks(acc, l_i, m_i, q, k_desc, v_desc, full, qk_scale, BLOCK_N, DOT_PREC)
        acc, l_i, m_i = _edge_blocks(acc, l_i, m_i, q, k_edge_desc, v_edge_desc, full, end, len_k, offs_m,
                                     causal_off, qk_scale, EDGE_N, BLOCK_D, CAUSAL, DOT_PREC)

        empty = l_i == 0.0  # no visible key (len_k = 0, or causal rows before the first key): out = 0, lse = -inf
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        o_desc.store([m0, 0], out.to(O.dtype.element_ty))  # rows past len_q are clipped by the descriptor
        tl.store(LSE + b64 * stride_lb + h * stride_lh + start_q + offs_m, lse, mask=offs_m < len_q)
