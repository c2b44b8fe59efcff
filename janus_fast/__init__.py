"""janus_fast: fast kernels and a drop-in Janus-Pro model for NVIDIA GPUs.

Importing the package has no side effects: the CUDA extension, Triton kernels and the model
load on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ops": ("janus_fast.ops", None),
    "backends": ("janus_fast.ops._backend", "backends"),
    "JanusPro": ("janus_fast.engine", "JanusPro"),
    "JanusProcessor": ("janus_fast.processor", "JanusProcessor"),
}

__all__ = ["JanusPro", "JanusProcessor", "backends", "ops", "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'janus_fast' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)


def __dir__():
    return sorted(set(globals()) | set(__all__))
