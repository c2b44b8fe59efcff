"""Janus-Pro in plain PyTorch (official module names and state-dict keys) over janus_fast.ops."""

from .config import JanusProConfig, LlamaConfig, VisionConfig, VQConfig
from .janus_pro import JanusPro

__all__ = ["JanusPro", "JanusProConfig", "LlamaConfig", "VisionConfig", "VQConfig"]
