"""Text-to-image throughput: JanusPro.generate_images against the official generation loop
re-implemented in plain PyTorch (growing torch.cat KV cache, SDPA attention, softmax +
torch.multinomial), on the same weights. Reports images/s and image tokens/s.

Random Janus-Pro-1B weights in bf16 by default (speed does not depend on the values); set
JANUS_FAST_BENCH_MODEL=/path/to/Janus-Pro-1B to time a real release. GPU only.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness import run_context

PROMPT = "A close-up photo of a red fox in fresh snow, golden hour."
PARALLEL_SIZE = 16


@pytest.fixture(scope="module")
def model():
    from janus_fast.models.random_model import build_random_checkpoint
    from janus_fast.models import JanusPro

    path = os.environ.get("JANUS_FAST_BENCH_MODEL")
    if path is None:
        import tempfile

        tmp = tempfile.mkdtemp(prefix="janus-bench-")
        build_random_checkpoint(os.path.join(tmp, "ck"), "1b", "cuda", torch.bfloat16)
        path = os.path.join(tmp, "ck")
    return JanusPro.from_pretrained(path, dtype=torch.bfloat16, device="cuda")


def _rope(x, positions, theta):
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device).float() / d))
    emb = torch.cat([positions.float()[:, None] * inv_freq] * 2, -1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _plain_llm(lm, x, past):
    """transformers-style Llama forward: x [B, T, H], past: list of (k, v) [B, Hkv, S, D] or None."""
    cfg = lm.config
    b, t, _ = x.shape
    start = 0 if past is None else past[0][0].shape[2]
    positions = torch.arange(start, start + t, device=x.device)
    new_past = []
    for i, layer in enumerate(lm.layers):
        a = layer.self_attn
        y = layer.input_layernorm(x)
        q = F.linear(y, a.q_proj.weight).view(b, t, -1, cfg.head_dim).transpose(1, 2)
        k = F.linear(y, a.k_proj.weight).view(b, t, -1, cfg.head_dim).transpose(1, 2)
        v = F.linear(y, a.v_proj.weight).view(b, t, -1, cfg.head_dim).transpose(1, 2)
        q, k = _rope(q, positions, cfg.rope_theta), _rope(k, positions, cfg.rope_theta)
        if past is not None:
            k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
        new_past.append((k, v))
        group = q.shape[1] // k.shape[1]
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                           is_causal=t > 1)
        x = x + F.linear(o.transpose(1, 2).reshape(b, t, -1), a.o_proj.weight)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return lm.norm(x), new_past


@torch.inference_mode()
def official_style_generate(model, prompt, parallel_size, cfg_weight=5.0, temperature=1.0):
    proc, vq = model.processor, model.config.vq
    conversation = [{"role": proc.roles[0], "content": prompt}, {"role": proc.roles[1], "content": ""}]
    sft = proc.apply_sft_template_for_multi_turn_prompts(conversation, system_prompt="")
    ids = torch.tensor(proc.tokenizer.encode(sft + proc.image_start_tag), device="cuda")
    tokens = ids.repeat(parallel_size * 2, 1)
    tokens[1::2, 1:-1] = proc.pad_id
    x = model.language_model.get_input_embeddings()(tokens)
    generated = torch.zeros(parallel_size, vq.num_tokens, dtype=torch.long, device="cuda")
    past = None
    for i in range(vq.num_tokens):
        h, past = _plain_llm(model.language_model.model, x, past)
        logits = model.gen_head(h[:, -1])
        cond, uncond = logits[0::2], logits[1::2]
        probs = torch.softmax((uncond + cfg_weight * (cond - uncond)) / temperature, -1)
        nxt = torch.multinomial(probs, 1)[:, 0]
        generated[:, i] = nxt
        x = model.prepare_gen_img_embeds(torch.stack([nxt, nxt], 1).view(-1))[:, None]
    return model.decode_images(generated)


CONTENDERS = {
    "janus_fast": lambda m: m.generate_images(PROMPT, parallel_size=PARALLEL_SIZE, seed=0),
    "official-style torch": lambda m: official_style_generate(m, PROMPT, PARALLEL_SIZE),
}


@pytest.mark.parametrize("label", list(CONTENDERS))
def bench_generate_images(benchmark, model, label):
    fn = CONTENDERS[label]

    def run():
        fn(model)
        torch.cuda.synchronize()

    run()  # warm-up: allocator, kernels, autotuning
    start = time.perf_counter()
    benchmark.pedantic(run, rounds=3, iterations=1)
    seconds = (time.perf_counter() - start) / 3
    tokens = PARALLEL_SIZE * model.config.vq.num_tokens
    benchmark.extra_info.update(run_context())
    benchmark.extra_info.update(case=f"1 prompt x {PARALLEL_SIZE} images", label=label, median_ms=seconds * 1000,
                                images_per_s=PARALLEL_SIZE / seconds, tokens_per_s=tokens / seconds)
    print(f"\n{label}: {seconds:.2f} s per batch, {PARALLEL_SIZE / seconds:.2f} images/s, "
          f"{tokens / seconds:.0f} image tokens/s")
