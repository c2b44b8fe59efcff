"""CFG sampling with its settings in device memory: `cfg_sample` for captured steps, where one
CUDA graph must serve every cfg_weight, temperature, top_k and top_p (the kernel reads them at
each launch), and the rows of several requests draw in one launch from their own seeds."""

from __future__ import annotations

import torch

from . import _backend, _checks
from .sampling import LAYOUTS, SLOT_WIDTH, _check_workspace, _reference_sample, merge_slots, row_splits

FAST = ("triton",)
MAX_TOP_K = 1 << 24  # top_k is stored in float32, exact up to here; larger values (all >= V) mean "off"


def sampling_settings(cfg_weight: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0) -> torch.Tensor:
    """float32 [4] on the CPU: (cfg_weight, temperature, top_k, top_p) as `cfg_sample_settings`
    reads them, checked as `cfg_sample` checks its arguments. Copy it into the device tensor a
    captured step reads (`settings.copy_(sampling_settings(...), non_blocking=True)`). A
    temperature below float32's smallest normal is stored as 0 (the argmax, as cfg_sample takes
    it); top_k from 2^24 up (above any vocabulary: off) as 2^24."""
    cfg_weight = _checks.finite_number("cfg_weight", cfg_weight)
    temperature = _checks.finite_number("temperature", temperature, low=0.0)
    top_k = _checks.whole_number("top_k", top_k)
    top_p = _checks.finite_number("top_p", top_p, low=0.0, high=1.0)
    if temperature < torch.finfo(torch.float32).tiny:
        temperature = 0.0
    return torch.tensor([cfg_weight, temperature, min(top_k, MAX_TOP_K), top_p], dtype=torch.float32)


def _check_settings_values(settings: torch.Tensor) -> None:
    """What sampling_settings guarantees, read back from device memory (one host sync)."""
    cfg_weight, temperature, top_k, top_p = settings.tolist()
    _checks.finite_number("settings[0] (cfg_weight)", cfg_weight)
    _checks.finite_number("settings[1] (temperature)", temperature, low=0.0)
    if not (0 <= top_k <= MAX_TOP_K and top_k == int(top_k)):
        raise ValueError(f"settings[2] (top_k) must be a whole number in [0, 2^24], got {top_k}")
    _checks.finite_number("settings[3] (top_p)", top_p, low=0.0, high=1.0)


def _request_runs(streams: torch.Tensor, state_seed: int, b: int) -> list[tuple[int, int, int]]:
    """(seed, first row, end row) of each request: rows listed 0, 1, ... under one seed."""
    if streams.numel() == 0:
        return [(state_seed, 0, b)]
    runs = []
    for row, (seed, index) in enumerate(streams.tolist()):
        if index == 0:
            runs.append([seed, row, row + 1])
        elif runs and seed == runs[-1][0] and index == row - runs[-1][1]:
            runs[-1][2] = row + 1
        else:
            raise ValueError(f"the reference cfg_sample_settings draws each request's rows together: streams must "
                             f"list each seed's rows as 0, 1, 2, ... in order; row {row} is ({seed}, {index})")
    return [tuple(r) for r in runs]


def _reference(logits, settings, state, streams, layout, return_ids):
    """cfg_sample's reference draw per request, each seeded (its seed, the state's offset)."""
    cfg_weight, temperature, top_k, top_p = settings.tolist()
    b = logits.shape[0] // 2
    seed, offset = state[:2].tolist()
    tokens = []
    for s, lo, hi in _request_runs(streams, seed, b):
        part = logits[2 * lo:2 * hi] if layout == "interleaved" else torch.cat([logits[lo:hi], logits[b + lo:b + hi]])
        t, _ = _reference_sample(part, cfg_weight, temperature, int(top_k), top_p, torch.tensor([s, offset]),
                                 layout)
        tokens.append(t)
    state[1] += 1
    t = torch.cat(tokens) if tokens else logits.new_empty((0,), dtype=torch.int64)
    ids = logits.new_empty((0,), dtype=torch.int64)
    if return_ids:
        ids = t.repeat_interleave(2) if layout == "interleaved" else t.repeat(2)
    return t, ids


@torch.library.custom_op("janus_fast::cfg_sample_settings", mutates_args=("rng_state", "workspace"))
def _cfg_sample_settings(logits: torch.Tensor, settings: torch.Tensor, rng_state: torch.Tensor,
                         streams: torch.Tensor, workspace: torch.Tensor, layout: str, return_ids: bool,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "reference":
        return _reference(logits, settings, rng_state, streams, layout, return_ids)
    b, v = logits.shape[0] // 2, logits.shape[1]
    splits = 1 if b == 0 else row_splits(b, v, logits.device, filtered=True)  # (whatever the settings)
    if splits > 1 and workspace.numel() == 0:
        workspace = merge_slots(logits.device, b)
    return _backend.triton_kernels("sampling_device").cfg_sample_settings(
        logits, settings, rng_state, streams, layout, return_ids, splits, workspace)


@_cfg_sample_settings.register_fake
def _(logits, settings, rng_state, streams, workspace, layout, return_ids, backend):
    b = logits.shape[0] // 2
    return (logits.new_empty((b,), dtype=torch.int64),
            logits.new_empty((2 * b if return_ids else 0,), dtype=torch.int64))


def cfg_sample_settings(logits, settings, rng_state, *, streams: torch.Tensor | None = None,
                        layout: str = "interleaved", return_ids: bool = False,
                        workspace: torch.Tensor | None = None,
                        backend: str = "auto"):
    """`cfg_sample(logits, cfg_weight=, temperature=, top_k=, top_p=, rng_state=)` with the four
    settings read from device memory by the kernel, so that a captured CUDA graph serves every
    setting: the same tokens as cfg_sample with those settings on the same backend.

    settings: float32 [4] (cfg_weight, temperature, top_k, top_p) on the logits' device, as
    `sampling_settings` makes (its values are checked here unless value checks are off: a host
    sync). rng_state: int64 [3] as `new_rng_state` makes; the launch adds 1 to its offset.
    streams: None, or int64 [B, 2] (seed, index) per output row: row b then draws what row
    `index` of `cfg_sample(..., rng_state=new_rng_state(seed, offset))` would (offset: the
    state's; its seed unused), so the rows of several requests sample in one launch exactly as
    each request alone. The reference backend draws each request's rows together: there streams
    must list each seed's rows as 0, 1, 2, ... in order. workspace: the merge slots of rows
    split across programs, as for cfg_sample (`new_sampling_workspace`; a captured step passes its
    own, made before capture). Backends: triton on CUDA tensors, the reference on the CPU.
    """
    _checks.tensor("logits", logits, ndim=2, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    if logits.shape[0] % 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [2B, V] with V >= 1, got shape {tuple(logits.shape)}")
    if logits.shape[1] > MAX_TOP_K:
        raise ValueError(f"cfg_sample_settings takes at most 2^24 tokens per row, got {logits.shape[1]}")
    _checks.last_dim_contiguous("logits", logits)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _checks.tensor("settings", settings, ndim=1, dtypes=(torch.float32,), device=logits.device)
    if settings.shape[0] != 4 or not settings.is_contiguous():
        raise ValueError(f"settings must be a contiguous float32 [4] tensor (cfg_weight, temperature, top_k, top_p) "
                         f"as sampling_settings makes, got shape {tuple(settings.shape)}")
    _checks.tensor("rng_state", rng_state, ndim=1, dtypes=(torch.int64,), device=logits.device)
    if rng_state.shape[0] != 3 or not rng_state.is_contiguous():
        raise ValueError(f"rng_state must be a contiguous int64 [3] tensor (seed, offset, 0) as new_rng_state "
                         f"makes, got shape {tuple(rng_state.shape)}")
    b = logits.shape[0] // 2
    if streams is None:
        streams = rng_state.new_empty((0, 2))
    _checks.tensor("streams", streams, ndim=2, dtypes=(torch.int64,), device=logits.device)
    if streams.numel() and (tuple(streams.shape) != (b, 2) or not streams.is_contiguous()):
        raise ValueError(f"streams must be a contiguous int64 [{b}, 2] tensor (seed, index per output row), "
                         f"got shape {tuple(streams.shape)}")
    if workspace is None:
        workspace = rng_state.new_empty((0, SLOT_WIDTH))
    else:
        _check_workspace(workspace, logits)
    chosen = _backend.resolve("cfg_sample_settings", backend, logits.device, FAST,
                              fast_inputs=logits.dtype in _checks.FLOAT_DTYPES)
    if chosen != "reference" and logits.dtype == torch.float64:
        raise TypeError(f"the {chosen} cfg_sample_settings takes float16, bfloat16 or float32 logits, got float64")
    if _checks.value_checks_enabled(settings):
        _check_settings_values(settings)
        _checks.index_range("streams[:, 1]", streams[:, 1], 1 << 31)
    tokens, ids = _cfg_sample_settings(logits, settings, rng_state, streams, workspace, layout, bool(return_ids),
                                       chosen)
    return (tokens, ids) if return_ids else tokens
