"""Attention forward for Hopper (sm_90): TMA descriptors, warp specialisation, persistent.

Same maths, layouts and non-finite rule as kernels/attention_fwd.py (see kernels/attention.py);
what differs is how the work reaches the tensor cores:
  - Q/K/V tiles are read and O tiles written through device-side tensor descriptors
    (tl.make_tensor_descriptor), which lower to TMA copies. A descriptor spans one sequence of one
    head, so rows past the sequence (another packed sequence, the tensor's end) are filled with
    zeros by the hardware and never read.
  - The key loop is marked warp_specialize=True: Triton splits it into a TMA producer and
    consumer warpgroups that overlap the softmax of one tile with the tensor-core work of another
    (needs num_warps=4). Causal attention is the same single loop with the mask on every block.
  - The grid is persistent: one program per SM walks the (query block, batch x head) tiles,
    causal ones heaviest first.
Used when the installed Triton has these features (available()) and the strides suit TMA
(tma_compatible()); the launcher falls back to the pointer-load kernel otherwise.

Causal contract 1 and Triton 3.9's warp-specialisation pass (NVGPUWarpSpecialization). Hidden
values of a diagonal block must stay out of P V (0 * NaN = NaN) while a visible NaN propagates.
Forms tried (D128 dense, 128x64, 4 warps, 2 stages; compiles that succeeded / compiles, the same
source giving different results from run to run: the pass is not deterministic on them):
  - the pointer kernel's _causal_safe_values in the loop (one V tile zeroed where non-finite and
    reduced to each column's first non-finite row) 1/8; the select where(|v| < inf, v, 0) alone
    1/8 in bf16, 3/8 through fp32, 0/1 as (v - v) == 0; a second full-size load of V for the
    check (merged with the first by the compiler) 1/6;
  - stand-ins without a compare, min(max(v, -big), big), with the first-bad-row tracking on the
    same tile 1/5 (from v - stand-in) and 1/5 (from v * 0); stand-ins with bounds that vary per
    block 0/4 or per key row 0/4 and 0/3, a select between v and its stand-ins 0/3 (per block
    and per key row);
  - a select on V by key index only 6/6 and stand-ins with constant bounds 6/6: reading V in
    registers is accepted, as long as the P V operand's tile has one use;
  - a separate diagonal loop after the specialised one (round one): rejected for varlen and D256.
What ships: compare-free stand-ins for the P V operand (first min/max with constant bounds,
now integer bit operations: _finite_stand_ins, the same on the GPU and in Triton 3.6's interpreter,
whose NaN-dropping max propagates NaN), and the tracking on a second load through a half-height
descriptor (two tiles per block, which the compiler cannot merge with the operand's): 4/4 for
every shipped causal config, dense and varlen (D64 3/3), and tests/test_compile_facts.py compiles
the causal configs on every run, on Triton 3.6 and 3.9. Its price, unmeasured here:
V is read twice from L2 per block and each consumer reduces a [BLOCK_N, BLOCK_D] tile per block.

Every block rescales the accumulator: skipping it when no row's max grew needs a branch on the
accumulator inside the loop, and with one Triton 3.9 silently drops warp specialisation for every
shipped config (no TMA pipeline split, 2 instead of 4 warpgroup MMAs) and spills 128 B (non-causal)
/ 312 B (causal) at 128x64; without a branch the multiply by alpha = 1 would still be done.
"""
import functools
import inspect

import torch
import triton
import triton.language as tl

from .attention_common import _causal_ranges, _finite_stand_ins, _first_nonfinite_row, _query_head
from .attention_configs import FWD_SM90, autotune


@functools.lru_cache(maxsize=None)
def available():
    """True if this Triton has device tensor descriptors, an allocator hook and warp_specialize."""
    return (hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")
            and "warp_specialize" in inspect.signature(tl.range.__init__).parameters)


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
    units, so p = exp2(qk * qk_scale - m) is one FMA per score.

    Causal: one loop over the visible key blocks, the mask applied to the scores of every block.
    Contract 1 in the same loop without a compare on the tile that feeds P V (the form the
    warp-specialisation pass compiles, see the module docstring): that tile's NaN/inf are
    replaced by finite stand-ins (_finite_stand_ins), so a hidden value meets P = 0 and adds
    exactly 0; a second load of the block (two half-height tiles, so the compiler keeps it apart
    from the P V operand) finds each column's first non-finite row, and an element (i, d) whose
    row sees that key becomes NaN, as the unmodified product would have made it."""
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
        k_desc = tl.make_tensor_descriptor(K + b64 * stride_kb + start_k.to(tl.int64) * stride_kn + hk * stride_kh,
                                           shape=[len_k, HEAD_D], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_base = V + b64 * stride_vb + start_k.to(tl.int64) * stride_vn + hk * stride_vh
        v_desc = tl.make_tensor_descriptor(v_base, shape=[len_k, HEAD_D], strides=[stride_vn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        if CAUSAL:
            v_half_desc = tl.make_tensor_descriptor(v_base, shape=[len_k, HEAD_D], strides=[stride_vn, 1],
                                                    block_shape=[BLOCK_N // 2, BLOCK_D])
        o_desc = tl.make_tensor_descriptor(O + b64 * stride_ob + start_q.to(tl.int64) * stride_om + h * stride_oh,
                                           shape=[len_q, HEAD_D], strides=[stride_om, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        causal_off = len_k - len_q
        _, end = _causal_ranges(m0, len_q, len_k, BLOCK_M, BLOCK_N, CAUSAL)
        end = tl.where(m0 < len_q, end, 0)  # a block past this sequence's end does nothing

        q = q_desc.load([m0, 0])
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for start_n in tl.range(0, end, BLOCK_N, warp_specialize=True):
            cols = start_n + offs_n
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])  # rows past len_k are zeros: P V reads nothing past the sequence
            qk = tl.dot(q, k.T, input_precision=DOT_PREC)
            visible = cols[None, :] < len_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + causal_off)
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            if CAUSAL:
                # a row that sees no key (yet) keeps m = -inf; subtract 0 instead (no NaN)
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_sub = m_new  # finite: every block has a key
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            if CAUSAL:
                acc = tl.dot(p.to(v.dtype), _finite_stand_ins(v), acc * alpha[:, None], input_precision=DOT_PREC)
                half = start_n + tl.arange(0, BLOCK_N // 2)
                first_bad = tl.minimum(_first_nonfinite_row(v_half_desc.load([start_n, 0]), half),
                                       _first_nonfinite_row(v_half_desc.load([start_n + BLOCK_N // 2, 0]),
                                                            half + BLOCK_N // 2))
                acc = tl.where(first_bad[None, :] <= offs_m[:, None] + causal_off, float("nan"), acc)
            else:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
            m_i = m_new

        empty = l_i == 0.0  # no visible key (len_k = 0, or causal rows before the first key): out = 0, lse = -inf
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        o_desc.store([m0, 0], out.to(O.dtype.element_ty))  # rows past len_q are clipped by the descriptor
        tl.store(LSE + b64 * stride_lb + h * stride_lh + start_q + offs_m, lse, mask=offs_m < len_q)
