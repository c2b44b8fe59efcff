"""Janus-Pro in plain PyTorch (official module names and state-dict keys) over janus_fast.ops.

Importing this package (not `import janus_fast`) also registers the official names with
transformers' Auto classes under "multi_modality", as the official `janus.models` does, so
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` returns our model."""

from .config import JanusProConfig, LlamaConfig, VisionConfig, VQConfig
from .janus_pro import JanusPro
from .official import MultiModalityCausalLM, VLChatProcessor, load_pil_images, register_auto_classes

register_auto_classes()

__all__ = ["JanusPro", "JanusProConfig", "LlamaConfig", "MultiModalityCausalLM", "VLChatProcessor", "VQConfig",
           "VisionConfig", "load_pil_images"]
