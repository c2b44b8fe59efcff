"""Triton attention against the float64 reference: dense, varlen and decode, forward and gradients.

Tolerance (flash-attn's rule, tests/helpers.py): the kernel's error against the float64 result is
at most 2x (forward) / 3x (gradients) the error of plain torch computing in the same low dtype,
plus a small floor. On CPU the kernels run in the Triton interpreter (fp16/fp32, small shapes);
bf16 and the full Janus shapes run on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

import janus_fast.kernels.attention as K
import janus_fast.kernels.attention_configs as C
import janus_fast.kernels.attention_decode as K_decode
from janus_fast import ops
from janus_fast.ops import reference
from tests.helpers import DEVICE, assert_close_to_reference, grid

CPU_DTYPES = [torch.float16, torch.float32]
GRAD_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


# --------------------------------------------------------------------------- plain-torch baselines


def _visible(sq, sk, causal, device):
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return (j <= i + sk - sq) if causal else torch.ones(sq, sk, dtype=torch.bool, device=device)


def _torch_attention(q, k, v, causal, scale):
    """Plain torch in the input dtype (the baseline of the tolerance rule), differentiable.
    A row with no visible key gives out 0 and lse -inf, as in the contract."""
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    vis = _visible(q.shape[1], k.shape[1], causal, q.device)
    s = (qh @ kh.transpose(-1, -2)) * scale
    lse = torch.logsumexp(s.masked_fill(~vis, -math.inf), dim=-1)
    seen = vis.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~vis, -math.inf).masked_fill(~seen, 0.0), dim=-1) * seen
    return (p @ vh).transpose(1, 2), lse


def _varlen_split(t, cu):
    bounds = cu.tolist()
    return [t[a:b] for a, b in zip(bounds, bounds[1:])]


def _torch_varlen(q, k, v, cu_q, cu_k, causal, scale):
    outs, lses = [], []
    for qi, ki, vi in zip(_varlen_split(q, cu_q), _varlen_split(k, cu_k), _varlen_split(v, cu_k)):
        o, lse = _torch_attention(qi[None], ki[None], vi[None], causal, scale)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def _torch_decode(q, k_cache, v_cache, seqlens, scale):
    rows = []
    for b in range(q.shape[0]):
        n = int(seqlens[b])
        o, _ = _torch_attention(q[b, None, None], k_cache[b, None, :n], v_cache[b, None, :n], False, scale)
        rows.append(o[0, 0] if n else torch.zeros_like(q[b]))
    return torch.stack(rows)


def _grads(out, dout, *inputs):
    return torch.autograd.grad(out, inputs, dout)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _randn(*shape, dtype, device=DEVICE):
    return torch.randn(*shape, dtype=dtype, device=device)


def _check_lse(lse, lse_base, lse_exact, name="lse"):
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_exact)), f"{name}: -inf rows differ"
    assert_close_to_reference(lse, lse_base, lse_exact, factor=2.0, floor=1e-4, name=name)


def _check_all(got, base, exact, dtype, names):
    for g, b, e, name in zip(got, base, exact, names):
        is_grad = name.startswith("d")
        assert_close_to_reference(g, b, e, factor=3.0 if is_grad else 2.0,
                                  floor=GRAD_FLOOR[dtype] if is_grad else 1e-5, name=name)


# --------------------------------------------------------------------------- dense

# (B, Sq, Sk, Hq, Hkv, D): lengths 1/17/129, GQA, Sq < Sk and Sq > Sk, head dims needing padding
DENSE_QUICK = [
    (1, 1, 1, 2, 2, 64),
    (2, 17, 17, 4, 2, 64),
    (1, 129, 129, 2, 1, 128),
    (1, 17, 129, 2, 2, 64),
    (1, 129, 17, 4, 4, 32),
    (2, 33, 20, 4, 1, 40),
]
DENSE_FULL = [
    (1, 1000, 1000, 2, 1, 64),
    (1, 1, 1000, 4, 2, 128),
    (1, 1000, 300, 2, 2, 128),
    (2, 70, 70, 2, 2, 256),
    (1, 129, 131, 3, 1, 96),
    (1, 17, 17, 2, 2, 8),
]


def _dense_case(shape, causal, dtype, device=DEVICE, strided=False):
    b, sq, sk, hq, hkv, d = shape
    if strided:  # row strides wider than the data: q cut out of a wider tensor, k/v out of a packed kv
        q = _randn(b, sq, hq, d + 8, dtype=dtype, device=device)[..., :d]
        kv = _randn(b, sk, 2, hkv, d, dtype=dtype, device=device)
        k, v = kv[:, :, 0], kv[:, :, 1]
    else:
        q, k, v = (_randn(b, s, h, d, dtype=dtype, device=device) for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    dout = _randn(b, sq, hq, d, dtype=dtype, device=device)
    return q, k, v, dout, d ** -0.5


def _run_dense(shape, causal, dtype, strided=False, device=DEVICE):
    q, k, v, dout, scale = _dense_case(shape, causal, dtype, device, strided)
    exact_out, exact_lse = reference.attention(q.double(), k.double(), v.double(), causal, scale)
    exact_grads = reference.attention_backward(dout.double(), q.double(), k.double(), v.double(),
                                               exact_out, exact_lse, causal, scale)
    leaves = [_leaf(t) for t in (q, k, v)]
    base_out, base_lse = _torch_attention(*leaves, causal, scale)
    base_grads = _grads(base_out, dout, *leaves)

    out, lse = K.attention_forward(q, k, v, causal, scale)
    _check_lse(lse, base_lse, exact_lse)
    leaves = [_leaf(t) for t in (q, k, v)]
    op_out = ops.flash_attention(*leaves, causal=causal, softmax_scale=scale, backend="triton")
    assert torch.equal(op_out, out), "the registered op and the launcher disagree"
    grads = _grads(op_out, dout, *leaves)
    _check_all((out, *grads), (base_out, *base_grads), (exact_out, *exact_grads), dtype, ("out", "dq", "dk", "dv"))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", grid(DENSE_QUICK, DENSE_FULL))
def test_dense_matches_reference(shape, causal, dtype):
    _run_dense(shape, causal, dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_strided_inputs(causal):
    _run_dense((2, 33, 40, 4, 2, 64), causal, torch.float16, strided=True)


# --------------------------------------------------------------------------- varlen

# (q lengths, k lengths, Hq, Hkv, D): uneven batches, empty sequences on either side
VARLEN_QUICK = [
    ([5, 0, 17, 1, 33], [9, 4, 17, 0, 20], 4, 2, 64),
    ([1, 129, 0], [1, 129, 0], 2, 2, 128),
    ([0], [7], 2, 1, 32),
]
VARLEN_FULL = [
    ([1000, 3, 0, 257], [1000, 40, 5, 100], 4, 1, 128),
    ([64] * 8, [64] * 8, 2, 2, 80),
]


def _cu(lengths, device=DEVICE):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _run_varlen(lq, lk, hq, hkv, d, causal, dtype, device=DEVICE):
    cu_q, cu_k = _cu(lq, device), _cu(lk, device)
    q = _randn(sum(lq), hq, d, dtype=dtype, device=device)
    k = _randn(sum(lk), hkv, d, dtype=dtype, device=device)
    v = _randn(sum(lk), hkv, d, dtype=dtype, device=device)
    dout = _randn(sum(lq), hq, d, dtype=dtype, device=device)
    scale, mq, mk = d ** -0.5, max(lq), max(lk)
    exact_out, exact_lse = reference.varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k, causal, scale)
    exact_grads = reference.varlen_attention_backward(dout.double(), q.double(), k.double(), v.double(),
                                                      exact_out, exact_lse, cu_q, cu_k, causal, scale)
    leaves = [_leaf(t) for t in (q, k, v)]
    base_out, base_lse = _torch_varlen(*leaves, cu_q, cu_k, causal, scale)
    base_grads = _grads(base_out, dout, *leaves)

    out, lse = K.varlen_attention_forward(q, k, v, cu_q, cu_k, mq, mk, causal, scale)
    _check_lse(lse, base_lse, exact_lse)
    leaves = [_leaf(t) for t in (q, k, v)]
    op_out = ops.varlen_attention(*leaves, cu_q, cu_k, mq, mk, causal=causal, softmax_scale=scale, backend="triton")
    assert torch.equal(op_out, out)
    grads = _grads(op_out, dout, *leaves)
    _check_all((out, *grads), (base_out, *base_grads), (exact_out, *exact_grads), dtype, ("out", "dq", "dk", "dv"))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", grid(VARLEN_QUICK, VARLEN_FULL))
def test_varlen_matches_reference(case, causal, dtype):
    _run_varlen(*case, causal, dtype)


# --------------------------------------------------------------------------- decode

# (B, Hq, Hkv, D, S_max); lengths always include 0, 1 and S_max
DECODE_QUICK = [(4, 4, 2, 64, 70), (3, 2, 2, 128, 1), (4, 8, 1, 40, 33)]
DECODE_FULL = [(5, 32, 8, 128, 1000), (3, 4, 4, 256, 129)]


def _decode_case(b, hq, hkv, d, s_max, dtype, device=DEVICE):
    q = _randn(b, hq, d, dtype=dtype, device=device)
    k_cache = _randn(b, s_max, hkv, d, dtype=dtype, device=device)
    v_cache = _randn(b, s_max, hkv, d, dtype=dtype, device=device)
    fixed = torch.tensor([0, 1, s_max])[:b]
    lengths = torch.cat([fixed, torch.randint(0, s_max + 1, (b - fixed.numel(),))])
    return q, k_cache, v_cache, lengths.to(device=device, dtype=torch.int32), d ** -0.5


def _check_decode(out, q, k_cache, v_cache, seqlens, scale):
    exact = reference.decode_attention(q.double(), k_cache.double(), v_cache.double(), seqlens, scale)
    base = _torch_decode(q, k_cache, v_cache, seqlens, scale)
    assert_close_to_reference(out, base, exact, name="decode out")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", grid(DECODE_QUICK, DECODE_FULL))
def test_decode_matches_reference(case, dtype):
    q, k_cache, v_cache, seqlens, scale = _decode_case(*case, dtype)
    out = ops.decode_attention(q, k_cache, v_cache, seqlens, softmax_scale=scale, backend="triton")
    _check_decode(out, q, k_cache, v_cache, seqlens, scale)
    assert torch.equal(out[seqlens == 0], torch.zeros_like(out[seqlens == 0]))


def test_decode_splits_over_the_cache():
    """The CPU plan must exercise the split-and-combine path the GPU uses."""
    block_n = K_decode._tiles(C.arch(-1), 64, 4)[0]
    _, n_splits = K_decode._decode_plan(200, block_n)
    assert n_splits > 1
    q, k_cache, v_cache, seqlens, scale = _decode_case(2, 4, 1, 64, 200, torch.float32)
    seqlens = torch.tensor([200, 150], dtype=torch.int32, device=DEVICE)
    _check_decode(K.decode_attention(q, k_cache, v_cache, seqlens, scale), q, k_cache, v_cache, seqlens, scale)


@pytest.mark.parametrize("s_max", [1, 128, 129, 600, 16384])
def test_decode_plan_depends_on_the_cache_length_only(s_max):
    """Splits of SPLIT_KEYS keys (whole tiles on every arch) at fixed positions cover the cache,
    whatever the batch or heads: a row's output does not depend on them."""
    for block_n in (16, 32, 64):
        split_len, n_splits = K_decode._decode_plan(s_max, block_n)
        assert split_len == K_decode.SPLIT_KEYS and split_len % block_n == 0
        assert (n_splits - 1) * split_len < s_max <= n_splits * split_len


def test_decode_rows_are_independent_of_the_batch_and_the_capacity():
    """A row's output is bitwise the same alone, in a batch, and in a bigger cache."""
    q, k_cache, v_cache, _, scale = _decode_case(3, 4, 2, 64, 300, torch.float32)
    seqlens = torch.tensor([300, 129, 40], dtype=torch.int32, device=DEVICE)
    batch = K.decode_attention(q, k_cache, v_cache, seqlens, scale)
    for b in range(3):
        n = int(seqlens[b])
        alone = K.decode_attention(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], seqlens[b:b + 1], scale)
        assert torch.equal(alone, batch[b:b + 1])  # (row 2 alone: no split, no combine)
    _check_decode(batch, q, k_cache, v_cache, seqlens, scale)


def test_decode_one_split_launches_no_combine(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the combine kernel was launched for a single split")

    monkeypatch.setattr(K_decode, "_decode_combine_kernel", NoLaunch())
    q, k_cache, v_cache, seqlens, scale = _decode_case(3, 4, 4, 64, 20, torch.float32)
    block_n = K_decode._tiles(C.arch(-1), 64, 4)[0]
    assert K_decode._decode_plan(20, block_n)[1] == 1
    _check_decode(K.decode_attention(q, k_cache, v_cache, seqlens, scale), q, k_cache, v_cache, seqlens, scale)


def test_decode_strided_cache():
    """A cache that is a slice of a bigger buffer (as an engine preallocates) is read through its strides."""
    q, k_cache, v_cache, seqlens, scale = _decode_case(3, 4, 2, 64, 40, torch.float16)
    big = torch.zeros(3, 64, 2, 2, 64, dtype=torch.float16, device=DEVICE)
    big[:, :40, 0], big[:, :40, 1] = k_cache, v_cache
    out = K.decode_attention(q, big[:, :40, 0], big[:, :40, 1], seqlens, scale)
    _check_decode(out, q, k_cache, v_cache, seqlens, scale)


# --------------------------------------------------------------------------- poisoned outputs, determinism


@pytest.fixture
def nan_poisoned_empty(monkeypatch):
    """torch.empty/empty_like return NaN-filled float buffers, so an element a kernel never
    writes shows up as NaN in the result."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


@pytest.mark.parametrize("causal", [False, True])
def test_every_output_element_is_written(nan_poisoned_empty, causal):
    dtype = torch.float32
    # dense with Sq > Sk: causal rows without a visible key must still be written (0 / -inf)
    q, k, v, dout, scale = _dense_case((2, 40, 17, 4, 2, 48), causal, dtype)
    out, lse = K.attention_forward(q, k, v, causal, scale)
    assert not out.isnan().any() and not lse.isnan().any()
    for deterministic in (False, True):
        grads = K.attention_backward(dout, q, k, v, out, lse, causal, scale, deterministic=deterministic)
        assert not any(g.isnan().any() for g in grads)
    # varlen with empty sequences on both sides
    lq, lk = [3, 0, 20, 5], [0, 6, 20, 9]
    cu_q, cu_k = _cu(lq), _cu(lk)
    q, dout = _randn(sum(lq), 4, 48, dtype=dtype), _randn(sum(lq), 4, 48, dtype=dtype)
    k, v = _randn(sum(lk), 2, 48, dtype=dtype), _randn(sum(lk), 2, 48, dtype=dtype)
    out, lse = K.varlen_attention_forward(q, k, v, cu_q, cu_k, 20, 20, causal, 0.2)
    assert not out.isnan().any() and not lse.isnan().any()
    for deterministic in (False, True):
        grads = K.varlen_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, 20, 20, causal, 0.2,
                                            deterministic=deterministic)
        assert not any(g.isnan().any() for g in grads)
    # decode, including the split partials
    q, k_cache, v_cache, seqlens, scale = _decode_case(3, 4, 2, 48, 100, dtype)
    assert not K.decode_attention(q, k_cache, v_cache, seqlens, scale).isnan().any()


@pytest.mark.parametrize("shape", grid([(2, 70, 70, 4, 2, 64)], [(1, 1000, 1000, 2, 1, 64)]))
def test_deterministic_run_to_run(shape):
    """The forward always, the backward with deterministic=True, give bit-identical results (on a
    GPU too, where the default backward's dQ atomics would not)."""
    q, k, v, dout, scale = _dense_case(shape, True, torch.float16)
    first = K.attention_forward(q, k, v, True, scale)
    again = K.attention_forward(q, k, v, True, scale)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    g1 = K.attention_backward(dout, q, k, v, *first, True, scale, deterministic=True)
    g2 = K.attention_backward(dout, q, k, v, *first, True, scale, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


# The default backward is the fused 5-GEMM kernel (dQ by atomics); every test above runs it. The
# deterministic kernels get the same cases in brief: dense GQA with Sq != Sk, lengths 1, varlen
# with empty sequences on either side.
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_deterministic_backward_matches_reference(causal, dtype):
    for shape in [(2, 33, 20, 4, 1, 40), (1, 1, 1, 2, 2, 64), (1, 17, 40, 2, 2, 32)]:
        q, k, v, dout, scale = _dense_case(shape, causal, dtype)
        out, lse = reference.attention(q.double(), k.double(), v.double(), causal, scale)
        exact = reference.attention_backward(dout.double(), q.double(), k.double(), v.double(), out, lse,
                                             causal, scale)
        leaves = [_leaf(t) for t in (q, k, v)]
        base = _grads(_torch_attention(*leaves, causal, scale)[0], dout, *leaves)
        leaves = [_leaf(t) for t in (q, k, v)]
        got = _grads(ops.flash_attention(*leaves, causal=causal, softmax_scale=scale, backend="triton",
                                         deterministic=True), dout, *leaves)
        _check_all(got, base, exact, dtype, ("dq", "dk", "dv"))
    lq, lk = [5, 0, 17, 1, 3], [9, 4, 17, 0, 1]
    cu_q, cu_k = _cu(lq), _cu(lk)
    q, dout = _randn(sum(lq), 4, 32, dtype=dtype), _randn(sum(lq), 4, 32, dtype=dtype)
    k, v = _randn(sum(lk), 2, 32, dtype=dtype), _randn(sum(lk), 2, 32, dtype=dtype)
    out, lse = reference.varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k, causal, 0.2)
    exact = reference.varlen_attention_backward(dout.double(), q.double(), k.double(), v.double(), out, lse,
                                                cu_q, cu_k, causal, 0.2)
    leaves = [_leaf(t) for t in (q, k, v)]
    base = _grads(_torch_varlen(*leaves, cu_q, cu_k, causal, 0.2)[0], dout, *leaves)
    leaves = [_leaf(t) for t in (q, k, v)]
    got = _grads(ops.varlen_attention(*leaves, cu_q, cu_k, 17, 17, causal=causal, softmax_scale=0.2,
                                      backend="triton", deterministic=True), dout, *leaves)
    _check_all(got, base, exact, dtype, ("dq", "dk", "dv"))


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter runs only without a GPU")
def test_bf16_refused_in_the_interpreter():
    """The interpreter's bf16 tl.dot is wrong; the launchers must refuse instead of answering."""
    q, k, v, dout, scale = _dense_case((1, 17, 17, 2, 2, 32), True, torch.bfloat16)
    with pytest.raises(TypeError, match="interpreter"):
        K.attention_forward(q, k, v, True, scale)
    with pytest.raises(TypeError, match="interpreter"):
        K.decode_attention(q[:, 0], k, v, torch.ones(1, dtype=torch.int32), scale)


# --------------------------------------------------------------------------- torch.library


@pytest.mark.parametrize("deterministic", [False, True])
def test_opcheck_dense(deterministic):
    q, k, v, _, scale = _dense_case((1, 17, 20, 2, 1, 32), True, torch.float32)
    args = (*(_leaf(t) for t in (q, k, v)), True, scale, "triton", deterministic)
    torch.library.opcheck(torch.ops.janus_fast.attention_fwd.default, args)


def test_opcheck_varlen():
    lq, lk = [3, 0, 9], [5, 2, 9]
    q = _leaf(_randn(sum(lq), 2, 32, dtype=torch.float32))
    k, v = (_leaf(_randn(sum(lk), 1, 32, dtype=torch.float32)) for _ in range(2))
    args = (q, k, v, _cu(lq), _cu(lk), 9, 9, True, 0.25, "triton")
    torch.library.opcheck(torch.ops.janus_fast.varlen_attention_fwd.default, args)


def test_opcheck_decode():
    q, k_cache, v_cache, seqlens, scale = _decode_case(3, 4, 2, 32, 20, torch.float32)
    torch.library.opcheck(torch.ops.janus_fast.decode_attention.default,
                          (q, k_cache, v_cache, seqlens, scale, "triton"))


# --------------------------------------------------------------------------- GPU: bf16, Janus shapes

GPU_DENSE = [
    ((1, 1024, 1024, 32, 32, 128), True),   # LLM prefill
    ((2, 100, 1000, 32, 32, 128), True),    # chunked prefill against a longer cache (Sq < Sk)
    ((1, 1000, 600, 8, 8, 128), True),      # Sq > Sk: leading rows see no key
    ((4, 576, 576, 16, 16, 64), False),     # SigLIP tower
    ((2, 1000, 1000, 32, 8, 128), True),    # GQA
    ((1, 300, 300, 4, 4, 256), False),      # padded head dim
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,causal", GPU_DENSE)
def test_gpu_dense(shape, causal, dtype):
    _run_dense(shape, causal, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_varlen(causal):
    lengths = [1000, 0, 1, 129, 2048, 17, 700]
    _run_varlen(lengths, lengths, 32, 32, 128, causal, torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(32, 32, 32, 128, 616), (2, 32, 8, 128, 4096), (3, 16, 16, 64, 1)])
def test_gpu_decode(case):
    q, k_cache, v_cache, seqlens, scale = _decode_case(*case, torch.bfloat16, device="cuda")
    out = ops.decode_attention(q, k_cache, v_cache, seqlens, softmax_scale=scale, backend="triton")
    _check_decode(out, q, k_cache, v_cache, seqlens, scale)


@pytest.mark.gpu
def test_gpu_decode_cuda_graph_replays_with_new_lengths():
    """Captured once, replayed as the cache grows: no host sync (capture would fail) and no
    recompilation (a replay cannot recompile) while cache_seqlens change."""
    q, k_cache, v_cache, seqlens, scale = _decode_case(8, 32, 8, 128, 512, torch.bfloat16, device="cuda")
    K.decode_attention(q, k_cache, v_cache, seqlens, scale)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.decode_attention(q, k_cache, v_cache, seqlens, scale)
    for lengths in ([0, 1, 2, 3, 100, 511, 512, 64], [512] * 8, [5] * 8):
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        graph.replay()
        _check_decode(out.clone(), q, k_cache, v_cache, seqlens, scale)


@pytest.mark.gpu
def test_gpu_autotune_picks_from_this_architecture():
    q, k, v, dout, scale = _dense_case((1, 256, 256, 4, 4, 128), True, torch.bfloat16, device="cuda")
    out, lse = K.attention_forward(q, k, v, True, scale)
    K.attention_backward(dout, q, k, v, out, lse, True, scale)
    tag = (C.arch(q.device.index), "narrow")
    for kernel, table in ((K._attn_fwd_kernel, C.FWD), (K._attn_bwd_dkdv_kernel, C.BWD_DKDV),
                          (K._attn_bwd_dq_kernel, C.BWD_DQ)):
        best = kernel.best_config
        assert any((c.kwargs, c.num_warps, c.num_stages) == (best.kwargs, best.num_warps, best.num_stages)
                   for c in table[tag])
