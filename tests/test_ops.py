"""Dispatch, op registration (opcheck) and edge cases of the public API on the reference backend."""

import pytest
import torch

import janus_fast
from janus_fast import ops
from janus_fast.ops import _backend


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = ("import sys, janus_fast; "
            "assert not any(m.startswith(('triton', 'janus_fast.kernels', 'janus_fast._C', 'janus_fast.models')) "
            "for m in sys.modules), sorted(m for m in sys.modules if 'janus' in m or 'triton' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backends_report():
    info = janus_fast.backends()
    assert info["torch"] == torch.__version__
    assert info["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    assert info["cuda_extension"] == (info["cuda_extension_error"] is None)


def test_auto_uses_reference_on_cpu():
    assert _backend.resolve("vq_lookup", "auto", torch.device("cpu"), ("cuda", "triton")) == "reference"


def test_auto_leaves_inputs_the_kernels_do_not_take_to_the_reference():
    cuda = torch.device("cuda")  # resolution happens before any device is touched
    assert _backend.resolve("vq_quantize", "auto", cuda, ("cuda", "triton"), fast_inputs=False) == "reference"


def test_prefer_backend_picks_a_usable_backend_under_auto():
    cpu, fast = torch.device("cpu"), ("triton",)
    with ops.prefer_backend("triton", ops=("rms_norm",)):
        assert _backend.resolve("rms_norm", "auto", cpu, fast) == "triton"  # the interpreter (conftest)
        assert _backend.resolve("silu_mul", "auto", cpu, fast) == "reference"  # not named
        assert _backend.resolve("rms_norm", "auto", cpu, fast, fast_inputs=False) == "reference"  # float64
        assert _backend.resolve("rms_norm", "reference", cpu, fast) == "reference"  # forced stays forced
    assert _backend.resolve("rms_norm", "auto", cpu, fast) == "reference"
    with pytest.raises(ValueError, match="prefer_backend takes one of"):
        with ops.prefer_backend("auto"):
            pass


def test_subnormal_temperature_is_argmax():
    logits = torch.randn(6, 30)
    greedy = ops.cfg_sample(logits, cfg_weight=2.0, temperature=0.0)
    assert torch.equal(ops.cfg_sample(logits, cfg_weight=2.0, temperature=1e-40), greedy)


def test_forced_backends_explain_why_unavailable(monkeypatch):
    cb = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ops.vq_lookup(torch.tensor([1]), cb, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.vq_lookup(torch.tensor([1]), cb, backend="triton")


def attention_inputs(requires_grad=True):
    q = torch.randn(2, 5, 4, 8, requires_grad=requires_grad)
    k = torch.randn(2, 7, 2, 8, requires_grad=requires_grad)
    v = torch.randn(2, 7, 2, 8, requires_grad=requires_grad)
    return q, k, v


def opcheck_cases():
    q, k, v = attention_inputs()
    out, lse = torch.ops.janus_fast.attention_fwd(q.detach(), k.detach(), v.detach(), True, 0.3, "reference")
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    pq, pk, pv = (torch.randn(5, h, 8, requires_grad=True) for h in (4, 2, 2))
    pout, plse = torch.ops.janus_fast.varlen_attention_fwd(pq.detach(), pk.detach(), pv.detach(), cu, cu, 3, 3,
                                                          True, 0.3, "reference")
    return [
        (torch.ops.janus_fast.attention_fwd, (q, k, v, True, 0.3, "reference")),
        (torch.ops.janus_fast.attention_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                                              True, 0.3, "reference")),
        (torch.ops.janus_fast.varlen_attention_fwd, (pq, pk, pv, cu, cu, 3, 3, True, 0.3, "reference")),
        (torch.ops.janus_fast.varlen_attention_bwd, (torch.randn_like(pout), pq.detach(), pk.detach(), pv.detach(),
                                                     pout, plse, cu, cu, 3, 3, True, 0.3, "reference")),
        (torch.ops.janus_fast.decode_attention, (torch.randn(2, 4, 8), torch.randn(2, 6, 2, 8),
                                                 torch.randn(2, 6, 2, 8), torch.tensor([3, 6], dtype=torch.int32),
                                                 0.3, "reference")),
        (torch.ops.janus_fast.vq_quantize, (torch.randn(9, 8), torch.randn(16, 8), True, "reference")),
        (torch.ops.janus_fast.vq_lookup, (torch.randint(0, 16, (8,)), torch.randn(16, 8), True, [2, 8, 2, 2],
                                          "reference")),
        (torch.ops.janus_fast.cfg_sample, (torch.randn(6, 11), 3.0, 1.0, 4, 0.9, torch.tensor([5, 0]),
                                           "interleaved", False, True, "reference")),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck_reference(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("sq,sk", [(0, 5), (5, 0), (0, 0)])
def test_flash_attention_empty(sq, sk):
    q = torch.randn(2, sq, 4, 8, requires_grad=True)
    k = torch.randn(2, sk, 2, 8, requires_grad=True)
    v = torch.randn(2, sk, 2, 8, requires_grad=True)
    out = ops.flash_attention(q, k, v)
    assert out.shape == q.shape and not out.isnan().any() and (out == 0).all()
    out.sum().backward()
    assert (k.grad == 0).all() and (q.grad == 0).all()


def test_flash_attention_gradients_flow_through_the_op():
    q, k, v = (t.double().detach().requires_grad_() for t in attention_inputs())
    torch.autograd.gradcheck(lambda a, b, c: ops.flash_attention(a, b, c, causal=True), (q, k, v))


def test_varlen_gradients_flow_through_the_op():
    cu = torch.tensor([0, 3, 3, 4], dtype=torch.int32)
    q, k, v = (torch.randn(4, h, 8, dtype=torch.float64, requires_grad=True) for h in (2, 1, 1))
    torch.autograd.gradcheck(lambda a, b, c: ops.varlen_attention(a, b, c, cu, cu, 3, 3, causal=True), (q, k, v))


def test_cfg_sample_generator_reproducible():
    logits = torch.randn(8, 50)
    draw = lambda seed: ops.cfg_sample(logits, cfg_weight=3.0, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1))
    assert any(not torch.equal(draw(1), draw(s)) for s in range(2, 6))


def test_no_value_checks_skips_only_value_checks():
    cb = torch.randn(4, 8)
    with ops.no_value_checks():
        with pytest.raises(TypeError):
            ops.vq_lookup(torch.tensor([0.5]), cb)
        ops.decode_attention(torch.randn(1, 2, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8),
                             torch.tensor([3], dtype=torch.int32))
    with pytest.raises(ValueError):
        ops.vq_lookup(torch.tensor([4]), cb)


def test_torch_compile_traces_the_ops():
    q, k, v = attention_inputs(requires_grad=False)
    compiled = torch.compile(lambda a, b, c: ops.flash_attention(a, b, c, causal=True), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), ops.flash_attention(q, k, v, causal=True))
