"""The generation engine: static buffers sized once per bucket of (rows, capacity), a packed
prefill without padding, and one decode step per token run eagerly on the CPU or replayed as one
CUDA graph (captured once per bucket) on the GPU.

`JanusPro` here is the models' JanusPro with its loops on the engine; `janus_fast.JanusPro` is it.
"""

from ..models.llama import BadLogitsError
from .images import ImageSettings, generate_image_tokens
from .model import JanusPro, LlamaForCausalLM
from .prefill import prefill
from .sjd import SjdResult, generate_image_tokens_sjd
from .profile import decode_launches_per_layer, decode_op_counts, image_step_launches
from .step import Buckets, Step, graphs_usable
from .text import TextSettings, generate_tokens

__all__ = [
    "BadLogitsError",
    "Buckets",
    "ImageSettings",
    "JanusPro",
    "LlamaForCausalLM",
    "SjdResult",
    "Step",
    "TextSettings",
    "decode_launches_per_layer",
    "decode_op_counts",
    "generate_image_tokens",
    "generate_image_tokens_sjd",
    "generate_tokens",
    "graphs_usable",
    "image_step_launches",
    "prefill",
]
