"""A tiny random Janus-Pro for the model, checkpoint and CLI tests (not a test module)."""

import torch

from janus_fast.models import JanusPro, JanusProConfig
from janus_fast.processor import JanusProcessor, toy_tokenizer


def tiny_model(seed: int = 0, processor: bool = True) -> JanusPro:
    tokenizer = toy_tokenizer()
    config = JanusProConfig.tiny(vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = JanusPro(config).eval()
    with torch.no_grad():  # every tensor distinct from its default init, so a swap shows
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if processor:
        model.processor = JanusProcessor(tokenizer, image_size=config.vision.image_size,
                                         num_image_tokens=config.vision.num_tokens)
    return model


def official_state(model: JanusPro) -> dict:
    """The model's state dict plus the keys official checkpoints hold but Janus never uses."""
    state = dict(model.state_dict())
    w = model.config.vision.width
    for name, shape in (("latent", (1, 1, w)), ("q.weight", (w, w)), ("q.bias", (w,)), ("kv.weight", (2 * w, w)),
                        ("kv.bias", (2 * w,)), ("proj.weight", (w, w)), ("proj.bias", (w,)), ("norm.weight", (w,)),
                        ("norm.bias", (w,)), ("mlp.fc1.weight", (4 * w, w)), ("mlp.fc1.bias", (4 * w,)),
                        ("mlp.fc2.weight", (w, 4 * w)), ("mlp.fc2.bias", (w,))):
        state[f"vision_model.vision_tower.attn_pool.{name}"] = torch.randn(shape)
    state["gen_vision_model.quantize.codebook_used"] = torch.zeros(65536)
    return state
