"""A quantized KV cache (int8 / fp8 heads with one fp32 scale per head and token): the RoPE + cache
write quantizing on every backend as ops.reference.quantize_rows does, and decode attention over
the quantized cache against the float64 attention over the dequantized cache (flash-attn's rule,
the baseline being plain torch over the dequantized cache in the queries' dtype); opcheck; bad
inputs."""


import pytest
import torch

from janus_fast import ops
from janus_fast.ops import quant, reference

from .helpers import DEVICE, DOT_DTYPES, FAST_BACKENDS, assert_close_to_reference, grid
from .test_quant import needs_format
from .test_decode_layer import rope_inputs

BACKENDS = ["reference"] + FAST_BACKENDS
FORMATS = ["int8", "fp8"]


def _quantized_caches(b, s_max, hkv, d, fmt):
    """NaN-free caches in `fmt` holding random heads, with their scales."""
    needs_format(fmt)
    k, k_scale = ops.quantize_rows(torch.randn(b, s_max, hkv, d, device=DEVICE) * 2, fmt)
    v, v_scale = ops.quantize_rows(torch.randn(b, s_max, hkv, d, device=DEVICE), fmt)
    return k, v, k_scale, v_scale


def _rope_inputs(*shape):
    """tests.test_decode_layer's rope inputs, on DEVICE."""
    return [t.to(DEVICE) for t in rope_inputs(*shape)]


def _codes(t):
    """Integer codes ordered like the values within one sign: int8 as is, e4m3 by its bits."""
    return t.view(torch.uint8).int() if t.dtype == torch.float8_e4m3fn else t.int()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("b, hq, hkv, d, s_max", grid([(3, 4, 2, 16, 9), (1, 2, 2, 128, 1)],
                                                      [(5, 16, 16, 128, 40), (2, 8, 1, 96, 17)]))
def test_rope_kv_write_quantizes(backend, fmt, dtype, b, hq, hkv, d, s_max):
    q, k, v, cos, sin, pos, _, _ = _rope_inputs(b, hq, hkv, d, s_max, dtype)
    kc, vc, ks, vs = _quantized_caches(b, s_max, hkv, d, fmt)
    want = [t.clone() for t in (kc, vc, ks, vs)]
    q_want = reference.rope_kv_write(q, k, v, cos, sin, pos, *want)
    q_out = ops.rope_kv_write(q, k, v, cos, sin, pos, kc, vc, k_scale=ks, v_scale=vs, backend=backend)
    torch.testing.assert_close(q_out, q_want)
    written = torch.zeros(b, s_max, dtype=torch.bool, device=DEVICE)
    written[torch.arange(b, device=DEVICE), pos.long()] = True
    for got, expected in zip((kc, vc, ks, vs), want):  # no other slot touched
        assert torch.equal(got[~written].view(torch.uint8), expected[~written].view(torch.uint8))
    torch.testing.assert_close(ks[written], want[2][written], rtol=1e-6, atol=0)
    torch.testing.assert_close(vs[written], want[3][written], rtol=1e-6, atol=0)
    # the same codes (a GPU's division may land one code away at a rounding boundary)
    for got, expected in ((kc, want[0]), (vc, want[1])):
        assert (_codes(got[written]) - _codes(expected[written])).abs().max() <= (0 if backend == "reference" else 1)
    # and they hold the rotated keys: within half an int8 step, or e4m3's 3 mantissa bits
    k64 = torch.zeros(b, s_max, hkv, d, dtype=torch.float64, device=DEVICE)
    reference.rope_kv_write(q.double(), k.double(), v.double(), cos.double(), sin.double(), pos, k64, k64.clone())
    exact, step = k64[written], ks[written][..., None].double()
    bound = step / 2 if fmt == "int8" else exact.abs() / 16 + step * 2.0 ** -9
    assert ((quant.dequantize_rows(kc, ks, torch.float64)[written] - exact).abs() <= bound * (1 + 1e-5) + 1e-6).all()


def _torch_decode(q, k, v, seqlens, scale):
    """Plain torch in q's dtype over the dequantized cache (rounded to q's dtype): the baseline."""
    rows = []
    group = q.shape[1] // k.shape[2]
    for b in range(q.shape[0]):
        n = int(seqlens[b])
        kb = k[b, :n].repeat_interleave(group, 1).transpose(0, 1)  # [Hq, n, D]
        vb = v[b, :n].repeat_interleave(group, 1).transpose(0, 1)
        p = torch.softmax((q[b, :, None] @ kb.transpose(1, 2)) * scale, -1)
        rows.append((p @ vb)[:, 0] if n else torch.zeros_like(q[b]))
    return torch.stack(rows)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt, dtype", grid([("int8", torch.float16), ("fp8", torch.float32)]
                                            + [(f, torch.bfloat16) for f in FORMATS if torch.bfloat16 in DOT_DTYPES],
                                            [("int8", torch.float32), ("fp8", torch.float16)]))
@pytest.mark.parametrize("b, hq, hkv, d, s_max", grid([(3, 4, 2, 64, 33), (3, 2, 2, 128, 1)],
                                                      [(5, 32, 8, 128, 1000), (4, 8, 1, 40, 70)]))
def test_decode_attention_over_a_quantized_cache(backend, fmt, dtype, b, hq, hkv, d, s_max):
    q = torch.randn(b, hq, d, dtype=dtype, device=DEVICE)
    kc, vc, ks, vs = _quantized_caches(b, s_max, hkv, d, fmt)
    fixed = torch.tensor([0, 1, s_max])[:b]
    seqlens = torch.cat([fixed, torch.randint(0, s_max + 1, (b - fixed.numel(),))]).int().to(DEVICE)
    scale = d ** -0.5
    out = ops.decode_attention(q, kc, vc, seqlens, k_scale=ks, v_scale=vs, backend=backend)
    k64, v64 = (quant.dequantize_rows(c, s, torch.float64) for c, s in ((kc, ks), (vc, vs)))
    exact = reference.decode_attention(q.double(), k64, v64, seqlens, scale)
    baseline = _torch_decode(q, k64.to(dtype), v64.to(dtype), seqlens, scale)
    assert_close_to_reference(out, baseline, exact, name="decode out")


def test_decode_attention_reads_a_quantized_cache_split(monkeypatch):
    """A cache long enough to be split (300 slots): the partial results of the quantized splits
    and their combine (the launch is spied on, so the test knows the split path ran)."""
    from janus_fast.kernels import attention_decode as K

    combines = []
    launcher = K._decode_combine_kernel
    monkeypatch.setattr(K, "_decode_combine_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: combines.append(grid) or launcher[grid]})())
    test_decode_attention_over_a_quantized_cache("triton", "int8", torch.float32, 2, 4, 1, 64, 300)
    assert combines


def test_opcheck():
    q, k, v, cos, sin, pos, _, _ = _rope_inputs(2, 4, 2, 16, 6, torch.float32)
    kc, vc, ks, vs = _quantized_caches(2, 6, 2, 16, "int8")
    torch.library.opcheck(torch.ops.janus_fast.rope_kv_write.default,
                          (q.contiguous(), k.contiguous(), v.contiguous(), cos, sin, pos, kc, vc, "reference", ks, vs))
    seqlens = torch.tensor([3, 6], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.janus_fast.decode_attention.default,
                          (q.contiguous(), kc, vc, seqlens, 0.25, "reference", ks, vs))


def test_bad_inputs(monkeypatch):
    q, k, v, cos, sin, pos, _, _ = _rope_inputs(2, 4, 2, 16, 6, torch.float32)
    kc, vc, ks, vs = _quantized_caches(2, 6, 2, 16, "int8")
    seqlens = torch.tensor([3, 6], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="both k_scale and v_scale"):
        ops.rope_kv_write(q, k, v, cos, sin, pos, kc, vc, k_scale=ks)
    with pytest.raises(TypeError, match="k_cache"):
        ops.rope_kv_write(q, k, v, cos, sin, pos, kc.float(), vc.float(), k_scale=ks, v_scale=vs)
    with pytest.raises(ValueError, match=r"k_scale must be \[B, S_max, Hkv\]"):
        ops.decode_attention(q, kc, vc, seqlens, k_scale=ks[:, :5], v_scale=vs[:, :5])
    with pytest.raises(TypeError, match="v_scale"):
        ops.decode_attention(q, kc, vc, seqlens, k_scale=ks, v_scale=vs.half())
    with pytest.raises(ValueError, match="k_cache and v_cache dtypes"):
        ops.decode_attention(q, kc, vc.view(torch.float8_e4m3fn), seqlens, k_scale=ks, v_scale=vs)
    with pytest.raises(TypeError, match="k must have dtype"):  # int8 without scales is no cache we know
        ops.decode_attention(q, kc, vc, seqlens)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA RTX 3090")
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8' .* sm_86"):  # what the cache checks call
        quant.check_supported(torch.float8_e4m3fn, "cuda", "kv_cache_dtype")
