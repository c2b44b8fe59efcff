"""Sequence packing: rows of a fixed token budget filled with whole samples, and the flat batch
JanusPro.forward takes (cu_seqlens, restarting position ids, target positions per loss).

The stream of rows is a pure function of (seed, epoch): each epoch shuffles the samples with its
own generator and fills rows in that order (next-fit). A loader's state is just (epoch, row), so
a resumed run sees exactly the rows an uninterrupted one would, and so does every rank of a
data-parallel run (rank r takes its share of each step's micro-batches).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .data import GEN_IMAGE, TEXT, UND_IMAGE, DatasetError, EncodedSample


def pack_rows(lengths: list[int], order: list[int], budget: int) -> list[list[int]]:
    """Sample indices grouped into rows of at most `budget` tokens, in `order` (next-fit)."""
    rows, row, used = [], [], 0
    for i in order:
        if used + lengths[i] > budget and row:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += lengths[i]
    if row:
        rows.append(row)
    return rows


@dataclass
class PackedBatch:
    """Model inputs (`model(**batch.inputs)`) plus what the loop reports."""

    inputs: dict
    samples: list[int]
    num_tokens: int  # rows x budget (pads included)
    num_real_tokens: int

    def to(self, device) -> "PackedBatch":
        moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in self.inputs.items()}
        return PackedBatch(moved, self.samples, self.num_tokens, self.num_real_tokens)


class PackedLoader:
    """Micro-batches of `rows_per_batch` packed rows, endlessly, epoch after epoch.

    encoded: the dataset (EncodedSample, GEN_IMAGE ids already filled in); images: a function
    sample -> pixel tensor [3, S, S] (S = image_size) for understanding samples; pad_id: the tokenizer's pad token;
    uncond_prob: the chance that a generation sample's prompt is replaced by the unconditional
    prompt (its tokens between the first and the last turned into pads), drawn per sample and
    epoch from the seed, so resumes and ranks agree."""

    def __init__(self, encoded: list[EncodedSample], *, row_tokens: int, rows_per_batch: int, pad_id: int,
                 image_size: int, images=None, uncond_prob: float = 0.1, seed: int = 0):
        if not encoded:
            raise DatasetError("the dataset is empty: nothing to train on")
        for s in encoded:
            if len(s) > row_tokens:
                raise DatasetError(f"sample {s.name} has {len(s)} tokens, more than the row budget of "
                                   f"{row_tokens} (row_tokens); shorten it or raise the budget")
        if not 0.0 <= uncond_prob <= 1.0:
            raise ValueError(f"uncond_prob must be in [0, 1], got {uncond_prob}")
        self.encoded = encoded
        self.row_tokens, self.rows_per_batch, self.pad_id = row_tokens, rows_per_batch, pad_id
        self.images, self.image_size, self.uncond_prob, self.seed = images, image_size, uncond_prob, seed
        self.epoch, self.row = 0, 0
        self._plan_epoch, self._plan = None, []
        self._tensors = [self._as_tensors(s) for s in encoded]

    @staticmethod
    def _as_tensors(s: EncodedSample):
        ids, kinds = torch.tensor(s.ids, dtype=torch.long), torch.tensor(s.kinds, dtype=torch.long)
        targets = torch.tensor(s.targets, dtype=torch.bool)
        # Position i predicts token i + 1: text targets go through lm_head, image ones through gen_head.
        nxt_target, nxt_kind = targets[1:], kinds[1:]
        text_at = torch.nonzero(nxt_target & (nxt_kind == TEXT))[:, 0]
        image_at = torch.nonzero(nxt_target & (nxt_kind == GEN_IMAGE))[:, 0]
        return ids, kinds, text_at, image_at

    # ------------------------------------------------------------------ the row stream
    def rows_of_epoch(self, epoch: int) -> list[list[int]]:
        if self._plan_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.encoded), generator=g).tolist()
            self._plan = pack_rows([len(s) for s in self.encoded], order, self.row_tokens)
            self._plan_epoch = epoch
        return self._plan

    def next_rows(self) -> list[tuple[int, list[int]]]:
        """The next micro-batch's rows as (epoch, sample indices), advancing the state."""
        out = []
        while len(out) < self.rows_per_batch:
            rows = self.rows_of_epoch(self.epoch)
            out.append((self.epoch, rows[self.row]))
            self.row += 1
            if self.row == len(rows):
                self.epoch, self.row = self.epoch + 1, 0
        return out

    def target_counts(self, rows) -> tuple[int, int]:
        """(text targets, image targets) of a micro-batch, without building it."""
        return (sum(len(self._tensors[i][2]) for _, row in rows for i in row),
                sum(len(self._tensors[i][3]) for _, row in rows for i in row))

    def real_tokens(self, rows) -> int:
        """Tokens of a micro-batch that are not padding."""
        return sum(len(self.encoded[i]) for _, row in rows for i in row)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's data seed is {state['seed']}, this run's is {self.seed}")
        self.epoch, self.row = int(state["epoch"]), int(state["row"])

    # ------------------------------------------------------------------ building a batch
    def unconditional(self, epoch: int, index: int) -> bool:
        return random.Random(f"{self.seed}:{epoch}:{index}").random() < self.uncond_prob

    def collate(self, rows) -> PackedBatch:
        """One flat batch from rows [(epoch, sample indices)], each row padded to the budget with
        a pad-only sequence that carries no target."""
        ids, positions, lengths = [], [], []
        text_pos, text_tgt, image_pos, image_tgt, gen_pos, und_pos, pixels, samples = [], [], [], [], [], [], [], []
        start = 0
        for epoch, row in rows:
            used = 0
            for i in row:
                s_ids, kinds, text_at, image_at = self._tensors[i]
                sample = self.encoded[i]
                if sample.prompt is not None and self.unconditional(epoch, i):
                    s_ids = s_ids.clone()
                    s_ids[sample.prompt[0]:sample.prompt[1]] = self.pad_id
                n = len(s_ids)
                ids.append(s_ids)
                positions.append(torch.arange(n))
                lengths.append(n)
                text_pos.append(text_at + start)
                text_tgt.append(s_ids[text_at + 1])
                image_pos.append(image_at + start)
                image_tgt.append(s_ids[image_at + 1])
                gen_pos.append(torch.nonzero(kinds == GEN_IMAGE)[:, 0] + start)
                und = torch.nonzero(kinds == UND_IMAGE)[:, 0]
                if len(und):
                    und_pos.append(und + start)
                    pixels.append(self.images(sample))
                samples.append(i)
                start += n
                used += n
            pad = self.row_tokens - used
            if pad:
                ids.append(torch.full((pad,), self.pad_id, dtype=torch.long))
                positions.append(torch.arange(pad))
                lengths.append(pad)
                start += pad
        all_ids = torch.cat(ids)
        gen_at = torch.cat(gen_pos)
        gen_ids = all_ids[gen_at]
        all_ids[gen_at] = self.pad_id  # the text embedding never sees a VQ id
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        size = self.image_size
        inputs = dict(
            input_ids=all_ids, position_ids=torch.cat(positions), cu_seqlens=cu, max_seqlen=max(lengths),
            text_positions=torch.cat(text_pos), text_targets=torch.cat(text_tgt),
            image_positions=torch.cat(image_pos), image_targets=torch.cat(image_tgt),
            gen_image_positions=gen_at, gen_image_ids=gen_ids,
            pixel_values=torch.stack(pixels) if pixels else torch.zeros(0, 3, size, size),
            und_image_positions=torch.cat(und_pos) if und_pos else torch.zeros(0, dtype=torch.long))
        return PackedBatch(inputs, samples, start, self.real_tokens(rows))
