"""Training (issue 9): peers side by side in one run.

LLM step: the Janus-Pro-1B LLM (random weights, bf16), 4 x 4096 tokens, forward + backward with
the next-token loss over every token:
  transformers + SDPA            LlamaForCausalLM(attn_implementation="sdpa"), [4, 4096], labels
  transformers + torch.compile   the same model under torch.compile
  transformers + Liger-Kernel    Liger's Llama patches (fused linear + CE, RMSNorm, SwiGLU, RoPE)
  janus_fast                     LlamaModel.forward_packed (ops.varlen_attention over the 4 packed
                                 rows) + ops.linear_cross_entropy; "janus_fast + AC" adds per-layer
                                 activation checkpointing
A peer whose package is missing is skipped with the reason. Cells: tokens/s, and in the JSON
line mfu (6·N + 12·L·H·S FLOPs per token, N = every LLM parameter, over the device's dense bf16
peak: the convention of issue 9's table) and peak_gib (max_memory_allocated during a step,
weights included).

Multi-task step: the whole Janus-Pro-1B (stage III recipe, activation checkpointing) on one
packed batch of understanding, text-to-image and text samples (5 : 4 : 1), model(**batch) +
backward.

Fused linear + cross-entropy: 16384 x 2048 hidden states against lm_head (102400), forward +
backward: janus_fast (Triton) against torch (full fp32 logits + F.cross_entropy) and Liger's
fused loss, time and peak extra memory.

Budget on a cold H100 (~4-5 min): five LLM-step contenders (a build, a warm-up or compile, then
~100 ms of timed steps each; torch.compile's compile ~1 min), the multi-task step (a 2B-parameter
build), three loss contenders. Tiny runs (CPU) use a 2-layer model and skip torch.compile.
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness
from janus_fast import ops
from janus_fast.models.config import JanusProConfig, LlamaConfig

DTYPE = torch.bfloat16 if harness.CUDA else torch.float32  # the interpreter has no bf16 arithmetic
ROWS, ROW_TOKENS = harness.shapes(full=(4, 4096), tiny=(2, 64))
TOKENS = ROWS * ROW_TOKENS
DENSE_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # tensor-core peaks, no sparsity
OURS, OURS_AC = "janus_fast", "janus_fast + AC"
LLM_PEERS = ["transformers + SDPA", "transformers + torch.compile", "transformers + Liger-Kernel", OURS, OURS_AC]
TARGET = {"metric": "tokens_per_s", "at_least": 55000}  # issue 9, H100, with <= 30 GiB


def llm_config() -> LlamaConfig:
    if harness.TINY:
        return LlamaConfig(64, 128, 2, 4, 2, 512, max_position_embeddings=ROW_TOKENS)
    return JanusProConfig.janus_pro_1b().language


def peak_tflops() -> float | None:
    if not harness.CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), None)


def step_cell(benchmark, step, n_params: int, cfg: LlamaConfig, case: str, label: str, target=None) -> None:
    """Peak memory of one step, then the timed steps: tokens/s, MFU where the peak is known."""
    info = {}
    if harness.CUDA:
        harness.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        harness.synchronize()
        info["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    per_token = 6 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * ROW_TOKENS
    peak = peak_tflops()
    metrics = {"tokens_per_s": lambda ms: TOKENS / ms * 1e3}
    if peak is not None:
        metrics["mfu"] = lambda ms: TOKENS / ms * 1e3 * per_token / (peak * 1e12)
    harness.record(benchmark, step, case=case, label=label, target=target, info=info, **metrics)


def transformers_step(cfg: LlamaConfig, peer: str):
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    if peer.endswith("Liger-Kernel"):
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    hf = HFLlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_key_value_heads, vocab_size=cfg.vocab_size,
                       max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                       rope_theta=cfg.rope_theta, tie_word_embeddings=False)
    hf._attn_implementation = "sdpa"
    with torch.device(harness.DEVICE):
        model = LlamaForCausalLM(hf).to(DTYPE)
    ids = torch.randint(0, cfg.vocab_size, (ROWS, ROW_TOKENS), device=harness.DEVICE)
    forward = torch.compile(model) if peer.endswith("torch.compile") else model

    def step():
        forward(input_ids=ids, labels=ids).loss.backward()

    return model, step


def janus_step(cfg: LlamaConfig, checkpointing: bool):
    from janus_fast.models.llama import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(harness.DEVICE):
        model = LlamaForCausalLM(cfg).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    if checkpointing:
        from janus_fast.training.distributed import checkpoint_layers

        checkpoint_layers(model.model.layers)
    ids = torch.randint(0, cfg.vocab_size, (TOKENS,), device=harness.DEVICE)
    positions = torch.arange(ROW_TOKENS, device=harness.DEVICE).repeat(ROWS)
    cu = torch.arange(0, TOKENS + 1, ROW_TOKENS, dtype=torch.int32, device=harness.DEVICE)
    targets = torch.roll(ids, -1).masked_fill(positions == ROW_TOKENS - 1, -100)

    def step():
        with ops.no_value_checks():
            hidden = model.model.forward_packed(model.model.embed_tokens(ids), positions, cu, ROW_TOKENS)
            ops.linear_cross_entropy(hidden, model.lm_head.weight, targets).backward()

    return model, step


@pytest.mark.parametrize("peer", LLM_PEERS)
def test_llm_step(benchmark, peer):
    cfg = llm_config()
    case = f"{'1B' if not harness.TINY else 'tiny'} LLM, {ROWS} x {ROW_TOKENS} tokens, fwd+bwd"
    harness.declare(case, peer)
    if peer.startswith(OURS):
        model, step = harness.available(lambda: janus_step(cfg, checkpointing=peer == OURS_AC), peer,
                                        errors=(ImportError,))
    else:
        if peer.endswith("torch.compile") and harness.TINY:
            pytest.skip("torch.compile peer: GPU runs only (compiling a training step on the CPU takes minutes)")
        if peer.endswith("Liger-Kernel") and importlib.util.find_spec("liger_kernel") is None:
            pytest.skip("liger-kernel is not installed (pip install liger-kernel)")
        model, step = harness.available(lambda: transformers_step(cfg, peer), peer)
    harness.available(step, peer, errors=(ImportError,) if peer.startswith(OURS) else harness.PEER_ERRORS)
    n_params = sum(p.numel() for p in model.parameters())
    step_cell(benchmark, step, n_params, cfg, case, peer, target=TARGET if peer.startswith(OURS) else None)


def synthetic_multitask_batch(config, image_id: int, pad_id: int, rows: int = ROWS, row_tokens: int = ROW_TOKENS,
                              seed: int = 0):
    """A packed batch of random understanding, text-to-image and text samples (5 : 4 : 1 by count,
    the stage III mix), built by the real packer from synthetic encoded samples: the fullest
    best-fit micro-batch of up to rows x row_tokens tokens (one flat sequence, no pads)."""
    from janus_fast.training.data import GEN_IMAGE, TEXT, UND_IMAGE, EncodedSample
    from janus_fast.training.packing import best_fit, collate, unconditional

    rng = random.Random(seed)
    vocab, n_img, n_gen = config.language.vocab_size, config.vision.num_tokens, config.vq.num_tokens
    samples = []
    for i in range(64):
        kind = rng.choices(["und", "gen", "text"], weights=[5, 4, 1])[0]
        if kind == "und":
            q, a = rng.randint(4, 40), rng.randint(4, 100)
            kinds = [TEXT] * 8 + [UND_IMAGE] * n_img + [TEXT] * (q + a)
            targets = [False] * (8 + n_img + q) + [True] * a
            prompt, image = None, "synthetic"
        elif kind == "gen":
            p = rng.randint(4, 40)
            kinds, targets, prompt, image = [TEXT] * p + [GEN_IMAGE] * n_gen, [False] * p + [True] * n_gen, (1, p - 1), None
        else:
            n = rng.randint(row_tokens // 20 + 2, row_tokens // 3)
            kinds, targets, prompt, image = [TEXT] * n, [False] + [True] * (n - 1), None, None
        ids = [rng.randrange(config.vq.codebook_size) if k == GEN_IMAGE else image_id if k == UND_IMAGE
               else rng.randrange(vocab) for k in kinds]
        samples.append(EncodedSample(i, f"synthetic:{i} ({kind})", ids, kinds, targets, prompt, image))
    size = config.vision.image_size
    fullest = max(best_fit([len(s) for s in samples], rows * row_tokens), key=lambda b: sum(len(samples[i]) for i in b))
    return collate([samples[i] for i in fullest], [unconditional(seed, 0, i, 0.1) for i in fullest], pad_id, size,
                   images=lambda s: torch.randn(3, size, size))


def test_multitask_step(benchmark):
    from janus_fast.models.random_model import random_model
    from janus_fast.training.config import apply_stage
    from janus_fast.training.distributed import checkpoint_layers

    # The tiny model's images are 16 tokens: its rows hold a few samples at 512 tokens.
    rows, row_tokens = (ROWS, ROW_TOKENS) if not harness.TINY else (2, 512)
    case = f"Janus-Pro-{'1B' if not harness.TINY else 'tiny'} multi-task, {rows} x {row_tokens} packed, AC"
    harness.declare(case, OURS)
    model = random_model("1b" if not harness.TINY else "tiny", device=harness.DEVICE, dtype=DTYPE).train()
    apply_stage(model, 3)
    checkpoint_layers(model.language_model.model.layers)
    proc = model.processor
    batch = synthetic_multitask_batch(model.config, proc.image_id, proc.pad_id, rows, row_tokens).to(harness.DEVICE)

    def step():
        with ops.no_value_checks():
            model(**batch.inputs).loss.backward()

    harness.available(step, OURS, errors=(ImportError,))
    info = {}
    if harness.CUDA:
        harness.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        info["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    harness.record(benchmark, step, case=case, label=OURS, info=info,
                   tokens_per_s=lambda ms: batch.num_tokens / ms * 1e3)


LOSS_PEERS = ["torch (full logits)", "Liger fused", "janus_fast triton"]


@pytest.mark.parametrize("peer", LOSS_PEERS)
def test_linear_cross_entropy(benchmark, peer):
    n, h, v = harness.shapes(full=(16384, 2048, 102400), tiny=(64, 32, 1000))
    case = f"{n} x {h} -> {v}, fwd+bwd {str(DTYPE).replace('torch.', '')}"
    harness.declare(case, peer)
    x = (torch.randn(n, h, device=harness.DEVICE) * 0.5).to(DTYPE).requires_grad_()
    w = (torch.randn(v, h, device=harness.DEVICE) * 0.02).to(DTYPE).requires_grad_()
    target = torch.randint(0, v, (n,), device=harness.DEVICE)
    if peer.startswith("torch"):
        harness.require_memory(n * v * (DTYPE.itemsize + 4 + 4), "the torch peer's full logits")
        fn = lambda: F.cross_entropy(F.linear(x, w).float(), target).backward()  # noqa: E731
        harness.available(fn, peer)
    elif peer.startswith("Liger"):
        if importlib.util.find_spec("liger_kernel") is None:
            pytest.skip("liger-kernel is not installed (pip install liger-kernel)")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()
        fn = lambda: loss(w, x, target).backward()  # noqa: E731
        harness.available(fn, peer)
    else:
        harness.require_backend("linear_cross_entropy", "triton", "cross_entropy")

        def fn():
            with ops.no_value_checks():
                ops.linear_cross_entropy(x, w, target, backend="triton").backward()

        harness.available(fn, peer, errors=(ImportError,))
    peak = harness.peak_memory(fn)
    harness.record(benchmark, fn, case=case, label=peer, info=None if peak is None else {"peak_extra_gib": peak / 2**30},
                   tflops=lambda ms: 3 * 2 * n * h * v / ms / 1e9)
