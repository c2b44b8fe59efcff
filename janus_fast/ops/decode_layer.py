"""The fused pieces of a Llama decode layer (inference only): residual add + RMSNorm, RoPE + the
KV-cache write, and SiLU·mul. With one QKV GEMM, one gate/up GEMM, decode_attention and the o/down
GEMMs they make a layer of nine dispatched ops.

Each public function validates its inputs, resolves the backend and calls a torch.library custom
op (with a fake implementation, so torch.compile and CUDA graphs see opaque ops).
"""

from __future__ import annotations

import torch

from . import _backend, _checks, quant, reference

FAST = ("triton",)


def _impl(backend: str, name: str):
    return getattr(reference if backend == "reference" else _backend.triton_kernels("decode_layer"), name)


def _resolve(op: str, backend: str, t: torch.Tensor) -> str:
    chosen = _backend.resolve(op, backend, t.device, FAST, fast_inputs=t.dtype in _checks.FLOAT_DTYPES)
    if chosen != "reference" and t.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"the {chosen} {op} takes float16, bfloat16 or float32, got {t.dtype}")
    return chosen


_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)

# --------------------------------------------------------------------------- RMSNorm


@torch.library.custom_op("janus_fast::rms_norm", mutates_args=())
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    return _impl(backend, "rms_norm")(x, weight, eps)[0].contiguous()


@_rms_norm.register_fake
def _(x, weight, eps, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("janus_fast::add_rms_norm", mutates_args=())
def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    y, h = _impl(backend, "rms_norm")(x, weight, eps, residual)
    return y.contiguous(), h.contiguous()


@_add_rms_norm.register_fake
def _(x, residual, weight, eps, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _check_norm(x, weight, eps):
    _checks.tensor("x", x, ndim=2, dtypes=_DTYPES)
    _checks.tensor("weight", weight, ndim=1, dtypes=(x.dtype,), device=x.device)
    _checks.same("hidden sizes of x and weight", x=x.shape[1], weight=weight.shape[0])
    _checks.last_dim_contiguous("x", x)
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")
    eps = _checks.finite_number("eps", eps)
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return eps


def rms_norm(x, weight, *, eps: float, residual=None, backend: str = "auto"):
    """Llama RMSNorm over rows of x [M, N]: weight · (h / sqrt(mean(h²) + eps)), normalised in fp32
    and cast to x.dtype before the weight (the Llama convention). With `residual` [M, N], h = x +
    residual is formed first (in x.dtype) and the result is (y, h): the fused pre-norm of a
    residual block, whose h is the next residual. Without it: y alone, h = x."""
    eps = _check_norm(x, weight, eps)
    chosen = _resolve("rms_norm", backend, x)
    if residual is None:
        return _rms_norm(x, weight, eps, chosen)
    _checks.tensor("residual", residual, ndim=2, dtypes=(x.dtype,), device=x.device)
    _checks.same("shapes of x and residual", x=tuple(x.shape), residual=tuple(residual.shape))
    _checks.last_dim_contiguous("residual", residual)
    return _add_rms_norm(x, residual, weight, eps, chosen)


# --------------------------------------------------------------------------- RoPE + cache write


@torch.library.custom_op("janus_fast::rope_kv_write", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def _rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   backend: str, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> torch.Tensor:
    return _impl(backend, "rope_kv_write")(q, k, v, cos, sin, positions, k_cache, v_cache, k_scale, v_scale)


@_rope_kv_write.register_fake
def _(q, k, v, cos, sin, positions, k_cache, v_cache, backend, k_scale=None, v_scale=None):
    return q.new_empty(q.shape)


def rope_kv_write(q, k, v, cos, sin, positions, k_cache, v_cache, *, k_scale=None, v_scale=None,
                  backend: str = "auto"):
    """New tokens of a KV cache: rotate-half RoPE of q [M, Hq, D] and k [M, Hkv, D] at position
    positions[m] (int32, a row of the cos/sin tables [S, D]); writes the rotated k and v into
    k_cache/v_cache [B, S_max, Hkv, D] at row m // (M // B), slot positions[m] (in place) and
    returns the rotated q [M, Hq, D]. M = B is one decode token per row; M a multiple of B gives
    each row M // B consecutive tokens (a speculative window). q/k/v may be column views of one
    fused projection (heads and dims contiguous). Rotation in fp32, rounded once. Positions are
    not range-checked on the device in graphs: the caller keeps them below min(S, S_max). A
    quantized cache (int8 / float8_e4m3fn, see ops.quant) comes with k_scale/v_scale fp32
    [B, S_max, Hkv]: each written head is quantized with its own scale (reference.quantize_rows),
    stored at the same slot."""
    dtypes = _DTYPES
    _checks.tensor("q", q, ndim=3, dtypes=dtypes)
    for name, t in (("k", k), ("v", v)):
        _checks.tensor(name, t, ndim=3, dtypes=(q.dtype,), device=q.device)
    _checks.same("k and v shapes", k=tuple(k.shape), v=tuple(v.shape))
    b, hq, d = q.shape
    _checks.same("batch sizes of q and k", q=b, k=k.shape[0])
    _checks.same("head_dim of q and k", q=d, k=k.shape[2])
    if d % 2 or not 2 <= d <= 256:
        raise ValueError(f"head_dim must be even and in [2, 256], got {d}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1 or t.stride(1) != d:
            raise ValueError(f"{name} must have contiguous heads and dims (strides (*, {d}, 1)), got {t.stride()}")
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.tensor(name, t, ndim=2, dtypes=dtypes, device=q.device)
        if t.shape[1] != d or t.stride(1) != 1:
            raise ValueError(f"{name} must be [S, {d}] with contiguous rows, got shape {tuple(t.shape)}")
    _checks.same("cos and sin shapes", cos=tuple(cos.shape), sin=tuple(sin.shape))
    _checks.same("cos and sin strides", cos=cos.stride(), sin=sin.stride())
    _checks.tensor("positions", positions, ndim=1, dtypes=(torch.int32,), device=q.device)
    _checks.same("batch sizes of q and positions", q=b, positions=positions.shape[0])
    if k_scale is None and v_scale is None:
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            _checks.tensor(name, t, ndim=4, dtypes=(q.dtype,), device=q.device)
    else:
        quant.check_quantized_cache(k_cache, v_cache, k_scale, v_scale, q.device)
    _checks.same("k_cache and v_cache shapes", k_cache=tuple(k_cache.shape), v_cache=tuple(v_cache.shape))
    _checks.same("k_cache and v_cache strides", k_cache=k_cache.stride(), v_cache=v_cache.stride())
    rows = k_cache.shape[0]
    if (b % rows if rows else b) or tuple(k_cache.shape[2:]) != tuple(k.shape[1:]):
        raise ValueError(f"k_cache must be [B, S_max, {k.shape[1]}, {d}] with B dividing the {b} tokens, "
                         f"got {tuple(k_cache.shape)}")
    if k_cache.stride(3) != 1 or k_cache.stride(2) != d:
        raise ValueError(f"k_cache must be contiguous in its last two dimensions, got strides {k_cache.stride()}")
    _checks.index_range("positions", positions, min(cos.shape[0], k_cache.shape[1]))
    return _rope_kv_write(q, k, v, cos, sin, positions, k_cache, v_cache, _resolve("rope_kv_write", backend, q),
                          k_scale, v_scale)


# --------------------------------------------------------------------------- SiLU·mul


@torch.library.custom_op("janus_fast::silu_mul", mutates_args=())
def _silu_mul(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    return _impl(backend, "silu_mul")(gate, up).contiguous()


@_silu_mul.register_fake
def _(gate, up, backend):
    return gate.new_empty(gate.shape)


def silu_mul(gate, up, *, backend: str = "auto"):
    """silu(gate) · up for gate/up [M, N] (rows may be strided: the two halves of one fused
    gate/up projection), in fp32, rounded once -> [M, N] contiguous."""
    _checks.tensor("gate", gate, ndim=2, dtypes=_DTYPES)
    _checks.tensor("up", up, ndim=2, dtypes=(gate.dtype,), device=gate.device)
    _checks.same("gate and up shapes", gate=tuple(gate.shape), up=tuple(up.shape))
    _checks.last_dim_contiguous("gate", gate)
    _checks.last_dim_contiguous("up", up)
    return _silu_mul(gate, up, _resolve("silu_mul", backend, gate))
