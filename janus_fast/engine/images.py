"""Text-to-image tokens on static buffers: one shared prefill per prompt, then one step per image
token (gen_head -> cfg_sample_settings -> write the code -> gen_embed + gen_aligner -> the LLM
decode step), eager or replayed as one CUDA graph, with one host sync per chunk at the end.

Rows are interleaved as the official loop has them: row 2i conditions image i on its prompt, row
2i + 1 is its unconditional partner. The settings (cfg weight, temperature, top-k, top-p) are a
device tensor the sampler reads, and every image draws from its own stream - its request's seed
and its index in the request - in one sampling launch for all requests; so one bucket (and one
captured graph) per (rows, capacity) serves every setting, prompt length and split of the rows
into requests, and image j of a request seeded s draws the same tokens wherever it sits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .. import ops
from ..models.janus_pro import JanusPro, raise_bad_image_tokens, unconditional_prompt
from .lookahead import run_steps
from .memory import bucket_bytes, free_bytes, make_room, plan_requests
from .prefill import prefill
from .step import CAPACITY_MULTIPLE, Bucket, Buckets, graphs_usable, round_up


@dataclass(frozen=True)
class ImageSettings:
    cfg_weight: float
    temperature: float
    top_k: int
    top_p: float

    def tensor(self) -> torch.Tensor:
        return ops.sampling_settings(self.cfg_weight, self.temperature, self.top_k, self.top_p)


class ImageBuffers:
    """Everything one image step reads or writes, allocated once per bucket (on the meta device
    without a cache: what the memory plan counts)."""

    def __init__(self, model: JanusPro, rows: int, capacity: int, device: torch.device | None = None):
        self.device = device = model.device if device is None else device
        n_tokens, n_images = model.config.vq.num_tokens, rows // 2
        if device.type != "meta":
            self.cache = model.language_model.model.new_cache(rows, capacity)
        self.hidden = torch.zeros(rows, model.config.language.hidden_size, dtype=model.dtype, device=device)
        self.codes = torch.zeros(n_images, n_tokens, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.rng = torch.zeros(3, dtype=torch.long, device=device)  # the offset every stream shares
        self.streams = torch.zeros(n_images, 2, dtype=torch.long, device=device)  # (seed, index) per image
        self.settings = torch.zeros(4, dtype=torch.float32, device=device)
        self.workspace = ops.new_sampling_workspace(n_images, device)  # this bucket's own merge slots

    def reset(self, streams: list[tuple[int, int]], settings: ImageSettings) -> None:
        self.step.zero_()
        self.rng.zero_()
        self.streams.copy_(torch.tensor(streams, dtype=torch.long), non_blocking=True)
        self.settings.copy_(settings.tensor(), non_blocking=True)


def image_step(model: JanusPro, buf: ImageBuffers) -> None:
    """One image token for every row: reads buf.hidden, writes codes[:, step], advances the cache."""
    logits = model.gen_head(buf.hidden)
    tokens, ids = ops.cfg_sample_settings(logits, buf.settings, buf.rng, streams=buf.streams, return_ids=True,
                                          workspace=buf.workspace)
    buf.codes.index_copy_(1, buf.step, tokens[:, None])  # (a -1 of bad logits is reported at the end)
    x = model.prepare_gen_img_embeds(ids)
    buf.hidden.copy_(model.language_model.model.decode_step(x, buf.cache))
    buf.step.add_(1)


def image_bucket(model: JanusPro, buckets: Buckets, rows: int, capacity: int) -> Bucket:
    """The image bucket of `rows` rows with at least `capacity` cache slots, kept or made."""
    nbytes = image_bucket_bytes(model, rows, capacity)
    if buckets.find("image", rows, capacity) is None:
        make_room(buckets, model.device, nbytes)
    return buckets.get("image", rows, capacity, nbytes,
                       lambda: Bucket("image", rows, capacity, ImageBuffers(model, rows, capacity)))


def image_bucket_bytes(model: JanusPro, rows: int, capacity: int) -> int:
    return bucket_bytes(lambda device: ImageBuffers(model, rows, capacity, device), model.language_model.model, rows,
                        capacity, model.config.vq.codebook_size)


def image_capacity(model: JanusPro, prompts: list[list[int]]) -> int:
    return round_up(max(len(p) for p in prompts), CAPACITY_MULTIPLE) + model.config.vq.num_tokens


def generate_image_tokens(model: JanusPro, prompts: list[list[int]], pad_id: int, parallel_size: int,
                          settings: ImageSettings, seeds: list[int], buckets: Buckets,
                          progress=None, use_graphs: bool | None = None) -> torch.Tensor:
    """Image token ids [len(prompts) * parallel_size, num_tokens] for prompt token ids, prompt by
    prompt, in as many chunks of prompts as the device's free memory needs (see engine.memory);
    raises BadLogitsError naming the first step whose guided logits were not finite."""
    capacity = image_capacity(model, prompts)
    out = []
    for chunk in image_chunks(model, prompts, seeds, parallel_size, buckets, progress,
                              lambda rows: image_bucket_bytes(model, rows, capacity)):
        with torch.inference_mode():  # the buffers are inference tensors, whoever calls first
            codes = _generate_chunk(model, chunk.prompts, pad_id, parallel_size, settings, chunk.seeds, buckets,
                                    capacity, chunk.progress, use_graphs)
        out.append(codes[:chunk.images].clone())  # normal tensors outside inference mode
    return out[0] if len(out) == 1 else torch.cat(out)


@dataclass
class ImageChunk:
    """The prompts of one memory-plan chunk (the last padded with copies of its last prompt), their
    seeds, its progress callback (reporting over the whole batch) and its real images."""

    prompts: list[list[int]]
    seeds: list[int]
    progress: Callable[[int, int], None] | None
    images: int


def image_chunks(model: JanusPro, prompts: list[list[int]], seeds: list[int], parallel_size: int, buckets: Buckets,
                 progress, nbytes_for_rows: Callable[[int], int]) -> Iterator[ImageChunk]:
    """The memory plan's chunks of a batch of image prompts (2 x parallel_size rows each), a
    bucket of `nbytes_for_rows(rows)` bytes each (engine.memory: a warning when it splits, a
    ValueError before any launch when one prompt does not fit)."""
    plan = plan_requests(len(prompts), 2 * parallel_size, nbytes_for_rows, free_bytes(model.device, buckets),
                         "parallel_size or the number of prompts")
    for c, chunk in enumerate(plan.chunk_requests()):
        def chunk_progress(i, n, c=c):
            progress(c * n + i, plan.chunks * n)

        yield ImageChunk([prompts[r] for r in chunk], [seeds[r] for r in chunk],
                         chunk_progress if progress is not None else None, len(set(chunk)) * parallel_size)


def prefill_prompts(model: JanusPro, prompts: list[list[int]], pad_id: int, parallel_size: int, cache) -> torch.Tensor:
    """One prefill per prompt for its conditional and its unconditional row (the prompt's first
    and last tokens around pads, as the official script builds it), shared by the copies: the
    cache rows in the interleaved layout -> each row's last hidden state [rows, H]."""
    sequences, rows_of = [], []
    for r, ids in enumerate(prompts):
        first = r * parallel_size
        sequences += [ids, unconditional_prompt(ids, pad_id)]
        rows_of += [[2 * (first + i) for i in range(parallel_size)],
                    [2 * (first + i) + 1 for i in range(parallel_size)]]
    lm = model.language_model
    packed = torch.tensor([t for s in sequences for t in s], dtype=torch.long).to(model.device, non_blocking=True)
    return prefill(lm.model, lm.get_input_embeddings()(packed), [len(s) for s in sequences], cache, rows_of)


def _generate_chunk(model, prompts, pad_id, parallel_size, settings, seeds, buckets, capacity, progress,
                    use_graphs):
    n_tokens, device = model.config.vq.num_tokens, model.device
    rows = 2 * len(prompts) * parallel_size
    capture = graphs_usable(device, model.dtype) if use_graphs is None else use_graphs
    bucket = image_bucket(model, buckets, rows, capacity)
    # made before the reset: a capture's warm-up runs one step on the buffers
    step = bucket.step("image", lambda b: image_step(model, b), capture)
    buf = bucket.buffers
    buf.reset([(s, j) for s in seeds for j in range(parallel_size)], settings)
    buf.hidden.copy_(prefill_prompts(model, prompts, pad_id, parallel_size, buf.cache))
    with ops.no_value_checks():
        run_steps(step, n_tokens, progress=progress)
    raise_bad_image_tokens(buf.codes)  # the one host sync of the loop
    return buf.codes
