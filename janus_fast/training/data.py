"""Training samples: the JSONL dataset format, and each sample turned into token ids with a
mark per position saying what it is and whether it is a target.

One JSON object per line, by "type":
  {"type": "text", "text": "..."}                                   every token is a target
  {"type": "text", "conversation": [{"role": "user"|"assistant", "content": "..."}, ...],
   "system": "..."}                                                 assistant turns are targets
  {"type": "understanding", "image": "a.png", "question": "...", "answer": "..."}
                                                                    the answer is the target
  {"type": "generation", "prompt": "...", "image": "b.png"}        the image's VQ ids are targets
Relative image paths are read from the dataset file's folder. Texts follow the official "deepseek"
SFT template (JanusProcessor); prompts, system text and pads are never targets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TEXT, UND_IMAGE, GEN_IMAGE = 0, 1, 2  # what a position holds
SAMPLE_TYPES = ("text", "understanding", "generation")


class DatasetError(ValueError):
    """A sample the trainer cannot use; the message names it (file, line, type)."""


@dataclass
class Sample:
    """One raw sample: where it came from (for error messages) and its JSON fields."""

    source: str
    fields: dict

    @property
    def kind(self) -> str:
        return self.fields["type"]

    @property
    def name(self) -> str:
        return f"{self.source} ({self.kind})"

    def error(self, message: str) -> DatasetError:
        return DatasetError(f"sample {self.name}: {message}")

    def image_path(self, base: Path) -> Path:
        path = Path(self.fields["image"])
        return path if path.is_absolute() else base / path


@dataclass
class EncodedSample:
    """Token ids [L] and per position: kind (TEXT, UND_IMAGE, GEN_IMAGE) and whether the token is a
    target (predicted from the position before it). GEN_IMAGE positions hold the VQ ids (filled
    in from the token cache). `prompt` is the span [start, end) that the unconditional prompt
    replaces by pads (generation samples), `image` the understanding image path."""

    index: int
    name: str  # file:line (type), for error messages
    ids: list[int]
    kinds: list[int]
    targets: list[bool]
    prompt: tuple[int, int] | None = None
    image: Path | None = None

    def __len__(self) -> int:
        return len(self.ids)


REQUIRED = {"text": (), "understanding": ("image", "question", "answer"), "generation": ("prompt", "image")}


def parse_line(raw: bytes, source: str) -> Sample:
    """One JSONL line (bytes) as a Sample; bytes that are not UTF-8, malformed JSON, an unknown type
    and missing or mistyped fields raise DatasetError naming `source` (file:line)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"sample {source}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}: "
                           f"{e.reason}); re-encode the file as UTF-8") from None
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"sample {source}: not valid JSON ({e})") from None
    if not isinstance(fields, dict) or fields.get("type") not in SAMPLE_TYPES:
        raise DatasetError(f"sample {source}: needs a \"type\" in {SAMPLE_TYPES}, got {line.strip()[:80]!r}")
    sample = Sample(source, fields)
    missing = [k for k in REQUIRED[sample.kind] if not isinstance(fields.get(k), str)]
    if sample.kind == "text" and not isinstance(fields.get("text"), str):
        turns = fields.get("conversation")
        if not isinstance(turns, list):
            missing = ["text or conversation"]
        else:
            for i, turn in enumerate(turns):
                if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant") \
                        or not isinstance(turn.get("content"), str):
                    raise sample.error(f"conversation turn {i} must be {{'role': 'user'|'assistant', 'content': str}}")
            if not isinstance(fields.get("system", ""), str):
                missing = ["system (a string)"]
    if missing:
        raise sample.error(f"missing string field(s) {missing}")
    return sample


class SampleEncoder:
    """Turns samples into EncodedSample with a JanusProcessor's tokenizer and template."""

    def __init__(self, processor, num_gen_tokens: int):
        self.proc = processor
        self.tok = processor.tokenizer
        self.num_gen_tokens = num_gen_tokens
        self._constants: dict[str, list[int]] = {}

    def _text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def _constant(self, text: str) -> list[int]:
        """_text of a template piece every sample repeats (the system prompt), tokenised once."""
        ids = self._constants.get(text)
        if ids is None:
            ids = self._constants[text] = self._text(text)
        return ids

    def encode(self, index: int, sample: Sample, base: Path) -> EncodedSample:
        proc, fields = self.proc, sample.fields
        bos, eos = [self.tok.bos_token_id], self.tok.eos_token
        user, assistant = proc.roles
        parts: list[tuple[list[int], int, bool]] = [(bos, TEXT, False)]  # (ids, kind, are targets)
        if sample.kind == "text" and "text" in fields:
            parts.append((self._text(fields["text"] + eos), TEXT, True))
        elif sample.kind == "text":
            system = fields.get("system", "")
            if system:
                parts.append((self._text(system + "\n\n"), TEXT, False))
            for turn in fields["conversation"]:  # checked by parse_line
                if turn["role"] == "user":
                    parts.append((self._text(f"{user}: {turn['content'].strip()}\n\n"), TEXT, False))
                else:
                    parts.append((self._constant(f"{assistant}:"), TEXT, False))
                    parts.append((self._text(f" {turn['content'].strip()}{eos}"), TEXT, True))
        elif sample.kind == "understanding":
            image_ids = [proc.image_start_id] + [proc.image_id] * proc.num_image_tokens + [proc.image_end_id]
            parts += [(self._constant(proc.system_prompt + "\n\n" + f"{user}: "), TEXT, False),
                      (image_ids[:1], TEXT, False), (image_ids[1:-1], UND_IMAGE, False), (image_ids[-1:], TEXT, False),
                      (self._text(f"\n{fields['question'].strip()}\n\n{assistant}:"), TEXT, False),
                      (self._text(f" {fields['answer'].strip()}{eos}"), TEXT, True)]
        else:  # generation: the official prompt, then the image tokens (VQ ids filled in later)
            conversation = [{"role": user, "content": fields["prompt"]}, {"role": assistant, "content": ""}]
            text = proc.apply_sft_template_for_multi_turn_prompts(conversation, system_prompt="")
            parts += [(self._text(text), TEXT, False), ([proc.image_start_id], TEXT, False),
                      ([proc.pad_id] * self.num_gen_tokens, GEN_IMAGE, True)]
        ids, kinds, targets = [], [], []
        for part_ids, kind, target in parts:
            ids += part_ids
            kinds += [kind] * len(part_ids)
            targets += [target] * len(part_ids)
        targets[0] = False  # nothing predicts the first token
        prompt = None
        image = sample.image_path(base) if sample.kind != "text" else None
        if sample.kind == "generation":
            # The unconditional prompt keeps the first token (BOS) and the last (<begin_of_image>).
            prompt = (1, len(ids) - self.num_gen_tokens - 1)
        return EncodedSample(index, sample.name, ids, kinds, targets, prompt, image)
