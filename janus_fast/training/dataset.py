"""JSONL datasets read through an index of byte offsets: memory O(samples) integers, whatever the
size of the file, and samples parsed, tokenised and decoded only when the packer needs them.

The index is built by one streaming pass that also checks every line (UTF-8, JSON, type and
fields: a bad line stops the run before training, naming file:line) and records each sample's
line length and type; it is cached beside the file (or, when that folder is read-only, under the
run's cache folder), keyed by the file's size and modification time.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from array import array
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_write
from .data import SAMPLE_TYPES, DatasetError, EncodedSample, Sample, SampleEncoder, parse_line

INDEX_VERSION = 2
_KIND = {k: i for i, k in enumerate(SAMPLE_TYPES)}
_BLOCK = 1 << 16  # bytes of the file's head and tail hashed into its fingerprint


@dataclass
class JsonlIndex:
    """Where each sample of a JSONL file starts (blank lines skipped) and what it is."""

    path: Path
    offsets: np.ndarray  # int64 [n]: byte offset of each sample's line
    lines: np.ndarray  # uint32 [n]: its 1-based line number
    sizes: np.ndarray  # int32 [n]: its length in bytes (bounds its token count, see SampleReader)
    kinds: np.ndarray  # int8 [n]: index into SAMPLE_TYPES
    file_size: int
    mtime_ns: int

    def __len__(self) -> int:
        return len(self.offsets)

    def source(self, i: int) -> str:
        return f"{self.path.name}:{int(self.lines[i])}"

    def fingerprint(self) -> str:
        """The file's identity by content, cheaply: its size, every line's offset, and the bytes
        of its head and tail (an edit that keeps every line's length, away from both ends, is
        not seen)."""
        h = hashlib.sha256(f"{self.file_size}:{len(self)}".encode())
        h.update(self.offsets.tobytes())
        with self.path.open("rb") as f:
            h.update(f.read(_BLOCK))
            f.seek(max(self.file_size - _BLOCK, 0))
            h.update(f.read(_BLOCK))
        return h.hexdigest()[:16]


def build_index(path: Path) -> JsonlIndex:
    """One pass over the file: offsets, line numbers, sizes and types of its samples, every line
    checked by data.parse_line."""
    offsets, lines, sizes, kinds = array("q"), array("I"), array("i"), array("b")
    stat, name = path.stat(), path.name
    position = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                sample = parse_line(raw, f"{name}:{number}")
                offsets.append(position)
                lines.append(number)
                sizes.append(len(raw))
                kinds.append(_KIND[sample.kind])
            position += len(raw)
    return JsonlIndex(path, np.frombuffer(offsets, np.int64), np.frombuffer(lines, np.uint32),
                      np.frombuffer(sizes, np.int32), np.frombuffer(kinds, np.int8), stat.st_size, stat.st_mtime_ns)


def _cache_files(path: Path, fallback: Path | None) -> list[Path]:
    beside = path.parent / f".{path.name}.index.npz"
    if fallback is None:
        return [beside]
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return [beside, fallback / f"{path.stem}-{key}.index.npz"]


def _read_cached(file: Path, path: Path, stat: os.stat_result) -> JsonlIndex | None:
    try:
        with np.load(file) as z:
            head = z["head"].tolist()
            if head != [INDEX_VERSION, stat.st_size, stat.st_mtime_ns]:
                return None
            return JsonlIndex(path, z["offsets"], z["lines"], z["sizes"], z["kinds"], stat.st_size, stat.st_mtime_ns)
    except (OSError, ValueError, KeyError):  # missing, truncated or foreign: rebuild
        return None


def load_index(path, fallback_dir=None) -> JsonlIndex:
    """The index of `path`, from its cache when the file is unchanged, else built and cached
    (atomically: concurrent ranks may all write it). `fallback_dir` holds it when the dataset's
    folder is not writable; with neither, it lives in memory only."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} not found")
    stat = path.stat()
    files = _cache_files(path, Path(fallback_dir) if fallback_dir is not None else None)
    for file in files:
        index = _read_cached(file, path, stat)
        if index is not None:
            return index
    index = build_index(path)
    buffer = io.BytesIO()
    np.savez(buffer, head=np.array([INDEX_VERSION, index.file_size, index.mtime_ns], np.int64),
             offsets=index.offsets, lines=index.lines, sizes=index.sizes, kinds=index.kinds)
    for file in files:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(file, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
            break
        except OSError:
            continue
    return index


def data_files(data) -> list[tuple[str, float | None]]:
    """The config's `data` as [(path, weight)]: one path, a list of paths (weight None: sampled
    in proportion to their sizes, as if concatenated) or a list of {"path": ..., "weight": w}
    (each file's share of the samples, e.g. the Janus-Pro stage III mix)."""
    items = [data] if isinstance(data, (str, os.PathLike)) else data
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"data must be a JSONL path or a non-empty list of them, got {data!r}")
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            out.append((str(item), None))
        elif isinstance(item, dict) and set(item) <= {"path", "weight"} and isinstance(item.get("path"), str):
            weight = item.get("weight")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                    or weight <= 0:
                raise ValueError(f"data entry {item!r}: weight must be a finite number > 0")
            out.append((item["path"], float(weight)))
        else:
            raise ValueError(f"data entry {item!r} must be a path or {{\"path\": ..., \"weight\": ...}}")
    if len({w is None for _, w in out}) > 1:
        raise ValueError("data: give a weight to every file or to none")
    return out


class SampleReader:
    """Samples of several indexed files, read, parsed and encoded on demand (one open handle per
    file and process)."""

    def __init__(self, indexes: list[JsonlIndex], encoder: SampleEncoder):
        self.indexes, self.encoder = indexes, encoder
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    def sample(self, f: int, i: int) -> Sample:
        index = self.indexes[f]
        if self._pid != os.getpid():  # a forked worker: its own handles (a shared file offset would race)
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(f)
        if handle is None or handle.closed:
            handle = self._handles[f] = index.path.open("rb")
        handle.seek(int(index.offsets[i]))
        return parse_line(handle.readline(), index.source(i))

    def encode(self, f: int, i: int) -> EncodedSample:
        return self.encoder.encode(i, self.sample(f, i), self.indexes[f].path.parent)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def check_lengths(self, limit: int) -> None:
        """Stop before training on a sample of more than `limit` tokens, tokenising only the
        samples that might be: a sample's tokens are at most its line's bytes (byte-level BPE
        emits at least one byte per token; JSON spends at least as many bytes on a string and on
        a conversation turn as the template's tokens) plus the tokens of an empty sample of its
        type (BOS, EOS, system prompt, image tokens). Samples the bound misjudges are still
        stopped when the packer meets them."""
        overhead = np.array([len(self.encoder.encode(0, Sample("", empty), Path())) + 16 for empty in (
            {"type": "text", "text": ""}, {"type": "understanding", "image": "", "question": "", "answer": ""},
            {"type": "generation", "prompt": "", "image": ""})], np.int64)
        for f, index in enumerate(self.indexes):
            for i in np.flatnonzero(index.sizes + overhead[index.kinds] > limit).tolist():
                check_length(self.encode(f, i), limit)


def check_length(sample: EncodedSample, limit: int) -> None:
    if len(sample) > limit:
        raise DatasetError(f"sample {sample.name} has {len(sample)} tokens, more than the row budget of {limit} "
                           f"(row_tokens); shorten it or raise the budget")


def mixing_shares(sizes: list[int], weights: list[float | None]) -> list[Fraction]:
    """Each file's share of the sample stream (exact fractions summing to 1)."""
    raw = [Fraction(n) if w is None else Fraction(w) for n, w in zip(sizes, weights)]
    total = sum(raw)
    return [r / total for r in raw]
