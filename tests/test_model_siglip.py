"""The SigLIP tower (janus_fast.models.siglip) against a textbook ViT written out here from the
same weights, in float64, and the MLP projector."""

import math

import pytest
import torch

from janus_fast.models.config import VisionConfig
from janus_fast.models.siglip import CLIPVisionTower, MlpProjector

CFG = VisionConfig(image_size=48, patch_size=16, width=32, layers=3, heads=4, mlp_dim=80, model_name="t")


def layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def textbook_vit(sd, x, cfg):
    """Patchify by reshaping, then pre-norm blocks with per-head softmax attention."""
    b, p, w = x.shape[0], cfg.patch_size, cfg.width
    g = cfg.image_size // p
    patches = x.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
    weight = sd["patch_embed.proj.weight"].reshape(w, -1)
    h = patches @ weight.T + sd["patch_embed.proj.bias"] + sd["pos_embed"][0]
    hd = w // cfg.heads
    for i in range(cfg.layers):
        pre = f"blocks.{i}."
        y = layer_norm(h, sd[pre + "norm1.weight"], sd[pre + "norm1.bias"])
        qkv = y @ sd[pre + "attn.qkv.weight"].T + sd[pre + "attn.qkv.bias"]
        q, k, v = (t.reshape(b, -1, cfg.heads, hd).transpose(1, 2) for t in qkv.split(w, -1))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
        h = h + att.transpose(1, 2).reshape(b, -1, w) @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
        y = layer_norm(h, sd[pre + "norm2.weight"], sd[pre + "norm2.bias"])
        y = gelu(y @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"])
        h = h + y @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
    return layer_norm(h, sd["norm.weight"], sd["norm.bias"])


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    t = CLIPVisionTower(CFG).double()
    with torch.no_grad():
        for name, p in t.named_parameters():
            p.normal_(0, 0.5 if "norm" in name or "pos" in name else 0.1)
    return t


def test_matches_textbook_vit_float64(tower):
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    sd = {k.removeprefix("vision_tower."): v for k, v in tower.state_dict().items()}
    with torch.no_grad():
        got = tower(x)
    assert got.shape == (2, 9, 32)
    torch.testing.assert_close(got, textbook_vit(sd, x, CFG), rtol=1e-10, atol=1e-10)


def test_official_key_names(tower):
    keys = set(tower.state_dict())
    assert {"vision_tower.pos_embed", "vision_tower.patch_embed.proj.weight", "vision_tower.blocks.2.attn.qkv.bias",
            "vision_tower.blocks.0.mlp.fc2.weight", "vision_tower.norm.bias"} <= keys
    assert not any("attn_pool" in k for k in keys)


def test_select_layer_drops_trailing_blocks():
    assert VisionConfig(layers=24, select_layer=-1).num_blocks == 24
    assert VisionConfig(layers=24, select_layer=-2).num_blocks == 23


def test_projector_is_linear_gelu_linear():
    proj = MlpProjector(5, 7).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    l0, l2 = proj.layers[0], proj.layers[2]
    want = gelu(x @ l0.weight.T + l0.bias) @ l2.weight.T + l2.bias
    torch.testing.assert_close(proj(x), want)


def test_rejects_wrong_image_size(tower):
    with pytest.raises(ValueError, match="pixel_values"):
        tower(torch.zeros(1, 3, 32, 32, dtype=torch.float64))
