"""The fused Llama decoder layer over packed tokens: training (forward + backward) and the engine's
packed prefill. Per layer, on the packed tokens [T, H] of `PackedSequences` (no padding):

    normed, h1 = rms_norm(delta, residual)      the previous layer's last add fused into this norm
    q, k, v    = rope_qkv(normed · Wqkvᵀ)       one GEMM for Q/K/V; q and k rotated in one launch
    out        = varlen_attention(q, k, v)
    normed, h2 = rms_norm(out · Woᵀ, h1)
    down       = silu_mul(normed · Wguᵀ) · Wdownᵀ   one GEMM for gate/up
    -> (h2, down): the layer's second add is left to the next layer's norm (or the final norm)

Weights: Q/K/V and gate/up are fused in `fused_weight`'s layout (rows q | k | v, gate | up). For
training, the layer's GEMM weights are copied into one flat buffer in the compute dtype (one
launch: fp32 master weights to bf16 on one process, FSDP2's gathered bf16 parameters to one
buffer under torchrun), so FSDP2's per-layer units and the official parameters stay as they are.
The backward makes the copy again rather than keeping it (no second copy of the model lives
through the backward), and the weights' gradients come back in one launch into one flat buffer in
the parameters' dtype. Under inference mode (prefill) the layer runs the decode path's GEMMs: the
cached `fused_weight` tensors, or a QuantizedLinear's quantized weights (models/quant.py).

Activation memory: what the backward keeps per token per layer, E bytes per element of the compute
dtype (2 for bf16), H hidden, KV = Hkv·D, I intermediate, Hq query heads (lse is fp32):
    "none"       E·(6H + 2KV + 3I) + 4Hq   h1, norm1 out, q, k, v, out, lse, h2, norm2 out, gate/up, silu·mul
    "selective"  E·(4H + 2KV + 2I) + 4Hq   GEMM and attention outputs (h1, h2, q, k, v, out + lse,
                                           gate/up); the two norms' outputs and silu·mul are recomputed
    "full"       E·2H                      the layer's inputs (residual, delta); the whole layer is
                                           recomputed (torch.utils.checkpoint, training.distributed)
Janus-Pro-1B (H 2048, KV 2048, I 5632, Hq 16) in bf16: 65.1 / 46.1 / 8.0 KiB per token per layer,
so 4 x 4096 tokens x 24 layers keep 24.4 / 17.3 / 3.0 GiB (`activation_bytes_per_token`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from .quant import QuantizedLinear

QKV = ("q_proj", "k_proj", "v_proj")  # fused_weight's row blocks
GATE_UP = ("gate_proj", "up_proj")


def activation_bytes_per_token(cfg, mode: str, itemsize: int = 2) -> int:
    """Bytes the backward keeps per token per decoder layer (the table above)."""
    h, kv, i = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    lse = 4 * cfg.num_attention_heads
    per_mode = {"none": itemsize * (6 * h + 2 * kv + 3 * i) + lse,
                "selective": itemsize * (4 * h + 2 * kv + 2 * i) + lse,
                "full": itemsize * 2 * h}
    if mode not in per_mode:
        raise ValueError(f"mode must be one of {tuple(per_mode)}, got {mode!r}")
    return per_mode[mode]


class PackedSequences:
    """What every layer of one packed forward reads: position ids [T], cu_seqlens int32 [n + 1] and
    max_seqlen (a host int), the RoPE tables cos/sin [max_seqlen, D] (fp32), the compute dtype and,
    for a prefill, `keep_kv(k, v)` receiving the layer's rotated keys and values [T, Hkv, D].
    (A plain class, so FSDP2 does not cast its tables when it casts a unit's inputs.)"""

    __slots__ = ("positions", "cu_seqlens", "max_seqlen", "cos", "sin", "dtype", "keep_kv")

    def __init__(self, positions, cu_seqlens, max_seqlen: int, cos, sin, dtype: torch.dtype, keep_kv=None):
        self.positions, self.cu_seqlens, self.max_seqlen = positions, cu_seqlens, max_seqlen
        self.cos, self.sin, self.dtype, self.keep_kv = cos, sin, dtype, keep_kv

    def with_keep_kv(self, keep_kv) -> "PackedSequences":
        return PackedSequences(self.positions, self.cu_seqlens, self.max_seqlen, self.cos, self.sin, self.dtype,
                               keep_kv)


# --------------------------------------------------------------------------- weights


def _gemm_params(layer) -> list[torch.Tensor]:
    """The layer's GEMM weights in flat-buffer order: q, k, v, o, gate, up, down."""
    attn, mlp = layer.self_attn, layer.mlp
    return [getattr(attn, n).weight for n in (*QKV, "o_proj")] + [getattr(mlp, n).weight for n in (*GATE_UP, "down_proj")]


def _flat_copy(tensors, dtype: torch.dtype) -> torch.Tensor:
    """One new flat buffer in `dtype` holding `tensors` back to back (one launch)."""
    sizes = [t.numel() for t in tensors]
    flat = torch.empty(sum(sizes), dtype=dtype, device=tensors[0].device)
    torch._foreach_copy_([v.view(t.shape) for v, t in zip(flat.split(sizes), tensors)], list(tensors))
    return flat


def _fused_views(flat: torch.Tensor, shapes) -> tuple[torch.Tensor, ...]:
    """(qkv, o, gate_up, down) views of the flat buffer of the 7 weights (q, k, v, o, gate, up, down)."""
    sizes = [s.numel() for s in shapes]
    qkv, o, gate_up, down = flat.split([sum(sizes[:3]), sizes[3], sizes[4] + sizes[5], sizes[6]])
    hidden = shapes[0][1]
    return qkv.view(-1, hidden), o.view(shapes[3]), gate_up.view(-1, hidden), down.view(shapes[6])


class WeightSource:
    """The layer's GEMM weights in the compute dtype, made in the forward and made again on first
    use in the backward (then dropped after the last of the four GEMMs' backwards has read its
    own), rather than kept alive from the forward to the backward."""

    def __init__(self, params: list[torch.Tensor], dtype: torch.dtype):
        self.params, self.dtype = params, dtype
        self._made, self._pending = None, 0

    def make(self) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return _fused_views(_flat_copy(self.params, self.dtype), [p.shape for p in self.params])

    def get(self, slot: int) -> torch.Tensor:
        """Weight `slot` (0 qkv, 1 o, 2 gate_up, 3 down) for a GEMM's backward."""
        if self._made is None:
            self._made, self._pending = self.make(), 4
        weight = self._made[slot]
        self._pending -= 1
        if self._pending <= 0:
            self._made = None
        return weight


class _FlatWeights(torch.autograd.Function):
    """Forward: the 7 parameters copied into one flat buffer in the compute dtype (one launch),
    handed out as (qkv, o, gate_up, down). Backward: their gradients as views of the GEMMs'
    gradients when the dtypes agree, else copied into one flat buffer in the parameters' dtype
    (one launch): fp32 gradients of fp32 master weights."""

    @staticmethod
    def forward(ctx, source: WeightSource, *params):
        ctx.shapes = [p.shape for p in params]
        ctx.param_dtype = params[0].dtype
        ctx.set_materialize_grads(False)
        return source.make()

    @staticmethod
    def backward(ctx, *grads):
        shapes = ctx.shapes
        sizes = [s.numel() for s in shapes]
        hidden = shapes[0][1]
        fused_shapes = [(sum(sizes[:3]) // hidden, hidden), shapes[3], ((sizes[4] + sizes[5]) // hidden, hidden),
                        shapes[6]]
        like = next(g for g in grads if g is not None)  # a GEMM that did not reach the loss: zeros
        grads = [g if g is not None else like.new_zeros(s) for g, s in zip(grads, fused_shapes)]
        if any(g.dtype != ctx.param_dtype for g in grads):
            pieces = _flat_copy(grads, ctx.param_dtype).split(sizes)
        else:
            dqkv, do, dgu, ddown = (g.reshape(-1) for g in grads)
            pieces = [*dqkv.split(sizes[:3]), do, *dgu.split(sizes[4:6]), ddown]
        return (None, *(p.view(s) for p, s in zip(pieces, shapes)))


class LayerWeights:
    """What the four GEMMs of one layer compute with. Training: the weights qkv, o, gate_up, down
    in the compute dtype (`tensors`, the autograd inputs of the GEMMs) and the WeightSource their
    backwards fetch them from again. Inference mode (prefill), or quantized layers (inference
    only): the decode path's GEMMs, which read the cached `fused_weight` tensors, or a
    QuantizedLinear's quantized ones."""

    def __init__(self, layer, dtype: torch.dtype):
        from .llama import fused_linear

        attn, mlp = layer.self_attn, layer.mlp
        self.source, self.tensors = None, (None,) * 4
        if torch.is_inference_mode_enabled() or isinstance(attn.q_proj, QuantizedLinear):
            self.modules = (lambda x: fused_linear(attn, QKV, x), attn.o_proj,
                            lambda x: fused_linear(mlp, GATE_UP, x), mlp.down_proj)
            return
        self.modules = None
        params = _gemm_params(layer)
        self.source = WeightSource(params, dtype)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            self.tensors = _FlatWeights.apply(self.source, *params)
        else:
            self.tensors = self.source.make()

    def linear(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """x through GEMM `slot` (0 qkv, 1 o, 2 gate_up, 3 down)."""
        return self.modules[slot](x) if self.modules is not None else F.linear(x, self.tensors[slot])


# --------------------------------------------------------------------------- GEMMs with their prologue


def _weight_grads(ctx, dout, x, weight_index: int, slot: int):
    """(dW, dx) of out = x Wᵀ, W fetched from the layer's WeightSource."""
    dw = dout.t().mm(x) if ctx.needs_input_grad[weight_index] else None
    return dw, dout.mm(ctx.source.get(slot))


class _NormLinear(torch.autograd.Function):
    """out = rms_norm(x (+ residual)) · Wᵀ -> out, or (out, h = x + residual) with a residual. Keeps
    h and the norm weight; the norm's output too when `keep`, else it is recomputed in the backward
    (one launch), and the norm's backward adds the gradient reaching h in the same launch."""

    @staticmethod
    def forward(ctx, x, residual, norm_weight, weight, w: LayerWeights, slot: int, eps: float, keep: bool):
        if residual is None:
            y, h = ops.rms_norm(x, norm_weight, eps=eps), x
        else:
            y, h = ops.rms_norm(x, norm_weight, eps=eps, residual=residual)
        ctx.source, ctx.slot, ctx.eps, ctx.fused = w.source, slot, eps, residual is not None
        ctx.save_for_backward(h, norm_weight, *([y] if keep else []))
        ctx.set_materialize_grads(False)
        out = w.linear(slot, y)
        return (out, h) if residual is not None else out

    @staticmethod
    def backward(ctx, dout, dh=None):
        h, norm_weight, *kept = ctx.saved_tensors
        y = kept[0] if kept else ops.rms_norm(h, norm_weight, eps=ctx.eps)
        dw, dy = _weight_grads(ctx, dout, y, 3, ctx.slot)
        dx, dnorm = ops.rms_norm_backward(dy, h, norm_weight, eps=ctx.eps, grad_h=dh,
                                          weight_grad=ctx.needs_input_grad[2])
        return dx, dx if ctx.fused else None, dnorm if ctx.needs_input_grad[2] else None, dw, None, None, None, None


class _SiluMulLinear(torch.autograd.Function):
    """out = silu_mul(gate_up) · Wᵀ. Keeps gate_up; silu_mul's output too when `keep`, else it is
    recomputed in the backward (one launch)."""

    @staticmethod
    def forward(ctx, gate_up, weight, w: LayerWeights, slot: int, keep: bool):
        a = ops.silu_mul(gate_up)
        ctx.source, ctx.slot = w.source, slot
        ctx.save_for_backward(gate_up, *([a] if keep else []))
        return w.linear(slot, a)

    @staticmethod
    def backward(ctx, dout):
        gate_up, *kept = ctx.saved_tensors
        a = kept[0] if kept else ops.silu_mul(gate_up)
        dw, da = _weight_grads(ctx, dout, a, 1, ctx.slot)
        return ops.silu_mul_backward(da, gate_up), dw, None, None, None


class _Linear(torch.autograd.Function):
    """out = x · Wᵀ, W fetched again in the backward."""

    @staticmethod
    def forward(ctx, x, weight, w: LayerWeights, slot: int):
        ctx.source, ctx.slot = w.source, slot
        ctx.save_for_backward(x)
        return w.linear(slot, x)

    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        dw, dx = _weight_grads(ctx, dout, x, 1, ctx.slot)
        return dx, dw, None, None


# --------------------------------------------------------------------------- the layer


def packed_layer(layer, residual: torch.Tensor, delta: torch.Tensor | None, seqs: PackedSequences):
    """One LlamaDecoderLayer over packed tokens: residual [T, H] (plus the previous layer's
    `delta`, None for the first layer) -> (residual, delta) for the next layer."""
    attn, norm1, norm2 = layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm
    w = LayerWeights(layer, seqs.dtype)
    keep = not layer.recompute_elementwise
    if delta is None:
        qkv, h1 = _NormLinear.apply(residual, None, norm1.weight, w.tensors[0], w, 0, norm1.eps, keep), residual
    else:
        qkv, h1 = _NormLinear.apply(delta, residual, norm1.weight, w.tensors[0], w, 0, norm1.eps, keep)
    q, k, v = ops.rope_qkv(qkv, seqs.positions, seqs.cos, seqs.sin, num_heads=attn.num_heads,
                           num_kv_heads=attn.num_kv_heads)
    if seqs.keep_kv is not None:
        seqs.keep_kv(k, v)
    out = ops.varlen_attention(q, k, v, seqs.cu_seqlens, seqs.cu_seqlens, seqs.max_seqlen, seqs.max_seqlen,
                               causal=True)
    o = _Linear.apply(out.view(out.shape[0], -1), w.tensors[1], w, 1)
    gate_up, h2 = _NormLinear.apply(o, h1, norm2.weight, w.tensors[2], w, 2, norm2.eps, keep)
    return h2, _SiluMulLinear.apply(gate_up, w.tensors[3], w, 3, keep)
