"""VQ-16 (janus_fast.models.vq): encode/decode shapes, codebook semantics (L2-normalised nearest
row, lowest index on ties, straight-through gradient, losses), token layout, attention blocks."""

import math

import pytest
import torch
import torch.nn.functional as F

from janus_fast.models.config import VQConfig
from janus_fast.models.vq import AttnBlock, Downsample, VectorQuantizer, VQModel

CFG = VQConfig(codebook_size=64, codebook_dim=8, ch=32, ch_mult=(1, 1, 1, 1, 2), num_res_blocks=1,
               z_channels=32, image_size=64)


@pytest.fixture(scope="module")
def vq():
    torch.manual_seed(0)
    return VQModel(CFG).eval()


def test_encode_decode_shapes(vq):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        quant, losses, (_, _, idx) = vq.encode(x)
        assert quant.shape == (2, 8, 4, 4) and idx.shape == (32,) and idx.dtype == torch.int64
        assert 0 <= idx.min() and idx.max() < 64
        pixels = vq.decode_code(idx.view(2, 16), shape=(2, 8, 4, 4))
    assert pixels.shape == (2, 3, 64, 64) and torch.isfinite(pixels).all()
    # decoding the quantised latent and decoding its token ids agree
    torch.testing.assert_close(vq.decode(quant), pixels, rtol=1e-5, atol=1e-5)


def test_quantize_picks_nearest_normalised_row():
    q = VectorQuantizer(50, 8).double()
    z = torch.randn(3, 8, 5, 7, dtype=torch.float64)
    z_q, _, (_, _, idx) = q(z)
    rows = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    book = F.normalize(q.embedding.weight, dim=-1)
    assert torch.equal(idx, torch.cdist(rows, book).argmin(-1))
    torch.testing.assert_close(z_q, book[idx].view(3, 5, 7, 8).permute(0, 3, 1, 2))


def test_quantize_ties_go_to_lowest_index():
    q = VectorQuantizer(6, 4)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.randn(6, 4))
        q.embedding.weight[4] = q.embedding.weight[1]
    z = q.embedding.weight[4].detach().view(1, 4, 1, 1).clone()
    assert q(z)[2][2].tolist() == [1]


def test_straight_through_gradient_and_losses():
    q = VectorQuantizer(16, 8).double()
    z = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    z_q, (codebook_loss, commit_loss, _, _), _ = q(z)
    zn = F.normalize(z, dim=1)
    gap = torch.mean((z_q - zn) ** 2)
    torch.testing.assert_close(codebook_loss, gap)
    torch.testing.assert_close(commit_loss, 0.25 * gap)
    (z_q * 2).sum().backward()  # straight-through: d z_q / d z = d normalise(z) / d z
    zz = z.detach().clone().requires_grad_(True)
    (F.normalize(zz, dim=1) * 2).sum().backward()
    torch.testing.assert_close(z.grad, zz.grad)
    codebook_loss.backward()
    assert q.embedding.weight.grad is not None


def test_codebook_entry_layout(vq):
    codes = torch.randint(0, 64, (2, 16))
    latent = vq.quantize.get_codebook_entry(codes, (2, 8, 4, 4))
    book = F.normalize(vq.quantize.embedding.weight, dim=-1)
    for b, i, j in [(0, 0, 0), (1, 2, 3), (0, 3, 1)]:
        torch.testing.assert_close(latent[b, :, i, j], book[codes[b, i * 4 + j]])
    with pytest.raises(ValueError, match="do not fill"):
        vq.quantize.get_codebook_entry(codes, (2, 8, 4, 5))


@pytest.mark.parametrize("channels", [64, 512])  # 512: beyond ops.flash_attention's head_dim limit
def test_attn_block_matches_textbook(channels):
    blk = AttnBlock(channels).double()
    x = torch.randn(2, channels, 3, 2, dtype=torch.float64)
    y = F.group_norm(x, 32, blk.norm.weight, blk.norm.bias, eps=1e-6)
    q, k, v = (conv(y).flatten(2) for conv in (blk.q, blk.k, blk.v))  # [B, C, HW]
    w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(channels), dim=-1)  # [B, HW, HW]
    out = (v @ w.transpose(1, 2)).view_as(x)
    torch.testing.assert_close(blk(x), x + blk.proj_out(out))


def test_downsample_pads_right_and_bottom():
    d = Downsample(32).double()
    x = torch.randn(1, 32, 8, 8, dtype=torch.float64)
    want = F.conv2d(F.pad(x, (0, 1, 0, 1)), d.conv.weight, d.conv.bias, stride=2)
    assert want.shape[-1] == 4
    torch.testing.assert_close(d(x), want)


def test_encode_rejects_bad_images(vq):
    with pytest.raises(ValueError, match="multiples of 16"):
        vq.encode(torch.zeros(1, 3, 40, 40))
