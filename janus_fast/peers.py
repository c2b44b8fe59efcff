"""The tools people use today, written as they use them: the baselines janus_fast's benchmarks
put beside our kernels (`python -m janus_fast.bench`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def official_cfg_sample(logits, cfg_weight: float, temperature: float = 1.0, generator=None):
    """The official generation loop's sampling step: interleaved [2B, V] logits, guidance,
    softmax and torch.multinomial."""
    cond, uncond = logits[0::2], logits[1::2]
    guided = uncond + cfg_weight * (cond - uncond)
    probs = torch.softmax(guided / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def torch_filtered_cfg_sample(logits, cfg_weight: float, temperature: float = 1.0, top_k: int = 0,
                              top_p: float = 1.0, generator=None):
    """The official sampling step with the sort-based top-k / top-p filters transformers'
    logits warpers use: top-k keeps logits >= the k-th largest (torch.topk); top-p sorts
    ascending and drops the tokens whose cumulative probability stays <= 1 - top_p, always
    keeping the largest. Filters apply in that order, in fp32."""
    cond, uncond = logits[0::2], logits[1::2]
    guided = (uncond + cfg_weight * (cond - uncond)).float() / temperature
    if top_k:
        kth = torch.topk(guided, min(top_k, guided.shape[-1]), dim=-1).values[:, -1:]
        guided = guided.masked_fill(guided < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = guided.sort(dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[:, -1] = False
        guided = guided.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = torch.softmax(guided, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def torch_vq_quantize(z, codebook):
    """The official VQ quantizer: normalise, the full [N, K] distance matrix, argmin."""
    z, codebook = F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
    d = (z ** 2).sum(1, keepdim=True) + (codebook ** 2).sum(1) - 2 * z @ codebook.T
    return d.argmin(dim=1)


def torch_vq_lookup(indices, codebook, shape):
    """The official decode_code lookup: embedding of the normalised codebook, then permute."""
    b, d, h, w = shape
    rows = F.embedding(indices, F.normalize(codebook, dim=-1))
    return rows.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()

