"""Which backend runs an op: "reference" (plain PyTorch), "triton" or "cuda" (janus_fast._C).

"auto" takes the first usable fast backend of the op for CUDA tensors and the reference on the
CPU. Forcing "triton" on CPU tensors runs the Triton interpreter, which must have been switched
on with TRITON_INTERPRET=1 before triton was imported.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import threading

import torch

from ._checks import FLOAT_DTYPES

BACKENDS = ("auto", "reference", "triton", "cuda")
_state = threading.local()  # .preferred: (backend, op names or None) inside prefer_backend


@functools.cache
def triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _extension() -> tuple[object | None, str | None]:
    """Import janus_fast._C once, on first use; remember why it failed."""
    try:
        return importlib.import_module("janus_fast._C"), None
    except ImportError as e:
        return None, f"janus_fast._C is not built or failed to load ({e})"


def extension_error() -> str | None:
    return _extension()[1]


def cuda_op(name: str):
    """torch.ops.janus_fast_C.<name>, loading the extension on first use; None if absent."""
    if _extension()[0] is None:
        return None
    return getattr(torch.ops.janus_fast_C, name, None)


def _usable(backend: str, op: str, device: torch.device) -> str | None:
    """None if `backend` can run `op` on `device`, else the reason it cannot."""
    if backend == "triton":
        if triton_version() is None:
            return "triton is not installed"
        if device.type == "cpu" and not interpreter_enabled():
            return "Triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not run on {device.type} tensors"
        return None
    if device.type != "cuda":
        return f"the CUDA backend needs CUDA tensors, got {device.type}"
    if cuda_op(op) is None:
        return extension_error() or f"janus_fast._C has no op {op}"
    return None


def resolve(op: str, requested: str, device: torch.device, fast: tuple[str, ...], *,
            fast_inputs: bool = True) -> str:
    """The concrete backend for `op` on `device`; `fast` lists its fast backends, best first.
    fast_inputs=False says the inputs are outside what the fast backends take (float64, say):
    "auto" then uses the reference, and a forced fast backend is left to the op's own checks."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "reference":
        return requested
    preferred = getattr(_state, "preferred", None)
    if requested == "auto" and preferred is not None and fast_inputs:
        name, only = preferred
        if name in fast and (only is None or op in only) and _usable(name, op, device) is None:
            return name
    if requested == "auto":
        if device.type == "cuda" and fast_inputs:
            for backend in fast:
                if _usable(backend, op, device) is None:
                    return backend
        return "reference"
    if requested not in fast:
        raise ValueError(f"{op} has no {requested!r} backend; available: {('reference',) + fast}")
    reason = _usable(requested, op, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {requested!r} is unavailable: {reason}")
    return requested


@contextlib.contextmanager
def prefer_backend(name: str, ops=None):
    """Within the context, backend="auto" resolves to `name` for every op it serves and can run
    (for the ops named in `ops` only, if given): e.g. "triton" runs the Triton kernels of CPU
    tensors in the interpreter, to count or debug them."""
    if name not in BACKENDS[2:]:
        raise ValueError(f"prefer_backend takes one of {BACKENDS[2:]}, got {name!r}")
    previous = getattr(_state, "preferred", None)
    _state.preferred = (name, None if ops is None else frozenset(ops))
    try:
        yield
    finally:
        _state.preferred = previous


def resolve_float(op: str, requested: str, t: torch.Tensor, fast: tuple[str, ...]) -> str:
    """`resolve` for an op whose fast backends take float16/bfloat16/float32 (float64 runs on the
    reference under "auto"); a forced fast backend with another dtype is a TypeError."""
    chosen = resolve(op, requested, t.device, fast, fast_inputs=t.dtype in FLOAT_DTYPES)
    if chosen != "reference" and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"the {chosen} {op} takes float16, bfloat16 or float32, got {t.dtype}")
    return chosen


def implementation(backend: str, family: str, name: str):
    """The function `name` of the reference (backend "reference") or of janus_fast.kernels.<family>."""
    if backend == "reference":
        from . import reference

        return getattr(reference, name)
    return getattr(triton_kernels(family), name)


def triton_kernels(family: str):
    """janus_fast.kernels.<family>, imported only when a Triton backend is used."""
    return importlib.import_module(f"janus_fast.kernels.{family}")


def backends() -> dict:
    """What this installation can use: versions, the CUDA extension, the device."""
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "triton": triton_version(),
        "triton_interpreter": interpreter_enabled(),
        "cuda_extension": _extension()[0] is not None,
        "cuda_extension_error": extension_error(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "capability": torch.cuda.get_device_capability() if cuda else None,
    }
