"""The peers of bench_generation.py, each running Janus-Pro text-to-image generation with the
weights of one of our random models:

- `official_loop`: the official generation_inference.py algorithm, unchanged, on transformers'
  LlamaForCausalLM (the class the official MultiModalityCausalLM wraps) holding our LLM's
  tensors: interleaved cond/uncond rows, a growing transformers cache, softmax +
  torch.multinomial, gen_head / gen_aligner / VQ decode as the official modules do them;
- `StaticGraphPeer`: plain PyTorch the gpt-fast way: a static KV cache, SDPA with a position
  mask, a host-sync-free categorical draw, and the whole decode step captured as one CUDA graph
  replayed per image token (eager on the CPU);
- `transformers_janus`: transformers' own JanusForConditionalGeneration.generate(mode "image")
  at the same config (its own random weights: speed does not depend on the values).

gen_head, gen_embed + gen_aligner and the VQ decoder are our modules in every peer: plain
nn.Linear / GELU / Embedding / convolutions, the same work as the official ones.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.nn.functional as F

CFG_WEIGHT = 5.0


def hf_llama(model):
    """transformers' LlamaForCausalLM sharing our language model's tensors (no copy)."""
    import transformers

    c = model.config.language
    config = transformers.LlamaConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=False, torch_dtype=model.dtype)
    with torch.device("meta"):
        llm = transformers.LlamaForCausalLM(config)
    llm.load_state_dict(model.language_model.state_dict(), assign=True, strict=True)
    # inv_freq is a non-persistent buffer: build it for real on the model's device
    llm.model.rotary_emb = type(llm.model.rotary_emb)(config=config).to(model.device)
    return llm.eval()


def prompt_ids(model, prompt: str) -> list[int]:
    """The official script's prompt: SFT template, empty system prompt, the image start tag."""
    proc = model.processor
    conversation = [{"role": proc.roles[0], "content": prompt}, {"role": proc.roles[1], "content": ""}]
    sft = proc.apply_sft_template_for_multi_turn_prompts(conversation, system_prompt="")
    return proc.tokenizer.encode(sft + proc.image_start_tag)


def to_uint8_images(dec: torch.Tensor) -> np.ndarray:
    """The official script's conversion: [N, 3, S, S] in [-1, 1] -> uint8 [N, S, S, 3] on the host."""
    dec = dec.to(torch.float32).cpu().numpy().transpose(0, 2, 3, 1)
    return np.clip((dec + 1) / 2 * 255, 0, 255).astype(np.uint8)


def decode(model, codes: torch.Tensor) -> np.ndarray:
    vq = model.config.vq
    return to_uint8_images(model.gen_vision_model.decode_code(codes.to(torch.int),
                                                              (codes.shape[0], vq.codebook_dim, vq.grid, vq.grid)))


@torch.inference_mode()
def official_loop(llm, model, ids: list[int], parallel_size: int, temperature: float = 1.0) -> np.ndarray:
    """generation_inference.py's generate(), on `llm` (hf_llama(model))."""
    device = model.device
    n_tokens = model.config.vq.num_tokens
    input_ids = torch.LongTensor(ids)
    tokens = torch.zeros((parallel_size * 2, len(input_ids)), dtype=torch.int).to(device)
    for i in range(parallel_size * 2):
        tokens[i, :] = input_ids
        if i % 2 != 0:
            tokens[i, 1:-1] = model.processor.pad_id
    inputs_embeds = llm.get_input_embeddings()(tokens)
    generated = torch.zeros((parallel_size, n_tokens), dtype=torch.int).to(device)
    outputs = None
    for i in range(n_tokens):
        outputs = llm.model(inputs_embeds=inputs_embeds, use_cache=True,
                            past_key_values=outputs.past_key_values if i != 0 else None)
        logits = model.gen_head(outputs.last_hidden_state[:, -1, :])
        cond, uncond = logits[0::2, :], logits[1::2, :]
        probs = torch.softmax((uncond + CFG_WEIGHT * (cond - uncond)) / temperature, dim=-1)
        next_token = torch.multinomial(probs, num_samples=1)
        generated[:, i] = next_token.squeeze(dim=-1)
        next_token = torch.cat([next_token.unsqueeze(dim=1), next_token.unsqueeze(dim=1)], dim=1).view(-1)
        inputs_embeds = model.prepare_gen_img_embeds(next_token).unsqueeze(dim=1)
    return decode(model, generated)


class StaticGraphPeer:
    """Plain-PyTorch generation with static buffers for `rows` = 2 * parallel_size rows and a
    `prompt_len`-token prompt; the decode step (LLM layers, gen_head, CFG, sampling, the next
    token's embedding, counters) is one function, captured once as a CUDA graph."""

    def __init__(self, llm, model, prompt_len: int, parallel_size: int):
        c = model.config.language
        self.llm, self.model, self.parallel_size = llm, model, parallel_size
        self.n_tokens = model.config.vq.num_tokens
        rows, capacity = 2 * parallel_size, prompt_len + self.n_tokens
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = c.head_dim
        device, dtype = model.device, model.dtype
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.num_hidden_layers)]
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))
        freqs = torch.arange(capacity, device=device).float()[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        self.key_pos = torch.arange(capacity, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # next free cache slot
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)  # next code column
        self.codes = torch.zeros(parallel_size, self.n_tokens, dtype=torch.long, device=device)
        self.x = torch.zeros(rows, 1, c.hidden_size, device=device, dtype=dtype)
        self.graph = None

    def _rope(self, t, positions):
        cos, sin = self.cos[positions][None, None], self.sin[positions][None, None]
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat((-t2, t1), dim=-1) * sin

    def _llm(self, x):
        """x [rows, T, hidden] at cache slots pos..pos+T-1 -> final-norm hidden of the last token."""
        b, t, _ = x.shape
        positions = self.pos + torch.arange(t, device=x.device)
        mask = self.key_pos[None, :] <= positions[:, None]  # causal over the filled cache
        for i, layer in enumerate(self.llm.model.layers):
            a = layer.self_attn
            y = layer.input_layernorm(x)
            q = self._rope(a.q_proj(y).view(b, t, self.heads, self.head_dim).transpose(1, 2), positions)
            k = self._rope(a.k_proj(y).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2), positions)
            v = a.v_proj(y).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            self.k[i].index_copy_(2, positions, k)
            self.v[i].index_copy_(2, positions, v)
            o = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask,
                                               enable_gqa=self.heads != self.kv_heads)
            x = x + a.o_proj(o.transpose(1, 2).reshape(b, t, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.pos += t
        return self.llm.model.norm(x[:, -1])

    def _sample_and_embed(self, h):
        logits = self.model.gen_head(h).float()
        cond, uncond = logits[0::2], logits[1::2]
        probs = torch.softmax(uncond + CFG_WEIGHT * (cond - uncond), dim=-1)
        # argmax(p / E), E ~ Exp(1), is an exact categorical draw with no host sync (gpt-fast)
        token = torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1)
        self.codes.index_copy_(1, self.step_index, token[:, None])
        self.step_index += 1
        self.x.copy_(self.model.prepare_gen_img_embeds(torch.stack([token, token], 1).view(-1))[:, None])

    def _step(self):
        self._sample_and_embed(self._llm(self.x))

    def _capture(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up outside the capture, then undo its effects
            self._step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        return graph

    @torch.inference_mode()
    def generate(self, ids: list[int]) -> np.ndarray:
        device = self.model.device
        tokens = torch.tensor(ids, device=device).repeat(2 * self.parallel_size, 1)
        tokens[1::2, 1:-1] = self.model.processor.pad_id
        self.pos.zero_()
        self.step_index.zero_()
        self._sample_and_embed(self._llm(self.llm.get_input_embeddings()(tokens)))  # prefill, eager
        if device.type == "cuda" and self.graph is None:
            saved = (self.pos.clone(), self.step_index.clone(), self.x.clone())
            self.graph = self._capture()
            for buf, value in zip((self.pos, self.step_index, self.x), saved):
                buf.copy_(value)
        for _ in range(self.n_tokens - 1):
            self.graph.replay() if self.graph is not None else self._step()
        return decode(self.model, self.codes)


def transformers_janus(model):
    """transformers' JanusForConditionalGeneration at our model's config, random weights, on our
    model's device and dtype; raises when this transformers has no Janus."""
    import transformers

    c = model.config
    lang, vis, vq = c.language, c.vision, c.vq
    h = lang.hidden_size
    config = transformers.JanusConfig(
        text_config=dict(model_type="llama", hidden_size=h, intermediate_size=lang.intermediate_size,
                         num_hidden_layers=lang.num_hidden_layers, num_attention_heads=lang.num_attention_heads,
                         num_key_value_heads=lang.num_key_value_heads, vocab_size=lang.vocab_size,
                         max_position_embeddings=lang.max_position_embeddings, rms_norm_eps=lang.rms_norm_eps,
                         rope_theta=lang.rope_theta),
        vision_config=dict(hidden_size=vis.width, num_hidden_layers=vis.layers, num_attention_heads=vis.heads,
                           image_size=vis.image_size, patch_size=vis.patch_size, mlp_ratio=vis.mlp_dim / vis.width,
                           projection_dim=h, num_image_tokens=vq.num_tokens),
        vq_config=dict(embed_dim=vq.codebook_dim, num_embeddings=vq.codebook_size, base_channels=vq.ch,
                       channel_multiplier=list(vq.ch_mult), num_res_blocks=vq.num_res_blocks,
                       latent_channels=vq.z_channels, num_patches=vq.grid, projection_dim=h,
                       image_token_embed_dim=h),
        tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)  # built in the final dtype: no fp32 copy of a 7B model
    try:
        with torch.device(model.device):
            janus = transformers.JanusForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    return janus.to(model.dtype).eval()


def _static_cache_call_is_broken(janus) -> bool:
    """Whether this transformers' Janus generate() calls _prepare_static_cache without the
    prefill_chunk_size argument it requires (transformers 5.17: a TypeError before the first
    step). Such a version reads a StaticCache passed as past_key_values; later ones pass the
    argument, and reject past_key_values."""
    required = inspect.signature(janus._prepare_static_cache).parameters.get("prefill_chunk_size")
    if required is None or required.default is not inspect.Parameter.empty:
        return False
    return "prefill_chunk_size" not in inspect.getsource(type(janus).generate)


@torch.inference_mode()
def transformers_janus_generate(janus, model, ids: list[int], parallel_size: int) -> np.ndarray:
    """transformers' image generation: its CFG processor, static cache and torch.multinomial (the
    StaticCache made here, as generate() makes it, where that version's own call is broken)."""
    input_ids = torch.tensor([ids], device=model.device)
    gen = janus.generation_config
    gen.bos_token_id, gen.pad_token_id = ids[0], model.processor.pad_id
    gen.generation_kwargs = {"boi_token_id": ids[-1]}
    extra = {}
    if _static_cache_call_is_broken(janus):
        from transformers import StaticCache

        extra["past_key_values"] = StaticCache(config=janus.config.get_text_config(decoder=True),
                                               max_cache_len=len(ids) + model.config.vq.num_tokens)
    codes = janus.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_mode="image",
                           do_sample=True, num_return_sequences=parallel_size, guidance_scale=CFG_WEIGHT, **extra)
    images = janus.decode_image_tokens(codes)  # [N, S, S, 3] in [-1, 1]
    return np.clip((images.float().cpu().numpy() + 1) / 2 * 255, 0, 255).astype(np.uint8)
