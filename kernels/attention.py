"""Triton attention launchers: fused forward/backward (dense and packed varlen) and flash-decoding.

Kernels, one idea per file: attention_fwd (FlashAttention-2, pointer loads), attention_fwd_sm90
(Hopper: TMA, 128x128 tiles, masks on edge blocks only, persistent), attention_bwd (fused 5-GEMM with
atomic dQ; deterministic split kernels), attention_decode (flash-decoding), attention_configs
(per-architecture tiles, autotune key), attention_common (shared device and host helpers).

Maths (per batch b, query head h, kv head g = h // (Hq // Hkv), scale s):
    S = s * Q K^T            (causal: key j visible to query i iff j <= i + Sk - Sq, bottom-right aligned)
    lse_i = log sum_j exp(S_ij)          (natural log; -inf for a row with no visible key)
    O = softmax(S) V                     (a row with no visible key gives 0)
Backward, with P = exp(S - lse) and delta_i = sum_d dO_id O_id:
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = s dS K,   dK = s dS^T Q
dK/dV of a kv head are summed over the query heads of its group.

All softmax statistics and all accumulators are fp32; the matmul inputs stay in the input dtype
(bf16/fp16 use tensor cores; fp32 is computed with ieee dots, for the interpreter and as an oracle).
Scores are pre-multiplied by s*log2(e) so the kernels use exp2; lse is converted back to natural log.

One set of kernels serves dense and varlen: a dense tensor [B, S, H, D] is addressed with its batch
stride and sequence starts at 0; a packed tensor [total, H, D] has batch stride 0 and takes each
sequence's start and length from cu_seqlens. Programs past a sequence's end exit at once.

Layouts follow the ops contract (janus_fast/ops/reference.py): dense q [B, Sq, Hq, D],
k/v [B, Sk, Hkv, D], lse [B, Hq, Sq]; varlen q [total_q, Hq, D], lse [Hq, total_q];
decode q [B, Hq, D], caches [B, S_max, Hkv, D]. Any strides with stride(-1) == 1 are accepted.
Outputs are allocated with torch.empty: every element is written by a kernel.

Non-finite inputs (the ops contract): NaN in a visible score or value propagates as in SDPA's
math path; keys a row cannot see never reach its result: keys past a sequence's end are loaded
as 0 and causally hidden scores are replaced by -inf; hidden values in a diagonal block are
kept out of the P V product (_causal_safe_values; the sm_90 kernel's _edge_blocks).
"""
import itertools
import warnings

import torch
import triton
from triton.runtime.errors import OutOfResources, PTXASError

from . import attention_fwd_sm90 as fwd_sm90
from .attention_bwd import (
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_bwd_fused_kernel,
    _bwd_delta_kernel,
    _bwd_dq_convert_kernel,
)
from .attention_common import (
    LOG2E,
    block_d_for,
    check_runnable,
    dot_precision,
    last_dim_contiguous,
    num_sms,
)
from .attention_configs import FWD_SM90, arch, delta_block_m, rows, tag, tune_buckets
from .attention_decode import decode_attention
from .attention_fwd import _attn_fwd_kernel

__all__ = ["attention_forward", "attention_backward", "varlen_attention_forward", "varlen_attention_backward",
           "decode_attention"]


def _common_meta(q, causal):
    d = q.shape[-1]
    return dict(HEAD_D=d, BLOCK_D=block_d_for(d), CAUSAL=bool(causal), DOT_PREC=dot_precision(q.dtype))


def _on_hopper(q):
    return q.is_cuda and arch(q.device.index) == "sm90"


def _use_sm90_forward(q, k, v, out, causal, softmax_scale):
    """The TMA forward runs on Hopper for 16-bit inputs (head_dim <= 128) whose strides suit TMA,
    when the installed Triton has the features; everything else takes the pointer-load kernel."""
    return (_on_hopper(q) and q.element_size() == 2 and block_d_for(q.shape[-1]) <= 128  # see FWD_SM90
            and softmax_scale > 0 and fwd_sm90.available() and fwd_sm90.tma_compatible(q, k, v, out))


def _forward_launch(q, k, v, cu_q, cu_k, n_seq, max_q, max_k, causal, softmax_scale, varlen):
    """(out, lse, kernel arguments, constexprs) of a forward call; out and lse are empty."""
    hq, hkv = q.shape[-2], k.shape[-2]
    out = torch.empty_like(q)
    if varlen:
        lse = torch.empty((hq, q.shape[0]), device=q.device, dtype=torch.float32)
        qs, ks, vs, os_ = (0, *q.stride()[:2]), (0, *k.stride()[:2]), (0, *v.stride()[:2]), (0, *out.stride()[:2])
        ls = (0, lse.stride(0))
    else:
        lse = torch.empty((q.shape[0], hq, q.shape[1]), device=q.device, dtype=torch.float32)
        qs, ks, vs, os_ = q.stride()[:3], k.stride()[:3], v.stride()[:3], out.stride()[:3]
        ls = lse.stride()[:2]
    args = (q, k, v, out, lse, cu_q, cu_k, *qs, *ks, *vs, *os_, *ls, max_q, max_k, hq, hq // hkv,
            softmax_scale * LOG2E)
    meta = dict(**tune_buckets(max_q, max_k, n_seq * hq), IS_VARLEN=varlen, **_common_meta(q, causal))
    return out, lse, args, meta


def _run_pointer_forward(args, n_seq, max_q, meta):
    hq = args[-3]  # args end with (..., hq, group, qk_scale): _forward_launch
    _attn_fwd_kernel[lambda m: (triton.cdiv(max_q, m["BLOCK_M"]), n_seq * hq)](*args, **meta)


def _run_sm90_forward(args, n_seq, max_q, meta):
    fwd_sm90.set_descriptor_allocator()
    sms, hq = num_sms(args[0].device.index), args[-3]

    def persistent_grid(m):
        return (min(sms, triton.cdiv(max_q, m["BLOCK_M"]) * n_seq * hq),)

    fwd_sm90._attn_fwd_tma_kernel[persistent_grid](*args, n_seq, **meta)


# The sm_90 forward per kind of call (dtype, head dim, causal, varlen, GQA, one sequence): a
# reason in _SM90_FAILED once it failed to compile or disagreed with the pointer kernel (the
# pointer kernel serves that kind from then on); a kind and autotuning key in _SM90_CHECKED once
# it passed the self-check.
_SM90_FAILED = {}
_SM90_CHECKED = set()
_BUILD_ERRORS = (triton.CompilationError, OutOfResources, PTXASError, RuntimeError)


def _sm90_kind(args, n_seq, meta):
    q, group = args[0], args[-2]
    return q.dtype, meta["HEAD_D"], meta["CAUSAL"], meta["IS_VARLEN"], group == 1, n_seq == 1


def _out_of_memory(error):
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _sm90_forward(args, n_seq, max_q, meta):
    """Run the sm_90 forward when it is trusted for this kind of call; False when the caller must
    run the pointer kernel (which overwrites whatever this one wrote).

    Device-side TMA descriptors and Hopper's pipelining are young compiler paths whose output
    changes between Triton releases (the GPU machines run 3.6, CI compiles with 3.9) and wrong
    code is worse than slow code: the
    first launch of each kind and autotuning key in a process is followed by a self-check against
    the pointer kernel (_sm90_self_check, one host sync); a disagreement or a failure to compile
    warns once and hands that kind to the pointer kernel for good. A CUDA out-of-memory error
    only sends this call to the pointer kernel. Inside a CUDA graph capture, where the check
    cannot run, an unchecked kind takes the pointer kernel."""
    kind = _sm90_kind(args, n_seq, meta)
    if kind in _SM90_FAILED:
        return False
    several = len(rows(FWD_SM90, *tag(args[0], meta["BLOCK_D"]), meta["CAUSAL"])) > 1
    checked = (kind, meta["tune_q"], meta["tune_k"], meta["tune_bh"]) if several else kind  # the config it runs
    if checked not in _SM90_CHECKED and _capturing(args[0]):
        return False
    try:
        _run_sm90_forward(args, n_seq, max_q, meta)
        if checked not in _SM90_CHECKED:
            disagreement = _sm90_self_check(args, n_seq, meta)
            if disagreement:
                return _sm90_failed(kind, f"disagrees with the pointer-load kernel on a check input ({disagreement})")
            _SM90_CHECKED.add(checked)
    except _BUILD_ERRORS as error:
        if _out_of_memory(error):
            return False
        return _sm90_failed(kind, f"did not compile ({type(error).__name__}: {str(error).strip()[:200]})")
    return True


def _capturing(q):
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


def _sm90_failed(kind, why):
    _SM90_FAILED[kind] = why
    dtype, d, causal, varlen = kind[:4]
    warnings.warn(f"the sm_90 attention forward with Triton {triton.__version__} {why}; the pointer-load kernel "
                  f"serves {str(dtype).removeprefix('torch.')} head_dim {d} {'causal' if causal else 'non-causal'}"
                  f"{' varlen' if varlen else ''} attention from now on", RuntimeWarning, stacklevel=4)
    return False


def _sm90_self_check(args, n_seq, meta):
    """None if the sm_90 kernel, on a small input of the same kind (and at the call's autotuning
    key, so with the call's config), matches the pointer kernel; else what differed. The input
    holds a NaN value some rows see and, causally, some cannot (contract 1), and ragged blocks."""
    q0, group = args[0], args[-2]
    d, causal, varlen = meta["HEAD_D"], meta["CAUSAL"], meta["IS_VARLEN"]
    hkv = 2 if group == 1 else 1
    hq, n = 2, (1 if n_seq == 1 else 2)
    u = 8 if triton.knobs.runtime.interpret else 64  # several query and key blocks of the shipped tiles, ragged ends
    lq, lk = [5 * u + 1, 2 * u + 3][:n], [6 * u + 5, 3 * u][:n]
    j0 = 3 * u + 2  # a NaN value at key j0 of the first sequence: causally seen by its rows >= 2u - 2
    gen = torch.Generator(device=q0.device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=q0.device, dtype=torch.float32).to(q0.dtype)

    if varlen:
        q, k, v = rand(sum(lq), hq, d), rand(sum(lk), hkv, d), rand(sum(lk), hkv, d)
        cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(x)], dtype=torch.int32, device=q0.device)
                      for x in (lq, lk))
        v[j0, 0, d // 2] = float("nan")
    else:
        q, k, v = rand(n, lq[0], hq, d), rand(n, lk[0], hkv, d), rand(n, lk[0], hkv, d)
        cu_q = cu_k = q
        v[0, j0, 0, d // 2] = float("nan")
    results = []
    for run in (_run_sm90_forward, _run_pointer_forward):
        out, lse, check_args, check_meta = _forward_launch(q, k, v, cu_q, cu_k, n, max(lq), max(lk), causal,
                                                           d ** -0.5, varlen)
        if run is _run_sm90_forward:  # the call's key: the autotuner's cached config for it
            check_meta.update(tune_q=meta["tune_q"], tune_k=meta["tune_k"], tune_bh=meta["tune_bh"])
        run(check_args, n, max(lq), check_meta)
        results.append((out.float(), lse))
    (out, lse), (ref_out, ref_lse) = results
    tol = 2e-2 if q.dtype == torch.float16 else 6e-2
    if not torch.equal(out.isnan(), ref_out.isnan()):
        return "NaN positions differ"
    ok = (out - ref_out).abs() <= tol * (1 + ref_out.abs())
    lse_ok = ((lse - ref_lse).abs() <= 1e-2 * (1 + ref_lse.abs())) | (lse == ref_lse)
    if not bool(torch.where(ref_out.isnan(), True, ok).all() & lse_ok.all()):
        return f"max output difference {(out - ref_out).nan_to_num().abs().max().item():.3g}"
    return None


def _forward(q, k, v, cu_q, cu_k, n_seq, max_q, max_k, causal, softmax_scale, varlen):
    check_runnable(q)
    out, lse, args, meta = _forward_launch(q, k, v, cu_q, cu_k, n_seq, max_q, max_k, causal, softmax_scale, varlen)
    if out.numel() == 0:
        return out, lse
    if not (_use_sm90_forward(q, k, v, out, causal, softmax_scale) and _sm90_forward(args, n_seq, max_q, meta)):
        _run_pointer_forward(args, n_seq, max_q, meta)
    return out, lse


def _backward(dout, q, k, v, out, lse, cu_q, cu_k, n_seq, max_q, max_k, causal, softmax_scale, varlen,
              deterministic):
    check_runnable(q)
    dout = last_dim_contiguous(dout)
    hq, hkv = q.shape[-2], k.shape[-2]
    dq, dk, dv = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    # the fused kernel adds dQ into an fp32 accumulator (cleared by the delta kernel); unused otherwise
    dq_acc = dq if deterministic else torch.empty(q.shape, dtype=torch.float32, device=q.device)

    def strides(t):
        return (0, *t.stride()[:2]) if varlen else t.stride()[:3]

    ls = (0, lse.stride(0)) if varlen else lse.stride()[:2]
    meta = _common_meta(q, causal)
    delta_rows = delta_block_m(meta["BLOCK_D"])
    _bwd_delta_kernel[(triton.cdiv(max_q, delta_rows), n_seq * hq)](
        out, dout, delta, dq_acc, cu_q, *strides(out), *strides(dout), *ls, *strides(dq_acc), max_q, hq,
        HEAD_D=meta["HEAD_D"], BLOCK_D=meta["BLOCK_D"], IS_VARLEN=varlen, BLOCK_M=delta_rows,
        ZERO_DQ=not deterministic,
    )
    args = (*strides(q), *strides(k), *strides(v), *strides(dout))
    scale2 = softmax_scale * LOG2E
    tunes = tune_buckets(max_q, max_k, n_seq * hq)

    def kv_grid(m):
        return (triton.cdiv(max_k, m["BLOCK_N"]), n_seq * hkv)

    kv_kernel = _attn_bwd_dkdv_kernel if deterministic else _attn_bwd_fused_kernel
    kv_kernel[kv_grid](
        q, k, v, dout, lse, delta, dk, dv, dq_acc, cu_q, cu_k, *args, *strides(dk), *strides(dv),
        *strides(dq_acc), *ls, max_q, max_k, hkv, hq // hkv, scale2, softmax_scale, **tunes,
        IS_VARLEN=varlen, ATOMIC_DQ=not deterministic, **meta,
    )
    if not deterministic:
        _bwd_dq_convert_kernel[(triton.cdiv(dq.numel(), 1024),)](dq_acc, dq, dq.numel(), softmax_scale, BLOCK=1024)
        return dq, dk, dv
    _attn_bwd_dq_kernel[lambda m: (triton.cdiv(max_q, m["BLOCK_M"]), n_seq * hq)](
        q, k, v, dout, lse, delta, dq, cu_q, cu_k, *args, *strides(dq), *ls,
        max_q, max_k, hq, hq // hkv, scale2, softmax_scale, **tunes, IS_VARLEN=varlen, **meta,
    )
    return dq, dk, dv


def attention_forward(q, k, v, causal, softmax_scale):
    """Dense attention. q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> out like q, lse fp32 [B, Hq, Sq]."""
    b, sq = q.shape[:2]
    return _forward(q, k, v, q, q, b, sq, k.shape[1], causal, float(softmax_scale), False)


def attention_backward(dout, q, k, v, out, lse, causal, softmax_scale, deterministic=False):
    """Gradients (dq, dk, dv) of attention_forward in the input dtypes. deterministic=True uses the
    atomic-free kernels (bit-reproducible, 7 GEMMs instead of 5)."""
    b, sq = q.shape[:2]
    return _backward(dout, q, k, v, out, lse, q, q, b, sq, k.shape[1], causal, float(softmax_scale), False,
                     deterministic)


def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                             softmax_scale):
    """Packed attention. q [total_q, Hq, D], k/v [total_k, Hkv, D] -> out like q, lse fp32 [Hq, total_q]."""
    n_seq = cu_seqlens_q.shape[0] - 1
    return _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, n_seq, int(max_seqlen_q), int(max_seqlen_k),
                    causal, float(softmax_scale), True)


def varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              causal, softmax_scale, deterministic=False):
    """Gradients (dq, dk, dv) of varlen_attention_forward in the input dtypes (deterministic as in
    attention_backward)."""
    n_seq = cu_seqlens_q.shape[0] - 1
    return _backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, n_seq, int(max_seqlen_q),
                     int(max_seqlen_k), causal, float(softmax_scale), True, deterministic)


