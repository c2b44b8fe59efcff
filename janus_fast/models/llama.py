"""The Llama LLM of Janus-Pro (DeepSeek-LLM) with the official module names, a static KV cache and
janus_fast.ops attention.

Attention paths (chosen once per forward, shared by all layers):
  dense   no cache and no padding mask: ops.flash_attention(causal=True) over [B, T].
  packed  a padding mask and/or earlier cached tokens: the real tokens are packed and run through
          ops.varlen_attention (causal, bottom-right aligned), so left padding needs no additive
          mask. The cache keeps each row's real tokens left-aligned: row b holds cache.seqlens[b]
          tokens, and a token's rotary position is its index in that row (0 at the first real
          token, as the official `generate` computes position ids from the attention mask).
  decode  one new token per row with a cache: `LlamaModel.decode_step`, a small function over the
          static cache with ops.decode_attention and per-row lengths, free of host syncs so a
          later engine can capture it in a CUDA graph or replace it.
Training and the engine's prefill run `LlamaModel.forward_packed`: the fused layer of
models/packed_layer.py over packed sequences (fused norms, QKV and gate/up GEMMs, RoPE, SiLU·mul,
with their backward and selective recomputation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.quant import QUANTIZED_DTYPES, format_dtype
from . import arguments
from .config import LlamaConfig
from .packed_layer import GATE_UP, QKV, PackedSequences, packed_layer
from .quant import QuantizedLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32, cast back before the weight (the Llama convention).
        x32 = x.float() if x.dtype != torch.float64 else x
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [*positions.shape, 1, head_dim] for rotate-half RoPE, computed in fp32 and cast
    to `dtype` (as the reference Llama does)."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[..., None, :], emb.sin().to(dtype)[..., None, :]


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Static KV cache: per layer k/v [B, capacity, Hkv, D]; row b holds its first seqlens[b]
    slots (real tokens only, left-aligned), so a token's slot is also its rotary position.
    `max_seqlen` is a host-side upper bound of seqlens so growing the cache never reads device
    memory. rope_cos/rope_sin [capacity, D] (fp32) are the RoPE table of every slot, which the
    decode step reads at seqlens.

    kv_format "int8" / "fp8" makes a quantized cache: k/v hold each head of each token in that
    format and k_scale/v_scale [B, capacity, Hkv] (fp32) its scale (ops.quantize_rows);
    `write` / `read` quantize and dequantize, `scales(layer)` hands them to the decode ops."""

    def __init__(self, num_layers: int, batch: int, capacity: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, rope_theta: float = 10000.0, kv_format: str | None = None):
        shape = (batch, capacity, num_kv_heads, head_dim)
        storage = dtype if kv_format is None else format_dtype(kv_format, "kv_cache_dtype")
        self.dtype, self.kv_format = dtype, kv_format
        self.k = [torch.zeros(shape, dtype=storage, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=storage, device=device) for _ in range(num_layers)]
        self.k_scale = self.v_scale = None
        if kv_format is not None:
            self.k_scale = [torch.zeros(shape[:3], dtype=torch.float32, device=device) for _ in range(num_layers)]
            self.v_scale = [torch.zeros(shape[:3], dtype=torch.float32, device=device) for _ in range(num_layers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.max_seqlen = 0
        self.rope_theta = rope_theta
        self._rope_table(capacity)

    def _rope_table(self, capacity: int) -> None:
        positions = torch.arange(capacity, device=self.seqlens.device)
        cos, sin = rope_cos_sin(positions, self.k[0].shape[-1], self.rope_theta, torch.float32)
        self.rope_cos, self.rope_sin = cos[:, 0], sin[:, 0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def get_seq_length(self) -> int:
        return self.max_seqlen

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def write(self, layer: int, index: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys and values [..., Hkv, D] at k/v[layer][index] (index: over rows and slots),
        quantized per head in a quantized cache."""
        if not self.quantized:
            self.k[layer][index] = k
            self.v[layer][index] = v
            return
        self.k[layer][index], self.k_scale[layer][index] = ops.quantize_rows(k, self.kv_format)
        self.v[layer][index], self.v_scale[layer][index] = ops.quantize_rows(v, self.kv_format)

    def read(self, layer: int, index) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) at k/v[layer][index] in the activations' dtype (dequantized from a quantized cache)."""
        if not self.quantized:
            return self.k[layer][index], self.v[layer][index]
        return (ops.quant.dequantize_rows(self.k[layer][index], self.k_scale[layer][index], self.dtype),
                ops.quant.dequantize_rows(self.v[layer][index], self.v_scale[layer][index], self.dtype))

    def scales(self, layer: int) -> dict:
        """The decode ops' scale arguments for `layer` (none for a plain cache)."""
        return {"k_scale": self.k_scale[layer], "v_scale": self.v_scale[layer]} if self.quantized else {}

    def reserve(self, n: int) -> None:
        """Make room for n more tokens per row (reallocating at least 2x when it must grow)."""
        need = self.max_seqlen + n
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity)
        for buf in (self.k, self.v) + ((self.k_scale, self.v_scale) if self.quantized else ()):
            for i, t in enumerate(buf):
                grown = t.new_zeros((t.shape[0], cap, *t.shape[2:]))
                grown[:, : t.shape[1]] = t
                buf[i] = grown
        self._rope_table(cap)


def fused_weight(owner: nn.Module, names: tuple[str, ...], attr: str = "weight") -> torch.Tensor:
    """One [sum of out_features, in_features] weight whose row blocks are the weights of the
    Linear layers owner.<names>, so a decode step runs one GEMM for all of them. The layers keep
    their Parameters (and state-dict keys): those become views of the fused tensor, with their
    values unchanged, and the Parameter objects themselves too (an optimizer holding them keeps
    updating what the model computes with). Made on first use and again whenever a Parameter no
    longer views it (after `.to()`, or a checkpoint load that assigned new tensors). `attr` fuses
    another per-row tensor of the layers the same way (a QuantizedLinear's qweight / weight_scale
    buffers)."""
    key = "_fused_" + "_".join(names) + ("" if attr == "weight" else "_" + attr)
    weights = [getattr(getattr(owner, n), attr) for n in names]
    fused = owner.__dict__.get(key)
    if fused is not None:
        starts = [0]
        for w in weights:
            starts.append(starts[-1] + w.shape[0])
        if all(w.data_ptr() == fused[s].data_ptr() and w.shape[1:] == fused.shape[1:]
               for w, s in zip(weights, starts)) and starts[-1] == fused.shape[0]:
            return fused
    # Outside inference mode, so the Parameters stay trainable wherever the fusion happens.
    with torch.inference_mode(False), torch.no_grad():
        fused = torch.cat([w.detach() for w in weights])
        start = 0
        for n, w in zip(names, weights):
            linear, rows = getattr(owner, n), fused[start:start + w.shape[0]]
            if attr in linear._parameters:
                w.data = rows
            else:
                linear._buffers[attr] = rows
            start += w.shape[0]
    owner.__dict__[key] = fused
    return fused


def fused_linear(owner: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    """x through the bias-free Linear layers owner.<names> at once, their outputs side by side:
    one GEMM over fused_weight, or one ops.quantized_linear over the fused quantized weights and
    scales when the layers are QuantizedLinear."""
    if isinstance(getattr(owner, names[0]), QuantizedLinear):
        return ops.quantized_linear(x, fused_weight(owner, names, "qweight"), fused_weight(owner, names, "weight_scale"))
    return F.linear(x, fused_weight(owner, names))


class BadLogitsError(FloatingPointError):
    """The (guided) logits held NaN or +inf, or no finite entry: no token can be drawn
    (ops.cfg_sample's -1)."""


def first_bad_step(tokens: torch.Tensor) -> int | None:
    """The first step (column of tokens [B, n]) holding the sampler's -1 of bad logits, or None;
    one host sync."""
    bad = (tokens < 0).any(0)
    step = int(torch.where(bad.any(), bad.int().argmax(), -1)) if bad.numel() else -1
    return None if step < 0 else step


def bad_new_token(step: int) -> BadLogitsError:
    return BadLogitsError(f"the logits held NaN or +inf (or nothing finite) at new token {step}")


@dataclass
class BaseModelOutputWithPast:
    last_hidden_state: torch.Tensor
    past_key_values: KVCache | None = None

    def __getitem__(self, i):
        return (self.last_hidden_state, self.past_key_values)[i]


@dataclass
class CausalLMOutputWithPast:
    logits: torch.Tensor
    past_key_values: KVCache | None = None

    def __getitem__(self, i):
        return (self.logits, self.past_key_values)[i]


@dataclass
class _Packing:
    """Where the real tokens of a [B, T] chunk go: index pairs, cache slots and cu_seqlens."""

    rows: torch.Tensor
    cols: torch.Tensor
    slots: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    kv_select: torch.Tensor | None  # [B, capacity] bool: cached keys each row attends to


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def qkv(self, x, cos, sin):
        shape = x.shape[:-1]
        q = self.q_proj(x).view(*shape, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None, packing: _Packing | None):
        b, t = x.shape[:2]
        q, k, v = self.qkv(x, cos, sin)
        if packing is None:  # dense: fresh causal sequences, no padding
            if cache is not None:
                cache.write(layer, (slice(None), slice(0, t)), k, v)
            out = ops.flash_attention(q, k, v, causal=True)
        else:
            p = packing
            k_new, v_new = k[p.rows, p.cols], v[p.rows, p.cols]
            if cache is not None:
                cache.write(layer, (p.rows, p.slots), k_new, v_new)
                k_all, v_all = cache.read(layer, p.kv_select)
                if cache.quantized:  # the chunk attends to its own keys unquantized, as a prefill does
                    at = p.cu_k[:-1].long()[p.rows] + p.slots
                    k_all[at], v_all[at] = k_new, v_new
                k_new, v_new = k_all, v_all
            packed = ops.varlen_attention(q[p.rows, p.cols], k_new, v_new, p.cu_q, p.cu_k, p.max_q, p.max_k,
                                          causal=True)
            out = q.new_zeros(q.shape)
            out[p.rows, p.cols] = packed
        return self.o_proj(out.reshape(b, t, -1))

    def _cached_qkv(self, x, cache: KVCache, layer: int, positions: torch.Tensor):
        """x [M, H] new tokens: one QKV GEMM, RoPE fused with writing k/v at slots positions[m] of
        cache row m // (M // B) -> the rotated q [M, Hq, D]."""
        m, d = x.shape[0], self.head_dim
        qkv = fused_linear(self, QKV, x)
        q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], -1)
        return ops.rope_kv_write(q.view(m, self.num_heads, d), k.view(m, self.num_kv_heads, d),
                                 v.view(m, self.num_kv_heads, d), cache.rope_cos, cache.rope_sin, positions,
                                 cache.k[layer], cache.v[layer], **cache.scales(layer))

    def decode(self, x, cache: KVCache, layer: int, lengths: torch.Tensor):
        """x [B, H], one token per row: k/v written at slot seqlens[b], attention over lengths[b]
        = seqlens[b] + 1 keys, the o GEMM."""
        q = self._cached_qkv(x, cache, layer, cache.seqlens)
        out = ops.decode_attention(q, cache.k[layer], cache.v[layer], lengths, **cache.scales(layer))
        return self.o_proj(out.reshape(x.shape[0], -1))

    def verify(self, x, cache: KVCache, layer: int, positions: torch.Tensor, lengths: torch.Tensor):
        """x [B * W, H], a window of W tokens per row: k/v written at slots positions (seqlens[b]
        + j), attention of token j over the lengths[b] - (W - 1 - j) first keys, the o GEMM."""
        b = lengths.shape[0]
        q = self._cached_qkv(x, cache, layer, positions)
        out = ops.verify_attention(q.view(b, x.shape[0] // b, self.num_heads, self.head_dim), cache.k[layer],
                                   cache.v[layer], lengths)
        return self.o_proj(out.reshape(x.shape[0], -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def decode(self, x):
        """The same maths for decoding: one gate/up GEMM, a fused SiLU·mul, the down GEMM."""
        return self.down_proj(ops.silu_mul(fused_linear(self, GATE_UP, x)))


class LlamaDecoderLayer(nn.Module):
    # Training's selective activation checkpointing (training.distributed.checkpoint_layers): the
    # packed layer's backward recomputes its norms and SiLU·mul instead of keeping their outputs.
    recompute_elementwise = False

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, attend, delta=None):
        """`attend(self_attn, normed_h)` runs the attention path the caller chose (dense or
        padded), so the paths share one block definition. Given PackedSequences instead, the
        fused packed layer runs (models/packed_layer.py): h is the residual stream and delta the
        previous layer's output still to be added (None for the first layer), and the result is
        (residual, delta), this layer's last add left to the next norm."""
        if isinstance(attend, PackedSequences):
            return packed_layer(self, h, delta, attend)
        h = h + attend(self.self_attn, self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # the storage format of new caches: None (the activations' dtype) or "int8" / "fp8"
        self.kv_cache_dtype: str | None = None

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        cfg, w = self.config, self.embed_tokens.weight
        return KVCache(cfg.num_hidden_layers, batch, capacity, cfg.num_key_value_heads, cfg.head_dim,
                       w.dtype, w.device, cfg.rope_theta, self.kv_cache_dtype)

    def kv_bytes_per_token(self, kv_dtype=None) -> int:
        """Bytes of K and V per token per cache row over all layers, scales included, for a cache
        of `kv_dtype`: a torch dtype (a plain cache; torch.int8 / float8_e4m3fn mean the quantized
        formats), "int8" / "fp8" (one byte per value plus one fp32 scale per head), or None: the
        caches `new_cache` makes. Memory plans multiply it by rows x capacity."""
        cfg = self.config
        if kv_dtype is None:
            kv_dtype = self.kv_cache_dtype or self.embed_tokens.weight.dtype
        quantized = isinstance(kv_dtype, str) or kv_dtype in QUANTIZED_DTYPES
        value_bytes = (format_dtype(kv_dtype, "kv_dtype") if isinstance(kv_dtype, str) else kv_dtype).itemsize
        per_head = cfg.head_dim * value_bytes + (torch.float32.itemsize if quantized else 0)
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * per_head

    def _rope(self, positions, dtype):
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)

    def decode_step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row: x [B, H] embeddings -> final-normed hidden [B, H]; appends to the
        cache and advances cache.seqlens in place. No host syncs, no allocation that depends on
        values: the piece a CUDA-graph engine captures. The caller keeps capacity
        (`cache.reserve(1)`) and `cache.max_seqlen`.

        Each layer is nine dispatched ops: the residual add fused into each RMSNorm, one QKV
        GEMM, RoPE fused with the cache write, decode attention, the o GEMM, one gate/up GEMM,
        SiLU·mul and the down GEMM (the Q/K/V and gate/up weights fused on first use)."""
        lengths = cache.seqlens + 1
        out = self._fused_layers(x, lambda attn, normed, i: attn.decode(normed, cache, i, lengths))
        cache.seqlens.add_(1)
        return out

    def verify_step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """A window of W tokens per row (speculative decoding's verification pass): x [B, W, H] ->
        final-normed hidden [B, W, H]. Their keys and values go to slots seqlens[b] .. seqlens[b]
        + W - 1 (their rotary positions), token j attends to the cache and to window tokens <= j.
        cache.seqlens is NOT advanced: the caller adds what it accepts, and the next pass
        overwrites the rest. The decode step's ops per layer with verify_attention; no host
        syncs. The caller keeps capacity for seqlens + W."""
        if cache.quantized:
            raise ValueError("verify_step (speculative decoding) does not take a quantized KV cache yet: "
                             "use kv_cache_dtype=None")
        b, w, h = x.shape
        positions = (cache.seqlens[:, None] + torch.arange(w, dtype=torch.int32, device=x.device)).view(-1)
        lengths = cache.seqlens + w
        out = self._fused_layers(x.reshape(b * w, h),
                                 lambda attn, normed, i: attn.verify(normed, cache, i, positions, lengths))
        return out.view(b, w, h)

    def _fused_layers(self, x: torch.Tensor, attend) -> torch.Tensor:
        """The layers on the fused decode ops for rows x [M, H]: `attend(self_attn, normed, i)`
        is layer i's attention; -> the final-normed hidden [M, H]."""
        eps = self.config.rms_norm_eps
        residual, delta = x, None
        for i, layer in enumerate(self.layers):
            if delta is None:
                normed = ops.rms_norm(residual, layer.input_layernorm.weight, eps=eps)
            else:
                normed, residual = ops.rms_norm(delta, layer.input_layernorm.weight, eps=eps, residual=residual)
            delta = attend(layer.self_attn, normed, i)
            normed, residual = ops.rms_norm(delta, layer.post_attention_layernorm.weight, eps=eps, residual=residual)
            delta = layer.mlp.decode(normed)
        if delta is None:
            return ops.rms_norm(residual, self.norm.weight, eps=eps)
        return ops.rms_norm(delta, self.norm.weight, eps=eps, residual=residual)[0]

    def forward_packed(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                       max_seqlen: int, keep_kv=None) -> torch.Tensor:
        """Packed sequences (training, and the engine's prefill): inputs_embeds [T, H] holding the
        sequences of cu_seqlens (int32 [n + 1]) back to back, position_ids [T] restarting at 0 in
        each (so below max_seqlen) -> final-normed hidden [T, H]. `keep_kv(layer, k, v)`, if given,
        receives each layer's rotated keys and values [T, Hkv, D]. Runs the fused packed layer in
        the compute dtype: the autocast dtype under torch.autocast (the residual stream and every
        activation in it, the weights copied into it once per layer), else inputs_embeds'."""
        if inputs_embeds.dim() != 2 or position_ids.shape != inputs_embeds.shape[:1]:
            raise ValueError(f"inputs_embeds must be [T, hidden] and position_ids [T], got "
                             f"{tuple(inputs_embeds.shape)} and {tuple(position_ids.shape)}")
        device = inputs_embeds.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else inputs_embeds.dtype
        cos, sin = rope_cos_sin(torch.arange(max(max_seqlen, 1), device=device), self.config.head_dim,
                                self.config.rope_theta, torch.float32)
        seqs = PackedSequences(position_ids, cu_seqlens, max_seqlen, cos[:, 0], sin[:, 0], dtype)
        residual, delta = inputs_embeds.to(dtype), None
        for i, layer in enumerate(self.layers):
            keep = None if keep_kv is None else (lambda k, v, i=i: keep_kv(i, k, v))
            residual, delta = layer(residual, seqs.with_keep_kv(keep), delta)
        if delta is None:
            return ops.rms_norm(residual, self.norm.weight, eps=self.norm.eps)
        return ops.rms_norm(delta, self.norm.weight, eps=self.norm.eps, residual=residual)[0]

    def _packing(self, mask: torch.Tensor | None, b: int, t: int, cache: KVCache | None, device):
        """Positions [B, T] and the packing of the real tokens (host syncs: prefill only)."""
        starts = cache.seqlens.long() if cache is not None else torch.zeros(b, dtype=torch.long, device=device)
        real = mask.bool() if mask is not None else torch.ones(b, t, dtype=torch.bool, device=device)
        rank = real.long().cumsum(1) - 1
        positions = (starts[:, None] + rank).clamp(min=0)
        n_new = real.sum(1)
        rows, cols = real.nonzero(as_tuple=True)
        lengths_k = starts + n_new
        zero = torch.zeros(1, dtype=torch.int32, device=device)
        cu_q = torch.cat([zero, n_new.cumsum(0).int()])
        cu_k = torch.cat([zero, lengths_k.cumsum(0).int()])
        kv_select = None
        if cache is not None:
            kv_select = torch.arange(cache.capacity, device=device)[None, :] < lengths_k[:, None]
        return positions, _Packing(rows, cols, (starts[:, None] + rank)[rows, cols], cu_q, cu_k,
                                   int(n_new.max()), int(lengths_k.max()), kv_select)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, past_key_values=None,
                use_cache: bool | None = None, return_dict: bool = True) -> BaseModelOutputWithPast:
        """input_ids [B, T] or inputs_embeds [B, T, H]; attention_mask [B, T] or [B, past + T]
        (1 = real token; only its last T columns are read: the cache holds no padding);
        past_key_values: a KVCache from an earlier call (updated in place and returned).
        return_dict is accepted for transformers compatibility: the result is always an object."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if h.dim() != 3:
            raise ValueError(f"inputs must be [batch, seq] ids or [batch, seq, hidden] embeddings, got {tuple(h.shape)}")
        b, t, _ = h.shape
        cache = past_key_values
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"past_key_values must be a janus_fast KVCache, got {type(cache).__name__}")
        if cache is not None and cache.batch_size != b:
            raise ValueError(f"past_key_values holds {cache.batch_size} rows, inputs have {b}")
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < t:
                raise ValueError(f"attention_mask must be [batch, past + seq] = [{b}, >= {t}], "
                                 f"got {tuple(attention_mask.shape)}")
            mask = attention_mask[:, -t:]
            if bool(mask.all()):
                mask = None
        if cache is None and use_cache:
            cache = self.new_cache(b, t)
        if cache is not None:
            cache.reserve(t)
        if t == 1 and mask is None and cache is not None and cache.max_seqlen > 0:
            with ops.no_value_checks():  # cache lengths are kept by us: no device reads per layer
                out = self.decode_step(h[:, 0], cache)[:, None]
            cache.max_seqlen += 1
            return BaseModelOutputWithPast(out, cache)
        if mask is None and (cache is None or cache.max_seqlen == 0):
            positions = torch.arange(t, device=h.device).expand(b, t)
            packing = None
        else:
            positions, packing = self._packing(mask, b, t, cache, h.device)
        cos, sin = self._rope(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, lambda attn, y, i=i: attn(y, cos, sin, i, cache, packing))
        if cache is not None:
            cache.seqlens += t if mask is None else mask.sum(1).int()
            cache.max_seqlen += t
        return BaseModelOutputWithPast(self.norm(h), cache if use_cache or past_key_values is not None else None)


class LlamaForCausalLM(nn.Module):
    model_class = LlamaModel  # the engine's subclass runs the token-by-token loop on captured steps

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = self.model_class(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, past_key_values=None,
                use_cache: bool | None = None, return_dict: bool = True) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         past_key_values=past_key_values, use_cache=use_cache)
        return CausalLMOutputWithPast(self.lm_head(out.last_hidden_state), out.past_key_values)

    def sample(self, logits, do_sample: bool, temperature: float, top_k: int, top_p: float, generator=None,
               rng_state=None, workspace=None):
        """Next token [B] from logits [B, V]: argmax, or a draw through ops.cfg_sample with the
        logits as both halves at cfg_weight 1 (u + 1·(c − u) = c exactly: no guidance), from
        `generator` or from a device `rng_state` (ops.new_rng_state) that the launch advances,
        with cfg_sample's `workspace` when given; a row without a finite maximum draws -1 (cfg_sample's bad-logits token)."""
        if not do_sample:
            return logits.argmax(-1)
        both = torch.cat([logits, logits])  # (cfg_sample reads 16-bit logits in fp32 itself)
        return ops.cfg_sample(both, cfg_weight=1.0, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator, rng_state=rng_state, layout="halves", workspace=workspace)

    @torch.no_grad()
    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, *, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 pad_token_id=None, bos_token_id=None, eos_token_id=None, use_cache: bool = True,
                 generator: torch.Generator | None = None, progress=None) -> torch.Tensor:
        """Text generation as transformers' `generate` for a left-padded batch: returns the new
        token ids [B, n <= max_new_tokens] (after input_ids when those were given instead of
        embeddings); rows that produced EOS are padded with pad_token_id (default: EOS); stops
        when every row is done. bos_token_id and use_cache are accepted for compatibility. The
        prompt plus max_new_tokens must fit the context (max_position_embeddings); the sampling
        arguments are checked as `models.arguments.sampling` states, before anything runs.
        progress(step, max_new_tokens), if given, is called as each new token is done."""
        del bos_token_id, use_cache
        max_new_tokens = arguments.max_new_tokens(max_new_tokens)
        if do_sample:
            _, temperature, top_k, top_p = arguments.sampling(None, temperature, top_k, top_p)
        if (input_ids if inputs_embeds is None else inputs_embeds) is None:
            raise ValueError("pass input_ids or inputs_embeds")
        prompt = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        arguments.fits_context(prompt, max_new_tokens, self.config.max_position_embeddings, "the answer may take")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        new = self.generate_new_tokens(inputs_embeds, attention_mask, max_new_tokens, do_sample, temperature,
                                       top_k, top_p, tuple(eos), pad, generator, progress)
        return torch.cat([input_ids, new], 1) if input_ids is not None else new

    def generate_new_tokens(self, embeds, attention_mask, max_new_tokens: int, do_sample: bool, temperature: float,
                            top_k: int, top_p: float, eos: tuple[int, ...], pad: int, generator,
                            progress=None) -> torch.Tensor:
        """The decoding loop of `generate`, eager over a growing cache (the engine replaces it):
        left-padded embeds [B, T, H] (attention_mask [B, T] or None) -> new ids [B, n]; raises
        ValueError for a mask that is not left padding."""
        b, t = embeds.shape[:2]
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs a left-padded batch: attention_mask[:, -1] must be 1 in every row")
        cache = self.model.new_cache(b, t + max_new_tokens)
        h = self.model(inputs_embeds=embeds, attention_mask=attention_mask, past_key_values=cache,
                       use_cache=True).last_hidden_state[:, -1]
        eos_t = torch.tensor(eos, dtype=torch.long, device=h.device)
        done = torch.zeros(b, dtype=torch.bool, device=h.device)
        tokens, drawn = [], []
        for step in range(max_new_tokens):
            sampled = self.sample(self.lm_head(h), do_sample, temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(sampled, pad), sampled)
            tokens.append(nxt)
            drawn.append(sampled)
            done |= torch.isin(nxt, eos_t)
            if progress is not None:
                progress(step + 1, max_new_tokens)
            if step == max_new_tokens - 1 or (eos and bool(done.all())):
                break
            cache.reserve(1)
            # Finished rows keep decoding their sampled token (their output is pad): pad ids
            # need not be valid embeddings.
            with ops.no_value_checks():  # the cache lengths are ours: skip per-layer device reads
                h = self.model.decode_step(self.embed_sampled(sampled), cache)
            cache.max_seqlen += 1
        if not tokens:
            return torch.zeros(b, 0, dtype=torch.long, device=h.device)
        bad = first_bad_step(torch.stack(drawn, 1))  # (the output may hide a finished row's -1 behind pad)
        if bad is not None:
            raise bad_new_token(bad)
        return torch.stack(tokens, 1)

    def embed_sampled(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings of sampled tokens; the -1 of bad logits is never an embedding index (the
        loops report it at their end)."""
        return self.model.embed_tokens(tokens.clamp(min=0))
