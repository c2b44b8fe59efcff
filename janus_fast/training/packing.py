"""Sequence packing: micro-batches that are one flat varlen sequence of whole samples (no pad
tokens: cu_seqlens marks the samples, position ids restart per sample), filled by best-fit within
a window of samples, and the flat batch JanusPro.forward takes.

The stream of micro-batches is a pure function of the seed and the data: the sample stream is cut
into windows; window w takes its share of samples from each file (file f's samples in the order
of its own endless sequence of seeded permutations, one per epoch of f), packs them best-fit
(largest first, each into the fullest micro-batch it fits) and shuffles the micro-batches. A
position in the stream is (window, micro-batch), so a resumed run, a run on another number of
processes and every rank of a data-parallel run see the same micro-batches.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from .data import GEN_IMAGE, TEXT, UND_IMAGE, EncodedSample


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices into `lengths` grouped into bins of at most `capacity` (best-fit decreasing: the
    longest first, each into the bin it leaves least room in; ties by index, so deterministic)."""
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, bin)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            bins.append([i])
            free, b = capacity - lengths[i], len(bins) - 1
        else:
            free, b = room.pop(at)
            bins[b].append(i)
            free -= lengths[i]
        bisect.insort(room, (free, b))
    return bins


def next_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices into `lengths` in order, a new bin whenever the next one does not fit."""
    bins, used = [], capacity + 1
    for i, n in enumerate(lengths):
        if used + n > capacity:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += n
    return bins


PACKERS = {"best_fit": best_fit, "next_fit": next_fit}


def padding_fraction(bins: list[list[int]], lengths: list[int], capacity: int) -> float:
    """The share of the bins' token budget that their samples leave unused."""
    return 1.0 - sum(lengths[i] for b in bins for i in b) / max(len(bins) * capacity, 1)


@dataclass(frozen=True)
class MicroPlan:
    """One micro-batch of the stream: its samples as (file, sample index, stream position) and
    what the loss normalisation needs, known from tokenising alone (no image decoding)."""

    refs: tuple[tuple[int, int, int], ...]
    tokens: int
    text_targets: int
    image_targets: int


def target_counts(sample: EncodedSample) -> tuple[int, int]:
    """(text targets, image targets) of a sample: position i predicts token i + 1."""
    text = sum(1 for t, k in zip(sample.targets, sample.kinds) if t and k == TEXT)
    image = sum(1 for t, k in zip(sample.targets, sample.kinds) if t and k == GEN_IMAGE)
    return text, image


class SampleStream:
    """Which samples window w holds. File f's share s_f of the stream: window w takes its samples
    at positions [floor(w W s_f), floor((w + 1) W s_f)) of f's endless sequence, position k being
    sample perm_{f, k // n_f}[k % n_f] (a permutation per epoch, seeded). W = min(window, total
    samples), so one file of n <= window samples makes one window per epoch."""

    def __init__(self, sizes: list[int], shares: list[Fraction], window: int, seed: int):
        self.sizes, self.shares, self.seed = sizes, shares, seed
        self.window = min(window, sum(sizes))
        self._perm: dict[int, tuple[int, np.ndarray]] = {}

    def _start(self, f: int, w: int) -> int:
        return int(self.shares[f] * w * self.window)  # floor of a non-negative Fraction

    def refs(self, w: int) -> list[tuple[int, int, int]]:
        """The window's samples as (file, sample index, position in the file's sequence)."""
        out = []
        for f, n in enumerate(self.sizes):
            for k in range(self._start(f, w), self._start(f, w + 1)):
                out.append((f, self.sample_at(f, k), k))
        return out

    def sample_at(self, f: int, k: int) -> int:
        epoch = k // self.sizes[f]
        cached = self._perm.get(f)
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + f) * 1_000_003 + epoch)
            cached = self._perm[f] = (epoch, torch.randperm(self.sizes[f], generator=g, dtype=torch.int32).numpy())
        return int(cached[1][k % self.sizes[f]])

    def epochs(self, w: int) -> list[float]:
        """Epochs of each file completed before window w."""
        return [self._start(f, w) / n for f, n in enumerate(self.sizes)]


def plan_window(stream: SampleStream, w: int, measure, capacity: int, packer: str = "best_fit") -> list[MicroPlan]:
    """Window w's micro-batches, in stream order. measure(f, i) -> EncodedSample (text only)."""
    refs = stream.refs(w)
    lengths, counts = [], []
    for f, i, _ in refs:
        sample = measure(f, i)
        lengths.append(len(sample))
        counts.append(target_counts(sample))
    bins = PACKERS[packer](lengths, capacity)
    order = torch.randperm(len(bins), generator=torch.Generator().manual_seed(stream.seed * 7_919 + w)).tolist()
    return [MicroPlan(tuple(refs[i] for i in bins[b]), sum(lengths[i] for i in bins[b]),
                      sum(counts[i][0] for i in bins[b]), sum(counts[i][1] for i in bins[b])) for b in order]


def unconditional(seed: int, f: int, k: int, prob: float) -> bool:
    """Whether the k-th occurrence of file f's stream has its prompt replaced (generation samples),
    drawn from the seed alone so every rank and a resumed run agree."""
    return prob > 0 and random.Random(f"{seed}:{f}:{k}").random() < prob


@dataclass
class PackedBatch:
    """Model inputs (`model(**batch.inputs)`) plus what the loop reports. There are no pads:
    every one of the num_tokens positions belongs to a sample."""

    inputs: dict
    samples: list[str]  # file:line (type) of each sample, in order
    num_tokens: int

    def to(self, device, non_blocking: bool = True) -> "PackedBatch":
        moved = {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
                 for k, v in self.inputs.items()}
        return PackedBatch(moved, self.samples, self.num_tokens)


def collate(samples: list[EncodedSample], uncond: list[bool], pad_id: int, image_size: int, images=None) -> PackedBatch:
    """One flat batch of `samples` (GEN_IMAGE ids filled in, -1 where still unknown). uncond[i]
    replaces sample i's prompt span by pads (the unconditional prompt of classifier-free
    guidance); images(sample) -> float32 [3, S, S] gives an understanding sample's pixels.
    Generation samples' image targets are exactly their VQ ids, in the same order as
    gen_image_ids (image_targets[j] == gen_image_ids[j] for every j)."""
    ids, kinds_all, targets_all, pixels, lengths = [], [], [], [], []
    for sample, drop in zip(samples, uncond):
        s_ids = np.asarray(sample.ids, np.int64)
        if drop and sample.prompt is not None:
            s_ids = s_ids.copy()
            s_ids[sample.prompt[0]:sample.prompt[1]] = pad_id
        ids.append(s_ids)
        kinds_all.append(np.asarray(sample.kinds, np.int8))
        targets_all.append(np.asarray(sample.targets, bool))
        lengths.append(len(s_ids))
        if UND_IMAGE in sample.kinds:
            pixels.append(images(sample))
    all_ids, kinds, targets = np.concatenate(ids), np.concatenate(kinds_all), np.concatenate(targets_all)
    starts = np.zeros(len(lengths) + 1, np.int64)
    starts[1:] = np.cumsum(lengths)
    positions = np.arange(len(all_ids)) - np.repeat(starts[:-1], lengths)
    # Position i predicts token i + 1, within its sample: a sample's first token is never a target.
    predicts = np.zeros(len(all_ids), bool)
    predicts[:-1] = targets[1:]
    predicts[starts[1:] - 1] = False
    nxt_kind = np.append(kinds[1:], TEXT)
    text_at = np.flatnonzero(predicts & (nxt_kind == TEXT))
    image_at = np.flatnonzero(predicts & (nxt_kind == GEN_IMAGE))
    gen_at = np.flatnonzero(kinds == GEN_IMAGE)
    gen_ids = all_ids[gen_at]
    input_ids = all_ids.copy()
    input_ids[gen_at] = pad_id  # the text embedding never sees a VQ id
    t = torch.from_numpy
    inputs = dict(
        input_ids=t(input_ids), position_ids=t(positions), cu_seqlens=t(starts.astype(np.int32)),
        max_seqlen=int(max(lengths)), text_positions=t(text_at), text_targets=t(all_ids[text_at + 1]),
        image_positions=t(image_at), image_targets=t(all_ids[image_at + 1]),
        gen_image_positions=t(gen_at), gen_image_ids=t(gen_ids),
        pixel_values=torch.stack(pixels) if pixels else torch.zeros(0, 3, image_size, image_size),
        und_image_positions=t(np.flatnonzero(kinds == UND_IMAGE)))
    return PackedBatch(inputs, [s.name for s in samples], int(len(all_ids)))
