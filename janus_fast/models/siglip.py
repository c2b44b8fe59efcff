"""The SigLIP ViT understanding encoder (`vision_model.vision_tower`) and the MLP projectors.

No class token; learned absolute positions; pre-norm blocks with LayerNorm eps 1e-6, fused qkv,
non-causal softmax attention through ops.flash_attention and an exact-GELU MLP; the output is
every patch token after the final norm. The checkpoint's `attn_pool.*` head is unused by Janus
and not built (the loader accepts and drops those keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .config import VisionConfig


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, C]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).unbind(2)
        return self.proj(ops.flash_attention(q, k, v).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)

    def forward(self, pixel_values):
        """pixel_values [B, 3, S, S] (normalised to [-1, 1]) -> tokens [B, (S/16)^2, width]."""
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values must be [batch, 3, {size}, {size}], got {tuple(pixel_values.shape)}")
        x = self.patch_embed(pixel_values) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class CLIPVisionTower(nn.Module):
    """The official wrapper: the ViT lives at `.vision_tower`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_tower = VisionTransformer(cfg)

    def forward(self, pixel_values):
        return self.vision_tower(pixel_values)


class MlpProjector(nn.Module):
    """projector_type "mlp_gelu", depth 2: `layers.0` Linear, exact GELU, `layers.2` Linear."""

    def __init__(self, input_dim: int, n_embed: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_dim, n_embed), nn.GELU(), nn.Linear(n_embed, n_embed))

    def forward(self, x):
        return self.layers(x)
