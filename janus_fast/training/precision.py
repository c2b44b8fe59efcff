"""Mixed precision of a training run. `mixed_precision: "bf16"` computes in bf16 on fp32 master
weights with an fp32 optimizer: under torchrun FSDP2's MixedPrecisionPolicy (distributed.shard_model)
gathers each unit's parameters in bf16 and reduces the gradients in fp32; on one process the
trainer runs the forward under torch.autocast, and the LLM's packed layers
(models/packed_layer.py) take the autocast dtype as their compute dtype: the residual stream and
every activation in bf16, each layer's weights copied into bf16 once per forward, their
gradients returned to the fp32 parameters in fp32."""

from __future__ import annotations

import torch


def compute_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype of `mixed_precision` ("bf16" or "fp32") on `device`; a ValueError naming
    the field when the device has no bf16 (a CUDA GPU before sm_80)."""
    if mixed_precision == "fp32":
        return torch.float32
    if mixed_precision != "bf16":
        raise ValueError(f"mixed_precision must be 'bf16' or 'fp32', got {mixed_precision!r}")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        raise ValueError(f"mixed_precision='bf16' needs a GPU with bfloat16 (sm_80 or newer); "
                         f"{torch.cuda.get_device_name(device)} ({device}) has none: use mixed_precision='fp32'")
    return torch.bfloat16
