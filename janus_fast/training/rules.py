"""The rules a training config field is checked with: each returns the value (numbers
normalised) or raises ValueError stating the rule, so that a bad config is one line naming the
field and its rule. A field declares its rule beside its default with `setting(default, rule)`."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch


class Rule:
    describe = ""

    def check(self, value):
        raise NotImplementedError

    def __call__(self, value):
        value = self.check(value)
        if value is _BAD:
            raise ValueError(self.describe)
        return value


_BAD = object()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Int(Rule):
    min: int | None = None
    max: int | None = None

    @property
    def describe(self) -> str:
        return "must be an integer" + _range_words(self.min, self.max)

    def check(self, v):
        return v if _is_int(v) and _within(v, self.min, self.max) else _BAD


@dataclass(frozen=True)
class Float(Rule):
    min: float | None = None
    max: float | None = None
    positive: bool = False  # > 0 (rather than >= min)

    @property
    def describe(self) -> str:
        words = " > 0" if self.positive else _range_words(self.min, self.max)
        return "must be a finite number" + words

    def check(self, v):
        if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v):
            return _BAD
        ok = v > 0 if self.positive else _within(v, self.min, self.max)
        return float(v) if ok else _BAD


class Bool(Rule):
    describe = "must be true or false"

    def check(self, v):
        return v if isinstance(v, bool) else _BAD


@dataclass(frozen=True)
class Choice(Rule):
    values: tuple
    aliases: tuple = ()  # (an older config's value, the value it reads as) pairs

    @property
    def describe(self) -> str:
        words = "must be one of " + ", ".join(json.dumps(v) for v in self.values)
        if self.aliases:
            words += " (or " + "/".join(json.dumps(old) for old, _ in self.aliases) + ": " + \
                "/".join(json.dumps(new) for _, new in self.aliases) + ")"
        return words

    def check(self, v):
        # 1 == True in Python: a bool is only one of the values when the choices are bools
        same = lambda a, b: a == b and type(a) is type(b)  # noqa: E731
        for old, new in self.aliases:
            if same(v, old):
                return new
        return v if any(same(v, c) for c in self.values) else _BAD


@dataclass(frozen=True)
class Text(Rule):
    optional: bool = False
    pattern: str | None = None
    words: str = "a non-empty string"

    @property
    def describe(self) -> str:
        return f"must be {self.words}" + (" or null" if self.optional else "")

    def check(self, v):
        if v is None and self.optional:
            return v
        if not isinstance(v, str) or not v or (self.pattern and not re.fullmatch(self.pattern, v)):
            return _BAD
        return v


class Betas(Rule):
    describe = "must be two numbers in [0, 1), e.g. [0.9, 0.95]"

    def check(self, v):
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            return _BAD
        if not all((_is_int(b) or isinstance(b, float)) and 0 <= b < 1 for b in v):
            return _BAD
        return tuple(float(b) for b in v)


class Device(Rule):
    describe = "must be \"cpu\", \"cuda\", \"cuda:N\" or null (cuda when a GPU is available)"

    def check(self, v):
        if v is None or v == "cpu":
            return v
        if not isinstance(v, str) or not re.fullmatch(r"cuda(:\d+)?", v):
            return _BAD
        if not torch.cuda.is_available():
            raise ValueError(f"is {v!r} but no CUDA GPU is available here (use \"cpu\", or leave it unset)")
        return v


def _within(v, lo, hi) -> bool:
    return (lo is None or v >= lo) and (hi is None or v <= hi)


def _range_words(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    return f" >= {lo}" if lo is not None else (f" <= {hi}" if hi is not None else "")


def setting(default, rule: Rule):
    """A config field with its default and rule."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


class DataFiles(Rule):
    """The `data` entry: checked by the loader's own reading of it (dataset.data_files)."""

    describe = ('must be a JSONL path, a list of them, or a list of {"path": ..., "weight": w > 0} '
                '(a weight for every file or for none)')

    def check(self, v):
        from .dataset import data_files

        try:
            data_files(v)
        except (ValueError, TypeError):
            return _BAD
        return os.fspath(v) if isinstance(v, os.PathLike) else v


def shown(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, bool, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
