"""Text generation on static buffers: one packed prefill, then one step per new token
(lm_head -> sample on the device -> EOS bookkeeping -> embed -> the LLM decode step), eager or
replayed as one CUDA graph. The host looks at the EOS flag every `check_every` steps through a
non-blocking copy, so it never waits on the device inside the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..models.llama import LlamaForCausalLM, bad_new_token
from .prefill import prefill
from .step import CAPACITY_MULTIPLE, Buckets, Step, graphs_usable, round_up

NO_BAD_STEP = 1 << 62  # what the bad-step counter holds until the sampler returns -1


@dataclass(frozen=True)
class TextSettings:
    """As LlamaForCausalLM.sample takes them; eos lists the stop ids (empty: never stop early)."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos: tuple[int, ...]
    pad: int


class TextBuffers:
    def __init__(self, lm: LlamaForCausalLM, rows: int, capacity: int, eos: tuple[int, ...]):
        w = lm.get_input_embeddings().weight  # (lm_head's may be quantized)
        self.cache = lm.model.new_cache(rows, capacity)
        self.hidden = torch.zeros(rows, lm.config.hidden_size, dtype=w.dtype, device=w.device)
        self.out = torch.zeros(rows, capacity, dtype=torch.long, device=w.device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=w.device)
        # step, first step with bad logits, first step after which every row is done
        self.counters = torch.zeros(3, dtype=torch.long, device=w.device)
        self.rng = torch.zeros(3, dtype=torch.long, device=w.device)
        self.sampling = ops.new_sampling_workspace(rows, w.device)  # this bucket's graph's own merge slots
        self.eos = torch.tensor(eos, dtype=torch.long, device=w.device)

    @property
    def step(self):
        return self.counters[0:1]

    def reset(self, seed: torch.Tensor) -> None:
        self.done.zero_()
        self.counters.copy_(torch.tensor([0, NO_BAD_STEP, -1]), non_blocking=True)
        self.rng.zero_()
        self.rng[0:1].copy_(seed, non_blocking=True)


def text_step(lm: LlamaForCausalLM, buf: TextBuffers, settings: TextSettings) -> None:
    tokens = lm.sample(lm.lm_head(buf.hidden), settings.do_sample, settings.temperature, settings.top_k,
                       settings.top_p, rng_state=buf.rng, workspace=buf.sampling)
    step, bad_step, all_done_at = buf.counters[0:1], buf.counters[1:2], buf.counters[2:3]
    if settings.do_sample:  # (argmax never returns cfg_sample's -1)
        # the first step with bad logits; a finished row's output hides its token behind pad
        torch.minimum(bad_step, torch.where(tokens.amin() < 0, step, NO_BAD_STEP), out=bad_step)
    if settings.eos:
        emitted = torch.where(buf.done, settings.pad, tokens)
        buf.done |= torch.isin(emitted, buf.eos)
        all_done_at.copy_(torch.where(buf.done.all() & (all_done_at < 0), step, all_done_at))
    else:
        emitted = tokens
    buf.out.index_copy_(1, step, emitted[:, None])
    # Finished rows keep decoding what they sampled (their output is pad): pad ids need not be
    # valid embeddings.
    buf.hidden.copy_(lm.model.decode_step(lm.embed_sampled(tokens), buf.cache))
    step.add_(1)


class TextBucket:
    def __init__(self, lm: LlamaForCausalLM, rows: int, capacity: int, settings: TextSettings, capture: bool):
        self.buffers = TextBuffers(lm, rows, capacity, settings.eos)
        with ops.no_value_checks():
            self.step = Step(lambda: text_step(lm, self.buffers, settings), capture)


class DoneProbe:
    """Reads a device flag into host memory without blocking: `poll` returns the last copy that
    has landed (None while none has) and starts the next one."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.full((1,), -1, dtype=torch.long, pin_memory=self.cuda)
        self.event = None

    def poll(self, flag: torch.Tensor) -> int | None:
        landed = self.event is None or self.event.query()
        value = int(self.host) if landed and self.event is not None else None
        if landed:
            self.host.copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event() if self.cuda else _Landed()
            self.event.record()
        return value


class _Landed:
    """The CPU stand-in for a CUDA event: a CPU copy has landed when it returns."""

    def record(self):
        pass

    def query(self):
        return True


def generate_tokens(lm: LlamaForCausalLM, embeds: torch.Tensor, lengths: list[int], max_new_tokens: int,
                    settings: TextSettings, seed: torch.Tensor, buckets: Buckets, check_every: int = 8,
                    use_graphs: bool | None = None) -> torch.Tensor:
    """New token ids [B, n <= max_new_tokens] for B packed prompts (embeds [sum(lengths), H]);
    rows that produced an EOS are padded with settings.pad, and n stops at the step after which
    every row is done."""
    with torch.inference_mode():  # the buffers are inference tensors, whoever calls first
        out = _generate_tokens(lm, embeds, lengths, max_new_tokens, settings, seed, buckets, check_every, use_graphs)
    return out.clone()  # a normal tensor outside inference mode


def _generate_tokens(lm, embeds, lengths, max_new_tokens, settings, seed, buckets, check_every, use_graphs):
    device, rows = embeds.device, len(lengths)
    capacity = round_up(max(lengths) + max_new_tokens, CAPACITY_MULTIPLE)
    capture = graphs_usable(device, embeds.dtype) if use_graphs is None else use_graphs
    bucket = buckets.get(("text", rows, capacity, settings, capture),
                         lambda: TextBucket(lm, rows, capacity, settings, capture))
    buf = bucket.buffers
    buf.reset(seed)
    buf.hidden.copy_(prefill(lm.model, embeds, lengths, buf.cache, [[r] for r in range(rows)]))
    probe = DoneProbe(device)
    with ops.no_value_checks():
        for i in range(max_new_tokens):
            bucket.step()
            if settings.eos and (i + 1) % check_every == 0 and i + 1 < max_new_tokens:
                done_at = probe.poll(buf.counters[2:3])
                if done_at is not None and done_at >= 0:
                    break
    _, bad, done_at = buf.counters.tolist()  # the one host sync of the loop
    if bad != NO_BAD_STEP:
        raise bad_new_token(bad)
    n = done_at + 1 if done_at >= 0 else max_new_tokens
    return buf.out[:, :n]
