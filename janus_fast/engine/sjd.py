"""Image tokens by speculative Jacobi decoding (SJD) on static buffers: lossless parallel decoding
(the algorithm and its proof: janus_fast/ops/sampling_verify.py).

The prompts' shared prefill, then the first token of every image drawn from the prefill's
logits exactly as the token-by-token loop draws it; then one verification pass per step
(gen_embed + gen_aligner of each row's window of W ids -> LlamaModel.verify_step -> gen_head ->
ops.sjd_verify per request, which commits 1..W tokens per image and advances the cache lengths
on the device), eager or replayed as one CUDA graph: the second kind of captured step beside
images.image_step. Every pass commits at least one token per unfinished image, so N - 1 passes
always suffice; the host reads the slowest image's progress every `check_every` passes without
waiting (a copy that lands in the background) and stops once every image is done.

Requests keep their own random state and their own sjd_verify launch, as in images.py: image j
of a request seeded s gets the same tokens wherever the request sits in the batch, for the same
settings and window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..models.janus_pro import DEFAULT_WINDOW, JanusPro, check_decoding, raise_bad_image_tokens
from .images import ImageSettings, prefill_prompts
from .step import CAPACITY_MULTIPLE, Buckets, Step, graphs_usable, round_up
from .text import DoneProbe

@dataclass(frozen=True)
class SjdSettings:
    image: ImageSettings
    window: int
    grid_width: int  # tokens per image row: the drafts' spatial prior


class SjdBuffers:
    """The state of a generation (ops.sjd_verify's layout), allocated once per bucket."""

    def __init__(self, model: JanusPro, rows: int, capacity: int, settings: SjdSettings):
        device, vq, w = model.device, model.config.vq, settings.window
        images = rows // 2
        self.cache = model.language_model.model.new_cache(rows, capacity)
        self.cache.max_seqlen = capacity  # (a host bound: the lengths move on the device)
        self.hidden = torch.zeros(rows, model.config.language.hidden_size, dtype=model.dtype, device=device)
        self.tokens = torch.zeros(images, vq.num_tokens + w, dtype=torch.long, device=device)
        self.point = torch.ones(images, vq.num_tokens + w, dtype=torch.int8, device=device)
        self.q = torch.zeros(images, w, vq.codebook_size, dtype=torch.float32, device=device)
        self.progress = torch.zeros(images, 2, dtype=torch.long, device=device)
        self.next_ids = torch.zeros(rows, w, dtype=torch.long, device=device)
        self.rng = torch.zeros(len(settings.image.images_per_request), 3, dtype=torch.long, device=device)

    def reset(self, seeds: list[int]) -> None:
        self.rng.copy_(torch.tensor([[s, 0, 0] for s in seeds], dtype=torch.long), non_blocking=True)
        self.point.fill_(1)

    def start(self, model: JanusPro, settings: SjdSettings) -> None:
        """The first token of every image from the prefill's hidden state (one cfg_sample per
        request, as images.image_step draws it), and the first window: point-mass drafts on it."""
        s = settings.image
        logits = model.gen_head(self.hidden)
        first = torch.cat([ops.cfg_sample(logits[2 * lo:2 * hi], cfg_weight=s.cfg_weight, temperature=s.temperature,
                                          top_k=s.top_k, top_p=s.top_p, rng_state=self.rng[r])
                           for r, (lo, hi) in enumerate(s.spans())])
        self.tokens[:, :settings.window + 1] = first[:, None]
        self.progress.copy_(torch.tensor([1, 0], device=self.progress.device).expand_as(self.progress))
        self.next_ids.copy_(first.repeat_interleave(2)[:, None].expand_as(self.next_ids))


def sjd_step(model: JanusPro, buf: SjdBuffers, settings: SjdSettings) -> None:
    """One verification pass for every row: reads buf.next_ids, commits into buf.tokens."""
    rows, w = buf.next_ids.shape
    x = model.prepare_gen_img_embeds(buf.next_ids.view(-1))
    h = model.language_model.model.verify_step(x.view(rows, w, -1), buf.cache)
    logits = model.gen_head(h.view(rows * w, -1)).view(rows, w, -1)
    s = settings.image
    for r, (lo, hi) in enumerate(s.spans()):
        ops.sjd_verify(logits[2 * lo:2 * hi], buf.tokens[lo:hi], buf.point[lo:hi], buf.q[lo:hi], buf.progress[lo:hi],
                       buf.cache.seqlens[2 * lo:2 * hi], buf.next_ids[2 * lo:2 * hi], cfg_weight=s.cfg_weight,
                       temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, rng_state=buf.rng[r],
                       grid_width=settings.grid_width)


class SjdBucket:
    def __init__(self, model: JanusPro, rows: int, capacity: int, settings: SjdSettings, capture: bool):
        self.buffers = SjdBuffers(model, rows, capacity, settings)
        with ops.no_value_checks():
            self.step = Step(lambda: sjd_step(model, self.buffers, settings), capture)


@dataclass
class SjdResult:
    codes: torch.Tensor  # [images, N]
    passes: torch.Tensor  # [images]: verification passes each image needed (its forward passes: 1 + passes)
    steps: int  # passes run for the batch (the slowest image's, plus the host's look-ahead)


def generate_image_tokens_sjd(model: JanusPro, prompts: list[list[int]], pad_id: int, parallel_size: int,
                              settings: ImageSettings, seeds: list[int], buckets: Buckets, window: int = DEFAULT_WINDOW,
                              progress=None, use_graphs: bool | None = None, check_every: int = 4) -> SjdResult:
    """Image token ids [len(prompts) * parallel_size, num_tokens] by SJD with a window of `window`
    tokens; raises BadLogitsError naming the first token whose guided logits were not finite.
    progress(tokens, total) follows the slowest image."""
    n_tokens = model.config.vq.num_tokens
    check_decoding("sjd", window, n_tokens, model.language_model.model.kv_cache_dtype)
    with torch.inference_mode():  # the buffers are inference tensors, whoever calls first
        result = _generate(model, prompts, pad_id, parallel_size,
                           SjdSettings(settings, window, model.config.vq.grid), seeds, buckets, progress, use_graphs,
                           check_every)
    return SjdResult(result.codes.clone(), result.passes.clone(), result.steps)


def _generate(model, prompts, pad_id, parallel_size, settings, seeds, buckets, progress, use_graphs, check_every):
    n_tokens, device = model.config.vq.num_tokens, model.device
    rows = 2 * len(prompts) * parallel_size
    capacity = round_up(max(len(p) for p in prompts), CAPACITY_MULTIPLE) + n_tokens + settings.window
    capture = graphs_usable(device, model.dtype) if use_graphs is None else use_graphs
    bucket = buckets.get(("sjd", rows, capacity, settings, capture),
                         lambda: SjdBucket(model, rows, capacity, settings, capture))
    buf = bucket.buffers
    buf.reset(seeds)
    buf.hidden.copy_(prefill_prompts(model, prompts, pad_id, parallel_size, buf.cache))
    probe = DoneProbe(device)
    steps = 0
    with ops.no_value_checks():
        buf.start(model, settings)
        while steps < n_tokens - 1:
            bucket.step()
            steps += 1
            if steps % check_every == 0 or device.type == "cpu":
                slowest = buf.progress[:, 0].amin()
                done = int(slowest) if device.type == "cpu" else probe.poll(slowest)  # (no wait on a GPU)
                if done is not None and progress is not None and done < n_tokens:
                    progress(done, n_tokens)
                if done == n_tokens:
                    break
    if progress is not None:
        progress(n_tokens, n_tokens)
    codes = buf.tokens[:, :n_tokens]
    raise_bad_image_tokens(codes)  # the one host sync of the loop
    return SjdResult(codes, buf.progress[:, 1], steps)
