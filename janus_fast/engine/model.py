"""The engine-backed model classes: the models' JanusPro, LlamaForCausalLM and LlamaModel with
their decoding loops replaced by the engine's. `janus_fast.JanusPro` is this JanusPro (and the
official name `MultiModalityCausalLM` is a subclass of it: janus_fast.official).

The models stay a description of the maths (they import nothing from here); these subclasses
override only the loop methods (`generate_image_tokens`, `generate_new_tokens`, and the
token-by-token `LlamaModel.forward` of engine.decode), so the front doors (prompt templates,
argument checks, image decoding, `answer`) are the models' own. Buckets of buffers and captured
steps live on each instance, made on first use.
"""

from __future__ import annotations

import torch

from ..models import janus_pro, llama
from ..models.janus_pro import DEFAULT_WINDOW, check_decoding
from .decode import LlamaModel
from .images import ImageSettings, generate_image_tokens
from .lookahead import LOOKAHEAD
from .sjd import generate_image_tokens_sjd
from .step import Buckets
from .text import TextSettings, generate_tokens


class _EngineState:
    """The buckets of one model, dropped when its weights move: a captured graph holds their
    addresses (in-place updates such as load_state_dict keep them and stay valid)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.buckets, self.weights = module, Buckets(), None

    def __enter__(self) -> Buckets:
        if self.weights is not None and self.weights != self._addresses():
            self.buckets.clear()
        return self.buckets

    def __exit__(self, *exc):
        self.weights = self._addresses()  # after the first call's fusion of the projections

    def __getstate__(self):  # a copy of the model starts without buckets (graphs do not copy)
        return {"module": self.module, "buckets": Buckets(), "weights": None}

    def _addresses(self):
        return tuple(p.data_ptr() for p in self.module.parameters())


def _engine(module: torch.nn.Module) -> _EngineState:
    return module.__dict__.setdefault("_engine", _EngineState(module))


class LlamaForCausalLM(llama.LlamaForCausalLM):
    """`generate` on the engine: a packed prefill and a captured step per token."""

    model_class = LlamaModel
    lookahead = LOOKAHEAD  # steps the host runs ahead of the device (how late it sees EOS)

    def generate_new_tokens(self, embeds, attention_mask, max_new_tokens: int, do_sample: bool, temperature: float,
                            top_k: int, top_p: float, eos: tuple[int, ...], pad: int, generator,
                            progress=None) -> torch.Tensor:
        b, t, hidden = embeds.shape
        lengths = [t] * b
        if attention_mask is not None:  # the one host read of a call: the real tokens of each row
            if tuple(attention_mask.shape) != (b, t):
                raise ValueError(f"attention_mask must be [{b}, {t}], got {tuple(attention_mask.shape)}")
            rows = attention_mask.bool().tolist()
            lengths = [sum(row) for row in rows]
            if any(not row[-1] or not all(row[t - n:]) for row, n in zip(rows, lengths)):
                raise ValueError("generate needs a left-padded batch: each row of attention_mask must be 0s "
                                 "then 1s, ending in 1")
        if max_new_tokens < 1 or b == 0:
            return torch.zeros(b, 0, dtype=torch.long, device=embeds.device)
        index = torch.tensor([r * t + c for r, n in enumerate(lengths) for c in range(t - n, t)])
        packed = embeds.reshape(b * t, hidden)[index.to(embeds.device, non_blocking=True)]
        if generator is not None and generator.device != embeds.device:
            raise ValueError(f"generator is on {generator.device}, the model on {embeds.device}")
        # one seed per row, drawn on the device (no host sync): a row's tokens do not depend on
        # the other rows, nor on how the memory plan splits the batch
        seeds = torch.randint(0, 1 << 62, (b,), generator=generator, device=embeds.device)
        settings = TextSettings(bool(do_sample), float(temperature), int(top_k), float(top_p), eos, int(pad))
        with _engine(self) as buckets:
            return generate_tokens(self, packed, lengths, max_new_tokens, settings, seeds, buckets, progress,
                                   lookahead=self.lookahead)


class JanusPro(janus_pro.JanusPro):
    """Janus-Pro with image and text generation on the engine (see janus_fast.engine)."""

    language_model_class = LlamaForCausalLM

    def __init__(self, config):
        super().__init__(config)
        self.language_model.model.cache_headroom = config.vq.num_tokens  # the official image loop's cache

    def generate_image_tokens(self, prompts, pad_id, parallel_size, cfg_weight, temperature, top_k, top_p, seeds,
                              progress=None, use_graphs: bool | None = None, decoding: str = "token",
                              window: int = DEFAULT_WINDOW) -> torch.Tensor:
        """The engine's image-token loops: token by token, or speculative Jacobi decoding
        (decoding="sjd", a window of `window` tokens: engine/sjd.py); use_graphs=False forces
        eager steps on CUDA (default: captured wherever every op has a capture-safe backend)."""
        check_decoding(decoding, window, self.config.vq.num_tokens, self.language_model.model.kv_cache_dtype)
        settings = ImageSettings(float(cfg_weight), float(temperature), int(top_k), float(top_p))
        with _engine(self) as buckets:
            if decoding == "sjd":
                return generate_image_tokens_sjd(self, prompts, pad_id, parallel_size, settings, seeds, buckets,
                                                 window, progress, use_graphs, self.language_model.lookahead).codes
            return generate_image_tokens(self, prompts, pad_id, parallel_size, settings, seeds, buckets, progress,
                                         use_graphs)
