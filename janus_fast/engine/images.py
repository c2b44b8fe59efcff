"""Text-to-image tokens on static buffers: one shared prefill per prompt, then one step per image
token (gen_head -> cfg_sample -> write the code -> gen_embed + gen_aligner -> the LLM decode step),
eager or replayed as one CUDA graph, with one host sync at the end.

Rows are interleaved as the official loop has them: row 2i conditions image i on its prompt, row
2i + 1 is its unconditional partner. The images of a request occupy consecutive rows and sample
in their own cfg_sample launch from their own random state, so image j of a request seeded s
draws the same stream wherever the request sits in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..models.janus_pro import JanusPro, raise_bad_image_tokens, unconditional_prompt
from .prefill import prefill
from .step import CAPACITY_MULTIPLE, Buckets, Step, graphs_usable, round_up


@dataclass(frozen=True)
class ImageSettings:
    cfg_weight: float
    temperature: float
    top_k: int
    top_p: float
    images_per_request: tuple[int, ...]

    def spans(self):
        """(first image, end) of each request."""
        start = 0
        for n in self.images_per_request:
            yield start, start + n
            start += n


class ImageBuffers:
    """Everything one image step reads or writes, allocated once per bucket."""

    def __init__(self, model: JanusPro, rows: int, capacity: int, requests: int):
        device, n_tokens = model.device, model.config.vq.num_tokens
        self.cache = model.language_model.model.new_cache(rows, capacity)
        self.hidden = torch.zeros(rows, model.config.language.hidden_size, dtype=model.dtype, device=device)
        self.codes = torch.zeros(rows // 2, n_tokens, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.rng = torch.zeros(requests, 3, dtype=torch.long, device=device)
        self.sampling = ops.new_sampling_workspace(rows // 2, device)  # this bucket's graph's own merge slots

    def reset(self, seeds: list[int]) -> None:
        self.step.zero_()
        self.rng.copy_(torch.tensor([[s, 0, 0] for s in seeds], dtype=torch.long), non_blocking=True)


def image_step(model: JanusPro, buf: ImageBuffers, settings: ImageSettings) -> None:
    """One image token for every row: reads buf.hidden, writes codes[:, step], advances the cache."""
    logits = model.gen_head(buf.hidden)
    tokens, ids = [], []
    for r, (lo, hi) in enumerate(settings.spans()):
        t, i = ops.cfg_sample(logits[2 * lo:2 * hi], cfg_weight=settings.cfg_weight,
                              temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                              rng_state=buf.rng[r], return_ids=True, workspace=buf.sampling)
        tokens.append(t)
        ids.append(i)
    tokens = tokens[0] if len(tokens) == 1 else torch.cat(tokens)
    ids = ids[0] if len(ids) == 1 else torch.cat(ids)
    buf.codes.index_copy_(1, buf.step, tokens[:, None])  # (a -1 of bad logits is reported at the end)
    x = model.prepare_gen_img_embeds(ids)
    buf.hidden.copy_(model.language_model.model.decode_step(x, buf.cache))
    buf.step.add_(1)


class ImageBucket:
    def __init__(self, model: JanusPro, rows: int, capacity: int, settings: ImageSettings, capture: bool):
        self.buffers = ImageBuffers(model, rows, capacity, len(settings.images_per_request))
        with ops.no_value_checks():
            self.step = Step(lambda: image_step(model, self.buffers, settings), capture)


def generate_image_tokens(model: JanusPro, prompts: list[list[int]], pad_id: int, parallel_size: int,
                          settings: ImageSettings, seeds: list[int], buckets: Buckets,
                          progress=None, use_graphs: bool | None = None) -> torch.Tensor:
    """Image token ids [len(prompts) * parallel_size, num_tokens] for prompt token ids, prompt by
    prompt; raises BadLogitsError naming the first step whose guided logits were not finite."""
    with torch.inference_mode():  # the buffers are inference tensors, whoever calls first
        codes = _generate_image_tokens(model, prompts, pad_id, parallel_size, settings, seeds, buckets, progress,
                                       use_graphs)
    return codes.clone()  # a normal tensor outside inference mode


def prefill_prompts(model: JanusPro, prompts: list[list[int]], pad_id: int, parallel_size: int, cache) -> torch.Tensor:
    """One prefill per prompt for its conditional and its unconditional row (the prompt's first
    and last tokens around pads, as the official script builds it), shared by the copies: the
    cache rows in the interleaved layout, -> each row's last hidden state [rows, H]."""
    sequences, rows_of = [], []
    for r, ids in enumerate(prompts):
        first = r * parallel_size
        sequences += [ids, unconditional_prompt(ids, pad_id)]
        rows_of += [[2 * (first + i) for i in range(parallel_size)],
                    [2 * (first + i) + 1 for i in range(parallel_size)]]
    lm = model.language_model
    packed = torch.tensor([t for s in sequences for t in s], dtype=torch.long).to(model.device, non_blocking=True)
    return prefill(lm.model, lm.get_input_embeddings()(packed), [len(s) for s in sequences], cache, rows_of)


def _generate_image_tokens(model, prompts, pad_id, parallel_size, settings, seeds, buckets, progress, use_graphs):
    n_tokens, device = model.config.vq.num_tokens, model.device
    rows = 2 * len(prompts) * parallel_size
    capacity = round_up(max(len(p) for p in prompts), CAPACITY_MULTIPLE) + n_tokens
    capture = graphs_usable(device, model.dtype) if use_graphs is None else use_graphs
    bucket = buckets.get(("image", rows, capacity, settings, capture),
                         lambda: ImageBucket(model, rows, capacity, settings, capture))
    buf = bucket.buffers
    buf.reset(seeds)
    buf.hidden.copy_(prefill_prompts(model, prompts, pad_id, parallel_size, buf.cache))
    with ops.no_value_checks():
        for i in range(n_tokens):
            bucket.step()
            if progress is not None:
                progress(i + 1, n_tokens)
    raise_bad_image_tokens(buf.codes)  # the one host sync of the loop
    return buf.codes
