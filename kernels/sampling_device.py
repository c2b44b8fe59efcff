"""CFG sampling with its settings in device memory: the kernels of kernels/sampling.py with
cfg_weight, temperature, top_k and top_p read by the kernel at each launch, so one compiled
kernel - and one captured CUDA graph - serves every setting.

Each kernel loads the four settings and branches at run time (a uniform branch: every program
takes the same one) into the specialisation that kernels/sampling.cfg_sample launches for them:
greedy (temperature below float32's smallest normal), top-k and top-p, top-k, top-p, or
unfiltered. The maths, noise and thresholds are those kernels' own (_sample_rows and
_split_rows), so the tokens are the same. (An unfiltered or top-k-free branch divides by a
temperature of 1 where cfg_sample skips the division: x / 1 is x exactly.)

A row split across programs takes one launch per phase of the slowest setting (SPLIT_LAUNCHES:
the first pass, 4 + 4 radix passes, the final draw); the launches a setting does not need
return at once (the greedy and unfiltered draws end in launch 0, one filter's in launch 9).

Rows of several requests draw in one launch: `streams` int64 [B, 2] gives output row b the
Philox key streams[b, 0] and the noise row streams[b, 1] (the offset is the state's, shared),
the noise of row streams[b, 1] of a cfg_sample launch seeded streams[b, 0].
"""
import torch
import triton
import triton.language as tl

from .sampling import (ON_CHIP_MAX, SPLIT_BLOCK, SPLIT_SELECT, _sample_rows, _split_rows, _stream, launch_config,
                       mass_scale, max_registers)

SPLIT_LAUNCHES = 10  # the phases of a split row with both filters (1 + 4 + 4 + 1)
ONE_FILTER_FINAL = 5  # the final phase of a split row with one filter (1 + 4), run by the last launch
MAX_WARPS = 8  # per program of both kernels (the split kernel as kernels/sampling launches it)
ON_CHIP_ELEMENTS = 8192  # values of s a program keeps in registers: 32 per thread at 8 warps
FLT_MIN = 1.1754943508222875e-38  # temperatures below float32's smallest normal take the argmax
_FLT_MIN = tl.constexpr(FLT_MIN)
_LAST_LAUNCH = tl.constexpr(SPLIT_LAUNCHES - 1)
_ONE_FILTER_FINAL = tl.constexpr(ONE_FILTER_FINAL)


@triton.jit
def _settings(settings_ptr, V):
    """(cfg_weight, temperature, top_k, top_p, greedy, use_k, use_p) from float32 [4] settings."""
    cfg_weight = tl.load(settings_ptr)
    temperature = tl.load(settings_ptr + 1)
    top_k = tl.load(settings_ptr + 2).to(tl.int32)
    top_p = tl.load(settings_ptr + 3)
    return cfg_weight, temperature, top_k, top_p, temperature < _FLT_MIN, (top_k > 0) & (top_k < V), top_p < 1.0


@triton.jit
def _streams(state_ptr, streams_ptr, rows, row_ok, STREAMS: tl.constexpr):
    """(seed, offset, offset low/high words, noise rows): the state's offset; each row's key and
    noise row from streams (a [ROWS, 1] key), or the state's seed and the row itself."""
    seed, offset, off_lo, off_hi = _stream(state_ptr, 0, 0, False)
    noise_rows = rows
    if STREAMS:
        at = streams_ptr + 2 * rows.to(tl.int64)
        seed = tl.load(at, mask=row_ok, other=0)[:, None]
        noise_rows = tl.load(at + 1, mask=row_ok, other=0).to(tl.int32)
    return seed, offset, off_lo, off_hi, noise_rows


@triton.jit
def _cfg_sample_settings_kernel(logits_ptr, stride_row, tokens_ptr, ids_ptr, state_ptr, settings_ptr, streams_ptr, B,
                                V, mass_scale, STREAMS: tl.constexpr, INTERLEAVED: tl.constexpr,
                                WRITE_IDS: tl.constexpr, ON_CHIP: tl.constexpr, DIGIT: tl.constexpr,
                                ROWS: tl.constexpr, BLOCK: tl.constexpr, SELECT_BLOCK: tl.constexpr,
                                PASS_BLOCK: tl.constexpr):
    """kernels/sampling._cfg_sample_kernel (rows on one program each) with device settings; the
    launch advances the state's offset."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    w, t, k, p, greedy, use_k, use_p = _settings(settings_ptr, V)
    seed, offset, lo, hi, noise = _streams(state_ptr, streams_ptr, rows, rows < B, STREAMS)
    if greedy:
        _sample_rows(logits_ptr, stride_row, tokens_ptr, ids_ptr, state_ptr, rows, seed, offset, lo, hi, noise, B, V,
                     w, t, k, p, mass_scale, INTERLEAVED, True, False, False, False, True, WRITE_IDS, ON_CHIP, DIGIT,
                     ROWS, BLOCK, SELECT_BLOCK, PASS_BLOCK)
    elif use_k & use_p:
        _sample_rows(logits_ptr, stride_row, tokens_ptr, ids_ptr, state_ptr, rows, seed, offset, lo, hi, noise, B, V,
                     w, t, k, p, mass_scale, INTERLEAVED, False, True, True, True, True, WRITE_IDS, ON_CHIP, DIGIT,
                     ROWS, BLOCK, SELECT_BLOCK, PASS_BLOCK)
    elif use_k:
        _sample_rows(logits_ptr, stride_row, tokens_ptr, ids_ptr, state_ptr, rows, seed, offset, lo, hi, noise, B, V,
                     w, t, k, p, mass_scale, INTERLEAVED, False, True, True, False, True, WRITE_IDS, ON_CHIP, DIGIT,
                     ROWS, BLOCK, SELECT_BLOCK, PASS_BLOCK)
    elif use_p:
        _sample_rows(logits_ptr, stride_row, tokens_ptr, ids_ptr, state_ptr, rows, seed, offset, lo, hi, noise, B, V,
                     w, t, k, p, mass_scale, INTERLEAVED, False, True, False, True, True, WRITE_IDS, ON_CHIP, DIGIT,
                     ROWS, BLOCK, SELECT_BLOCK, PASS_BLOCK)
    else:
        _sample_rows(logits_ptr, stride_row, tokens_ptr, ids_ptr, state_ptr, rows, seed, offset, lo, hi, noise, B, V,
                     w, t, k, p, mass_scale, INTERLEAVED, False, True, False, False, True, WRITE_IDS, ON_CHIP, DIGIT,
                     ROWS, BLOCK, SELECT_BLOCK, PASS_BLOCK)


@triton.jit
def _cfg_sample_split_settings_kernel(logits_ptr, stride_row, tokens_ptr, ids_ptr, state_ptr, settings_ptr,
                                      streams_ptr, work_ptr, slot_stride, B, V, chunk, mass_scale,
                                      STREAMS: tl.constexpr, SPLITS: tl.constexpr, INTERLEAVED: tl.constexpr,
                                      WRITE_IDS: tl.constexpr, LAUNCH: tl.constexpr, ONE_FILTER: tl.constexpr,
                                      BLOCK: tl.constexpr, SELECT: tl.constexpr):
    """Launch LAUNCH (0 .. SPLIT_LAUNCHES - 1) of a split row with device settings: phase LAUNCH
    of both filters; phase ONE_FILTER (-1: none) of one filter; phase 0 of greedy and unfiltered
    rows in launch 0. The launch that runs a setting's final phase advances the state."""
    rows = tl.program_id(0) + tl.arange(0, 1)
    w, t, k, p, greedy, use_k, use_p = _settings(settings_ptr, V)
    seed, offset, lo, hi, noise = _streams(state_ptr, streams_ptr, rows, rows < B, STREAMS)
    if greedy:
        if LAUNCH == 0:
            _split_rows(logits_ptr, stride_row, tokens_ptr, ids_ptr, state_ptr, rows, seed, offset, lo, hi, noise,
                        work_ptr, slot_stride, B, V, chunk, w, t, k, p, mass_scale, SPLITS, INTERLEAVED, True, False,
                        False, False, True, WRITE_IDS, 0, 0, 0, BLOCK, SELECT)
    elif use_k & use_p:
        _split_rows(logits_ptr, stride_row, tokens_ptr, ids_ptr, state_ptr, rows, seed, offset, lo, hi, noise,
                    work_ptr, slot_stride, B, V, chunk, w, t, k, p, mass_scale, SPLITS, INTERLEAVED, False, True,
                    True, True, LAUNCH == _LAST_LAUNCH, WRITE_IDS, LAUNCH, 4, 4, BLOCK, SELECT)
    elif use_k:
        if ONE_FILTER >= 0:
            _split_rows(logits_ptr, stride_row, tokens_ptr, ids_ptr, state_ptr, rows, seed, offset, lo, hi, noise,
                        work_ptr, slot_stride, B, V, chunk, w, t, k, p, mass_scale, SPLITS, INTERLEAVED, False, True,
                        True, False, ONE_FILTER == _ONE_FILTER_FINAL, WRITE_IDS, ONE_FILTER, 4, 0, BLOCK, SELECT)
    elif use_p:
        if ONE_FILTER >= 0:
            _split_rows(logits_ptr, stride_row, tokens_ptr, ids_ptr, state_ptr, rows, seed, offset, lo, hi, noise,
                        work_ptr, slot_stride, B, V, chunk, w, t, k, p, mass_scale, SPLITS, INTERLEAVED, False, True,
                        False, True, ONE_FILTER == _ONE_FILTER_FINAL, WRITE_IDS, ONE_FILTER, 0, 4, BLOCK, SELECT)
    else:
        if LAUNCH == 0:
            _split_rows(logits_ptr, stride_row, tokens_ptr, ids_ptr, state_ptr, rows, seed, offset, lo, hi, noise,
                        work_ptr, slot_stride, B, V, chunk, w, t, k, p, mass_scale, SPLITS, INTERLEAVED, False, True,
                        False, False, True, WRITE_IDS, 0, 0, 0, BLOCK, SELECT)


def one_filter_phase(launch: int) -> int:
    """The phase of a one-filter split row that launch `launch` runs (-1: none): phases 0-4 in
    launches 0-4, the final draw (phase 5) in the last launch."""
    if launch < ONE_FILTER_FINAL:
        return launch
    return ONE_FILTER_FINAL if launch == SPLIT_LAUNCHES - 1 else -1


def settings_launch_config(b: int, v: int, interpreted: bool) -> tuple[int, dict]:
    """launch_config's tiling with at most ON_CHIP_ELEMENTS values of s kept on the chip per
    program (fewer rows per program; a longer row streams from L2 as rows past ON_CHIP_MAX do)
    and at most MAX_WARPS warps: the run-time branch keeps the settings, key and offset live
    beside the row, and an image row (16384) kept on the chip spills on sm_80 under triton
    3.6 even with the whole register file (tests/test_sampling_device.py's compile facts)."""
    rows, meta = launch_config(b, v, interpreted)
    if meta["ON_CHIP"] and rows * meta["BLOCK"] > ON_CHIP_ELEMENTS:
        if meta["BLOCK"] <= ON_CHIP_ELEMENTS:
            rows = ON_CHIP_ELEMENTS // meta["BLOCK"]
            meta = dict(meta, ROWS=rows)
        else:
            rows, meta = launch_config(1, ON_CHIP_MAX + 1, interpreted)  # (the streamed tiling)
    if meta["num_warps"] > MAX_WARPS:
        meta = dict(meta, num_warps=MAX_WARPS, maxnreg=max_registers(MAX_WARPS))
    return rows, meta


def cfg_sample_settings(logits, settings, state, streams, layout, return_ids=False, splits=1, work=None):
    """tokens int64 [B] and the pair-duplicated ids [2B] (empty unless return_ids) from [2B, V]
    logits with float32 [4] device settings (cfg_weight, temperature, top_k, top_p); state int64
    [3] (seed, offset, arrival counter) is advanced by one; streams int64 [B, 2] or empty (see
    the module docstring). splits > 1: each row over that many programs, merged in `work` as
    kernels/sampling.cfg_sample describes, in SPLIT_LAUNCHES launches whatever the settings."""
    two_b, v = logits.shape
    b = two_b // 2
    tokens = torch.empty(b, dtype=torch.int64, device=logits.device)
    ids = torch.empty(two_b if return_ids else 0, dtype=torch.int64, device=logits.device)
    if b == 0:
        state[1] += 1
        return tokens, ids
    common = dict(STREAMS=streams.numel() > 0, INTERLEAVED=layout == "interleaved", WRITE_IDS=bool(return_ids))
    if splits > 1:
        chunk = triton.cdiv(triton.cdiv(v, splits), SPLIT_BLOCK) * SPLIT_BLOCK
        split = triton.cdiv(v, chunk)
        select = SPLIT_SELECT if logits.device.type != "cpu" else 256  # (as kernels/sampling.cfg_sample)
        for launch in range(SPLIT_LAUNCHES):
            _cfg_sample_split_settings_kernel[(b, split)](
                logits, logits.stride(0), tokens, ids, state, settings, streams, work, work.stride(0), b, v, chunk,
                mass_scale(v), SPLITS=split, LAUNCH=launch, ONE_FILTER=one_filter_phase(launch), BLOCK=SPLIT_BLOCK,
                SELECT=select, num_warps=MAX_WARPS, maxnreg=max_registers(MAX_WARPS), enable_fp_fusion=False,
                **common)
        return tokens, ids
    rows, tiling = settings_launch_config(b, v, logits.device.type == "cpu")
    _cfg_sample_settings_kernel[(triton.cdiv(b, rows),)](
        logits, logits.stride(0), tokens, ids, state, settings, streams, b, v, mass_scale(v), **common, **tiling,
        enable_fp_fusion=False)  # round u + w (c - u) and g / T exactly as torch does
    return tokens, ids
