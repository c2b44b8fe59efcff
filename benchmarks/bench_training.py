"""Training benchmarks (issue 9), peers side by side in one run, GPU only.

LLM step: the Janus-Pro-1B LLM (random weights, bf16), 4 x 4096 tokens, forward + backward with
the next-token loss over all tokens:
  transformers + SDPA            LlamaForCausalLM(attn_implementation="sdpa"), [4, 4096], labels
  transformers + torch.compile   the same model under torch.compile
  transformers + Liger-Kernel    Liger's Llama patches (fused linear + CE, RMSNorm, SwiGLU, RoPE)
  janus_fast                     LlamaModel.forward_packed (ops.varlen_attention over the 4 packed
                                 rows) + ops.linear_cross_entropy; also with per-layer activation
                                 checkpointing ("janus_fast + AC")
A peer whose package is missing is skipped with the reason. extra_info: tokens_per_s, mfu
(6·N + 12·L·H·S FLOPs per token, N = all LLM parameters, over the device's dense bf16 peak: the
convention of the table in issue 9) and peak_gib (torch.cuda.max_memory_allocated in the step).

Multi-task step: the whole JanusPro-1B on one packed batch (understanding, text-to-image and text
samples, 4 rows x 4096 tokens), model(**batch) + backward, stage III recipe.

Fused linear + cross-entropy: 16384 x 2048 hidden states against lm_head (102400) forward +
backward: janus_fast (Triton) vs torch (full fp32 logits + F.cross_entropy) vs Liger's fused loss.
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness import record
from janus_fast import ops
from janus_fast.models.config import JanusProConfig

ROWS, ROW_TOKENS = 4, 4096
TOKENS = ROWS * ROW_TOKENS
DENSE_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16 tensor-core peaks
LLM_PEERS = ["transformers + SDPA", "transformers + torch.compile", "transformers + Liger-Kernel", "janus_fast",
             "janus_fast + AC"]


def peak_tflops() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), None)


def flops_per_token(cfg, n_params: int, seq: int) -> float:
    return 6 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq


def step_metrics(benchmark, cfg, n_params, fn, case, label):
    """Peak memory of one step, then the timed steps with tokens/s and MFU."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    benchmark.extra_info["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    peak = peak_tflops()
    per_token = flops_per_token(cfg, n_params, ROW_TOKENS)
    metrics = {"tokens_per_s": lambda ms: TOKENS / ms * 1e3}
    if peak is not None:
        metrics["mfu"] = lambda ms: TOKENS / ms * 1e3 * per_token / (peak * 1e12)
    record(benchmark, fn, case=case, label=label, **metrics)


def transformers_llm(cfg, peer: str):
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    if peer.endswith("Liger-Kernel"):
        if importlib.util.find_spec("liger_kernel") is None:
            pytest.skip("liger-kernel is not installed (pip install liger-kernel)")
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                     num_key_value_heads=cfg.num_key_value_heads, vocab_size=cfg.vocab_size,
                     max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                     rope_theta=cfg.rope_theta, tie_word_embeddings=False)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(hf, attn_implementation="sdpa", torch_dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (ROWS, ROW_TOKENS), device="cuda")
    forward = torch.compile(model) if peer.endswith("torch.compile") else model

    def step():
        forward(input_ids=ids, labels=ids).loss.backward()

    return model, step


def janus_llm(cfg, checkpointing: bool):
    from janus_fast.models.llama import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if checkpointing:
        from janus_fast.training.distributed import checkpoint_layers

        checkpoint_layers(model.model.layers)
    ids = torch.randint(0, cfg.vocab_size, (TOKENS,), device="cuda")
    positions = torch.arange(ROW_TOKENS, device="cuda").repeat(ROWS)
    cu = torch.arange(0, TOKENS + 1, ROW_TOKENS, dtype=torch.int32, device="cuda")
    targets = torch.roll(ids, -1).masked_fill(positions == ROW_TOKENS - 1, -100)

    def step():
        with ops.no_value_checks():
            hidden = model.model.forward_packed(model.model.embed_tokens(ids), positions, cu, ROW_TOKENS)
            ops.linear_cross_entropy(hidden, model.lm_head.weight, targets).backward()

    return model, step


@pytest.mark.benchmark(group="training: 1B LLM step")
@pytest.mark.parametrize("peer", LLM_PEERS)
def test_llm_step(benchmark, peer):
    cfg = JanusProConfig.janus_pro_1b().language
    if peer.startswith("janus_fast"):
        model, step = janus_llm(cfg, checkpointing=peer.endswith("AC"))
    else:
        model, step = transformers_llm(cfg, peer)
    n_params = sum(p.numel() for p in model.parameters())
    step_metrics(benchmark, cfg, n_params, step, f"1B LLM, {ROWS} x {ROW_TOKENS} tokens, fwd+bwd bf16", peer)


def synthetic_multitask_batch(config, processor_ids: dict, rows: int = ROWS, row_tokens: int = ROW_TOKENS,
                              seed: int = 0):
    """A packed batch of random understanding, text-to-image and text samples (5 : 4 : 1 by count,
    the stage III mix), built by the real packer from synthetic encoded samples."""
    from janus_fast.training.data import GEN_IMAGE, TEXT, UND_IMAGE, EncodedSample
    from janus_fast.training.packing import PackedLoader

    rng = random.Random(seed)
    vocab, n_img = config.language.vocab_size, config.vision.num_tokens
    n_gen = config.vq.num_tokens
    samples = []
    for i in range(64):
        kind = rng.choices(["und", "gen", "text"], weights=[5, 4, 1])[0]
        if kind == "und":
            q, a = rng.randint(20, 80), rng.randint(20, 200)
            kinds = [TEXT] * 60 + [UND_IMAGE] * n_img + [TEXT] * (q + a)
            targets = [False] * (60 + n_img + q) + [True] * a
            prompt, image = None, "synthetic"
        elif kind == "gen":
            p = rng.randint(10, 60)
            kinds, targets = [TEXT] * p + [GEN_IMAGE] * n_gen, [False] * p + [True] * n_gen
            prompt, image = (1, p - 1), None
        else:
            n = rng.randint(row_tokens // 20, row_tokens // 3)
            kinds, targets = [TEXT] * n, [False] + [True] * (n - 1)
            prompt, image = None, None
        ids = [rng.randrange(config.vq.codebook_size) if k == GEN_IMAGE else
               processor_ids["image"] if k == UND_IMAGE else rng.randrange(vocab) for k in kinds]
        samples.append(EncodedSample(i, f"synthetic:{i} ({kind})", ids, kinds, targets, prompt, image))
    size = config.vision.image_size
    loader = PackedLoader(samples, row_tokens=row_tokens, rows_per_batch=rows, pad_id=processor_ids["pad"],
                          image_size=size, images=lambda s: torch.randn(3, size, size), uncond_prob=0.1, seed=seed)
    return loader.collate(loader.next_rows())


@pytest.mark.benchmark(group="training: Janus-Pro-1B multi-task step")
def test_multitask_step(benchmark):
    from janus_fast.models.random_model import random_model
    from janus_fast.training.config import apply_stage
    from janus_fast.training.distributed import checkpoint_layers

    model = random_model("1b", device="cuda", dtype=torch.bfloat16).train()
    apply_stage(model, 3)
    checkpoint_layers(model.language_model.model.layers)
    proc = model.processor
    batch = synthetic_multitask_batch(model.config, {"image": proc.image_id, "pad": proc.pad_id}).to("cuda")

    def step():
        with ops.no_value_checks():
            model(**batch.inputs).loss.backward()

    cfg = model.config.language
    n_params = sum(p.numel() for p in model.language_model.parameters())
    step_metrics(benchmark, cfg, n_params, step, f"Janus-Pro-1B multi-task, {ROWS} x {ROW_TOKENS} packed, AC",
                 "janus_fast")


@pytest.mark.benchmark(group="training: fused linear + cross-entropy")
@pytest.mark.parametrize("peer", ["torch (full logits)", "Liger fused", "janus_fast triton"])
def test_linear_cross_entropy(benchmark, peer):
    n, h, v = TOKENS, 2048, 102400
    x = (torch.randn(n, h, device="cuda") * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(v, h, device="cuda") * 0.02).bfloat16().requires_grad_()
    target = torch.randint(0, v, (n,), device="cuda")
    if peer.startswith("torch"):
        fn = lambda: F.cross_entropy(F.linear(x, w).float(), target).backward()
    elif peer.startswith("Liger"):
        if importlib.util.find_spec("liger_kernel") is None:
            pytest.skip("liger-kernel is not installed (pip install liger-kernel)")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()
        fn = lambda: loss(w, x, target).backward()
    else:
        def fn():
            with ops.no_value_checks():
                ops.linear_cross_entropy(x, w, target, backend="triton").backward()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    benchmark.extra_info["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    record(benchmark, fn, case=f"{n} x {h} -> {v}, fwd+bwd bf16", label=peer,
           tflops=lambda ms: 3 * 2 * n * h * v / ms / 1e9)
