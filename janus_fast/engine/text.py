"""Text generation on static buffers: one packed prefill, then one step per new token
(lm_head -> argmax or cfg_sample_settings -> EOS bookkeeping -> embed -> the LLM decode step),
eager or replayed as one CUDA graph. The sampling settings, stop ids and pad id are device
tensors, so a (rows, capacity) bucket serves every setting: the greedy and the sampled step are
two captures on its buffers. The host runs at most `lookahead` steps ahead of the device and
stops a few steps after every row has produced EOS (engine.lookahead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..models.llama import LlamaForCausalLM, bad_new_token
from .lookahead import LOOKAHEAD, run_steps
from .memory import bucket_bytes, free_bytes, make_room, plan_requests
from .prefill import prefill
from .step import CAPACITY_MULTIPLE, Bucket, Buckets, graphs_usable, round_up

NO_BAD_STEP = 1 << 62  # what the bad-step counter holds until the sampler returns -1
MAX_EOS = 8  # stop ids a bucket holds
NO_ID = -2  # fills the unused stop ids: no token (nor the sampler's -1) equals it


@dataclass(frozen=True)
class TextSettings:
    """As LlamaForCausalLM.generate takes them; eos lists the stop ids (empty: never stop early)."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos: tuple[int, ...]
    pad: int

    def __post_init__(self):
        if len(self.eos) > MAX_EOS:
            raise ValueError(f"eos_token_id lists {len(self.eos)} ids; the engine takes at most {MAX_EOS}")


class TextBuffers:
    def __init__(self, lm: LlamaForCausalLM, rows: int, capacity: int, device: torch.device | None = None):
        w = lm.get_input_embeddings().weight  # (lm_head's may be quantized)
        self.device = device = w.device if device is None else device
        if device.type != "meta":
            self.cache = lm.model.new_cache(rows, capacity)
        self.hidden = torch.zeros(rows, lm.config.hidden_size, dtype=w.dtype, device=device)
        self.out = torch.zeros(rows, capacity, dtype=torch.long, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        # step, first step with bad logits, first step after which every row is done
        self.counters = torch.zeros(3, dtype=torch.long, device=device)
        self.rng = torch.zeros(3, dtype=torch.long, device=device)  # the offset the rows' streams share
        self.streams = torch.zeros(rows, 2, dtype=torch.long, device=device)  # (seed, 0): each row its own
        self.settings = torch.zeros(4, dtype=torch.float32, device=device)
        self.eos = torch.full((MAX_EOS,), NO_ID, dtype=torch.long, device=device)
        self.pad = torch.zeros((), dtype=torch.long, device=device)
        self.workspace = ops.new_sampling_workspace(rows, device)  # this bucket's own merge slots

    def reset(self, seeds: torch.Tensor, settings: TextSettings) -> None:
        """A new generation: row r draws from seed seeds[r] (a device tensor: no sync)."""
        self.done.zero_()
        self.counters.copy_(torch.tensor([0, NO_BAD_STEP, -1]), non_blocking=True)
        self.rng.zero_()
        self.streams[:, 0].copy_(seeds)
        self.settings.copy_(ops.sampling_settings(1.0, settings.temperature, settings.top_k, settings.top_p),
                            non_blocking=True)
        eos = list(settings.eos) + [NO_ID] * (MAX_EOS - len(settings.eos))
        self.eos.copy_(torch.tensor(eos, dtype=torch.long), non_blocking=True)
        self.pad.fill_(settings.pad)


def text_step(lm: LlamaForCausalLM, buf: TextBuffers, sample: bool) -> None:
    logits = lm.lm_head(buf.hidden)
    step, bad_step, all_done_at = buf.counters[0:1], buf.counters[1:2], buf.counters[2:3]
    if sample:  # both halves the same logits at cfg_weight 1: u + 1·(c − u) = c, no guidance
        tokens = ops.cfg_sample_settings(torch.cat([logits, logits]), buf.settings, buf.rng, streams=buf.streams,
                                         layout="halves", workspace=buf.workspace)
        # the first step with bad logits; a finished row's output hides its token behind pad
        torch.minimum(bad_step, torch.where(tokens.amin() < 0, step, NO_BAD_STEP), out=bad_step)
    else:  # (argmax never returns cfg_sample's -1)
        tokens = logits.argmax(-1)
    emitted = torch.where(buf.done, buf.pad, tokens)
    buf.done |= torch.isin(emitted, buf.eos)
    all_done_at.copy_(torch.where(buf.done.all() & (all_done_at < 0), step, all_done_at))
    buf.out.index_copy_(1, step, emitted[:, None])
    # Finished rows keep decoding what they sampled (their output is pad): pad ids need not be
    # valid embeddings.
    buf.hidden.copy_(lm.model.decode_step(lm.embed_sampled(tokens), buf.cache))
    step.add_(1)


def text_bucket_bytes(lm: LlamaForCausalLM, rows: int, capacity: int) -> int:
    return bucket_bytes(lambda device: TextBuffers(lm, rows, capacity, device), lm.model, rows, capacity,
                        lm.config.vocab_size)


def text_bucket(lm: LlamaForCausalLM, buckets: Buckets, rows: int, capacity: int) -> Bucket:
    """The text bucket of `rows` rows with at least `capacity` cache slots, kept or made."""
    nbytes = text_bucket_bytes(lm, rows, capacity)
    if buckets.find("text", rows, capacity) is None:
        make_room(buckets, lm.get_input_embeddings().weight.device, nbytes)
    return buckets.get("text", rows, capacity, nbytes,
                       lambda: Bucket("text", rows, capacity, TextBuffers(lm, rows, capacity)))


def generate_tokens(lm: LlamaForCausalLM, embeds: torch.Tensor, lengths: list[int], max_new_tokens: int,
                    settings: TextSettings, seeds: torch.Tensor, buckets: Buckets, progress=None,
                    lookahead: int = LOOKAHEAD, use_graphs: bool | None = None) -> torch.Tensor:
    """New token ids [B, n <= max_new_tokens] for B packed prompts (embeds [sum(lengths), H]),
    row r sampling from seed seeds[r] (int64 [B] on the device); rows that produced an EOS are
    padded with settings.pad, and n stops at the step after which every row is done. Rows go in
    as many chunks as the device's free memory needs (engine.memory)."""
    capacity = round_up(max(lengths) + max_new_tokens, CAPACITY_MULTIPLE)
    plan = plan_requests(len(lengths), 1, lambda rows: text_bucket_bytes(lm, rows, capacity),
                         free_bytes(embeds.device, buckets), "the batch size or max_new_tokens")
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    outs = []
    for chunk in plan.chunk_requests():
        index = torch.tensor([t for r in chunk for t in range(starts[r], starts[r + 1])])
        part = embeds if len(chunk) == len(lengths) else embeds[index.to(embeds.device, non_blocking=True)]
        rows = torch.tensor(chunk).to(seeds.device, non_blocking=True)
        with torch.inference_mode():  # the buffers are inference tensors, whoever calls first
            out = _generate_chunk(lm, part, [lengths[r] for r in chunk], max_new_tokens, settings, seeds[rows],
                                  buckets, capacity, progress, lookahead, use_graphs)
        outs.append(out[:len(set(chunk))].clone())  # normal tensors outside inference mode
    n = max(o.shape[1] for o in outs)
    return torch.cat([torch.nn.functional.pad(o, (0, n - o.shape[1]), value=settings.pad) for o in outs])


def _generate_chunk(lm, embeds, lengths, max_new_tokens, settings, seeds, buckets, capacity, progress, lookahead,
                    use_graphs):
    device, rows = embeds.device, len(lengths)
    capture = graphs_usable(device, embeds.dtype) if use_graphs is None else use_graphs
    bucket = text_bucket(lm, buckets, rows, capacity)
    sample = settings.do_sample  # (the step's capture warms up on the buffers: before the reset)
    step = bucket.step("sample" if sample else "greedy", lambda b: text_step(lm, b, sample), capture)
    buf = bucket.buffers
    buf.reset(seeds, settings)
    buf.hidden.copy_(prefill(lm.model, embeds, lengths, buf.cache, [[r] for r in range(rows)]))
    with ops.no_value_checks():
        run_steps(step, max_new_tokens, stop=buf.counters[2:3] if settings.eos else None, progress=progress,
                  lookahead=lookahead)
    _, bad, done_at = buf.counters.tolist()  # the one host sync of the loop
    if bad != NO_BAD_STEP:
        raise bad_new_token(bad)
    n = done_at + 1 if done_at >= 0 else max_new_tokens
    return buf.out[:, :n]
