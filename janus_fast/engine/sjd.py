"""Image tokens by speculative Jacobi decoding (SJD) on static buffers: lossless parallel decoding
(the algorithm and its proof: janus_fast/ops/sampling_verify.py).

The prompts' shared prefill, then the first token of every image drawn from the prefill's
logits exactly as the token-by-token step draws it (ops.cfg_sample_settings, each image its own
stream); then one verification pass per step (gen_embed + gen_aligner of each row's window of W
ids -> LlamaModel.verify_step -> gen_head -> ops.sjd_verify per request, which commits 1..W
tokens per image and advances the cache lengths on the device), eager or replayed as one CUDA
graph: the second kind of step on engine.step's interface, beside images.image_step. Every pass
commits at least one token per unfinished image, so N - 1 passes always suffice; the step sets a
stop flag once every image is done, and engine.lookahead.run_steps stops within LOOKAHEAD passes
of it without waiting on the device, `progress` following the slowest image's committed tokens.

Buckets and memory as for token by token: an "sjd:W" bucket of (rows, capacity) within the byte
budget, counted by engine.memory (its window of W tokens per row in the step's transient
tensors), batches split into chunks of whole prompts by the same memory plan.

Settings. sjd_verify specialises its kernel on the settings (argmax, temperature scaling, top-k,
top-p are compile-time branches) and takes them as host numbers, and each request draws its
verification noise in its own launch (its own random state): so a captured SJD step is made per
(settings, prompts x images split) and kept as a named step of the bucket - the buffers serve
every setting, a graph only its own. Image j of a request seeded s gets the same tokens wherever
the request sits in the batch, for the same settings and window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import ops
from ..models.janus_pro import DEFAULT_WINDOW, JanusPro, check_decoding, raise_bad_image_tokens
from .images import ImageSettings, image_bucket_bytes, image_capacity, image_chunks, prefill_prompts
from .lookahead import LOOKAHEAD, Marks, run_steps
from .memory import bucket_bytes, make_room
from .step import Bucket, Buckets, graphs_usable


@dataclass(frozen=True)
class SjdSettings:
    """What one captured SJD step is made for: the sampling settings (host numbers, as
    sjd_verify takes them), the window, the images per request and the spatial prior's width."""

    image: ImageSettings
    window: int
    parallel_size: int
    grid_width: int  # tokens per image row: the drafts' spatial prior

    def name(self) -> str:
        s = self.image
        return (f"sjd w={self.window} n={self.parallel_size} cfg={s.cfg_weight!r} t={s.temperature!r} "
                f"k={s.top_k} p={s.top_p!r}")


class SjdBuffers:
    """The state of a generation (ops.sjd_verify's layout), allocated once per bucket (on the meta
    device without a cache: what the memory plan counts)."""

    def __init__(self, model: JanusPro, rows: int, capacity: int, window: int, device: torch.device | None = None):
        self.device = device = model.device if device is None else device
        vq, w, images = model.config.vq, window, rows // 2
        if device.type != "meta":
            self.cache = model.language_model.model.new_cache(rows, capacity)
            self.cache.max_seqlen = capacity  # (a host bound: the lengths move on the device)
        self.hidden = torch.zeros(rows, model.config.language.hidden_size, dtype=model.dtype, device=device)
        self.tokens = torch.zeros(images, vq.num_tokens + w, dtype=torch.long, device=device)
        self.point = torch.ones(images, vq.num_tokens + w, dtype=torch.int8, device=device)
        self.q = torch.zeros(images, w, vq.codebook_size, dtype=torch.float32, device=device)
        self.progress = torch.zeros(images, 2, dtype=torch.long, device=device)  # (committed, passes)
        self.next_ids = torch.zeros(rows, w, dtype=torch.long, device=device)
        self.stop = torch.zeros(1, dtype=torch.long, device=device)  # >= 0 once every image is done
        # the first token: as image_step draws it (a shared offset, each image its own stream)
        self.first_rng = torch.zeros(3, dtype=torch.long, device=device)
        self.streams = torch.zeros(images, 2, dtype=torch.long, device=device)
        self.settings = torch.zeros(4, dtype=torch.float32, device=device)
        self.workspace = ops.new_sampling_workspace(images, device)
        self.rng = torch.zeros(images, 3, dtype=torch.long, device=device)  # per request (at most one per image)

    def reset(self, seeds: list[int], parallel_size: int, settings: ImageSettings) -> None:
        self.first_rng.zero_()
        self.streams.copy_(torch.tensor([(s, j) for s in seeds for j in range(parallel_size)], dtype=torch.long),
                           non_blocking=True)
        self.settings.copy_(settings.tensor(), non_blocking=True)
        # request r verifies from (seed, 1): offset 0 is the first token's draw
        states = torch.tensor([[s, 1, 0] for s in seeds], dtype=torch.long)
        self.rng[:len(seeds)].copy_(states, non_blocking=True)
        self.point.fill_(1)

    def start(self, model: JanusPro, window: int) -> None:
        """The first token of every image from the prefill's hidden state, and the first window:
        point-mass drafts on it."""
        first, ids = ops.cfg_sample_settings(model.gen_head(self.hidden), self.settings, self.first_rng,
                                             streams=self.streams, return_ids=True, workspace=self.workspace)
        self.tokens[:, :window + 1] = first[:, None]
        self.progress[:, 0].fill_(1)
        self.progress[:, 1].zero_()
        self.next_ids.copy_(ids[:, None].expand_as(self.next_ids))


def sjd_step(model: JanusPro, buf: SjdBuffers, settings: SjdSettings) -> None:
    """One verification pass for every row: reads buf.next_ids, commits into buf.tokens, sets
    buf.stop to (the slowest image's committed tokens) - N."""
    rows, w = buf.next_ids.shape
    x = model.prepare_gen_img_embeds(buf.next_ids.view(-1))
    h = model.language_model.model.verify_step(x.view(rows, w, -1), buf.cache)
    logits = model.gen_head(h.view(rows * w, -1)).view(rows, w, -1)
    s, n = settings.image, settings.parallel_size
    for r in range(rows // (2 * n)):
        lo, hi = r * n, (r + 1) * n
        ops.sjd_verify(logits[2 * lo:2 * hi], buf.tokens[lo:hi], buf.point[lo:hi], buf.q[lo:hi], buf.progress[lo:hi],
                       buf.cache.seqlens[2 * lo:2 * hi], buf.next_ids[2 * lo:2 * hi], cfg_weight=s.cfg_weight,
                       temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, rng_state=buf.rng[r],
                       grid_width=settings.grid_width)
    buf.stop.copy_(buf.progress[:, 0].amin() - model.config.vq.num_tokens)


def sjd_kind(window: int) -> str:
    return f"sjd:{window}"  # (the window sets the buffers' shapes)


def sjd_capacity(model: JanusPro, prompts: list[list[int]], window: int) -> int:
    return image_capacity(model, prompts) + window  # (a pass writes W keys past the committed ones)


def sjd_bucket_bytes(model: JanusPro, rows: int, capacity: int, window: int) -> int:
    return bucket_bytes(lambda device: SjdBuffers(model, rows, capacity, window, device), model.language_model.model,
                        rows, capacity, model.config.vq.codebook_size, tokens_per_row=window)


def sjd_bucket(model: JanusPro, buckets: Buckets, rows: int, capacity: int, window: int) -> Bucket:
    """The SJD bucket of window `window`, `rows` rows and at least `capacity` cache slots, kept or made."""
    kind, nbytes = sjd_kind(window), sjd_bucket_bytes(model, rows, capacity, window)
    if buckets.find(kind, rows, capacity) is None:
        make_room(buckets, model.device, nbytes)
    return buckets.get(kind, rows, capacity, nbytes,
                       lambda: Bucket(kind, rows, capacity, SjdBuffers(model, rows, capacity, window)))


def image_generation_bytes(model: JanusPro, prompts: list[list[int]], decoding: str = "token",
                           window: int = DEFAULT_WINDOW) -> Callable[[int], int]:
    """rows -> bytes of the bucket that image generation of `prompts` takes with that decoding
    (the memory plan's measure; the CLI plans with it before loading the weights)."""
    if decoding == "sjd":
        capacity = sjd_capacity(model, prompts, window)
        return lambda rows: sjd_bucket_bytes(model, rows, capacity, window)
    capacity = image_capacity(model, prompts)
    return lambda rows: image_bucket_bytes(model, rows, capacity)


@dataclass
class SjdResult:
    codes: torch.Tensor  # [images, N]
    passes: torch.Tensor  # [images]: verification passes each image needed (its forward passes: 1 + passes)
    steps: int  # passes run, over all chunks (each chunk's slowest image's, plus the host's look-ahead)


class _TokenProgress(Marks):
    """run_steps' marks, reporting the stop flag (the slowest image's tokens - N) as progress in
    tokens as each pass finishes on the device."""

    def __init__(self, flag: torch.Tensor, size: int, n_tokens: int, progress):
        super().__init__(flag, size)
        self.n_tokens, self.progress = n_tokens, progress

    def wait(self, i: int) -> int:
        flag = super().wait(i)
        if self.progress is not None:
            self.progress(min(flag + self.n_tokens, self.n_tokens), self.n_tokens)
        return flag


def generate_image_tokens_sjd(model: JanusPro, prompts: list[list[int]], pad_id: int, parallel_size: int,
                              settings: ImageSettings, seeds: list[int], buckets: Buckets, window: int = DEFAULT_WINDOW,
                              progress=None, use_graphs: bool | None = None, lookahead: int = LOOKAHEAD) -> SjdResult:
    """Image token ids [len(prompts) * parallel_size, num_tokens] by SJD with a window of `window`
    tokens, in as many chunks of prompts as the device's free memory needs (engine.memory);
    raises BadLogitsError naming the first token whose guided logits were not finite.
    progress(tokens, total) follows the slowest image (over the chunks)."""
    n_tokens = model.config.vq.num_tokens
    check_decoding("sjd", window, n_tokens, model.language_model.model.kv_cache_dtype)
    sjd_settings = SjdSettings(settings, window, parallel_size, model.config.vq.grid)
    capacity = sjd_capacity(model, prompts, window)
    codes, passes, steps = [], [], 0
    for chunk in image_chunks(model, prompts, seeds, parallel_size, buckets, progress,
                              lambda rows: sjd_bucket_bytes(model, rows, capacity, window)):
        with torch.inference_mode():  # the buffers are inference tensors, whoever calls first
            result = _generate_chunk(model, chunk.prompts, pad_id, chunk.seeds, sjd_settings, buckets, capacity,
                                     chunk.progress, use_graphs, lookahead)
        codes.append(result.codes[:chunk.images].clone())  # normal tensors outside inference mode
        passes.append(result.passes[:chunk.images].clone())
        steps += result.steps
    return SjdResult(torch.cat(codes), torch.cat(passes), steps)


def _generate_chunk(model, prompts, pad_id, seeds, settings, buckets, capacity, progress, use_graphs, lookahead):
    n_tokens, device = model.config.vq.num_tokens, model.device
    rows = 2 * len(prompts) * settings.parallel_size
    capture = graphs_usable(device, model.dtype) if use_graphs is None else use_graphs
    bucket = sjd_bucket(model, buckets, rows, capacity, settings.window)
    # made before the reset (a capture's warm-up runs one pass on the buffers); one per settings
    step = bucket.step(settings.name(), lambda b: sjd_step(model, b, settings), capture)
    buf = bucket.buffers
    buf.reset(seeds, settings.parallel_size, settings.image)
    buf.hidden.copy_(prefill_prompts(model, prompts, pad_id, settings.parallel_size, buf.cache))
    with ops.no_value_checks():
        buf.start(model, settings.window)
        steps = run_steps(step, n_tokens - 1, stop=buf.stop, lookahead=lookahead,
                          marks=_TokenProgress(buf.stop, lookahead, n_tokens, progress))
    if progress is not None:
        progress(n_tokens, n_tokens)
    codes = buf.tokens[:, :n_tokens]
    raise_bad_image_tokens(codes)  # the one host sync of the loop
    return SjdResult(codes, buf.progress[:, 1], steps)
