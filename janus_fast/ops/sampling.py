"""Classifier-free-guided token sampling from paired conditional/unconditional logits."""

from __future__ import annotations

import warnings

import torch

from . import _backend, _checks, reference

FAST = ("cuda", "triton")
LAYOUTS = ("interleaved", "halves")


def reference_generator(seed: torch.Tensor, device) -> torch.Generator:
    """A torch.Generator on `device` seeded from the (seed, offset) pair in `seed` (read on the
    host): the reference backends' reproducible stream."""
    s, offset = seed[:2].tolist()
    return torch.Generator(device=device).manual_seed(_mix_seed(s, offset))


def _reference_sample(logits, cfg_weight, temperature, top_k, top_p, seed, layout, advance=False,
                      return_ids=False):
    """The reference draw, made reproducible from the (seed, offset) pair in `seed`; the same
    contract as the kernels (advance the offset, pair-duplicated ids) around reference.cfg_sample."""
    generator = reference_generator(seed, logits.device)
    tokens = reference.cfg_sample(logits, cfg_weight, temperature, top_k, top_p, generator, layout)
    if advance:
        seed[1] += 1
    ids = logits.new_empty((0,), dtype=torch.int64)
    if return_ids:
        ids = tokens.repeat_interleave(2) if layout == "interleaved" else tokens.repeat(2)
    return tokens, ids


def _mix_seed(seed: int, offset: int) -> int:
    """One generator seed from (seed, offset): splitmix64's finaliser, so every bit of both
    reaches the low 32 bits (torch's CPU generator reads only those: a plain sum would make seeds
    that differ above bit 31 draw the same numbers)."""
    x = (seed * 0x9E3779B97F4A7C15 + offset) % (1 << 64)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return (x ^ (x >> 31)) % (1 << 63)


SPLIT_COLUMNS = 4096  # the least columns a program of a split row takes
SPLIT_FILTERED_COLUMNS = 32768  # the shortest filtered row that is split
SLOT_WIDTH = 16 + 8 * 256  # merge slots per row: a header and 8 radix histograms (kernels/sampling.py)
_EMPTY_SLOT = torch.iinfo(torch.int64).min  # entries 0, 1, 4 and 5 of a clean row
_stream_slots: dict = {}  # (device, stream) -> the eager launches' merge slots


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill (a small stand-in under the CPU interpreter)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def row_splits(b: int, v: int, device: torch.device, filtered: bool = False) -> int:
    """Blocks per row: enough for about two per SM, at least SPLIT_COLUMNS columns each; 1 (no
    split) once the batch alone fills the GPU. Text decoding (B = 1, V = 102400) takes 25 blocks
    instead of one. A filtered row is split only from SPLIT_FILTERED_COLUMNS tokens: split, it
    takes one launch per radix pass plus two (up to 10) where one block does it all in one launch,
    and below that length one block holds the row on the chip (the CUDA kernel in shared memory,
    Triton up to 16384 tokens in registers) and reads the logits once."""
    if filtered and v < SPLIT_FILTERED_COLUMNS:
        return 1
    return max(1, min(-(-v // SPLIT_COLUMNS), (2 * _sm_count(device)) // max(b, 1)))


def new_sampling_workspace(rows: int, device=None) -> torch.Tensor:
    """Merge slots for `cfg_sample(..., workspace=)`: int64 [rows, SLOT_WIDTH] in the clean
    state kernels/sampling.py describes (entries 0, 1, 4, 5 of a row at int64's minimum, the
    rest 0), for batches of up to `rows` pairs. Every launch leaves it clean again, so one
    workspace serves one stream of launches (like an rng_state): make one per CUDA graph before
    capturing it, keep it as long as the graph, and never give two graphs that may replay at
    the same time on different streams the same one."""
    rows = _checks.whole_number("rows", rows)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    slots = torch.zeros((rows, SLOT_WIDTH), dtype=torch.int64, device=device)
    slots[:, 0:2] = _EMPTY_SLOT  # (slices: nothing is copied from the host)
    slots[:, 4:6] = _EMPTY_SLOT
    return slots


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def merge_slots(device: torch.device, rows: int) -> torch.Tensor:
    """The merge slots of a split launch that was given no workspace: outside CUDA-graph
    capture, one clean int64 [>= rows, SLOT_WIDTH] tensor per device and stream (launches on one
    stream never overlap), made or grown eagerly. Under capture, a fresh one that only this
    graph uses (allocated from the graph's pool, its initialisation captured and so repeated on
    every replay), with a warning: pass a workspace made before capture instead."""
    if _capturing(device):
        warnings.warn("cfg_sample: a split launch under CUDA-graph capture without a workspace gets merge slots "
                      "allocated and initialised inside the graph (re-initialised on every replay); pass "
                      "workspace=janus_fast.ops.new_sampling_workspace(B) made before capture", stacklevel=4)
        return new_sampling_workspace(rows, device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    slots = _stream_slots.get((device, stream))
    if slots is None or slots.shape[0] < rows:
        # (a smaller old tensor is freed in stream order: no graph ever holds these slots)
        slots = _stream_slots[(device, stream)] = new_sampling_workspace(max(rows, 64), device)
    return slots


def _impl(backend: str):
    """(logits, cfg_weight, temperature, top_k, top_p, seed, layout, advance, return_ids, splits,
    slots) -> (tokens [B], ids [2B] or empty)."""
    if backend == "cuda":
        return _backend.cuda_op("cfg_sample")
    return _backend.triton_kernels("sampling").cfg_sample


@torch.library.custom_op("janus_fast::cfg_sample", mutates_args=("seed", "workspace"))
def _cfg_sample(logits: torch.Tensor, cfg_weight: float, temperature: float, top_k: int, top_p: float,
                seed: torch.Tensor, layout: str, advance: bool, return_ids: bool,
                backend: str, workspace: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "reference":
        return _reference_sample(logits, cfg_weight, temperature, top_k, top_p, seed, layout, advance,
                                 return_ids)
    b, v = logits.shape[0] // 2, logits.shape[1]
    filtered = temperature != 0 and (0 < top_k < v or top_p < 1.0)
    splits = 1 if b == 0 else row_splits(b, v, logits.device, filtered)
    slots = seed.new_empty((0, 4))
    if splits > 1:
        slots = workspace if workspace is not None else merge_slots(logits.device, b)
    return _impl(backend)(logits, cfg_weight, temperature, top_k, top_p, seed, layout, advance, return_ids,
                          splits, slots)


@_cfg_sample.register_fake
def _(logits, cfg_weight, temperature, top_k, top_p, seed, layout, advance, return_ids, backend, workspace=None):
    b = logits.shape[0] // 2
    return (logits.new_empty((b,), dtype=torch.int64),
            logits.new_empty((2 * b if return_ids else 0,), dtype=torch.int64))


def new_rng_state(seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """A persistent random state for `cfg_sample(..., rng_state=)`: int64 [3] holding (seed,
    offset, 0), on `device` (default: the current CUDA device when there is one, else the CPU).
    Each call reads it and adds 1 to the offset in the same launch (the third entry is the
    kernel's arrival counter, which must be 0 on entry and is left at 0), so a captured CUDA
    graph draws a new stream on every replay. One state serves one stream of launches: two
    launches sharing a state concurrently (different CUDA streams) would race on the counter."""
    seed = _checks.whole_number("seed", seed, low=-(1 << 63))
    offset = _checks.whole_number("offset", offset)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.tensor([seed, offset, 0], dtype=torch.int64, device=device)


def _check_workspace(workspace, logits) -> None:
    _checks.tensor("workspace", workspace, ndim=2, dtypes=(torch.int64,), device=logits.device)
    if workspace.shape[0] < logits.shape[0] // 2 or workspace.shape[1] != SLOT_WIDTH or not workspace.is_contiguous():
        raise ValueError(f"workspace must be a contiguous int64 [>= B, {SLOT_WIDTH}] tensor as "
                         f"new_sampling_workspace makes (B = {logits.shape[0] // 2}), got shape "
                         f"{tuple(workspace.shape)}")


def _draw_seed(generator, device) -> torch.Tensor:
    """(seed, offset) int64 [2] for one draw from `generator` (or the device's default one),
    without a host sync. On CUDA outside graph capture it is the generator's own Philox seed and
    offset, read and advanced on the host (a CPU tensor: the kernel takes it by value, so the
    step launches nothing else); otherwise (CPU tensors, graph capture - replays must draw new
    streams - or torch.compile tracing) a draw on the device."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, logits on {device}")
    if device.type == "cuda" and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing():
        gen = generator if generator is not None else torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()]
        offset = gen.get_offset()
        gen.set_offset(offset + 4)  # Philox offsets move in steps of 4
        return torch.tensor([gen.initial_seed() % (1 << 63), offset], dtype=torch.int64)
    return torch.randint(0, 1 << 62, (2,), dtype=torch.int64, device=device, generator=generator)


def cfg_sample(logits, *, cfg_weight: float, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, generator=None, layout: str = "interleaved",
               rng_state: torch.Tensor | None = None, return_ids: bool = False,
               workspace: torch.Tensor | None = None, backend: str = "auto"):
    """One token per image from [2B, V] conditional/unconditional logits -> int64 [B].

    guided = u + cfg_weight·(c − u) in fp32; layout "interleaved" has conditional rows even and
    unconditional rows odd (the official loop), "halves" conditional rows first (transformers).
    temperature 0 (or any below float32's smallest normal, or one at which guided / temperature
    overflows) takes the argmax (lowest index on ties); otherwise top_k (0 = off) and top_p
    (1 = off) filter softmax(guided / temperature) as `reference.sampling_probs` defines, and one
    token is drawn. `generator` makes the draw reproducible.

    Non-finite logits: a pair whose guided row holds NaN or +inf, or no finite entry, gets token
    -1 (and -1 in both its `return_ids` entries) at every temperature and filter, on every
    backend, with no exception and no host sync: read `tokens < 0` on the device, and clamp
    before any embedding lookup. -inf entries elsewhere are ordinary impossible tokens.

    rng_state (from `new_rng_state`) replaces the generator with a persistent device state that
    the launch itself advances: the fast backends then need exactly one launch per step. With
    return_ids=True the result is (tokens [B], ids [2B]): the tokens pair-duplicated in the
    logits' layout, the ids the next step embeds.
    """
    _checks.tensor("logits", logits, ndim=2, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    if logits.shape[0] % 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [2B, V] with V >= 1, got shape {tuple(logits.shape)}")
    _checks.last_dim_contiguous("logits", logits)
    cfg_weight = _checks.finite_number("cfg_weight", cfg_weight)
    temperature = _checks.finite_number("temperature", temperature, low=0.0)
    top_k = _checks.whole_number("top_k", top_k)
    top_p = _checks.finite_number("top_p", top_p, low=0.0, high=1.0)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if temperature < torch.finfo(torch.float32).tiny:  # g / T would overflow fp32: that is the argmax
        temperature = 0.0
    chosen = _backend.resolve("cfg_sample", backend, logits.device, FAST,
                              fast_inputs=logits.dtype in _checks.FLOAT_DTYPES)
    if chosen != "reference" and logits.dtype == torch.float64:
        raise TypeError(f"the {chosen} cfg_sample takes float16, bfloat16 or float32 logits, got float64")
    if rng_state is None:
        state, advance = _draw_seed(generator, logits.device), False
    else:
        if generator is not None:
            raise ValueError("pass either generator or rng_state, not both")
        _checks.tensor("rng_state", rng_state, ndim=1, dtypes=(torch.int64,), device=logits.device)
        if rng_state.shape[0] != 3 or not rng_state.is_contiguous():
            raise ValueError(f"rng_state must be a contiguous int64 [3] tensor (seed, offset, 0) as "
                             f"new_rng_state makes, got shape {tuple(rng_state.shape)}")
        state, advance = rng_state, True
    if workspace is not None:
        _check_workspace(workspace, logits)
    tokens, ids = _cfg_sample(logits, cfg_weight, temperature, top_k, top_p, state, layout, advance,
                              bool(return_ids), chosen, workspace)
    return (tokens, ids) if return_ids else tokens
