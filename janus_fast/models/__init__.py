"""Janus-Pro in plain PyTorch (official module names and state-dict keys) over janus_fast.ops.

Importing this package (not `import janus_fast`) also registers the official names with
transformers' Auto classes under "multi_modality", as the official `janus.models` does, so
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` returns our model.
`MultiModalityCausalLM`, the official class name, decodes on the engine: it lives above the
engine (janus_fast.official) and this package hands it out by name on first use."""

import importlib

from .config import JanusProConfig, LlamaConfig, VisionConfig, VQConfig
from .janus_pro import JanusPro
from .official import FRONT_DOOR, VLChatProcessor, load_pil_images, register_auto_classes

register_auto_classes()

__all__ = ["JanusPro", "JanusProConfig", "LlamaConfig", "MultiModalityCausalLM", "VLChatProcessor", "VQConfig",
           "VisionConfig", "load_pil_images"]


def __getattr__(name: str):
    if name == "MultiModalityCausalLM":  # (the front door imports the engine, which imports us)
        return importlib.import_module(FRONT_DOOR).MultiModalityCausalLM
    raise AttributeError(f"module 'janus_fast.models' has no attribute {name!r}")
