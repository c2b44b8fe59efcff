"""Input validation shared by every op: clear errors, raised before any launch.

Shape/dtype/device checks are free. Value checks (index ranges, cu_seqlens, cache lengths)
read device memory, which costs a host sync on CUDA; they run unless a CUDA graph is being
captured, torch.compile is tracing, or the caller opted out with `no_value_checks()` for a hot
loop over inputs it built itself.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_state = threading.local()


@contextlib.contextmanager
def no_value_checks():
    """Skip checks that read tensor values (they sync with the GPU); shape checks still run."""
    previous = getattr(_state, "skip_values", False)
    _state.skip_values = True
    try:
        yield
    finally:
        _state.skip_values = previous


def value_checks_enabled(*tensors: torch.Tensor) -> bool:
    if getattr(_state, "skip_values", False) or torch.compiler.is_compiling():
        return False
    if any(isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta" for t in tensors):
        return False
    if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
        return False
    return True


def tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all inputs on one device)")
    return t


def last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride(-1) == 1), "
                         f"got strides {t.stride()}; call .contiguous() first")


def same(what: str, **values) -> None:
    if len(set(values.values())) > 1:
        listed = ", ".join(f"{k}={v}" for k, v in values.items())
        raise ValueError(f"{what} must match: {listed}")


def finite_number(name: str, x, *, low: float | None = None, high: float | None = None) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if (low is not None and x < low) or (high is not None and x > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {x}")
    return x


def whole_number(name: str, x, *, low: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < low:
        raise ValueError(f"{name} must be >= {low}, got {x}")
    return x


def softmax_scale(x, head_dim: int) -> float:
    if x is None:
        return head_dim ** -0.5
    scale = finite_number("softmax_scale", x)
    if scale <= 0:
        raise ValueError(f"softmax_scale must be positive, got {scale}")
    return scale


def index_range(name: str, t: torch.Tensor, high: int) -> None:
    """Every entry in [0, high)."""
    if t.numel() and value_checks_enabled(t):
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= high:
            raise ValueError(f"{name} must lie in [0, {high}), got values in [{lo}, {hi}]")


def cu_seqlens(name: str, cu: torch.Tensor, total: int, max_seqlen: int, device) -> None:
    tensor(name, cu, ndim=1, dtypes=(torch.int32,), device=device)
    if cu.numel() < 1:
        raise ValueError(f"{name} must have n+1 >= 1 entries, got 0")
    if not value_checks_enabled(cu):
        return
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the packed total {total}, got {values[-1]}")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen for {name} is {max_seqlen} but a sequence has {max(lengths)} tokens")


def rope_tables(cos, sin, head_dim: int, device, dtypes) -> None:
    """cos and sin: [S, head_dim] RoPE tables with contiguous rows, alike in shape and strides."""
    for name, t in (("cos", cos), ("sin", sin)):
        tensor(name, t, ndim=2, dtypes=dtypes, device=device)
        if t.shape[1] != head_dim or t.stride(1) != 1:
            raise ValueError(f"{name} must be [S, {head_dim}] with contiguous rows, got shape {tuple(t.shape)}")
    same("cos and sin shapes", cos=tuple(cos.shape), sin=tuple(sin.shape))
    same("cos and sin strides", cos=cos.stride(), sin=sin.stride())
