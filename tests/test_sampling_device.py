"""cfg_sample_settings: cfg_sample with its settings in device memory (the engine's captured
steps), against cfg_sample itself - the same tokens for every setting class on each backend, the
rows of several requests in one launch as each request alone - plus its errors, opcheck and the
compile facts of its kernels (full tier: they take minutes to build here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from janus_fast import ops
from janus_fast.ops import sampling_device as ss
from tests.helpers import DEVICE, FULL, grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ["reference", "triton"]
# (temperature, top_k, top_p): greedy, unfiltered, top-k, top-p, both; top_k >= V is off
SETTINGS = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 7, 0.6), (1.0, 10**6, 1.0)]


def per_request(logits, seeds, images, settings, backend, offset=0):
    """The tokens of one cfg_sample launch per request (rows 2·images each, interleaved)."""
    cfg_weight, temperature, top_k, top_p = settings
    out, row = [], 0
    for seed, n in zip(seeds, images):
        state = ops.new_rng_state(seed, offset, device=DEVICE)
        out.append(ops.cfg_sample(logits[2 * row:2 * (row + n)], cfg_weight=cfg_weight, temperature=temperature,
                                  top_k=top_k, top_p=top_p, rng_state=state, backend=backend))
        row += n
    return torch.cat(out)


def streams_of(seeds, images):
    return torch.tensor([[s, j] for s, n in zip(seeds, images) for j in range(n)], dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v,dtype", grid([(97, torch.float32)], [(1000, torch.bfloat16), (5000, torch.float16),
                                                               (9000, torch.float32)]))  # (9000: streamed)
def test_every_setting_from_one_settings_tensor_equals_cfg_sample(backend, v, dtype):
    seeds, images = [7, 7, 9], [2, 1, 2]  # two requests share a seed: each starts at index 0
    logits = (torch.randn(2 * sum(images), v, device=DEVICE) * 3).to(dtype)
    logits[4, 3] = float("nan")  # image 2 (request 1's only one) -> -1
    settings = torch.empty(4, device=DEVICE)  # one device tensor, rewritten in place
    state = ops.new_rng_state(123, 4, device=DEVICE)  # (its seed is unused with streams)
    for temperature, top_k, top_p in SETTINGS:
        settings.copy_(ops.sampling_settings(2.5, temperature, top_k, top_p))
        want = per_request(logits, seeds, images, (2.5, temperature, top_k, top_p), backend, offset=int(state[1]))
        got, ids = ops.cfg_sample_settings(logits, settings, state, streams=streams_of(seeds, images),
                                           return_ids=True, backend=backend)
        assert torch.equal(got, want), (temperature, top_k, top_p)
        assert got[2] == -1 and torch.equal(ids, got.repeat_interleave(2))
    assert state.tolist() == [123, 4 + len(SETTINGS), 0]


@pytest.mark.parametrize("layout", grid(["halves"], ["interleaved"]))
def test_without_streams_the_state_seeds_every_row(layout):
    logits = torch.randn(6, 40, device=DEVICE)
    for backend in BACKENDS:
        state = ops.new_rng_state(11, device=DEVICE)
        got = ops.cfg_sample_settings(logits, ops.sampling_settings(4.0, 0.8, 0, 0.9).to(DEVICE), state,
                                      layout=layout, backend=backend)
        want = ops.cfg_sample(logits, cfg_weight=4.0, temperature=0.8, top_p=0.9, layout=layout,
                              rng_state=ops.new_rng_state(11, device=DEVICE), backend=backend)
        assert torch.equal(got, want) and state.tolist() == [11, 1, 0]


@pytest.mark.parametrize("settings", grid([(0.9, 7, 0.6), (1.0, 0, 1.0)], [(0.0, 0, 1.0), (0.7, 5, 1.0),
                                                                           (1.3, 0, 0.8)]))
def test_split_rows_take_every_launch_and_equal_cfg_sample(monkeypatch, settings):
    # A split row takes SPLIT_LAUNCHES launches whatever the settings; those a setting does not
    # need return at once, the one that runs its final phase advances the state.
    from janus_fast.ops import sampling

    b, v = (2, 6001) if FULL else (1, 300)
    if FULL:  # two programs per row
        monkeypatch.setattr(sampling, "_sm_count", lambda device: 2 * b)
        monkeypatch.setattr(sampling, "SPLIT_FILTERED_COLUMNS", 0)
    else:  # one program per row, through the split kernels' launches and merge slots
        monkeypatch.setattr(ss, "row_splits", lambda *args, **kwargs: 2)
    temperature, top_k, top_p = settings
    logits = torch.randn(2 * b, v, device=DEVICE) * 2
    state = ops.new_rng_state(5, 2, device=DEVICE)
    got = ops.cfg_sample_settings(logits, ops.sampling_settings(1.5, *settings).to(DEVICE), state, backend="triton")
    want = ops.cfg_sample(logits, cfg_weight=1.5, temperature=temperature, top_k=top_k, top_p=top_p,
                          rng_state=ops.new_rng_state(5, 2, device=DEVICE), backend="triton")
    assert torch.equal(got, want) and state.tolist() == [5, 3, 0]
    slots = sampling.merge_slots(torch.device(DEVICE), b)[:b]
    assert (slots[:, [0, 1, 4, 5]] == -(2**63)).all() and (slots[:, 2:4] == 0).all() and (slots[:, 6:] == 0).all()


def test_sampling_settings_checks_and_stores():
    assert ops.sampling_settings(5, 1e-40, 3, 0.5).tolist() == [5.0, 0.0, 3.0, 0.5]  # a subnormal T: the argmax
    assert ops.sampling_settings(top_k=1 << 30)[2] == 1 << 24
    for kwargs, error in [(dict(temperature=-1.0), ValueError), (dict(top_p=1.5), ValueError),
                          (dict(top_k=2.0), TypeError), (dict(cfg_weight=float("nan")), ValueError)]:
        with pytest.raises(error):
            ops.sampling_settings(**kwargs)


def test_bad_input_is_named():
    logits = torch.randn(4, 9, device=DEVICE)
    good, state = ops.sampling_settings().to(DEVICE), ops.new_rng_state(0, device=DEVICE)
    cases = [
        (dict(settings=good[:3]), ValueError, "settings must be a contiguous float32 \\[4\\]"),
        (dict(settings=good.double()), TypeError, "settings must have dtype"),
        (dict(settings=torch.tensor([1.0, -2.0, 0.0, 1.0])), ValueError, "settings\\[1\\] \\(temperature\\)"),
        (dict(settings=torch.tensor([1.0, 1.0, 2.5, 1.0])), ValueError, "settings\\[2\\] \\(top_k\\)"),
        (dict(rng_state=state[:2]), ValueError, "rng_state must be a contiguous int64 \\[3\\]"),
        (dict(streams=torch.zeros(3, 2, dtype=torch.int64)), ValueError, "streams must be a contiguous int64 \\[2, 2\\]"),
        (dict(streams=torch.tensor([[1, 0], [1, -1]])), ValueError, "streams\\[:, 1\\] must lie in"),
        (dict(workspace=torch.zeros(1, 4, dtype=torch.int64)), ValueError, "workspace must be a contiguous int64"),
        (dict(layout="rows"), ValueError, "layout must be one of"),
    ]
    for override, error, message in cases:
        kwargs = dict(settings=good, rng_state=state) | override
        settings, rng_state = kwargs.pop("settings"), kwargs.pop("rng_state")
        with pytest.raises(error, match=message):
            ops.cfg_sample_settings(logits, settings, rng_state, **kwargs)
    with pytest.raises(ValueError, match="draws each request's rows together"):  # the reference's limit
        ops.cfg_sample_settings(logits, good, state, streams=torch.tensor([[1, 1], [1, 2]]), backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    logits = torch.randn(6, 11, device=DEVICE)
    settings = ops.sampling_settings(3.0, 0.7, 4, 0.9).to(DEVICE)
    none = torch.empty(0, 2, dtype=torch.int64, device=DEVICE)
    work = torch.empty(0, 4, dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(torch.ops.janus_fast.cfg_sample_settings,
                          (logits, settings, ops.new_rng_state(5, device=DEVICE), none, work, "halves", True, backend))
    torch.library.opcheck(torch.ops.janus_fast.cfg_sample_settings,
                          (logits, settings, ops.new_rng_state(5, device=DEVICE), streams_of([3], [3]), work,
                           "interleaved", False, backend))


# ---------------------------------------------------------------------------- compile facts


def compile_facts(cap: int) -> list[dict]:
    """Registers and spill bytes of every settings-kernel config for sm_<cap>: the image and
    text shapes' one-row kernel and each of the split kernel's launches."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import janus_fast.kernels.sampling as S
    import janus_fast.kernels.sampling_device as K
    from tests.test_compile_facts import _resource_usage

    common = dict(STREAMS=True, INTERLEAVED=True, WRITE_IDS=True)
    specs = [(f"settings {b}x{v}", K._cfg_sample_settings_kernel, dict(common, **K.settings_launch_config(b, v, False)[1]))
             for b, v in [(32, 16384), (32, 8000), (32, 1000)]]  # streamed (as 102400), on the chip
    specs += [(f"split launch {n}", K._cfg_sample_split_settings_kernel,
               dict(common, SPLITS=25, LAUNCH=n, ONE_FILTER=K.one_filter_phase(n), BLOCK=S.SPLIT_BLOCK,
                    SELECT=S.SPLIT_SELECT, num_warps=K.MAX_WARPS, maxnreg=S.max_registers(K.MAX_WARPS)))
              for n in range(K.SPLIT_LAUNCHES)]
    types = {"logits_ptr": "*bf16", "settings_ptr": "*fp32", "mass_scale": "fp32"}
    facts = []
    for name, fn, meta in specs:
        signature = {n: "constexpr" if n in meta else types.get(n, "*i64" if n.endswith("_ptr") else "i32")
                     for n in fn.arg_names}
        options = {"num_warps": meta["num_warps"], "num_stages": 1, "enable_fp_fusion": False,
                   "maxnreg": meta["maxnreg"]}
        constexprs = {k: v for k, v in meta.items() if k not in ("num_warps", "maxnreg")}
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", cap, 32),
                                  options=options)
        usage = _resource_usage(compiled.asm["cubin"])
        facts.append({"name": name, "warps": meta["num_warps"], "regs": usage["reg"],
                      "spill_bytes": usage["local"] + usage["stack"]})
    return facts


@pytest.mark.skipif(DEVICE == "cuda" or not FULL, reason="minutes of compiling: full tier, without a GPU")
@pytest.mark.parametrize("cap", [80, 90])
def test_settings_kernels_compile_without_spills(cap):
    job = subprocess.run([sys.executable, "-c", f"import json, tests.test_sampling_device as t; "
                                                f"print(json.dumps(t.compile_facts({cap})))"],
                         cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True,
                         timeout=3000)
    assert job.returncode == 0, job.stderr[-4000:]
    rows = json.loads(job.stdout.strip().splitlines()[-1])
    spilling = [(r["name"], r["regs"], r["spill_bytes"]) for r in rows if r["spill_bytes"]]
    assert not spilling, f"sm_{cap}: configs spill registers (name, regs, bytes): {spilling}"


if __name__ == "__main__":  # python -m tests.test_sampling_device [80|90]: the table
    os.environ["TRITON_INTERPRET"] = "0"
    for cap in [int(a) for a in sys.argv[1:]] or [80, 90]:
        for r in compile_facts(cap):
            print(f"sm_{cap}  {r['name']:<22} warps {r['warps']:>2}  regs {r['regs']:>3}  spill {r['spill_bytes']:>3} B")
