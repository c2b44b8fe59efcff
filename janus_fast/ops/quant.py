"""Quantized weights and caches: the formats, per-row quantization, and the weight-only quantized
linear layer.

Formats: "int8" (symmetric, -127..127) and "fp8" (float8 e4m3), each with one fp32 scale per row
(a weight's output channel, a cached head of one token): see reference.quantize_rows. The Triton
kernels read both (converting the 1-byte values in registers); e4m3 needs compute capability 8.9
or newer on CUDA (Triton has no e4m3 conversion before it), so fp8 is refused on older GPUs
before anything launches. On the CPU "auto" runs the reference, which dequantizes a few rows at
a time.
"""

from __future__ import annotations

import math

import torch

from . import _backend, _checks, reference

FORMATS = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QUANTIZED_DTYPES = tuple(FORMATS.values())
FAST = ("triton",)


def format_dtype(name, what: str = "quantize") -> torch.dtype:
    """The storage dtype of the format `name` ("int8" / "fp8"); ValueError naming `what` otherwise."""
    if not isinstance(name, str) or name not in FORMATS:
        raise ValueError(f"{what} must be one of {sorted(FORMATS)}, got {name!r}")
    return FORMATS[name]


def check_supported(dtype: torch.dtype, device, what: str = "quantize") -> None:
    """ValueError when `device` cannot run kernels on the quantized `dtype`: e4m3 needs a GPU of
    compute capability 8.9+ (Ada, Hopper); the CPU runs every format through the reference."""
    device = torch.device(device)
    if dtype == torch.float8_e4m3fn and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"{what}='fp8' (e4m3) needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                             f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}: use 'int8'")


def quantize_rows(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of x [..., K] to the format `fmt` ("int8" / "fp8"): (q [..., K]
    int8 or float8_e4m3fn, scale fp32 [...]) with x ≈ q · scale[..., None] (reference.quantize_rows,
    on any device: it runs once per weight at load time and per prompt in a prefill)."""
    dtype = format_dtype(fmt, "fmt")
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the rows' values)")
    return reference.quantize_rows(x, dtype)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q · scale[..., None] -> dtype: the values quantize_rows stored (reference.dequantize_rows)."""
    return reference.dequantize_rows(q, scale, dtype)


def check_quantized_cache(k_cache, v_cache, k_scale, v_scale, device) -> None:
    """A quantized KV cache: int8 / e4m3 caches [B, S, Hkv, D] of one dtype and their fp32 scales
    [B, S, Hkv], contiguous over heads (both scales or neither)."""
    if (k_scale is None) != (v_scale is None):
        raise ValueError("pass both k_scale and v_scale (a quantized cache) or neither")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _checks.tensor(name, t, ndim=4, dtypes=QUANTIZED_DTYPES, device=device)
    _checks.same("k_cache and v_cache dtypes", k_cache=k_cache.dtype, v_cache=v_cache.dtype)
    check_supported(k_cache.dtype, device, "kv_cache_dtype")
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        _checks.tensor(name, t, ndim=3, dtypes=(torch.float32,), device=device)
        if tuple(t.shape) != tuple(k_cache.shape[:3]):
            raise ValueError(f"{name} must be [B, S_max, Hkv] = {list(k_cache.shape[:3])}, got {list(t.shape)}")
        if t.shape[2] > 1 and t.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous over heads, got strides {t.stride()}")
    _checks.same("k_scale and v_scale strides", k_scale=k_scale.stride(), v_scale=v_scale.stride())


# --------------------------------------------------------------------------- quantized linear


def _impl(backend: str):
    if backend == "reference":
        return reference.quantized_linear
    return _backend.triton_kernels("quant_linear").quantized_linear


@torch.library.custom_op("janus_fast::quantized_linear", mutates_args=())
def _quantized_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    return _impl(backend)(x, qweight, weight_scale, bias).contiguous()


@_quantized_linear.register_fake
def _(x, qweight, weight_scale, bias, backend):
    return x.new_empty((x.shape[0], qweight.shape[0]))


def _resolve(x: torch.Tensor, qweight: torch.Tensor, backend: str) -> str:
    chosen = _backend.resolve("quantized_linear", backend, x.device, FAST, fast_inputs=x.dtype in _checks.FLOAT_DTYPES)
    if chosen == "reference":
        return chosen
    if x.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"the {chosen} quantized_linear takes float16, bfloat16 or float32 x, got {x.dtype}")
    if x.dtype == torch.bfloat16 and _backend.interpreter_enabled():  # the interpreter's bf16 dot is wrong
        raise TypeError("a bfloat16 quantized_linear does not run in the Triton interpreter (TRITON_INTERPRET=1); "
                        "use float16/float32 on the CPU or run on a CUDA GPU")
    check_supported(qweight.dtype, x.device, "qweight")
    return chosen


def quantized_linear(x, qweight, weight_scale, bias=None, *, backend: str = "auto") -> torch.Tensor:
    """x Wᵀ + bias for a weight stored quantized: W = qweight [N, K] (int8 or float8_e4m3fn) · weight_scale
    [N, 1] (fp32, one scale per output channel). x [..., K] -> [..., N] in x.dtype, accumulated
    in fp32 and rounded once. The Triton kernel converts the weight in registers (no dequantized
    copy exists) with a decode tiling for up to 64 rows and a GEMM tiling above; the reference
    dequantizes 4096 output channels at a time. bias [N] in x.dtype or None."""
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    _checks.tensor("qweight", qweight, ndim=2, dtypes=QUANTIZED_DTYPES, device=x.device)
    _checks.tensor("weight_scale", weight_scale, ndim=1, dtypes=(torch.float32,), device=x.device)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (in_features)")
    n, k = qweight.shape
    _checks.same("in_features of x and qweight", x=x.shape[-1], qweight=k)
    _checks.same("out_features of qweight and weight_scale", qweight=n, weight_scale=weight_scale.shape[0])
    _checks.last_dim_contiguous("x", x)
    _checks.last_dim_contiguous("qweight", qweight)
    if weight_scale.stride(0) != 1 and n > 1:
        raise ValueError(f"weight_scale must be contiguous, got stride {weight_scale.stride()}")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=x.device)
        _checks.same("out_features of qweight and bias", qweight=n, bias=bias.shape[0])
        _checks.last_dim_contiguous("bias", bias)
    chosen = _resolve(x, qweight, backend)
    rows = x.reshape(math.prod(x.shape[:-1]), k)
    return _quantized_linear(rows, qweight, weight_scale, bias, chosen).reshape(*x.shape[:-1], n)
