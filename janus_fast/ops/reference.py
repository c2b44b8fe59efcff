"""Plain-PyTorch reference implementations: the oracle of every test and the CPU fallback.

Written for clarity, not speed. Low-precision inputs are computed in float32, float64 inputs in
float64; results come back contiguous in the input dtype (log-sum-exp always in float32 or float64).
Tests, benchmarks and the "reference" backend all import these functions, so they cannot drift.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "attention",
    "attention_backward",
    "varlen_attention",
    "varlen_attention_backward",
    "decode_attention",
    "verify_attention",
    "l2_normalize",
    "vq_quantize",
    "vq_lookup",
    "guided_logits",
    "unusable_rows",
    "sampling_probs",
    "cfg_sample",
    "sjd_init_position",
    "sjd_residual",
    "sjd_verify",
    "rms_norm",
    "rms_norm_backward",
    "rope_kv_write",
    "rope_qkv",
    "rope_qkv_backward",
    "silu_mul",
    "silu_mul_backward",
    "linear_cross_entropy",
    "linear_cross_entropy_backward",
    "quantize_rows",
    "dequantize_rows",
    "quantized_linear",
]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- attention


def _visible(sq: int, sk: int, causal: bool, device) -> torch.Tensor:
    """[sq, sk] bool: which keys each query sees. Causal is bottom-right aligned (flash-attn):
    query i sees key j iff j <= i + sk - sq."""
    if not causal:
        return torch.ones(sq, sk, dtype=torch.bool, device=device)
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + (sk - sq)


def _heads_first(t, group):
    """[B, S, H, D] -> [B, H·group, S, D] in the compute dtype (GQA: each kv head repeated)."""
    return t.to(_compute_dtype(t)).transpose(1, 2).repeat_interleave(group, dim=1)


def _softmax_rows(s):
    """(P, lse) of scores s whose invisible entries are -inf. A row with no visible key has
    lse = -inf and P = 0; a NaN score makes its whole row NaN, as in SDPA's math path."""
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return p.masked_fill(torch.isneginf(lse)[..., None], 0.0), lse


def _weighted_values(p, vh, visible):
    """P V reading only visible values: out[i, d] = sum over keys j visible to i of P[i, j] V[j, d].

    A plain P @ V would turn a NaN/inf at an invisible position into 0 * NaN = NaN, so the
    non-finite values are left out of the product and a row element is set to NaN if one of
    its visible values is non-finite (visible NaN propagates; visible inf gives a non-finite
    result, as SDPA's inf * weight or 0 * inf does). `visible` broadcasts against p."""
    finite = torch.isfinite(vh)
    out = p @ vh.where(finite, 0.0)
    bad = (visible.to(p.dtype) @ (~finite).to(p.dtype)) > 0
    return out.masked_fill(bad, math.nan)


def _scores(q, k, visible, scale):
    """Scaled scores [B, Hq, Sq, Sk] in the compute dtype, -inf where not visible."""
    s = (_heads_first(q, 1) @ _heads_first(k, q.shape[2] // k.shape[2]).transpose(-1, -2)) * scale
    return s.masked_fill(~visible, -math.inf)


def attention(q, k, v, causal=False, softmax_scale=None):
    """softmax(q kᵀ·scale + mask) v. q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] ->
    (out [B, Sq, Hq, D] in q.dtype, lse [B, Hq, Sq] float32/64).

    Non-finite values (contract 1): a query with no visible key gives out = 0 and lse = -inf; a
    NaN in a visible score (q row or visible k) makes the row NaN, a non-finite visible value
    makes its element non-finite; keys a query cannot see are never read into its result."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    visible = _visible(q.shape[1], k.shape[1], causal, q.device)
    p, lse = _softmax_rows(_scores(q, k, visible, scale))
    out = _weighted_values(p, _heads_first(v, q.shape[2] // k.shape[2]), visible)
    return out.transpose(1, 2).to(q.dtype).contiguous(), lse


def attention_backward(dout, q, k, v, out, lse, causal=False, softmax_scale=None):
    """Gradients of `attention` from its saved (out, lse), written out explicitly:
    P = exp(S - lse), dV = Pᵀ dO, dP = dO Vᵀ, D = rowsum(dO ∘ O), dS = P ∘ (dP - D),
    dQ = dS K · scale, dK = dSᵀ Q · scale; GQA gradients summed over each kv group."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    ct = _compute_dtype(q)
    b, sk, hkv, d = k.shape
    group = q.shape[2] // hkv
    s = _scores(q, k, _visible(q.shape[1], sk, causal, q.device), scale)
    lse = lse.to(ct)[..., None]
    p = torch.exp(s - lse).masked_fill(torch.isneginf(lse), 0.0)  # [B, Hq, Sq, Sk]; 0 for empty rows
    do, qh = _heads_first(dout, 1), _heads_first(q, 1)
    kh, vh = _heads_first(k, group), _heads_first(v, group)
    delta = (do * _heads_first(out, 1)).sum(-1, keepdim=True)
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ vh.transpose(-1, -2) - delta)
    dq = (ds @ kh) * scale
    dk = (ds.transpose(-1, -2) @ qh) * scale

    def per_kv_head(t):  # [B, Hq, Sk, D] -> [B, Sk, Hkv, D]
        return t.reshape(b, hkv, group, sk, d).sum(2).transpose(1, 2).contiguous()

    return dq.transpose(1, 2).to(q.dtype).contiguous(), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype)


def _segments(cu_seqlens_q, cu_seqlens_k):
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(len(cq) - 1)]


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, softmax_scale=None):
    """`attention` over packed sequences: sequence i is q[cu_q[i]:cu_q[i+1]] against
    k/v[cu_k[i]:cu_k[i+1]]. q [total_q, Hq, D] -> (out [total_q, Hq, D], lse [Hq, total_q])."""
    out = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=_compute_dtype(q), device=q.device)
    for qs, qe, ks, ke in _segments(cu_seqlens_q, cu_seqlens_k):
        if qe == qs:
            continue
        o, l = attention(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], causal, softmax_scale)
        out[qs:qe], lse[:, qs:qe] = o[0], l[0]
    return out, lse


def varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                              causal=False, softmax_scale=None):
    """Gradients of `varlen_attention`, sequence by sequence with `attention_backward`."""
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    for qs, qe, ks, ke in _segments(cu_seqlens_q, cu_seqlens_k):
        if qe == qs or ke == ks:
            continue
        g = attention_backward(dout[None, qs:qe], q[None, qs:qe], k[None, ks:ke], v[None, ks:ke],
                               out[None, qs:qe], lse[None, :, qs:qe], causal, softmax_scale)
        dq[qs:qe], dk[ks:ke], dv[ks:ke] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv


def decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=None, k_scale=None, v_scale=None):
    """One query per sequence against its cache prefix: q [B, Hq, D], caches [B, S_max, Hkv, D],
    cache_seqlens [B]; positions >= cache_seqlens[b] are never read into the result (they may
    hold garbage); length 0 gives 0. Non-finite values as in `attention`. A quantized cache
    (k_scale/v_scale [B, S_max, Hkv]) is dequantized (dequantize_rows) first."""
    return verify_attention(q[:, None], k_cache, v_cache, cache_seqlens, softmax_scale, k_scale, v_scale)[:, 0]


def verify_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=None, k_scale=None, v_scale=None):
    """W query tokens per sequence, the last W of its cache: q [B, W, Hq, D], caches
    [B, S_max, Hkv, D], cache_seqlens [B] counting the window's own keys; query j sees the keys at
    positions < cache_seqlens[b] - (W - 1 - j) (causal inside the window, bottom-right aligned;
    none, giving 0, when that is <= 0). W = 1 is `decode_attention`; a quantized cache as there.
    -> [B, W, Hq, D]."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    w = q.shape[1]
    used = int(cache_seqlens.max()) if cache_seqlens.numel() else 0  # (slots past every length: never read)
    k_cache, v_cache = k_cache[:, :used], v_cache[:, :used]
    if k_scale is not None:
        k_cache = dequantize_rows(k_cache, k_scale[:, :used], _compute_dtype(q))
        v_cache = dequantize_rows(v_cache, v_scale[:, :used], _compute_dtype(q))
    seen = cache_seqlens[:, None].long() - (w - 1) + torch.arange(w, device=q.device)  # [B, W]
    visible = (torch.arange(k_cache.shape[1], device=q.device) < seen[:, :, None])[:, None]  # [B, 1, W, S_max]
    p, _ = _softmax_rows(_scores(q, k_cache, visible, scale))
    out = _weighted_values(p, _heads_first(v_cache, q.shape[2] // k_cache.shape[2]), visible)
    return out.transpose(1, 2).to(q.dtype).contiguous()


# --------------------------------------------------------------------------- VQ


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm in the compute dtype: x / max(||x||, 1e-12) (F.normalize,
    as the official VQ code does), so a zero row stays zero."""
    return F.normalize(x.to(_compute_dtype(x)), p=2, dim=-1)


def vq_quantize(z, codebook, l2_norm=True):
    """Index of the nearest codebook row for each row of z [N, D] -> int64 [N]. Squared distance
    in the official expanded form ||z||² + ||c||² - 2 z·c, after L2-normalising both when
    l2_norm; ties go to the lowest index. A latent row with any non-finite entry gets -1 (it
    has no nearest code). Computed in row chunks to bound memory."""
    zc = l2_normalize(z) if l2_norm else z.to(_compute_dtype(z))
    cb = l2_normalize(codebook) if l2_norm else codebook.to(_compute_dtype(codebook))
    cb = cb.to(zc.dtype)
    c2 = (cb * cb).sum(-1)
    out = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    for start in range(0, z.shape[0], 4096):
        rows = zc[start:start + 4096]
        d = (rows * rows).sum(-1, keepdim=True) + c2 - 2 * rows @ cb.T
        out[start:start + 4096] = torch.argmin(d, dim=-1)  # first minimum: lowest index
    return out.masked_fill(~torch.isfinite(z).all(-1), -1)


def vq_lookup(indices, codebook, l2_norm=True, shape=None):
    """Codebook rows for `indices` (L2-normalised when l2_norm), in the codebook's dtype:
    [*indices.shape, D], or with shape=(B, D, H, W) the channels-first [B, D, H, W] tensor
    (row b*H*W + h*W + w goes to [b, :, h, w]), contiguous. An index outside [0, K) (vq_quantize's
    -1 among them) gives a NaN row, as the CUDA kernels do when no range check runs."""
    cb = l2_normalize(codebook) if l2_norm else codebook
    idx = indices.long()
    valid = (idx >= 0) & (idx < codebook.shape[0])
    rows = F.embedding(idx.clamp(0, codebook.shape[0] - 1), cb).to(codebook.dtype)
    rows = rows.masked_fill(~valid[..., None], math.nan)
    if shape is None:
        return rows
    b, d, h, w = shape
    return rows.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- sampling


def guided_logits(logits, cfg_weight, layout="interleaved"):
    """Classifier-free guidance in fp32: u + w·(c − u) from [2B, V] logits -> [B, V], and u
    itself where c == u (the same value when finite; a token masked to -inf in both rows stays
    -inf instead of becoming -inf + w·NaN = NaN).
    "interleaved": conditional rows even, unconditional odd (the official layout);
    "halves": conditional rows 0..B-1, unconditional B..2B-1 (transformers' layout)."""
    x = logits.to(_compute_dtype(logits))
    if layout == "interleaved":
        cond, uncond = x[0::2], x[1::2]
    else:
        cond, uncond = x.chunk(2, dim=0)
    return torch.where(cond == uncond, uncond, uncond + cfg_weight * (cond - uncond))


def unusable_rows(g: torch.Tensor) -> torch.Tensor:
    """bool [B]: guided rows cfg_sample cannot draw from and marks with token -1: any NaN or
    +inf, or no finite entry. -inf entries elsewhere are ordinary impossible tokens."""
    return (torch.isnan(g) | (g == math.inf)).any(-1) | ~torch.isfinite(g).any(-1)


def sampling_probs(logits, cfg_weight, temperature=1.0, top_k=0, top_p=1.0, layout="interleaved"):
    """The distribution cfg_sample draws from, [B, V]; a NaN row where `unusable_rows` holds.
    Temperature 0 is one-hot at the argmax of the guided row (lowest index on ties), and so is a
    row whose guided / temperature overflows (to +inf anywhere, or to -inf everywhere: a
    temperature too small for fp32; the limit of the distribution as the temperature falls). Otherwise softmax(guided /
    temperature), then top_k keeps token j iff fewer than k tokens have a strictly larger logit
    (0 = off), then top_p on the renormalised distribution keeps j iff p_j is the maximum or the
    mass of the tokens strictly more probable than j is < top_p (1 = off). Ties are kept or
    dropped together; survivors are renormalised."""
    g = guided_logits(logits, cfg_weight, layout)
    bad = unusable_rows(g)
    g = g.masked_fill(bad[:, None], 0.0)  # any finite row; marked NaN at the end
    greedy = F.one_hot(g.argmax(-1), g.shape[-1]).to(g.dtype)
    if temperature == 0:
        return greedy.masked_fill(bad[:, None], math.nan)
    g = g / temperature
    overflow = (g == math.inf).any(-1, keepdim=True) | (g == -math.inf).all(-1, keepdim=True)
    g = g.masked_fill(overflow, 0.0)  # those rows take `greedy`
    if top_k > 0:
        kth = torch.topk(g, min(top_k, g.shape[-1]), dim=-1).values[:, -1:]
        g = g.masked_fill(g < kth, -math.inf)  # same as: k or more tokens strictly above
    p = torch.softmax(g, dim=-1)
    if top_p < 1.0:
        # The kept set is {j: p_j >= t}: t is the smallest sorted probability whose exclusive
        # prefix mass is < top_p (at least the maximum), which keeps ties together.
        s = p.sort(dim=-1, descending=True).values
        kept = ((s.cumsum(-1) - s) < top_p).sum(-1, keepdim=True).clamp(min=1)
        p = p * (p >= s.gather(-1, kept - 1))
        p = p / p.sum(-1, keepdim=True)
    return torch.where(overflow, greedy, p).masked_fill(bad[:, None], math.nan)


def cfg_sample(logits, cfg_weight, temperature=1.0, top_k=0, top_p=1.0, generator=None,
               layout="interleaved"):
    """One token per guided row: argmax when temperature is 0, else a draw from
    `sampling_probs` with torch.multinomial; -1 for the rows `unusable_rows` marks (no
    exception). logits [2B, V] -> int64 [B]."""
    p = sampling_probs(logits, cfg_weight, temperature, top_k, top_p, layout)
    bad = p.isnan().any(-1)
    p = p.masked_fill(bad[:, None], 1.0)
    tokens = p.argmax(-1) if temperature == 0 else torch.multinomial(p, 1, generator=generator)[:, 0]
    return tokens.masked_fill(bad, -1)


def sjd_init_position(tokens, positions, window_end, grid_width):
    """Speculative Jacobi decoding's draft for a position entering the window (a point mass):
    the token grid_width positions back (the one above it in the image's raster) when that
    position lies before window_end (held a token before this commit), else the token at
    window_end - 1, the window's last. tokens [B, T], positions [B, K], window_end [B] -> [B, K]."""
    above = positions - grid_width
    use_above = (grid_width > 0) & (above >= 0) & (above < window_end[:, None])
    last = tokens.gather(1, (window_end - 1)[:, None])
    return torch.where(use_above, tokens.gather(1, above.clamp(0, tokens.shape[1] - 1)), last)


def sjd_residual(p, q):
    """Where a rejected draft is redrawn from: max(p - q, 0) (normalised by the draw)."""
    return (p - q).clamp(min=0)


def sjd_verify(logits, tokens, point, q, progress, lengths, next_ids, cfg_weight, temperature=1.0, top_k=0,
               top_p=1.0, generator=None, grid_width=0):
    """One verification of speculative Jacobi decoding, in place; the maths and the proof are in
    janus_fast/ops/sampling_verify.py. B images of N tokens, window W, V tokens:
    logits [2B, W, V] (interleaved pairs: row 2b conditional, 2b + 1 unconditional; column j
    predicts position n_b + j), tokens int64 [B, N + W] (committed [0, n_b), drafts
    [n_b, n_b + W)), point int8 [B, N + W] (1: the draft's q is the point mass on it), q float32
    [B, W, V] (q of position i in slot i % W where point is 0), progress int64 [B, 2] (n_b, passes),
    lengths int32 [2B] (the pair's cache lengths), next_ids int64 [2B, W] (written: the next
    pass's input ids). -> accepted bool [B, W]. Images with n_b == N are left as they are; at
    temperature 0 q is neither read nor written (every draft is a point mass on its token)."""
    two_b, w, v = logits.shape
    b, n_total = two_b // 2, tokens.shape[1] - w
    device = logits.device
    j = torch.arange(w, device=device)
    n = progress[:, 0].clone()
    active = n < n_total
    pos = torch.minimum(n, torch.full_like(n, n_total))[:, None] + j  # [B, W]
    p = sampling_probs(logits.transpose(0, 1).reshape(w * two_b, v), cfg_weight, temperature, top_k, top_p)
    p = p.float().view(w, b, v).transpose(0, 1)  # [B, W, V]: the distribution each draft is tested against
    bad = p.isnan().any(-1)
    draft = tokens.gather(1, pos)
    safe = draft.clamp(0, v - 1)
    onehot = F.one_hot(safe, v).float()
    slot = (pos % w)[:, :, None].expand(b, w, v)
    stored = q.gather(1, slot)
    q_full = torch.where(point.gather(1, pos).bool()[:, :, None] | (temperature == 0), onehot, stored)
    p_d = p.gather(2, safe[:, :, None])[:, :, 0]
    q_d = q_full.gather(2, safe[:, :, None])[:, :, 0]
    u = torch.rand(b, w, generator=generator, device=device)
    accepted = (u * q_d < p_d) & ~bad & active[:, None]
    residual = sjd_residual(p, q_full).nan_to_num(0.0)
    residual = torch.where((residual.sum(-1) > 0)[:, :, None], residual, onehot)  # (no mass: keep the draft)
    drawn = torch.multinomial(residual.reshape(b * w, v), 1, generator=generator).view(b, w)
    out = torch.where(bad, -1, torch.where(accepted, draft, drawn))
    keep = active[:, None]
    tokens.scatter_(1, pos, torch.where(keep, out, draft))
    point.scatter_(1, pos, torch.where(keep, torch.zeros_like(draft, dtype=point.dtype), point.gather(1, pos)))
    if temperature != 0:  # (at temperature 0 every q is a point mass: the ring is not used)
        q.scatter_(1, slot, torch.where(keep[:, :, None], p, stored))
    first_rejected = torch.where(accepted, w, j).amin(1)
    count = torch.minimum(torch.clamp(first_rejected + 1, max=w), n_total - n).clamp(min=0)
    new = n[:, None] + w + j  # positions entering the window
    rows, cols = torch.nonzero(j < count[:, None], as_tuple=True)
    fresh = sjd_init_position(tokens, new, n + w, grid_width)
    tokens[rows, new[rows, cols]] = fresh[rows, cols]
    point[rows, new[rows, cols]] = 1
    progress[:, 0] += count
    progress[:, 1] += active.long()
    lengths += count.repeat_interleave(2).to(lengths.dtype)
    next_ids.copy_(tokens.gather(1, (n + count - 1)[:, None] + j).repeat_interleave(2, dim=0))
    return accepted


# --------------------------------------------------------------------------- layer ops: RMSNorm, RoPE, SiLU·mul


def rms_norm(x, weight, eps, residual=None):
    """Llama RMSNorm of h = x (+ residual, added in x.dtype as torch adds): the normalisation
    h / sqrt(mean(h²) + eps) in the compute dtype, cast to x.dtype, then times weight.
    -> (y, h), both in x.dtype."""
    h = x if residual is None else x + residual
    h32 = h.to(_compute_dtype(h))
    y = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight * y).to(x.dtype), h


def rms_norm_backward(dy, h, weight, eps, dh=None, weight_grad=True):
    """Gradients of `rms_norm` written out, from h (x, or x + residual) and dy, in the compute
    dtype: n = h·rstd, g = dy·weight, dh_total = rstd·(g − n·mean(g·n)) (+ dh, the gradient
    reaching h itself: with a residual, dh_total is the gradient of x and of residual), dweight
    = Σ over rows of dy·n. -> (dh_total in h.dtype, dweight in weight.dtype, or an empty tensor
    without weight_grad)."""
    ct = _compute_dtype(h)
    h32, dy32 = h.to(ct), dy.to(ct)
    rstd = torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    n = h32 * rstd
    g = dy32 * weight.to(ct)
    dh_total = rstd * (g - n * (g * n).mean(-1, keepdim=True))
    if dh is not None:
        dh_total = dh_total + dh.to(ct)
    dw = (dy32 * n).sum(0).to(weight.dtype) if weight_grad else weight.new_empty(0)
    return dh_total.to(h.dtype), dw


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_kv_write(q, k, v, cos, sin, positions, k_cache, v_cache, k_scale=None, v_scale=None):
    """Rotate-half RoPE of q [M, Hq, D] and k [M, Hkv, D] at position positions[m] (rows of the
    cos/sin tables [S, D]), in the compute dtype; the rotated k and the unchanged v are written to
    k_cache/v_cache [B, S_max, Hkv, D] at row m // (M // B), slot positions[m] (in place; M a
    multiple of B: M // B consecutive tokens per cache row). With k_scale/v_scale [B, S_max, Hkv]
    (a quantized cache), each written head is quantize_rows'd to the cache dtype and its scale
    stored beside it. -> rotated q in q.dtype."""
    ct = _compute_dtype(q)
    pos = positions.long()
    c, s = cos[pos].to(ct)[:, None, :], sin[pos].to(ct)[:, None, :]

    def rotate(x):
        x = x.to(ct)
        return x * c + _rotate_half(x) * s

    rows = torch.arange(q.shape[0], device=q.device) // max(q.shape[0] // max(k_cache.shape[0], 1), 1)
    for cache, scale, x in ((k_cache, k_scale, rotate(k)), (v_cache, v_scale, v)):
        if scale is None:
            cache[rows, pos] = x.to(cache.dtype)
        else:
            cache[rows, pos], scale[rows, pos] = quantize_rows(x, cache.dtype)
    return rotate(q).to(q.dtype).contiguous()


def _heads(qkv, num_heads, num_kv_heads):
    """The q, k and v heads [T, H, D] of one fused projection [T, (Hq + 2·Hkv)·D] (views)."""
    n = num_heads + 2 * num_kv_heads
    heads = qkv.reshape(qkv.shape[0], n, qkv.shape[1] // n)
    return heads.split([num_heads, num_kv_heads, num_kv_heads], 1)


def _tables_at(cos, sin, positions, ct):
    pos = positions.long()
    return cos[pos].to(ct)[:, None, :], sin[pos].to(ct)[:, None, :]


def rope_qkv(qkv, positions, cos, sin, num_heads, num_kv_heads):
    """Rotate-half RoPE of the q and k heads of one fused projection qkv [T, (Hq + 2·Hkv)·D] at
    position positions[t] (a row of the cos/sin tables [S, D]), in the compute dtype; the v heads
    pass unchanged. -> (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]), contiguous, in qkv.dtype."""
    ct = _compute_dtype(qkv)
    q, k, v = _heads(qkv, num_heads, num_kv_heads)
    c, s = _tables_at(cos, sin, positions, ct)

    def rotate(x):
        x = x.to(ct)
        return (x * c + _rotate_half(x) * s).to(qkv.dtype).contiguous()

    return rotate(q), rotate(k), v.clone(memory_format=torch.contiguous_format)


def rope_qkv_backward(dq, dk, dv, positions, cos, sin):
    """The gradient of `rope_qkv` with respect to qkv: each rotation transposed, dx = dy·cos −
    rotate_half(dy·sin), in the compute dtype; dv passes unchanged. -> [T, (Hq + 2·Hkv)·D] in
    dq.dtype."""
    ct = _compute_dtype(dq)
    c, s = _tables_at(cos, sin, positions, ct)

    def back(g):
        g = g.to(ct)
        return g * c - _rotate_half(g * s)

    t, hq, d = dq.shape
    return torch.cat([back(dq), back(dk), dv.to(ct)], 1).reshape(t, (hq + 2 * dk.shape[1]) * d).to(dq.dtype)


def silu_mul(gate, up):
    """silu(gate) · up in the compute dtype -> gate.dtype."""
    ct = _compute_dtype(gate)
    return (F.silu(gate.to(ct)) * up.to(ct)).to(gate.dtype)


def silu_mul_backward(dout, gate, up, fused=False):
    """Gradients of `silu_mul` in the compute dtype: with s = sigmoid(gate), dgate = dout·up·s·(1 +
    gate·(1 − s)) and dup = dout·silu(gate). -> (dgate, dup) in gate.dtype, or with fused=True
    one [M, 2N] tensor [dgate | dup] (the gradient of one fused gate/up projection)."""
    ct = _compute_dtype(gate)
    g, u, d = gate.to(ct), up.to(ct), dout.to(ct)
    s = torch.sigmoid(g)
    dgate, dup = (d * u * s * (1 + g * (1 - s))).to(gate.dtype), (d * g * s).to(gate.dtype)
    return torch.cat([dgate, dup], 1) if fused else (dgate, dup)


# --------------------------------------------------------------------------- cross-entropy


def _linear_logits(x, weight, bias):
    ct = _compute_dtype(x)
    return F.linear(x.to(ct), weight.to(ct), None if bias is None else bias.to(ct))


def linear_cross_entropy(x, weight, target, bias=None, ignore_index=-100, reduction="mean"):
    """cross_entropy(x Wᵀ + b, target) on the full [N, V] logits in the compute dtype, differentiable.
    "sum" adds the losses of targets != ignore_index; "mean" divides that by their number, or
    by 1 when there is none (0, not torch's NaN)."""
    logits = _linear_logits(x, weight, bias)
    total = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (target != ignore_index).sum().clamp(min=1)


def linear_cross_entropy_backward(x, weight, target, bias=None, ignore_index=-100, reduction="mean"):
    """(loss, dx, dW, db) of `linear_cross_entropy` for dloss = 1, written out explicitly:
    dz = (softmax(z) − onehot(t)) · s on valid rows (0 on ignored ones), s = 1 or 1/max(#valid, 1);
    dx = dz W (x's dtype), dW = dzᵀ x, db = Σ dz (compute dtype)."""
    ct = _compute_dtype(x)
    logits = _linear_logits(x, weight, bias)
    valid = target != ignore_index
    safe = torch.where(valid, target.long(), 0)
    lse = torch.logsumexp(logits, dim=-1)
    losses = torch.where(valid, lse - logits.gather(1, safe[:, None])[:, 0], 0.0)
    scale = 1.0 if reduction == "sum" else 1.0 / valid.sum().clamp(min=1).to(ct)
    dz = torch.softmax(logits, dim=-1) - F.one_hot(safe, logits.shape[1]).to(ct)
    dz = dz * (valid[:, None].to(ct) * scale)
    loss = losses.sum() * scale
    return loss, (dz @ weight.to(ct)).to(x.dtype), dz.T @ x.to(ct), dz.sum(0)


# --------------------------------------------------------------------------- quantization

# The largest magnitude of each quantized format: int8 symmetric (-127..127), fp8 e4m3 (finite).
QUANT_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def quantize_rows(x, dtype):
    """Symmetric per-row quantization of x [..., K] to `dtype` (int8 or float8_e4m3fn), in fp32
    (float64 for float64 x): scale = max|x| / QUANT_MAX per row (0 for a row of zeros), and
    x / scale rounded - int8 half away from zero, fp8 to nearest even - within +-QUANT_MAX.
    -> (q [..., K] in dtype, scale [...] in float32). Weights (a row = an output channel) and
    KV-cache heads (a row = one head of one token) both use it."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(ct)
    scale = x.abs().amax(-1) / QUANT_MAX[dtype] if x.shape[-1] else x.new_zeros(x.shape[:-1])
    y = x / torch.where(scale > 0, scale, 1.0)[..., None]
    if dtype == torch.int8:
        y = torch.where(y >= 0, torch.floor(y + 0.5), torch.ceil(y - 0.5))
    q = y.clamp(-QUANT_MAX[dtype], QUANT_MAX[dtype]).to(dtype)
    return q, scale.float()


def dequantize_rows(q, scale, dtype=torch.float32):
    """q [..., K] · scale[..., None], computed in fp32 (float64 if asked) -> dtype."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    return (q.to(ct) * scale.to(ct)[..., None]).to(dtype)


def quantized_linear(x, qweight, scale, bias=None, rows_per_chunk: int = 4096):
    """x [M, K] @ Wᵀ + bias with W = dequantize_rows(qweight [N, K], scale [N]), in the compute
    dtype -> [M, N] in x.dtype. W is dequantized `rows_per_chunk` output channels at a time, so
    the whole float weight never exists at once."""
    ct = _compute_dtype(x)
    x32 = x.to(ct)
    parts = [F.linear(x32, dequantize_rows(q, s, ct)) for q, s in
             zip(qweight.split(rows_per_chunk), scale.split(rows_per_chunk))]
    out = torch.cat(parts, -1) if parts else x32.new_zeros((*x.shape[:-1], 0))
    if bias is not None:
        out = out + bias.to(ct)
    return out.to(x.dtype)
