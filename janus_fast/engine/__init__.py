"""The generation engine: static buffers sized once per bucket of (rows, capacity), a packed
prefill without padding, and one decode step per token run eagerly on the CPU or replayed as one
CUDA graph (captured once per bucket and step) on the GPU, its settings read from device memory.
The step interface (for new kinds of steps) is in engine.step; the host loop in engine.lookahead;
memory plans in engine.memory.

`JanusPro` here is the models' JanusPro with its loops on the engine; `janus_fast.JanusPro` is it.
"""

from ..models.llama import BadLogitsError
from .decode import LlamaModel
from .images import ImageBuffers, ImageSettings, generate_image_tokens, image_step
from .lookahead import LOOKAHEAD, Marks, run_steps
from .memory import MemoryPlan, MemoryPlanWarning, plan_requests
from .model import JanusPro, LlamaForCausalLM
from .prefill import prefill
from .profile import decode_launches_per_layer, decode_op_counts, image_step_launches
from .sjd import SjdBuffers, SjdResult, generate_image_tokens_sjd, sjd_step
from .step import Bucket, Buckets, Step, graphs_usable
from .text import TextBuffers, TextSettings, generate_tokens, text_step

__all__ = [
    "LOOKAHEAD",
    "BadLogitsError",
    "Bucket",
    "Buckets",
    "ImageBuffers",
    "ImageSettings",
    "JanusPro",
    "LlamaForCausalLM",
    "LlamaModel",
    "Marks",
    "MemoryPlan",
    "MemoryPlanWarning",
    "SjdBuffers",
    "SjdResult",
    "Step",
    "TextBuffers",
    "TextSettings",
    "decode_launches_per_layer",
    "decode_op_counts",
    "generate_image_tokens",
    "generate_image_tokens_sjd",
    "generate_tokens",
    "graphs_usable",
    "image_step",
    "image_step_launches",
    "plan_requests",
    "prefill",
    "run_steps",
    "sjd_step",
    "text_step",
]
