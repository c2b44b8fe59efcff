"""janus_fast.ops — the one public kernel API.

Every op takes backend="auto"|"reference"|"triton"|"cuda"; "auto" picks the fastest backend
available for the tensors' device and the plain-PyTorch reference on the CPU.
"""

from ._backend import backends
from ._checks import no_value_checks
from .attention import decode_attention, flash_attention, varlen_attention
from .attention_verify import verify_attention
from .cross_entropy import linear_cross_entropy
from .decode_layer import rms_norm, rope_kv_write, silu_mul
from .quant import quantize_rows, quantized_linear
from .sampling import cfg_sample, new_rng_state, new_sampling_workspace
from .sampling_verify import sjd_verify
from .vq import vq_lookup, vq_quantize

__all__ = [
    "backends",
    "cfg_sample",
    "decode_attention",
    "flash_attention",
    "linear_cross_entropy",
    "new_rng_state",
    "new_sampling_workspace",
    "no_value_checks",
    "quantize_rows",
    "quantized_linear",
    "rms_norm",
    "rope_kv_write",
    "silu_mul",
    "sjd_verify",
    "varlen_attention",
    "verify_attention",
    "vq_lookup",
    "vq_quantize",
]
