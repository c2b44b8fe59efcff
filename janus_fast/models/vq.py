"""VQ-16, the VQGAN image tokenizer of Janus-Pro (`gen_vision_model`), with the official names.

Quantisation and codebook lookup go through ops.vq_quantize / ops.vq_lookup (L2-normalised rows
and codebook, nearest by squared distance, ties to the lowest index).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .config import VQConfig

MAX_OPS_HEAD_DIM = 256  # ops.flash_attention's head_dim limit


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions with C channels, scale C^-0.5."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(conv):  # [B, C, H, W] -> [B, HW, 1, C]
            return conv(y).flatten(2).transpose(1, 2)[:, :, None, :].contiguous()

        q, k, v = tokens(self.q), tokens(self.k), tokens(self.v)
        if c <= MAX_OPS_HEAD_DIM:
            out = ops.flash_attention(q, k, v)
        else:
            # The real VQ-16 attends with one 512-wide head, beyond ops.flash_attention's head_dim
            # limit: plain-torch SDPA here (4 such blocks per decode, a small share of the time).
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out.transpose(1, 2)
        out = out[:, :, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        # Nearest x2 copies values, so interpolating in the input dtype equals the official
        # float32 round trip.
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    def __init__(self, cin: int, cout: int, n_res: int, attn: bool):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout) for i in range(n_res))
        self.attn = nn.ModuleList(AttnBlock(cout) for _ in range(n_res if attn else 0))

    def forward(self, x):
        for i, res in enumerate(self.res):
            x = res(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


def _mid(c: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        cin = cfg.ch
        for i, cout in enumerate(chans):
            level = Level(cin, cout, cfg.num_res_blocks, attn=i == len(chans) - 1)
            if i != len(chans) - 1:
                level.downsample = Downsample(cout)
            self.conv_blocks.append(level)
            cin = cout
        self.mid = _mid(cin)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        chans = [cfg.ch * m for m in reversed(cfg.ch_mult)]
        cin = chans[0]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _mid(cin)
        self.conv_blocks = nn.ModuleList()
        for i, cout in enumerate(chans):
            level = Level(cin, cout, cfg.num_res_blocks + 1, attn=i == 0)
            if i != len(chans) - 1:
                level.upsample = Upsample(cout)
            self.conv_blocks.append(level)
            cin = cout
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for level in self.conv_blocks:
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_e, e_dim)

    def forward(self, z):
        """z [B, D, H, W] -> (z_q, (codebook_loss, commitment_loss, entropy_loss, usage),
        (perplexity, min_encodings, indices)) as the official quantizer returns: z_q is the
        normalised codebook row (straight-through to the normalised z), indices int64 [B*H*W]."""
        b, d, h, w = z.shape
        idx = self.indices(z)
        codebook = self.embedding.weight
        if torch.is_grad_enabled() and codebook.requires_grad:
            # ops.vq_lookup has no backward; the codebook loss needs one: plain-torch gather.
            z_q = F.normalize(codebook, p=2, dim=-1)[idx].view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        else:
            z_q = ops.vq_lookup(idx, codebook, shape=(b, d, h, w)).to(z.dtype)
        zn = F.normalize(z, p=2, dim=1)
        codebook_loss = torch.mean((z_q - zn.detach()) ** 2)
        commitment_loss = self.beta * torch.mean((z_q.detach() - zn) ** 2)
        z_q = zn + (z_q - zn).detach()
        return z_q, (codebook_loss, commitment_loss, 0.0, None), (None, None, idx)

    def indices(self, z):
        """z [B, D, H, W] -> the nearest codes' ids int64 [B*H*W], row-major over (B, H, W)."""
        if z.dim() != 4 or z.shape[1] != self.embedding.embedding_dim:
            raise ValueError(f"z must have {self.embedding.embedding_dim} channels, got shape {tuple(z.shape)}")
        rows = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return ops.vq_quantize(rows.detach().contiguous(), self.embedding.weight.detach())

    def get_codebook_entry(self, indices, shape=None, channel_first: bool = True):
        """Normalised codebook rows for `indices`; shape (B, D, H, W) with channel_first gives
        the channels-first latent, (B, H, W, D) without it a channels-last one."""
        codebook = self.embedding.weight
        if shape is not None and channel_first:
            b, d, h, w = shape
            if indices.numel() != b * h * w or d != codebook.shape[1]:
                raise ValueError(f"{indices.numel()} codes with dim {codebook.shape[1]} do not fill shape {tuple(shape)}")
            return ops.vq_lookup(indices.reshape(-1), codebook, shape=(b, d, h, w))
        rows = ops.vq_lookup(indices, codebook)
        return rows if shape is None else rows.reshape(shape)


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.codebook_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)

    def encode(self, x):
        """images [B, 3, S, S] in [-1, 1] -> (quant, emb_loss, info); info[2] are the token ids
        [B * (S/16)^2], row-major over the latent grid."""
        return self.quantize(self._latents(x))

    def token_ids(self, x):
        """images [B, 3, S, S] in [-1, 1] -> token ids [B, (S/16)^2] (encode's, without the
        quantised latent and losses)."""
        return self.quantize.indices(self._latents(x)).view(x.shape[0], -1)

    def _latents(self, x):
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] % self.config.downsample or x.shape[3] % self.config.downsample:
            raise ValueError(f"images must be [batch, 3, H, W] with H and W multiples of "
                             f"{self.config.downsample}, got {tuple(x.shape)}")
        return self.quant_conv(self.encoder(x))

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b, shape=None, channel_first: bool = True):
        """token ids [B, N] and shape (B, D, h, w) -> pixels [B, 3, 16h, 16w] in about [-1, 1]."""
        if shape is None:
            b, n = code_b.shape
            g = int(round(n ** 0.5))
            if g * g != n:
                raise ValueError(f"pass shape= for {n} codes per image (not a square grid)")
            shape = (b, self.config.codebook_dim, g, g)
        return self.decode(self.quantize.get_codebook_entry(code_b, shape, channel_first))
