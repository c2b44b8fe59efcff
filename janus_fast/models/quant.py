"""Quantized weights as a property of a module: `QuantizedLinear` stores a Linear layer's weight
in int8 or fp8 (e4m3) with one fp32 scale per output channel and runs ops.quantized_linear, whose
kernels dequantize in registers. Whatever calls the layer (the packed prefill, the decode step,
gen_head) is unchanged; the fused Q/K/V and gate/up decode GEMMs fuse the quantized weights the
same way `llama.fused_weight` fuses float ones.

`quantize_linears` swaps a module's Linear layers one at a time, each float weight dropped
before the next is quantized, so quantizing a loaded model never holds a second copy of it.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .. import ops
from ..ops.quant import FORMATS, format_dtype


class QuantizedLinear(nn.Module):
    """A Linear layer for inference with its weight stored quantized: buffers qweight [out, in]
    (int8 or float8_e4m3fn) and weight_scale fp32 [out], weight = qweight · weight_scale[:, None];
    bias (a Parameter in the activations' dtype) or None. There is no float `weight`: training
    and exporting need the unquantized model. Moving the module (`.to(device)`) moves the
    buffers; casting it (`.to(dtype)`, `.half()`) casts only the bias: the stored format and its
    scales stay as they are."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: str = "int8",
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.format = in_features, out_features, fmt
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=format_dtype(fmt), device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str) -> "QuantizedLinear":
        """`linear` quantized per output channel (ops.quantize_rows); its bias is kept as is."""
        with torch.device("meta"):
            module = cls(linear.in_features, linear.out_features, False, fmt)
        with torch.no_grad():
            module.qweight, module.weight_scale = ops.quantize_rows(linear.weight.detach(), fmt)
        module.bias = linear.bias
        return module

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with, as a float tensor (for references and tests)."""
        return ops.reference.dequantize_rows(self.qweight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.quantized_linear(x, self.qweight, self.weight_scale, self.bias)

    def __getattr__(self, name: str):
        if name == "weight":  # (nn.Module's own message would not say why)
            raise AttributeError(f"{type(self).__name__} stores its weight quantized ({self.format}: qweight, "
                                 f"weight_scale) for inference and has no float weight; load the model without "
                                 f"quantize= to train or export it")
        return super().__getattr__(name)

    def _apply(self, fn, recurse=True):
        device = fn(torch.empty(0, device=self.qweight.device)).device  # where fn sends a float tensor
        stored = {name: self._buffers.pop(name) for name in ("qweight", "weight_scale")}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in stored.items():
                self._buffers[name] = t.to(device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}")


def check_quantize(fmt, device, what: str = "quantize") -> torch.dtype:
    """The storage dtype of the format `fmt`, or ValueError naming `what` (an unknown format; fp8
    on a GPU older than sm_89), raised before anything is loaded or quantized."""
    dtype = format_dtype(fmt, what)
    ops.quant.check_supported(dtype, device, what)
    return dtype


@torch.no_grad()
def quantize_linears(root: nn.Module, fmt: str) -> int:
    """Replace every nn.Linear under `root` by its QuantizedLinear, one at a time: each float
    weight is released (with any fused copy of it) before the next layer is quantized, so the
    peak is the model plus one layer. Returns the number of layers quantized."""
    count = 0
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                for key in [k for k in module.__dict__ if k.startswith("_fused_")]:
                    del module.__dict__[key]  # a fused copy would keep the float weights alive
                setattr(module, name, QuantizedLinear.from_linear(child, fmt))
                count += 1
    return count


def weight_formats(root: nn.Module) -> set[str]:
    """The formats of the QuantizedLinear layers under `root` (empty: not quantized)."""
    return {m.format for m in root.modules() if isinstance(m, QuantizedLinear)}


def decode_weight_bytes(model: nn.Module, step: str = "image") -> int:
    """Bytes of weights one decode step of a JanusPro reads, each tensor once: the LLM's layers
    and final norm, then gen_head and gen_aligner for an image token or lm_head for a text token
    (embedding lookups read only their rows and are left out). The measure int8 halves."""
    if step not in ("image", "text"):
        raise ValueError(f"step must be 'image' or 'text', got {step!r}")
    lm = model.language_model
    parts = [lm.model.layers, lm.model.norm] + ([model.gen_head, model.gen_aligner] if step == "image" else [lm.lm_head])
    return sum(t.nbytes for part in parts for t in itertools.chain(part.parameters(), part.buffers()))


__all__ = ["FORMATS", "QuantizedLinear", "check_quantize", "decode_weight_bytes", "quantize_linears", "weight_formats"]
