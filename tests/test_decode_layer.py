"""The decode step's RoPE + KV-cache write on every backend against the float64 reference, with
the flash-attn error rule; opcheck; bad inputs. (The decode layer's norm and SiLU·mul:
test_rms_norm.py, test_silu_mul.py.)"""

import pytest
import torch

from janus_fast import ops
from janus_fast.models.llama import rope_cos_sin
from janus_fast.ops import reference
from janus_fast.ops.decode_layer import FAST

from .helpers import DEVICE, assert_close_to_reference, grid

FAST_BACKENDS = list(FAST)  # (Triton only: janus_fast._C has no decode-layer ops)
BACKENDS = ["reference"] + FAST_BACKENDS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _on_device():
    """Every tensor these tests make is on DEVICE: with a GPU the kernels run natively, bf16 too."""
    with torch.device(DEVICE):
        yield


@pytest.fixture(autouse=True)
def _no_interpreted_bf16(request):
    """The Triton interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest): bf16 runs
    on the reference here and on every backend on a GPU."""
    params = getattr(request.node, "callspec", None)
    params = params.params if params else {}
    if params.get("dtype") == torch.bfloat16 and params.get("backend") == "triton" and not torch.cuda.is_available():
        pytest.skip("bf16 casts under the Triton interpreter truncate")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_kv_write_window(backend):
    """M = B x W tokens (a speculative window per row): token m lands in cache row m // W at its
    own position, as W single-token writes would put it."""
    b, w, hq, hkv, d, s_max = 3, 4, 4, 2, 16, 12
    q, k, v, cos, sin, _, kc, vc = rope_inputs(b * w, hq, hkv, d, s_max, torch.float32)
    kc, vc = kc[:b].contiguous(), vc[:b].contiguous()
    pos = (torch.tensor([0, 5, 8])[:, None] + torch.arange(w)).flatten().to(torch.int32)
    kc_one, vc_one = kc.clone(), vc.clone()
    expected = torch.stack([reference.rope_kv_write(q[j::w], k[j::w], v[j::w], cos, sin, pos[j::w], kc_one, vc_one)
                            for j in range(w)], 1).flatten(0, 1)
    out = ops.rope_kv_write(q, k, v, cos, sin, pos, kc, vc, backend=backend)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(kc, kc_one, equal_nan=True)
    assert torch.equal(vc.isnan(), vc_one.isnan()) and torch.equal(vc[~vc.isnan()], vc_one[~vc_one.isnan()])
    with pytest.raises(ValueError, match="k_cache must be"):
        ops.rope_kv_write(q[:-1], k[:-1], v[:-1], cos, sin, pos[:-1], kc, vc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_rope_kv_write_window_quantizes(backend, fmt):
    """The window form into a quantized cache: each of the B x W heads quantized with its own
    scale at its row and slot, as W single-token writes would store them (the same codes; a GPU's
    division may land one code away at a rounding boundary)."""
    from .test_quant import needs_format
    from .test_quant_kv import _codes

    needs_format(fmt)
    b, w, hq, hkv, d, s_max = 3, 4, 4, 2, 16, 12
    q, k, v, cos, sin, _, _, _ = rope_inputs(b * w, hq, hkv, d, s_max, torch.float32)
    (kc, ks), (vc, vs) = (ops.quantize_rows(torch.randn(b, s_max, hkv, d), fmt) for _ in range(2))
    pos = (torch.tensor([0, 5, 8])[:, None] + torch.arange(w)).flatten().to(torch.int32)
    want = [t.clone() for t in (kc, vc, ks, vs)]
    expected = torch.stack([reference.rope_kv_write(q[j::w], k[j::w], v[j::w], cos, sin, pos[j::w], *want)
                            for j in range(w)], 1).flatten(0, 1)
    out = ops.rope_kv_write(q, k, v, cos, sin, pos, kc, vc, k_scale=ks, v_scale=vs, backend=backend)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(ks, want[2], rtol=1e-6, atol=0)
    torch.testing.assert_close(vs, want[3], rtol=1e-6, atol=0)
    for got, exp in ((kc, want[0]), (vc, want[1])):
        assert (_codes(got) - _codes(exp)).abs().max() <= (0 if backend == "reference" else 1)


def rope_inputs(b, hq, hkv, d, s_max, dtype):
    """q/k/v as column views of one fused projection, the tables of rope_cos_sin, NaN caches."""
    proj = torch.randn(b, (hq + 2 * hkv) * d, dtype=dtype)
    q, k, v = (t.view(b, h, d) for t, h in zip(proj.split([hq * d, hkv * d, hkv * d], -1), (hq, hkv, hkv)))
    cos, sin = (t[:, 0] for t in rope_cos_sin(torch.arange(s_max), d, 10000.0, torch.float32))
    positions = torch.randint(0, s_max, (b,), dtype=torch.int32)
    caches = [torch.full((b, s_max, hkv, d), float("nan"), dtype=dtype) for _ in range(2)]
    return q, k, v, cos, sin, positions, *caches


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, hq, hkv, d, s_max", grid([(3, 4, 2, 16, 9), (1, 2, 2, 64, 1), (0, 2, 1, 8, 4)],
                                                      [(5, 16, 16, 128, 40), (2, 8, 1, 96, 17)]))
def test_rope_kv_write(backend, dtype, b, hq, hkv, d, s_max):
    q, k, v, cos, sin, pos, kc, vc = rope_inputs(b, hq, hkv, d, s_max, dtype)
    kc64, vc64 = kc.double(), vc.double()
    q64 = reference.rope_kv_write(q.double(), k.double(), v.double(), cos.double(), sin.double(), pos, kc64, vc64)
    kcb, vcb = kc.clone(), vc.clone()
    q_base = reference.rope_kv_write(q, k, v, cos, sin, pos, kcb, vcb)
    out = ops.rope_kv_write(q, k, v, cos, sin, pos, kc, vc, backend=backend)
    assert_close_to_reference(out, q_base, q64, name="q")
    rows = torch.arange(b)
    written = torch.zeros(b, s_max, dtype=torch.bool)
    written[rows, pos.long()] = True
    assert_close_to_reference(kc[written], kcb[written], kc64[written], name="k_cache")
    assert torch.equal(vc[written], v)
    assert kc[~written].isnan().all() and vc[~written].isnan().all()  # no other slot touched


def test_opcheck():
    q, k, v, cos, sin, pos, kc, vc = rope_inputs(2, 4, 2, 16, 6, torch.float32)
    kc.zero_(), vc.zero_()
    torch.library.opcheck(torch.ops.janus_fast.rope_kv_write.default,
                          (q.contiguous(), k.contiguous(), v.contiguous(), cos, sin, pos, kc, vc, "triton"))


def test_bad_inputs():
    q, k, v, cos, sin, pos, kc, vc = rope_inputs(2, 4, 2, 16, 6, torch.float32)
    with pytest.raises(ValueError, match="positions must lie in"):
        ops.rope_kv_write(q, k, v, cos, sin, pos + 6, kc, vc)
    with pytest.raises(ValueError, match="k_cache must be"):
        ops.rope_kv_write(q, k, v, cos, sin, pos, kc[:, :, :1], vc[:, :, :1])
    with pytest.raises(ValueError, match="head_dim must be even"):
        ops.rope_kv_write(q[..., :15], k[..., :15], v[..., :15], cos[:, :15], sin[:, :15], pos, kc[..., :15],
                          vc[..., :15])
    with pytest.raises(TypeError, match="positions"):
        ops.rope_kv_write(q, k, v, cos, sin, pos.long(), kc, vc)
