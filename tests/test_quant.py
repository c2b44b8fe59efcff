"""Quantized weights: per-row quantization and the weight-only quantized linear layer on every
backend against the float64 product with the dequantized weight, with the flash-attn error rule
(the baseline is plain torch multiplying by the dequantized weight in the activations' dtype);
opcheck; bad inputs; the static choice of tiles."""

import pytest
import torch
import torch.nn.functional as F

from janus_fast import ops
from janus_fast.kernels import quant_linear as K
from janus_fast.ops import quant, reference

from .helpers import DEVICE, DOT_DTYPES, FAST_BACKENDS, assert_close_to_reference, grid

BACKENDS = ["reference"] + FAST_BACKENDS
FORMATS = ["int8", "fp8"]
# (M, N, K): one row, odd sizes that end inside every tile, the largest decode M, the first
# prefill M, empty rows and an empty reduction
SHAPES = grid([(1, 37, 70), (64, 33, 65), (65, 50, 40), (0, 8, 16), (3, 7, 0)],
              [(5, 100, 129), (17, 1000, 300), (33, 64, 1024), (130, 257, 96), (1, 4096, 512)])


def needs_format(fmt: str) -> None:
    """Skip fp8 on a GPU without e4m3 conversions (the ops refuse it there)."""
    if fmt == "fp8" and DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 needs sm_89+")


def _case(m, n, k, dtype, fmt, bias: bool, device=DEVICE):
    needs_format(fmt)
    w = torch.randn(n, k, device=device) * torch.rand(n, 1, device=device)  # channels of different ranges
    qweight, scale = ops.quantize_rows(w, fmt)
    x = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    return x, qweight, scale, b


def _exact_and_baseline(x, qweight, scale, b):
    w64 = reference.dequantize_rows(qweight, scale, torch.float64)
    exact = F.linear(x.double(), w64, None if b is None else b.double())
    baseline = F.linear(x, w64.to(x.dtype), b)
    return exact, baseline


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_quantized_linear(backend, fmt, dtype, m, n, k):
    x, qweight, scale, b = _case(m, n, k, dtype, fmt, bias=(m + n) % 2 == 1)
    out = ops.quantized_linear(x, qweight, scale, b, backend=backend)
    assert out.dtype == dtype and out.shape == (m, n)
    exact, baseline = _exact_and_baseline(x, qweight, scale, b)
    assert_close_to_reference(out, baseline, exact)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_quantized_linear_takes_strided_rows_and_any_leading_dims(backend):
    """Rows of a wider buffer (a fused projection's columns), and [B, T, K] prefill inputs."""
    _, qweight, scale, b = _case(1, 48, 40, torch.float32, "int8", bias=True)
    wide = torch.randn(6, 100, device=DEVICE)[:, 30:70]
    out = ops.quantized_linear(wide, qweight, scale, b, backend=backend)
    torch.testing.assert_close(out, reference.quantized_linear(wide.contiguous(), qweight, scale, b))
    x3 = torch.randn(2, 3, 40, device=DEVICE)
    out3 = ops.quantized_linear(x3, qweight, scale, b, backend=backend)
    torch.testing.assert_close(out3, reference.quantized_linear(x3.reshape(6, 40), qweight, scale, b).view(2, 3, 48))


def test_reference_dequantizes_a_few_channels_at_a_time():
    x, qweight, scale, b = _case(3, 50, 24, torch.float32, "int8", bias=True)
    whole = reference.quantized_linear(x, qweight, scale, b, rows_per_chunk=64)
    torch.testing.assert_close(reference.quantized_linear(x, qweight, scale, b, rows_per_chunk=7), whole)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_rows(fmt):
    x = torch.randn(5, 33) * torch.tensor([1e-3, 1.0, 50.0, 0.0, 3.0])[:, None]
    q, scale = ops.quantize_rows(x, fmt)
    dtype, qmax = quant.FORMATS[fmt], reference.QUANT_MAX[quant.FORMATS[fmt]]
    assert q.dtype == dtype and scale.dtype == torch.float32 and scale.shape == (5,)
    torch.testing.assert_close(scale, x.abs().amax(1) / qmax)
    assert scale[3] == 0 and (q[3].float() == 0).all()  # a row of zeros stays zeros
    assert q.float().abs().max() == qmax  # each row's largest value maps to the format's largest
    back = ops.quant.dequantize_rows(q, scale)
    # int8 rounds to the nearest step; e4m3 keeps 3 mantissa bits (relative error <= 1/16)
    if fmt == "int8":
        assert ((back - x).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()
    else:
        assert ((back - x).abs() <= x.abs() / 16 + scale[:, None] * 2.0 ** -9).all()
    # ties: int8 rounds half away from zero, e4m3 to even (as torch converts)
    ties = torch.tensor([[127.0, 0.5, -0.5, 1.5, -2.5]])
    assert ops.quantize_rows(ties, "int8")[0].tolist() == [[127, 1, -1, 2, -3]]
    assert ops.quantize_rows(torch.tensor([[448.0, 9.5, 10.5]]), "fp8")[0].float().tolist() == [[448.0, 10.0, 10.0]]


def test_quantize_rows_on_the_meta_device():
    """Quantizing a model built on the meta device gives the real shapes and dtypes."""
    q, scale = ops.quantize_rows(torch.empty(4096, 512, device="meta", dtype=torch.bfloat16), "int8")
    assert q.device.type == "meta" and q.dtype == torch.int8 and scale.shape == (4096,)


def test_opcheck():
    x, qweight, scale, b = _case(3, 40, 24, torch.float32, "int8", bias=True)
    torch.library.opcheck(torch.ops.janus_fast.quantized_linear.default, (x, qweight, scale, b, "triton"))
    torch.library.opcheck(torch.ops.janus_fast.quantized_linear.default, (x, qweight, scale, None, "reference"))


def test_decode_and_prefill_tiles_come_from_static_shapes():
    """Up to 64 rows share one M tile (16/32/64) with narrow N tiles, 32 wide only while that
    leaves two programs per SM; above 64 rows the GEMM tiling. No value is read."""
    for m, block_m in ((1, 16), (16, 16), (17, 32), (32, 32), (33, 64), (64, 64)):
        cfg = K.launch_config("sm90", m, 4096, False, sms=132)
        assert cfg["BLOCK_M"] == block_m and cfg["BLOCK_N"] == 16, cfg  # 4096 / 32 = 128 < 264
    assert K.launch_config("sm90", 32, 12288, False, sms=132)["BLOCK_N"] == 32
    assert K.launch_config("sm80", 65, 4096, False, sms=108)["BLOCK_M"] == 128
    for arch in ("sm80", "sm90", "interp"):
        for fp32 in (False, True):
            for m in (1, 64, 65, 4096):
                assert K.launch_config(arch, m, 4096, fp32, sms=8)["BLOCK_K"] >= 32


def test_bad_inputs():
    x, qweight, scale, b = _case(3, 40, 24, torch.float32, "int8", bias=True)
    with pytest.raises(TypeError, match="qweight"):
        ops.quantized_linear(x, qweight.float(), scale)
    with pytest.raises(TypeError, match="weight_scale"):
        ops.quantized_linear(x, qweight, scale.half())
    with pytest.raises(ValueError, match="in_features of x and qweight"):
        ops.quantized_linear(x[:, :20], qweight, scale)
    with pytest.raises(ValueError, match="out_features of qweight and weight_scale"):
        ops.quantized_linear(x, qweight, scale[:39])
    with pytest.raises(TypeError, match="bias"):
        ops.quantized_linear(x, qweight, scale, b.double())
    with pytest.raises(ValueError, match="out_features of qweight and bias"):
        ops.quantized_linear(x, qweight, scale, b[:3])
    with pytest.raises(ValueError, match="contiguous"):
        ops.quantized_linear(x.t().contiguous().t(), qweight, scale)
    with pytest.raises(ValueError, match=r"fmt must be one of \['fp8', 'int8'\], got 'int4'"):
        ops.quantize_rows(x, "int4")
    if not torch.cuda.is_available():
        with pytest.raises(TypeError, match="interpreter"):
            ops.quantized_linear(x.bfloat16(), qweight, scale, backend="triton")


def test_fp8_needs_sm89(monkeypatch):
    """On a GPU without e4m3 conversions (A100: sm_80) fp8 is refused before any launch, naming
    the argument; int8 is fine there, and sm_89+ takes both."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"quantize='fp8' .* 8\.9 .* sm_80"):
        quant.check_supported(torch.float8_e4m3fn, "cuda", "quantize")
    quant.check_supported(torch.int8, "cuda", "quantize")
    quant.check_supported(torch.float8_e4m3fn, "cpu", "quantize")  # the reference dequantizes
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    quant.check_supported(torch.float8_e4m3fn, "cuda", "quantize")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_linear_bf16_on_gpu(fmt):
    """The Janus shapes in bf16: 1B / 7B decode rows, the 7B fused Q/K/V, a prefill."""
    for m, n, k in ((2, 2048, 2048), (32, 12288, 4096), (33, 11008, 512), (300, 1000, 2048)):
        x, qweight, scale, b = _case(m, n, k, torch.bfloat16, fmt, True)
        exact, baseline = _exact_and_baseline(x, qweight, scale, b)
        assert_close_to_reference(ops.quantized_linear(x, qweight, scale, b), baseline, exact)


def test_the_kernel_makes_no_float_copy_of_the_weight():
    """The Triton path allocates its output and nothing the size of the weight: the 1-byte values
    are converted in registers (every tensor op of the call is recorded)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.floats = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    self.floats.append((str(func), t.numel()))
            return out

    x, qweight, scale, b = _case(4, 96, 80, torch.float32, "int8", bias=True)
    # (the launchers themselves: the custom op is one opaque node to a dispatch mode)
    for launcher, copies in ((K.quantized_linear, False), (reference.quantized_linear, True)):
        with Allocations() as seen:
            launcher(x, qweight, scale, b)
        assert any(n >= qweight.numel() for _, n in seen.floats) == copies, (launcher, seen.floats)


@pytest.mark.gpu
def test_decode_rows_do_not_depend_on_the_batch():
    """A row's output is the same bits whatever the other rows (1, 17 or 64 of them: the three
    decode M tiles): the K loop and the tile's reduction order do not depend on M."""
    x, qweight, scale, b = _case(64, 4096, 4096, torch.bfloat16, "int8", True)
    alone = ops.quantized_linear(x[:1], qweight, scale, b)
    for m in (17, 64):
        assert torch.equal(ops.quantized_linear(x[:m], qweight, scale, b)[:1], alone), m
