"""janus_fast.ops — the one public kernel API.

Every op takes backend="auto"|"reference"|"triton"|"cuda"; "auto" picks the fastest backend
available for the tensors' device and the plain-PyTorch reference on the CPU.
"""

from ._backend import backends, prefer_backend
from ._checks import no_value_checks
from .attention import decode_attention, flash_attention, varlen_attention
from .attention_verify import verify_attention
from .cross_entropy import linear_cross_entropy
from .decode_layer import rope_kv_write
from .quant import quantize_rows, quantized_linear
from .rms_norm import rms_norm, rms_norm_backward
from .rope import rope_qkv
from .sampling import cfg_sample, new_rng_state, new_sampling_workspace
from .sampling_device import cfg_sample_settings, sampling_settings
from .sampling_verify import sjd_verify
from .silu_mul import silu_mul, silu_mul_backward
from .vq import vq_lookup, vq_quantize

__all__ = [
    "backends",
    "cfg_sample",
    "cfg_sample_settings",
    "decode_attention",
    "flash_attention",
    "linear_cross_entropy",
    "new_rng_state",
    "new_sampling_workspace",
    "no_value_checks",
    "prefer_backend",
    "quantize_rows",
    "quantized_linear",
    "rms_norm",
    "rms_norm_backward",
    "rope_kv_write",
    "rope_qkv",
    "sampling_settings",
    "silu_mul",
    "silu_mul_backward",
    "sjd_verify",
    "varlen_attention",
    "verify_attention",
    "vq_lookup",
    "vq_quantize",
]
