"""The token-by-token loop of callers who drive the model themselves - the official generation
script's `language_model.model(inputs_embeds=x, use_cache=True, past_key_values=...)` - on a
static cache and, on the GPU, one captured decode step per cache.

A prefill without a cache (`use_cache=True`, `past_key_values=None`) gets a cache with
`cache_headroom` free slots (a JanusPro's: one image's tokens), so the loop never reallocates
it. Each one-token call with that cache then runs `LlamaModel.decode_step` (the fused decode
layer): eagerly the first time, then captured once as a CUDA graph bound to the cache's
tensors and replayed; a cache that grows gets a new capture.
"""

from __future__ import annotations

import weakref

import torch

from .. import ops
from ..models import llama
from .step import CAPACITY_MULTIPLE, Step, graphs_usable, round_up


class CacheDecoder:
    """decode_step bound to one cache: input and output buffers, eager on the first call, then a
    captured graph (warm: the first call compiled everything)."""

    def __init__(self, lm: llama.LlamaModel, cache: llama.KVCache, x: torch.Tensor):
        # (the cache owns its decoder: a weak reference back, so the graph goes with the cache)
        self.lm, self.cache, self.tensors = lm, weakref.ref(cache), (cache.k[0], cache.v[-1])
        self.x, self.out = torch.empty_like(x), torch.empty_like(x)
        self.step: Step | None = None
        self.calls = 0

    def serves(self, cache: llama.KVCache, x: torch.Tensor) -> bool:
        same = cache.k[0] is self.tensors[0] and cache.v[-1] is self.tensors[1]  # (a grown cache has new ones)
        return same and x.shape == self.x.shape and x.dtype == self.x.dtype

    def _run(self) -> None:
        self.out.copy_(self.lm.decode_step(self.x, self.cache()))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        with ops.no_value_checks():
            if self.calls and self.step is None:
                self.step = Step(self._run, capture=True, warm=False)
            if self.step is None:
                self._run()
            else:
                self.step()
        self.calls += 1
        return self.out


class LlamaModel(llama.LlamaModel):
    """The models' LlamaModel with the token-by-token loop on a static cache and captured steps."""

    cache_headroom = 0  # free slots of a cache made by a prefill (JanusPro: its image tokens)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, past_key_values=None,
                use_cache: bool | None = None, return_dict: bool = True) -> llama.BaseModelOutputWithPast:
        x = inputs_embeds if inputs_embeds is not None else input_ids
        if past_key_values is None and use_cache and x is not None and x.dim() >= 2:
            b, t = x.shape[:2]
            past_key_values = self.new_cache(b, round_up(t + self.cache_headroom, CAPACITY_MULTIPLE))
        cache = past_key_values
        if (inputs_embeds is not None and inputs_embeds.dim() == 3 and inputs_embeds.shape[1] == 1
                and attention_mask is None and isinstance(cache, llama.KVCache) and cache.max_seqlen > 0
                and cache.batch_size == inputs_embeds.shape[0] and not torch.is_grad_enabled()
                and graphs_usable(inputs_embeds.device, inputs_embeds.dtype)):
            return self._captured_decode(inputs_embeds[:, 0], cache)
        return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               past_key_values=past_key_values, use_cache=use_cache, return_dict=return_dict)

    def _captured_decode(self, x: torch.Tensor, cache: llama.KVCache) -> llama.BaseModelOutputWithPast:
        cache.reserve(1)
        decoder = cache.__dict__.get("_decoder")
        if decoder is None or not decoder.serves(cache, x):
            decoder = cache.__dict__["_decoder"] = CacheDecoder(self, cache, x)
        out = decoder(x)[:, None].clone()
        cache.max_seqlen += 1
        return llama.BaseModelOutputWithPast(out, cache)
