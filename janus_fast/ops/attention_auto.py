"""flash_attention(backend="auto") on a GPU: our Triton kernels or torch's SDPA, measured here.

The first call of a kind of call (dtype, head dim, causal, power-of-two buckets of Sq and Sk,
GQA, forward only or forward + backward) on a GPU times ours against SDPA pinned to each of its
flash / cuDNN / efficient backends, on the call's own shapes (with a backward, ours both ways: the
fused backward, whose dQ GEMMs run on mma.sync at its small query tiles on sm_90 and add into dQ
with fp32 atomics, and the two-pass backward of deterministic=True, dK/dV then dQ, every GEMM on
wgmma there and no atomics, at the cost of two more GEMMs), and remembers the fastest: in this
process, and on disk in one JSON file per GPU and versions (torch, CUDA, Triton, janus_fast)
under $JANUS_FAST_CACHE_DIR or ~/.cache/janus_fast/attention_auto/ (written atomically; a file
that cannot be read is ignored and rewritten). Timing syncs with the host, so it never runs
while a CUDA graph is captured (a remembered choice is used there, else ours) nor inside
torch.compile's tracing (ours). JANUS_FAST_ATTENTION=triton forces ours, =sdpa the fastest SDPA backend that honours our
contracts (ours where none does); unset or "auto" measures.

SDPA is only chosen where it honours the contracts of ops.flash_attention:
  - GQA through enable_gqa (a backend that rejects it is not a candidate);
  - causal alignment: SDPA's is_causal is top-left, ours bottom-right, so causal calls with
    Sq != Sk stay ours (they also hold the rows with no visible key, which must be 0);
  - non-finite values: without a causal mask every key is visible and NaN propagates as in the
    math path; a causal call may hide keys inside a diagonal block, where a kernel computing
    P V over the whole block turns 0 * NaN into NaN, so each SDPA backend is probed once per
    kind with a NaN value and key hidden from earlier rows, and a backend that leaks is not a
    candidate;
  - 16-bit inputs only (fp32 stays on our exact-fp32 path), and deterministic=True with a
    backward stays ours (bit-reproducible by construction).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

FORCE_ENV = "JANUS_FAST_ATTENTION"
CACHE_ENV = "JANUS_FAST_CACHE_DIR"
OURS = "triton"
OURS_TWO_PASS = "triton-two-pass"  # ours with deterministic=True's backward (a backward kind only)
SDPA_BACKENDS = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient")
_FORCES = ("auto", OURS, "sdpa")


@dataclasses.dataclass(frozen=True)
class Kind:
    """What decides the winner of a call, besides the GPU and versions (the cache file)."""
    dtype: str
    head_dim: int
    causal: bool
    q_bucket: int
    k_bucket: int
    gqa: bool
    backward: bool

    @property
    def key(self) -> str:
        return (f"{self.dtype} D{self.head_dim} {'causal' if self.causal else 'full'} q{self.q_bucket} "
                f"k{self.k_bucket}{' gqa' if self.gqa else ''} {'fwd+bwd' if self.backward else 'fwd'}")


def _bucket(n: int) -> int:
    return 1 << max(4, (max(int(n), 1) - 1).bit_length())  # >= 16


def kind_of(q, k, causal: bool, backward: bool) -> Kind:
    return Kind(str(q.dtype).removeprefix("torch."), q.shape[-1], bool(causal), _bucket(q.shape[1]),
                _bucket(k.shape[1]), q.shape[2] != k.shape[2], bool(backward))


def force() -> str:
    value = os.environ.get(FORCE_ENV, "auto").strip().lower() or "auto"
    if value not in _FORCES:
        raise ValueError(f"{FORCE_ENV} must be one of {_FORCES}, got {value!r}")
    return value


def sdpa_attention(q, k, v, causal: bool, scale: float, backend: str):
    """SDPA pinned to `backend` ("sdpa-flash" / "sdpa-cudnn" / "sdpa-efficient") on our layout
    ([B, S, H, D] in and out, contiguous), differentiable through SDPA's own backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pinned = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
              "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    gqa = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}
    with sdpa_kernel(pinned):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=scale, **gqa)
    return out.transpose(1, 2).contiguous()


def _sdpa_may_serve(q, k, causal: bool, backward: bool, deterministic: bool) -> bool:
    """The contract checks that need no run: 16-bit, non-empty, causal only when Sq == Sk, and
    no deterministic backward (ours is bit-reproducible by construction)."""
    return (q.dtype in (torch.float16, torch.bfloat16) and q.numel() > 0 and k.numel() > 0
            and not (causal and q.shape[1] != k.shape[1]) and not (backward and deterministic))


# --------------------------------------------------------------------------- the platform and its file


def platform(device_index: int) -> dict:
    """The GPU and the versions a measurement holds for."""
    import triton

    import janus_fast

    return {"gpu": torch.cuda.get_device_name(device_index), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "janus_fast": janus_fast.__version__}


def cache_file(where: dict) -> Path:
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "janus_fast")
    name = "-".join(f"{key}{value}" for key, value in where.items())
    return root / "attention_auto" / ("".join(c if c.isalnum() or c in ".+" else "_" for c in name) + ".json")


def _read(path: Path) -> dict:
    """The remembered records of `path`; {} if it is missing or unreadable (it is rewritten)."""
    try:
        kinds = json.loads(path.read_text(encoding="utf-8"))["kinds"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {key: record for key, record in kinds.items() if isinstance(record, dict) and "winner" in record} \
        if isinstance(kinds, dict) else {}


def _write(path: Path, where: dict, kinds: dict) -> None:
    from janus_fast.files import atomic_write_text

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"platform": where, "kinds": kinds}, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home: the choice still holds for this process


@functools.cache
def _remembered(path: Path) -> dict:
    """This process's records for one platform file, loaded from disk once."""
    return _read(path)


@functools.cache
def _platform_file(device_index: int) -> tuple[dict, Path]:
    """(platform, its cache file) of a device, worked out once per process (every call asks)."""
    where = platform(device_index)
    return where, cache_file(where)


# --------------------------------------------------------------------------- measuring


def _capturing(q) -> bool:
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


def _time_ms(fn, warmup: int = 2, reps: int = 7) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _runner(candidate: str, q, k, v, causal: bool, scale: float, backward: bool):
    """A zero-argument call of `candidate` on inputs shaped (and stored) like the call's."""
    from .attention import flash_attention

    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    dout = torch.randn_like(q) if backward else None

    def forward():
        if candidate in (OURS, OURS_TWO_PASS):
            return flash_attention(*leaves, causal=causal, softmax_scale=scale, backend=OURS,
                                   deterministic=candidate == OURS_TWO_PASS)
        return sdpa_attention(*leaves, causal, scale, candidate)

    def run():
        out = forward()
        if backward:
            torch.autograd.grad(out, leaves, dout)

    return run


def time_candidates(candidates, q, k, v, causal: bool, scale: float, backward: bool) -> dict:
    """{candidate: median milliseconds}; a candidate that cannot run these inputs is left out."""
    timings = {}
    for candidate in candidates:
        try:
            timings[candidate] = _time_ms(_runner(candidate, q, k, v, causal, scale, backward))
        except (RuntimeError, TypeError, ValueError):  # e.g. "No available kernel", an unsupported head dim
            if candidate == OURS:
                raise
    return timings


def sdpa_honours_causal_contract(backend: str, q, k, causal: bool) -> bool:
    """Contract 1 on this GPU: a NaN value and a NaN key at position j0 leave the rows before j0
    bit-identical (they cannot see j0) and make the later rows non-finite. Small input of the
    call's dtype, head dim and GQA; one host sync."""
    hq, hkv, d, n, j0 = q.shape[2], k.shape[2], q.shape[-1], 200, 150
    gen = torch.Generator(device=q.device).manual_seed(0)
    qq, kk, vv = (torch.randn(1, n, h, d, generator=gen, device=q.device, dtype=torch.float32).to(q.dtype)
                  for h in (hq, hkv, hkv))
    clean = sdpa_attention(qq, kk, vv, causal, d ** -0.5, backend)
    for poisoned in ((qq, kk, vv.index_fill(1, torch.tensor([j0], device=q.device), float("nan"))),
                     (qq, kk.index_fill(1, torch.tensor([j0], device=q.device), float("nan")), vv)):
        out = sdpa_attention(*poisoned, causal, d ** -0.5, backend)
        if not (torch.equal(out[:, :j0], clean[:, :j0]) and not out[:, j0:].isfinite().any()):
            return False
    return True


def _measure(q, k, v, causal: bool, scale: float, backward: bool) -> dict:
    candidates = [OURS, OURS_TWO_PASS] if backward else [OURS]
    refused = {}
    for backend in SDPA_BACKENDS:
        try:
            honours = not causal or sdpa_honours_causal_contract(backend, q, k, causal)
        except (RuntimeError, TypeError, ValueError) as error:
            refused[backend] = f"does not run: {type(error).__name__}"
            continue
        if honours:
            candidates.append(backend)
        else:
            refused[backend] = "reads causally hidden values (contract 1)"
    timings = time_candidates(candidates, q, k, v, causal, scale, backward)
    return {"winner": min(timings, key=timings.get), "timings_ms": timings, "refused": refused}


# --------------------------------------------------------------------------- choosing


def choose(q, k, v, causal: bool, scale: float, backward: bool, deterministic: bool = False) -> str:
    """OURS, OURS_TWO_PASS (ours with the two-pass backward) or the SDPA backend that runs this
    flash_attention call (inputs already validated)."""
    if torch.compiler.is_compiling():  # no files or timing in a traced graph: ours
        return OURS
    forced = force()
    if forced == OURS or not _sdpa_may_serve(q, k, causal, backward, deterministic):
        return OURS
    kind = kind_of(q, k, causal, backward)
    where, path = _platform_file(q.device.index or 0)
    records = _remembered(path)
    record = records.get(kind.key)
    if record is None:
        if _capturing(q):  # no host sync here: ours now, measured at the next eager call
            return OURS
        record = _measure(q, k, v, causal, scale, backward)
        records[kind.key] = record
        _write(path, where, {**_read(path), **records})
    if forced == "sdpa":
        sdpa = {name: ms for name, ms in record.get("timings_ms", {}).items() if name in SDPA_BACKENDS}
        return min(sdpa, key=sdpa.get) if sdpa else OURS
    return record["winner"] if record["winner"] in (OURS, OURS_TWO_PASS, *SDPA_BACKENDS) else OURS
