"""backend="auto" for flash_attention: ours or SDPA by measurement, remembered per GPU and versions.

Timing and SDPA's contract probe need a GPU: here they are replaced by injected timings and probe
answers (the platform is a named fake GPU), so the selection logic (contracts, forcing, capture,
the cache file) runs on CPU tensors. SDPA's wrapper (layout, scale, GQA) is checked against the
reference with SDPA's CPU flash kernel.
"""

from __future__ import annotations

import json

import pytest
import torch

from janus_fast import ops
from janus_fast.ops import attention_auto as A
from janus_fast.ops import reference
from tests.helpers import DEVICE

H100 = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "cuda": "13.0", "triton": "3.6.0", "janus_fast": "0.1.0"}


class Lab:
    """Injected measurements: timings per candidate, probe answers per SDPA backend; counts calls."""

    def __init__(self, monkeypatch, tmp_path, timings, honours=None, where=H100):
        self.timings, self.honours, self.measured, self.probed = dict(timings), honours or {}, [], []
        monkeypatch.setenv(A.CACHE_ENV, str(tmp_path))
        monkeypatch.delenv(A.FORCE_ENV, raising=False)
        monkeypatch.setattr(A, "platform", lambda device_index: dict(where))
        monkeypatch.setattr(A, "time_candidates", self.time)
        monkeypatch.setattr(A, "sdpa_honours_causal_contract", self.probe)
        A._remembered.cache_clear()
        A._platform_file.cache_clear()

    def time(self, candidates, q, k, v, causal, scale, backward):
        self.measured.append(tuple(candidates))
        return {c: self.timings[c] for c in candidates if c in self.timings}

    def probe(self, backend, q, k, causal):
        self.probed.append(backend)
        answer = self.honours.get(backend, True)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _qkv(sq=64, sk=64, hq=4, hkv=4, d=32, dtype=torch.float16):
    return (torch.randn(2, sq, hq, d, dtype=dtype), torch.randn(2, sk, hkv, d, dtype=dtype),
            torch.randn(2, sk, hkv, d, dtype=dtype))


def _choose(*qkv, causal=False, backward=False, deterministic=False):
    return A.choose(*qkv, causal, 0.125, backward, deterministic)


FAST_FLASH = {"triton": 2.0, "sdpa-flash": 1.0, "sdpa-cudnn": 1.5, "sdpa-efficient": 3.0}


def test_the_fastest_candidate_wins_and_is_remembered(monkeypatch, tmp_path):
    lab = Lab(monkeypatch, tmp_path, FAST_FLASH)
    assert _choose(*_qkv()) == "sdpa-flash"
    assert lab.measured == [("triton", *A.SDPA_BACKENDS)]
    assert _choose(*_qkv()) == "sdpa-flash" and len(lab.measured) == 1  # this process remembers
    assert _choose(*_qkv(sq=65, sk=65)) == "sdpa-flash" and len(lab.measured) == 2  # another length bucket
    assert _choose(*_qkv(), backward=True) == "sdpa-flash" and len(lab.measured) == 3  # fwd+bwd is its own kind
    lab.timings["triton"] = 0.5
    assert _choose(*_qkv(d=64)) == "triton"


def test_a_backward_kind_also_times_our_two_pass_backward(monkeypatch, tmp_path):
    lab = Lab(monkeypatch, tmp_path, {**FAST_FLASH, A.OURS_TWO_PASS: 0.9})
    assert _choose(*_qkv(), backward=True) == A.OURS_TWO_PASS
    assert lab.measured == [("triton", A.OURS_TWO_PASS, *A.SDPA_BACKENDS)]
    assert _choose(*_qkv()) == "sdpa-flash" and lab.measured[-1] == ("triton", *A.SDPA_BACKENDS)  # forward only
    monkeypatch.setenv(A.FORCE_ENV, "sdpa")
    assert _choose(*_qkv(), backward=True) == "sdpa-flash"  # forcing SDPA never picks one of ours


def test_remembered_on_disk_per_gpu_and_versions(monkeypatch, tmp_path):
    lab = Lab(monkeypatch, tmp_path, FAST_FLASH)
    assert _choose(*_qkv()) == "sdpa-flash"
    (file,) = (tmp_path / "attention_auto").iterdir()
    saved = json.loads(file.read_text())
    assert saved["platform"] == H100 and saved["kinds"][A.kind_of(*_qkv()[:2], False, False).key]["winner"] == "sdpa-flash"
    A._remembered.cache_clear()  # a new process reads the file instead of measuring
    A._platform_file.cache_clear()
    lab.timings["triton"] = 0.1
    assert _choose(*_qkv()) == "sdpa-flash" and len(lab.measured) == 1
    other = Lab(monkeypatch, tmp_path, {**FAST_FLASH, "triton": 0.1}, where={**H100, "triton": "3.9.0"})
    assert _choose(*_qkv()) == "triton" and len(other.measured) == 1  # another Triton: measured again
    assert len(list((tmp_path / "attention_auto").iterdir())) == 2
    assert not [p for p in (tmp_path / "attention_auto").iterdir() if p.name.startswith(".")]  # no temp files


@pytest.mark.parametrize("content", ["{not json", json.dumps({"kinds": [1, 2]}), json.dumps({"kinds": {"x": 3}}), ""])
def test_an_unreadable_cache_file_is_ignored_and_rewritten(monkeypatch, tmp_path, content):
    lab = Lab(monkeypatch, tmp_path, FAST_FLASH)
    file = A.cache_file(H100)
    file.parent.mkdir(parents=True)
    file.write_text(content)
    assert _choose(*_qkv()) == "sdpa-flash" and len(lab.measured) == 1
    assert "sdpa-flash" in file.read_text() and json.loads(file.read_text())["platform"] == H100


def test_forcing_by_environment(monkeypatch, tmp_path):
    lab = Lab(monkeypatch, tmp_path, {**FAST_FLASH, "triton": 0.1})
    monkeypatch.setenv(A.FORCE_ENV, "triton")
    assert _choose(*_qkv()) == "triton" and not lab.measured
    monkeypatch.setenv(A.FORCE_ENV, "SDPA")
    assert _choose(*_qkv()) == "sdpa-flash"  # the fastest SDPA backend, although ours measured faster
    monkeypatch.setenv(A.FORCE_ENV, "sdpa")
    assert _choose(*_qkv(sq=20, sk=40), causal=True) == "triton"  # SDPA cannot honour it: ours
    monkeypatch.setenv(A.FORCE_ENV, "cudnn")
    with pytest.raises(ValueError, match=A.FORCE_ENV):
        _choose(*_qkv())


def test_sdpa_only_where_it_honours_the_contracts(monkeypatch, tmp_path):
    lab = Lab(monkeypatch, tmp_path, FAST_FLASH, honours={"sdpa-flash": False, "sdpa-efficient": RuntimeError("no")})
    # causal with Sq != Sk: SDPA's causal mask is top-left aligned, ours bottom-right
    assert _choose(*_qkv(sq=20, sk=64), causal=True) == "triton" and not lab.measured
    # fp32 and a deterministic backward stay ours; an empty input too
    assert _choose(*_qkv(dtype=torch.float32)) == "triton"
    assert _choose(*_qkv(), backward=True, deterministic=True) == "triton"
    assert _choose(*_qkv(sq=0)) == "triton" and not lab.measured
    # causal Sq == Sk: a backend that leaks hidden values (flash here) or does not run is no candidate
    assert _choose(*_qkv(), causal=True) == "sdpa-cudnn"
    assert lab.measured == [("triton", "sdpa-cudnn")] and sorted(lab.probed) == sorted(A.SDPA_BACKENDS)
    record = A._remembered(A.cache_file(H100))[A.kind_of(*_qkv()[:2], True, False).key]
    assert set(record["refused"]) == {"sdpa-flash", "sdpa-efficient"}
    # without a causal mask every key is visible: no probe needed
    assert _choose(*_qkv(d=64)) == "sdpa-flash" and len(lab.probed) == 3


def test_gqa_backend_that_cannot_run_is_dropped(monkeypatch, tmp_path):
    Lab(monkeypatch, tmp_path, {"triton": 2.0, "sdpa-cudnn": 1.0})  # flash, efficient reject GQA here
    assert _choose(*_qkv(hq=8, hkv=2)) == "sdpa-cudnn"
    assert A.kind_of(*_qkv(hq=8, hkv=2)[:2], False, False).gqa


def test_no_measurement_inside_a_capture_or_compile(monkeypatch, tmp_path):
    lab = Lab(monkeypatch, tmp_path, FAST_FLASH)
    monkeypatch.setattr(A, "_capturing", lambda q: True)
    assert _choose(*_qkv()) == "triton" and not lab.measured and not (tmp_path / "attention_auto").exists()
    monkeypatch.setattr(A, "_capturing", lambda q: False)
    assert _choose(*_qkv()) == "sdpa-flash"
    monkeypatch.setattr(A, "_capturing", lambda q: True)
    assert _choose(*_qkv()) == "sdpa-flash" and len(lab.measured) == 1  # remembered: used in the capture
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _choose(*_qkv()) == "triton"


def test_public_op_runs_the_choice(monkeypatch, tmp_path):
    """flash_attention(backend="auto") asks choose() where our kernels would run and calls SDPA
    when it wins (a CUDA tensor stands for the GPU: resolve and choose are stubbed)."""
    asked = []
    monkeypatch.setattr(ops.attention._backend, "resolve", lambda *a, **kw: "triton")
    monkeypatch.setattr(A, "choose", lambda q, k, v, causal, scale, backward, det: asked.append(backward) or "sdpa-x")
    monkeypatch.setattr(A, "sdpa_attention", lambda q, k, v, causal, scale, backend: ("sdpa", backend))
    q, k, v = _qkv()
    assert ops.flash_attention(q, k, v) == ("sdpa", "sdpa-x")
    leaf = q.clone().requires_grad_()
    ops.flash_attention(leaf, k, v)
    with torch.no_grad():
        ops.flash_attention(leaf, k, v)
    assert asked == [False, True, False]
    monkeypatch.setattr(A, "choose", lambda *a: A.OURS_TWO_PASS)  # ours, with deterministic=True's backward
    ran = []
    monkeypatch.setattr(ops.attention, "_attention_fwd", lambda q, k, v, causal, scale, backend, det: ran.append(
        (backend, det)) or (q,))
    ops.flash_attention(leaf, k, v)
    assert ran == [("triton", True)]
    monkeypatch.setattr(A, "choose", lambda *a: pytest.fail("a forced backend is not measured"))
    ops.flash_attention(q.float(), k.float(), v.float(), backend="reference")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_sdpa_wrapper_matches_the_reference(causal, heads):
    """Our layout in and out, the scale and GQA, through SDPA's CPU flash kernel."""
    q, k, v = _qkv(sq=33, sk=33, hq=heads[0], hkv=heads[1], dtype=torch.float32)
    try:
        out = A.sdpa_attention(q, k, v, causal, 0.2, "sdpa-flash")
    except (RuntimeError, TypeError) as error:  # GQA needs torch >= 2.5's enable_gqa
        pytest.skip(f"SDPA's flash kernel does not take this on {DEVICE}: {error}")
    expected, _ = reference.attention(q.double(), k.double(), v.double(), causal, 0.2)
    assert out.shape == q.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
