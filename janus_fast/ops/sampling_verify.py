"""Speculative Jacobi decoding (SJD): the verification of a window of drafted image tokens against
the model's guided, filtered distributions, in one launch.

The algorithm (Teng et al. 2024, arXiv 2410.01699, with the draft reuse of SJD++, arXiv 2512.07503)
-----------------------------------------------------------------------------------------------
An image is N tokens x_0 .. x_{N-1}; token-by-token sampling draws x_i from P_i(. | x_<i), the
distribution `reference.sampling_probs` defines (guided u + w (c - u), temperature, top-k, top-p:
exactly what ops.cfg_sample draws from). SJD keeps, per image, n committed tokens and a window of
W drafts d_n .. d_{n+W-1}, each with its draft distribution q_i: the law d_i was drawn from.
One pass runs the model on (x_{n-1}, d_n, .., d_{n+W-2}) (W tokens, one forward: the verify
attention) and gets, for every column j, P~_j = P_{n+j}(. | x_<n, d_n .. d_{n+j-1}). Then, for
every column j at once:
    accept d_{n+j} iff U_j q_j(d) < P~_j(d)              (U_j uniform on (0, 1))
    o_j = d_{n+j} if accepted, else a draw from norm(max(P~_j - q_j, 0))
Commit c = min(r + 1, W, N - n) tokens x_{n+k} = o_k, r the first rejected column (W if none):
the accepted drafts and the draw at the first rejection. Columns after it keep o_j as their next
draft with q := P~_j (the values used in this pass, stored bit for bit); c new positions enter
the window as point masses (q = delta) on the token grid_width positions back (the one above in
the image raster: 24 for Janus-Pro) when that position already holds a token, else on the
window's last output. The cache keeps exactly the committed tokens: its lengths grow by c (the
keys written for rejected columns are overwritten by the next pass). Temperature 0: every P~ is
one-hot, a draft is accepted iff it is the argmax and o_j is the argmax, so SJD commits the
greedy tokens (Jacobi decoding).

Draft reuse. Plain SJD re-draws every column after the first rejection from P~_j; here each of
those columns outputs o_j, which is also an exact draw from P~_j (the lemma below) but equals the
old draft whenever that passes its test: drafts that are still valid are kept (SJD++'s reuse of
draft tokens as we implement it; SJD-PAC, arXiv 2603.18599, calls the same rule adaptive
continuation). Initialisation: a spatial prior (the token above), SJD++'s idea; the rule is
reference.sjd_init_position.

Why the images have exactly the token-by-token distribution
------------------------------------------------------------
Lemma (speculative sampling, Leviathan et al. 2023; Chen et al. 2023). If d ~ q, U ~ U(0, 1) and
the residual draw are independent given (p, q), then o ~ p:
    P(o = a) = q(a) min(1, p(a)/q(a)) + (1 - sum_x min(p(x), q(x))) max(p(a) - q(a), 0) / Z
             = min(p(a), q(a)) + max(p(a) - q(a), 0) = p(a),
with Z = sum_x max(p(x) - q(x), 0) = 1 - sum_x min(p(x), q(x)) because p and q both sum to 1.
Claim: every committed x_i has law P_i(. | x_<i) given the committed prefix. Let F_<i be all
randomness of positions < i (their drafts, uniforms, residual noise, in every pass). Position i
is committed in the first pass where it sits in column j <= r, an event decided by columns < j
only, i.e. by F_<i; columns before j were accepted, so the inputs before column j are the
committed tokens and P~_j = P_i(. | x_<i). The draft d_i has law q_i given F_<i: a point mass is
a function of tokens at positions < i (the token above, or the window's last output, which sits
before every entering position) with q = delta; a reused draft is the previous pass's o at i,
whose law given that pass's columns before it is that pass's P~ (the lemma, by induction over
passes), which is the stored q_i, and its noise (a Philox counter of its own per position and
pass) enters nothing at positions < i. What depends on d_i (outputs of later columns, fresh
drafts copied from it) lies at positions > i. So the lemma applies conditionally on F_<i and on
the pass: x_i ~ P_i(. | x_<i), and the chain rule gives the joint law of the image. Two things
make this exact only if kept exactly, and the kernels keep them: q must be the distribution the
draft was drawn from (the same fp32 values that pass used, stored, never recomputed), and the
acceptance uniforms and residual noise must be fresh per position and pass. (The fp32 p and q
sum to 1 within rounding; the uniform has 2^-23 resolution: the usual error of a sampler.)

Layout and state (see reference.sjd_verify): B images, logits [2B, W, V] in the interleaved
pair layout, tokens int64 [B, N + W], point int8 [B, N + W], q float32 [B, W, V] (a ring: the q
of position i in slot i % W), progress int64 [B, 2] (n, passes), lengths int32 [2B] (the pair's
cache lengths), next_ids int64 [2B, W] (the next pass's inputs, pair-duplicated).
"""

from __future__ import annotations

import torch

from . import _backend, _checks, reference
from .sampling import reference_generator

FAST = ("triton",)


@torch.library.custom_op("janus_fast::sjd_verify",
                         mutates_args=("tokens", "point", "q", "progress", "lengths", "next_ids", "seed"))
def _sjd_verify(logits: torch.Tensor, tokens: torch.Tensor, point: torch.Tensor, q: torch.Tensor,
                progress: torch.Tensor, lengths: torch.Tensor, next_ids: torch.Tensor, cfg_weight: float,
                temperature: float, top_k: int, top_p: float, seed: torch.Tensor, grid_width: int,
                backend: str) -> torch.Tensor:
    if backend == "reference":
        accepted = reference.sjd_verify(logits, tokens, point, q, progress, lengths, next_ids, cfg_weight,
                                        temperature, top_k, top_p, reference_generator(seed, logits.device),
                                        grid_width)
        seed[1] += 1
        return accepted
    return _backend.triton_kernels("sampling_verify").sjd_verify(logits, tokens, point, q, progress, lengths,
                                                                 next_ids, cfg_weight, temperature, top_k, top_p,
                                                                 seed, grid_width)


@_sjd_verify.register_fake
def _(logits, tokens, point, q, progress, lengths, next_ids, cfg_weight, temperature, top_k, top_p, seed, grid_width,
      backend):
    return logits.new_empty((logits.shape[0] // 2, logits.shape[1]), dtype=torch.bool)


def _state(name, t, shape, dtype, device):
    _checks.tensor(name, t, ndim=len(shape), dtypes=(dtype,), device=device)
    if tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor of shape {list(shape)}, got shape {list(t.shape)} "
                         f"and strides {t.stride()}")


def sjd_verify(logits, tokens, point, q, progress, lengths, next_ids, *, cfg_weight: float,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, rng_state: torch.Tensor,
               grid_width: int = 0, backend: str = "auto") -> torch.Tensor:
    """One speculative-Jacobi verification pass for B images (the maths above), in place and
    without a host sync on the fast backend: tests each image's W drafts, commits its accepted
    prefix plus one token, advances `progress`, `lengths` and the random state, redrafts, and
    writes the next pass's input ids. -> accepted bool [B, W] (all False for finished images).

    logits [2B, W, V] float (interleaved pairs: conditional row 2b, unconditional 2b + 1; column j
    predicts position n_b + j), tokens int64 [B, N + W], point int8 [B, N + W], q float32
    [B, W, V], progress int64 [B, 2] with 1 <= n_b <= N, lengths int32 [2B], next_ids int64
    [2B, W], rng_state an int64 [3] state from ops.new_rng_state (advanced by one, as cfg_sample
    advances it). cfg_weight, temperature, top_k, top_p as in cfg_sample (the same distribution);
    grid_width: tokens per image row for the drafts' spatial prior (0: none). The Triton backend
    keeps a row on the chip: V <= 16384 (Janus-Pro's image vocabulary)."""
    _checks.tensor("logits", logits, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    two_b, w, v = logits.shape
    if two_b % 2 or w < 1 or v < 1:
        raise ValueError(f"logits must be [2B, W, V] with W, V >= 1, got shape {tuple(logits.shape)}")
    _checks.last_dim_contiguous("logits", logits)
    b, device = two_b // 2, logits.device
    _checks.tensor("tokens", tokens, ndim=2, dtypes=(torch.int64,), device=device)
    n_total = tokens.shape[1] - w
    if n_total < 1:
        raise ValueError(f"tokens must be [B, N + W] with N >= 1 (W = {w}), got shape {tuple(tokens.shape)}")
    _state("tokens", tokens, (b, n_total + w), torch.int64, device)
    _state("point", point, (b, n_total + w), torch.int8, device)
    _state("q", q, (b, w, v), torch.float32, device)
    _state("progress", progress, (b, 2), torch.int64, device)
    _state("lengths", lengths, (two_b,), torch.int32, device)
    _state("next_ids", next_ids, (two_b, w), torch.int64, device)
    _state("rng_state", rng_state, (3,), torch.int64, device)
    cfg_weight = _checks.finite_number("cfg_weight", cfg_weight)
    temperature = _checks.finite_number("temperature", temperature, low=0.0)
    top_k = _checks.whole_number("top_k", top_k)
    top_p = _checks.finite_number("top_p", top_p, low=0.0, high=1.0)
    grid_width = _checks.whole_number("grid_width", grid_width)
    if temperature < torch.finfo(torch.float32).tiny:  # g / T would overflow fp32: the argmax
        temperature = 0.0
    if b and _checks.value_checks_enabled(progress):
        n = progress[:, 0]
        lo, hi = int(n.min()), int(n.max())
        if lo < 1 or hi > n_total:
            raise ValueError(f"progress[:, 0] (committed tokens) must lie in [1, {n_total}], got [{lo}, {hi}]")
    chosen = _backend.resolve("sjd_verify", backend, device, FAST)
    if chosen == "triton":
        _backend.triton_kernels("sampling_verify").check_vocabulary(v)
    return _sjd_verify(logits, tokens, point, q, progress, lengths, next_ids, cfg_weight, temperature, top_k, top_p,
                       rng_state, grid_width, chosen)
