"""cfg_sample: the Triton kernel (the interpreter on CPU) and the CUDA kernel (GPU) against
janus_fast/ops/reference.py.

Draws are checked statistically: many identical rows in ONE launch with a fixed seed, a
chi-square test of the token frequencies against reference.sampling_probs (deterministic, so not
flaky), and no token outside the reference's kept set, ever. Filter thresholds in these tests sit
well inside gaps of the distribution (or on exact ties), where the fp32 rounding of the kernels
and of the reference cannot disagree.
"""

import os

import pytest
import torch

from janus_fast import ops
from janus_fast.ops import reference as ref
from janus_fast.ops.sampling import new_rng_state
from tests.helpers import DEVICE, FULL, chi_square_pvalue, grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
LAYOUTS = ["interleaved", "halves"]


def pair(cond: torch.Tensor, uncond: torch.Tensor, layout: str) -> torch.Tensor:
    """[2B, V] logits from cond/uncond [B, V] in `layout`."""
    if layout == "interleaved":
        return torch.stack([cond, uncond], 1).reshape(-1, cond.shape[1])
    return torch.cat([cond, uncond])


def repeated(cond_row: torch.Tensor, uncond_row: torch.Tensor, n: int, layout: str) -> torch.Tensor:
    return pair(cond_row.expand(n, -1), uncond_row.expand(n, -1), layout).contiguous()


def seed_tensor(seed: int, offset: int = 0) -> torch.Tensor:
    return torch.tensor([seed, offset], dtype=torch.int64, device=DEVICE)


def draw(logits, backend, *, seed=1234, offset=0, **kw):
    """Tokens from the kernel behind `backend` for a fixed (seed, offset)."""
    kw.setdefault("cfg_weight", 2.0)
    kw.setdefault("temperature", 1.0)
    kw.setdefault("top_k", 0)
    kw.setdefault("top_p", 1.0)
    kw.setdefault("layout", "interleaved")
    return torch.ops.janus_fast.cfg_sample(logits, kw["cfg_weight"], kw["temperature"], kw["top_k"],
                                           kw["top_p"], seed_tensor(seed, offset), kw["layout"], False, False,
                                           backend)[0]


def check_frequencies(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """No token the reference filtered out; frequencies consistent with `probs` (float64 [V])."""
    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()
    dropped = counts[probs.cpu() == 0]
    assert dropped.sum() == 0, f"{int(dropped.sum())} draws of filtered-out tokens"
    p = chi_square_pvalue(counts, probs.cpu())
    assert p > 1e-4, f"chi-square p-value {p:.2e}: counts {counts.tolist()} vs probs {probs.tolist()}"


def top_p_in_gap(probs: torch.Tensor, keep: int) -> float:
    """A top_p that keeps exactly the `keep` most probable tokens of a tie-free distribution,
    halfway between two exclusive prefix masses (far from any rounding boundary)."""
    s = probs.double().sort(descending=True).values
    exclusive = s.cumsum(0) - s
    return float((exclusive[keep - 1] + exclusive[keep]) / 2)


# ---------------------------------------------------------------------------- temperature 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("b,v,dtype", grid(
    [(1, 1, torch.float32), (3, 37, torch.float32), (2, 4097, torch.float16), (5, 300, torch.bfloat16)],
    [(16, 16384, torch.bfloat16), (2, 102400, torch.float32), (1, 131072, torch.float16)]))
def test_temperature_zero_is_reference_argmax(backend, layout, b, v, dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the interpreter has no bfloat16 arithmetic; bf16 runs on the GPU")
    cond, uncond = torch.randn(b, v, device=DEVICE), torch.randn(b, v, device=DEVICE)
    if v > 3:  # an exact tie for the maximum: the lowest index must win
        cond[0, 1], uncond[0, 1] = 100.0, 100.0
        cond[0, v - 2], uncond[0, v - 2] = 100.0, 100.0
    logits = pair(cond, uncond, layout).to(dtype)
    tokens = draw(logits, backend, temperature=0.0, cfg_weight=3.0, layout=layout)
    assert torch.equal(tokens, ref.cfg_sample(logits, 3.0, 0.0, layout=layout))
    if v > 3:
        assert tokens[0].item() == 1


# ---------------------------------------------------------------------------- distributions


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("v,w,t", grid([(11, 2.0, 0.8)], [(64, 5.0, 0.3), (5, -1.0, 2.5)]))
def test_frequencies_match_guided_probabilities(backend, layout, v, w, t):
    n = 20000
    cond, uncond = torch.randn(1, v, device=DEVICE), torch.randn(1, v, device=DEVICE)
    tokens = draw(repeated(cond, uncond, n, layout), backend, cfg_weight=w, temperature=t, layout=layout)
    check_frequencies(tokens, ref.sampling_probs(pair(cond, uncond, layout), w, t, layout=layout)[0].double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["top_k", "top_p", "both", "top_p_zero", "top_k_one"])
def test_filtered_frequencies(backend, case):
    v, n, t = 13, 10000, 0.7
    cond, uncond = torch.randn(1, v, device=DEVICE), torch.randn(1, v, device=DEVICE)
    one = pair(cond, uncond, "interleaved")
    full = ref.sampling_probs(one, 1.5, t)[0]
    top_k, top_p = {"top_k": (5, 1.0), "top_p": (0, None), "both": (6, None), "top_p_zero": (0, 0.0),
                    "top_k_one": (1, 1.0)}[case]
    if top_p is None:
        top_p = top_p_in_gap(ref.sampling_probs(one, 1.5, t, top_k=top_k)[0], 3)
    tokens = draw(repeated(cond, uncond, n, "interleaved"), backend, cfg_weight=1.5, temperature=t,
                  top_k=top_k, top_p=top_p)
    probs = ref.sampling_probs(one, 1.5, t, top_k, top_p)[0].double()
    assert int((probs > 0).sum()) == {"top_k": 5, "top_p": 3, "both": 3, "top_p_zero": 1, "top_k_one": 1}[case]
    assert (full > 0).all()
    check_frequencies(tokens, probs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k,top_p", [(2, 1.0), (0, "tie")])
def test_ties_are_kept_together(backend, top_k, top_p):
    # guided == cond == uncond exactly: [3, 2, 2, 2, 1, 0, ...]; the three 2s share one fate
    g = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0, -1.0]], device=DEVICE)
    n = 10000
    if top_p == "tie":  # the boundary falls inside the group of 2s: the whole group stays
        p = torch.softmax(g[0].double(), 0)
        top_p = float(p[0] + p[1] / 2)
    logits = repeated(g, g, n, "interleaved")
    tokens = draw(logits, backend, cfg_weight=4.0, top_k=top_k, top_p=top_p)
    probs = ref.sampling_probs(logits[:2], 4.0, 1.0, top_k, top_p)[0].double()
    assert (probs > 0).tolist() == [True] * 4 + [False] * 3
    check_frequencies(tokens, probs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("v,top_k,top_p", grid([(5000, 50, 1.0), (4099, 0, 0.5), (300, 7, 0.9)],
                                               [(102400, 50, 0.9), (131072, 1000, 1.0)]))
def test_never_returns_a_filtered_token(backend, layout, v, top_k, top_p):
    b = 6
    cond, uncond = torch.randn(b, v, device=DEVICE) * 3, torch.randn(b, v, device=DEVICE) * 3
    logits = pair(cond, uncond, layout)
    kept = ref.sampling_probs(logits, 2.0, 1.0, top_k, top_p, layout) > 0
    for offset in range(3):
        tokens = draw(logits, backend, top_k=top_k, top_p=top_p, layout=layout, offset=offset)
        assert kept[torch.arange(b), tokens].all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k,top_p", [(20, 1.0), (0, 0.8), (30, 0.7)])
def test_filtered_draw_is_the_unfiltered_draw_when_it_survives(backend, top_k, top_p):
    # Gumbel-max with one noise: the filtered winner IS the unfiltered winner whenever the latter
    # is kept (the kernels' exact shortcut), and otherwise a kept token.
    b, v = 64, 700
    logits = torch.randn(2 * b, v, device=DEVICE) * 2
    kept = ref.sampling_probs(logits, 1.5, 1.0, top_k, top_p) > 0
    free = draw(logits, backend, cfg_weight=1.5, seed=5)
    filtered = draw(logits, backend, cfg_weight=1.5, seed=5, top_k=top_k, top_p=top_p)
    rows = torch.arange(b, device=DEVICE)
    survives = kept[rows, free]
    assert 0 < int(survives.sum()) < b  # both paths are exercised
    assert torch.equal(filtered[survives], free[survives])
    assert kept[rows, filtered].all()


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 1.0, 0.9), (9, 1.0, 1.0), (0, 0.6, 1.0), (40, 0.95, 0.8),
                                                     (0, 1.0, 0.0)])
def test_streamed_rows_equal_rows_kept_on_chip(monkeypatch, top_k, top_p, temperature):
    # Rows longer than ON_CHIP_MAX are streamed (re-read per pass, 4-bit digits); the maths is
    # the same, so the tokens must be identical.
    from janus_fast.kernels import sampling as kernels

    logits = torch.randn(2 * 5, 300, device=DEVICE) * 2
    logits[2:4, 100:] = float("-inf")
    on_chip = draw(logits, "triton", top_k=top_k, top_p=top_p, temperature=temperature, seed=9)
    monkeypatch.setattr(kernels, "ON_CHIP_MAX", 64)
    assert not kernels._blocks(5, 300, True)[2]
    streamed = draw(logits, "triton", top_k=top_k, top_p=top_p, temperature=temperature, seed=9)
    assert torch.equal(on_chip, streamed)


def _clean(slots: torch.Tensor) -> bool:
    """Merge slots in their resting state: entries 0, 1, 4, 5 of a row at int64's minimum, the rest 0."""
    empty = torch.zeros_like(slots[0], dtype=torch.bool)
    empty[[0, 1, 4, 5]] = True
    return bool((slots[:, empty] == -(2**63)).all() and (slots[:, ~empty] == 0).all())


def _slots_are_clean(sampling, b):
    return _clean(sampling.merge_slots(torch.device(DEVICE), b)[:b])


@pytest.mark.parametrize("b,v", [(1, 9000), (3, 4500)])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_rows_split_across_programs_equal_whole_rows(monkeypatch, b, v, temperature):
    # Small batches split each row over several programs merged by 64-bit atomics: the same
    # tokens as one program per row, the random state advanced once, the merge slots left clean.
    from janus_fast.ops import sampling

    assert sampling.row_splits(b, v, torch.device(DEVICE)) > 1
    logits = torch.randn(2 * b, v, device=DEVICE) * 2
    logits[0, 7] = float("nan")  # row 0 -> -1 through the merged flags
    state = new_rng_state(5, 2, device=DEVICE)
    split, ids = ops.cfg_sample(logits, cfg_weight=3.0, temperature=temperature, rng_state=state,
                                return_ids=True, backend="triton")
    assert state.tolist() == [5, 3, 0] and split[0] == -1 and torch.equal(ids, split.repeat_interleave(2))
    assert _slots_are_clean(sampling, b)
    monkeypatch.setattr(sampling, "row_splits", lambda *args: 1)
    whole = ops.cfg_sample(logits, cfg_weight=3.0, temperature=temperature, rng_state=new_rng_state(5, 2, device=DEVICE),
                           backend="triton")
    assert torch.equal(split, whole)


@pytest.mark.parametrize("top_k,top_p,temperature,layout,dtype", grid(
    [(0, 0.9, 1.0, "halves", torch.bfloat16), (40, 0.8, 0.7, "interleaved", torch.float16)],  # top-k in the 2nd
    [(50, 1.0, 1.0, "interleaved", torch.float32), (3, 1.0, 1.0, "halves", torch.float32),
     (0, 0.3, 1.3, "interleaved", torch.float32),
     (1, 0.5, 1.0, "interleaved", torch.bfloat16), (4999, 0.99, 1.0, "halves", torch.float16)]))
def test_filtered_rows_split_across_programs_equal_whole_rows(monkeypatch, top_k, top_p, temperature, layout,
                                                             dtype):
    # Long filtered rows split too: one launch per 8-bit radix pass, each program replaying the
    # digits from the merged histograms. The thresholds are the same integers, so the tokens are
    # those of one program per row - on rows whose unfiltered winner survives and on rows where
    # it does not - with the random state advanced once and the merge slots left clean.
    from janus_fast.ops import sampling

    b, v = (4, 6001) if not FULL else (8, 13003)  # (the last chunk ends inside a group of 4)
    monkeypatch.setattr(sampling, "SPLIT_FILTERED_COLUMNS", 0)
    monkeypatch.setattr(sampling, "_sm_count", lambda device: 2 * b)
    assert sampling.row_splits(b, v, torch.device(DEVICE), filtered=True) == (2 if not FULL else 4)
    cond, uncond = torch.randn(2, b, v, device=DEVICE) * 0.8
    cond[0, 7] = float("nan")  # row 0 -> -1 through the merged flags
    cond[1, v // 2:] = uncond[1, v // 2:] = float("-inf")  # row 1 half masked
    logits = pair(cond, uncond, layout).to(dtype)
    kw = {"cfg_weight": 1.5, "temperature": temperature, "top_k": top_k, "top_p": top_p, "layout": layout,
          "backend": "triton"}
    state = new_rng_state(3, 2, device=DEVICE)
    split, ids = ops.cfg_sample(logits, rng_state=state, return_ids=True, **kw)
    assert state.tolist() == [3, 3, 0] and split[0] == -1 and torch.equal(ids, pair(split[:, None], split[:, None],
                                                                                     layout)[:, 0])
    assert _slots_are_clean(sampling, b)
    kept = ref.sampling_probs(logits, 1.5, temperature, top_k, top_p, layout) > 0
    rows = torch.arange(1, b, device=DEVICE)
    assert kept[rows, split[1:]].all()
    monkeypatch.setattr(sampling, "row_splits", lambda *args: 1)
    whole = ops.cfg_sample(logits, rng_state=new_rng_state(3, 2, device=DEVICE), **kw)
    assert torch.equal(split, whole)


def test_text_decoding_rows_are_split_filtered_or_not(monkeypatch):
    # The README's claim at the shipped constants: B = 1, V = 102400 splits with or without a
    # filter (25 blocks on 132 SMs); a filtered row short enough for one block's chip does not.
    from janus_fast.ops import sampling

    monkeypatch.setattr(sampling, "_sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    assert sampling.row_splits(1, 102400, cpu) == sampling.row_splits(1, 102400, cpu, filtered=True) == 25
    assert sampling.row_splits(1, 16384, cpu) > 1 and sampling.row_splits(1, 16384, cpu, filtered=True) == 1
    assert sampling.row_splits(264, 102400, cpu, filtered=True) == 1  # the batch alone fills the GPU


def test_merge_slot_layout_is_one_layout():
    # ops allocates the slots, the Triton and CUDA kernels index them: one width, one header.
    import re

    from janus_fast.kernels import sampling as kernels

    from janus_fast.ops import sampling

    with open(os.path.join(ROOT, "csrc", "sampling", "sampling.h")) as f:
        header = f.read()
    cuda = {name: int(value) for name, value in re.findall(r"constexpr int64_t (kSlot\w+) = (\d+);", header)}
    assert cuda == {"kSlotHeader": kernels.SLOT_HEADER, "kSlotBins": kernels.SLOT_BINS}
    assert sampling.SLOT_WIDTH == kernels.SLOT_USED == cuda["kSlotHeader"] + 8 * cuda["kSlotBins"]
    assert re.search(r"kSlotWidth = kSlotHeader \+ 8 \* kSlotBins;", header)


def _record_slots(monkeypatch, sampling) -> list:
    """The merge-slots tensor each split launch of the Triton backend is given."""
    seen, impl = [], sampling._impl

    def spy(backend):
        def run(*args):
            seen.append(args[-1])
            return impl(backend)(*args)
        return run
    monkeypatch.setattr(sampling, "_impl", spy)
    return seen


def test_a_workspace_holds_the_merge_slots_and_is_left_clean(monkeypatch):
    # A caller's workspace (one per CUDA graph, made before capture) takes the merge slots of a
    # split launch: the shared per-stream slots are neither made nor used, the tokens are those
    # drawn without it, and every launch leaves it clean. A workspace too small, of another
    # dtype or on another device is refused by name.
    from janus_fast.ops import sampling

    b, v = 2, 9000
    assert sampling.row_splits(b, v, torch.device(DEVICE)) > 1
    monkeypatch.setattr(sampling, "_stream_slots", {})
    seen = _record_slots(monkeypatch, sampling)
    workspace = ops.new_sampling_workspace(3, device=DEVICE)
    assert workspace.shape == (3, sampling.SLOT_WIDTH) and _clean(workspace)
    logits = torch.randn(2 * b, v, device=DEVICE)
    kw = {"cfg_weight": 2.0, "temperature": 0.9, "backend": "triton"}
    got = ops.cfg_sample(logits, rng_state=new_rng_state(4, device=DEVICE), workspace=workspace, **kw)
    assert seen == [workspace] and sampling._stream_slots == {} and _clean(workspace)
    assert torch.equal(got, ops.cfg_sample(logits, rng_state=new_rng_state(4, device=DEVICE), **kw))
    for bad, error, message in ((ops.new_sampling_workspace(1, device=DEVICE), ValueError, "workspace must be"),
                                (workspace.int(), TypeError, "workspace must have dtype"),
                                (workspace[:, :100], ValueError, "workspace must be"),
                                (workspace.to("meta"), ValueError, "workspace is on meta")):
        with pytest.raises(error, match=message):
            ops.cfg_sample(logits, workspace=bad, **kw)


def test_capture_without_a_workspace_never_shares_the_stream_slots(monkeypatch):
    # Under CUDA-graph capture (what the op asks, simulated here) a split launch without a
    # workspace gets merge slots of its own, with a warning naming the fix: never the shared
    # per-stream slots (which are not even made), never another graph's.
    from janus_fast.ops import sampling

    monkeypatch.setattr(sampling, "_stream_slots", {})
    monkeypatch.setattr(sampling, "_capturing", lambda device: True)
    seen = _record_slots(monkeypatch, sampling)
    logits = torch.randn(2, 9000, device=DEVICE)
    with pytest.warns(UserWarning, match="new_sampling_workspace"):
        for _ in range(2):
            ops.cfg_sample(logits, cfg_weight=2.0, rng_state=new_rng_state(1, device=DEVICE), backend="triton")
    assert len(seen) == 2 and seen[0] is not seen[1] and sampling._stream_slots == {}
    assert all(_clean(slots) for slots in seen)


def test_engine_steps_sample_into_their_own_workspace(monkeypatch):
    # Each engine bucket (one CUDA graph on a GPU) makes a workspace with its other buffers,
    # before any capture, and every cfg_sample launch of its step uses it: image and text steps.
    from janus_fast import JanusPro
    from tests.tiny_janus import tiny_model

    plain = tiny_model()
    model = JanusPro(plain.config).eval()
    model.load_state_dict(plain.state_dict())
    model.processor = plain.processor
    seen = []
    for name in ("cfg_sample", "cfg_sample_settings"):  # the engine's step uses the device-settings form
        sample = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _sample=sample, **kw: seen.append(kw.get("workspace")) or _sample(*a, **kw))
    ids = model._generation_prompt_ids(model.processor, "a fox")
    model.generate_image_tokens([ids, ids[:3]], model.processor.pad_id, 2, 5.0, 1.0, 0, 1.0, [1, 2])
    images = list(seen)
    seen.clear()
    model.language_model.generate(input_ids=torch.randint(0, 100, (3, 5)), max_new_tokens=4, do_sample=True)
    for launches, rows in ((images, 4), (seen, 3)):
        assert launches and all(w is launches[0] for w in launches)
        assert launches[0].shape == (rows, ops.sampling.SLOT_WIDTH)


@pytest.mark.gpu
@pytest.mark.parametrize("top_k,top_p", [(50, 1.0), (0, 0.9), (50, 0.9)])
def test_cuda_split_rows_equal_whole_rows(monkeypatch, top_k, top_p):
    # The CUDA kernel's split phases against its own one-block rows at text decoding's shape.
    from janus_fast.ops import sampling

    b, v = 2, 102400
    assert sampling.row_splits(b, v, torch.device("cuda"), filtered=True) > 1
    logits = torch.randn(2 * b, v, device="cuda", dtype=torch.bfloat16)
    kw = {"temperature": 0.9, "top_k": top_k, "top_p": top_p}
    split = torch.stack([draw(logits, "cuda", seed=seed, **kw) for seed in range(8)])
    assert _slots_are_clean(sampling, b)
    monkeypatch.setattr(sampling, "row_splits", lambda *args: 1)
    whole = torch.stack([draw(logits, "cuda", seed=seed, **kw) for seed in range(8)])
    assert torch.equal(split, whole)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocabulary_of_one(backend):
    logits = torch.randn(8, 1, device=DEVICE)
    for kw in ({}, {"temperature": 0.0}, {"top_k": 1}, {"top_p": 0.0}, {"top_k": 3, "top_p": 0.5}):
        assert draw(logits, backend, **kw).tolist() == [0] * 4


# ---------------------------------------------------------------------------- non-finite logits


def non_finite_batch(v: int, layout: str) -> tuple[torch.Tensor, list[bool]]:
    """[2B, V] logits whose pairs cover contract 1's cases, and which pairs must give -1."""
    cond, uncond = torch.randn(7, v, device=DEVICE), torch.randn(7, v, device=DEVICE)
    cond[0, v // 2] = float("nan")                    # NaN in the conditional row
    uncond[1, 0] = float("inf")                        # inf - inf: NaN in g
    cond[2, v - 1] = float("inf")                      # +inf in g
    cond[3] = float("-inf")                            # g all -inf: no finite entry
    cond[4, :v // 2] = uncond[4, :v // 2] = float("-inf")  # masked in both rows: impossible tokens
    cond[5, 1:] = float("-inf")                        # one finite token left
    return pair(cond, uncond, layout), [True, True, True, True, False, False, False]


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.5),
                                                     (1.0, 3, 0.8)])
def test_non_finite_rows_get_minus_one(backend, temperature, top_k, top_p):
    v = 37
    for layout in LAYOUTS:
        logits, bad = non_finite_batch(v, layout)
        tokens, ids = ops.cfg_sample(logits, cfg_weight=2.0, temperature=temperature, top_k=top_k, top_p=top_p,
                                     layout=layout, rng_state=new_rng_state(3, device=DEVICE), return_ids=True,
                                     backend=backend)
        assert (tokens < 0).tolist() == bad
        assert torch.equal(ids, tokens.repeat_interleave(2) if layout == "interleaved" else tokens.repeat(2))
        kept = ref.sampling_probs(logits, 2.0, temperature, top_k, top_p, layout) > 0
        good = ~torch.tensor(bad, device=DEVICE)
        assert kept[good.nonzero()[:, 0], tokens[good]].all()
        assert tokens[5] == 0
        if temperature == 0:
            assert torch.equal(tokens, ref.cfg_sample(logits, 2.0, 0.0, layout=layout))


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("split", [False, True])
def test_temperature_that_overflows_is_argmax(monkeypatch, backend, split):
    # g / T overflowing to +inf somewhere, or to -inf everywhere (every g below -34 at T = 1e-37;
    # pair 3 has c == u, so g = u exactly): the argmax, as the reference - also in split rows.
    from janus_fast.ops import sampling

    if split:
        monkeypatch.setattr(sampling, "row_splits", lambda *args: 2)
    logits = torch.randn(10, 50, device=DEVICE) * 100
    logits[6:8] = -50 - torch.rand(50, device=DEVICE) * 100
    greedy = draw(logits, backend, temperature=0.0)
    assert torch.equal(greedy, ref.cfg_sample(logits, 2.0, 0.0))
    for top_k, top_p in ((0, 1.0), (5, 0.9), (5, 1.0), (0, 0.9)):
        assert torch.equal(ref.cfg_sample(logits, 2.0, 1e-37, top_k, top_p), greedy)
        assert torch.equal(draw(logits, backend, temperature=1e-37, top_k=top_k, top_p=top_p), greedy)


# ---------------------------------------------------------------------------- random stream


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_and_offset_select_the_stream(backend):
    logits = torch.randn(128, 500, device=DEVICE)
    first = draw(logits, backend, seed=7, offset=3)
    assert torch.equal(first, draw(logits, backend, seed=7, offset=3))
    assert (first != draw(logits, backend, seed=7, offset=4)).float().mean() > 0.5
    assert (first != draw(logits, backend, seed=8, offset=3)).float().mean() > 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rng_state_advances_in_the_launch_and_ids_follow_the_layout(backend, layout):
    logits = torch.randn(2 * 33, 257, device=DEVICE)
    state = new_rng_state(11, 5, device=DEVICE)
    tokens, ids = ops.cfg_sample(logits, cfg_weight=2.0, rng_state=state, return_ids=True, layout=layout,
                                 backend=backend)
    assert state.tolist() == [11, 6, 0]
    assert torch.equal(tokens, draw(logits, backend, seed=11, offset=5, layout=layout))
    expected_ids = tokens.repeat_interleave(2) if layout == "interleaved" else tokens.repeat(2)
    assert torch.equal(ids, expected_ids)
    again = ops.cfg_sample(logits, cfg_weight=2.0, rng_state=state, layout=layout, backend=backend)
    assert state.tolist() == [11, 7, 0]
    assert torch.equal(again, draw(logits, backend, seed=11, offset=6, layout=layout))
    assert not torch.equal(again, tokens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generator_path(backend):
    logits = torch.randn(10, 40, device=DEVICE)
    gen = lambda s: torch.Generator(device=DEVICE).manual_seed(s)
    a = ops.cfg_sample(logits, cfg_weight=2.0, generator=gen(3), backend=backend)
    assert torch.equal(a, ops.cfg_sample(logits, cfg_weight=2.0, generator=gen(3), backend=backend))
    tokens, ids = ops.cfg_sample(logits, cfg_weight=2.0, generator=gen(3), return_ids=True, backend=backend)
    assert torch.equal(tokens, a) and torch.equal(ids, a.repeat_interleave(2))


@pytest.mark.parametrize("top_k", [0, 5])
def test_host_seed_is_the_device_seed(top_k):
    # Eager CUDA draws pass (seed, offset) by value from the host: the same stream as the state.
    from janus_fast.kernels import sampling as kernels

    logits = torch.randn(2 * 9, 300, device=DEVICE)
    args = (logits, 2.0, 0.9, top_k, 1.0, seed_tensor(21, 4), "interleaved")
    assert torch.equal(kernels.cfg_sample(*args, host_seed=True)[0], kernels.cfg_sample(*args, host_seed=False)[0])
    with pytest.raises(ValueError, match="host seed cannot be advanced"):
        kernels.cfg_sample(*args, advance=True, host_seed=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_eager_draw_launches_one_kernel(backend):
    logits = torch.randn(2 * 4, 16384, device="cuda", dtype=torch.bfloat16)
    gen = lambda: torch.Generator(device="cuda").manual_seed(8)
    first = ops.cfg_sample(logits, cfg_weight=5.0, generator=gen(), backend=backend)  # compiles, warms up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        again = ops.cfg_sample(logits, cfg_weight=5.0, generator=gen(), backend=backend)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]
    assert torch.equal(first, again)
    g = gen()
    assert not torch.equal(ops.cfg_sample(logits, cfg_weight=5.0, generator=g, backend=backend),
                           ops.cfg_sample(logits, cfg_weight=5.0, generator=g, backend=backend))


def test_empty_batch():
    state = new_rng_state(1, device=DEVICE)
    tokens, ids = ops.cfg_sample(torch.randn(0, 9, device=DEVICE), cfg_weight=1.0, rng_state=state,
                                 return_ids=True, backend="triton")
    assert tokens.shape == (0,) and ids.shape == (0,) and state.tolist() == [1, 1, 0]


def test_new_rng_state_default_device():
    state = new_rng_state(4, 2)
    assert state.tolist() == [4, 2, 0] and state.dtype == torch.int64
    assert state.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TypeError, match="seed must be an int"):
        new_rng_state(1.5)


def test_rng_state_errors():
    logits = torch.randn(4, 9, device=DEVICE)
    with pytest.raises(ValueError, match="rng_state must be a contiguous int64 \\[3\\]"):
        ops.cfg_sample(logits, cfg_weight=1.0, rng_state=torch.zeros(2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(TypeError, match="rng_state must have dtype"):
        ops.cfg_sample(logits, cfg_weight=1.0, rng_state=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="either generator or rng_state"):
        ops.cfg_sample(logits, cfg_weight=1.0, rng_state=new_rng_state(0, device=DEVICE),
                       generator=torch.Generator(device=DEVICE))


# ---------------------------------------------------------------------------- op registration


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", [False, True])
def test_opcheck(monkeypatch, backend, split):
    from janus_fast.ops import sampling

    if split:  # rows over 2 programs: the multi-launch filtered path behind the same op
        monkeypatch.setattr(sampling, "row_splits", lambda *args: 2)
    logits = torch.randn(6, 11, device=DEVICE)
    torch.library.opcheck(torch.ops.janus_fast.cfg_sample,
                          (logits, 3.0, 1.0, 4, 0.9, seed_tensor(5), "halves", False, False, backend))
    torch.library.opcheck(torch.ops.janus_fast.cfg_sample,
                          (logits, 3.0, 0.7, 4, 0.9, new_rng_state(5, device=DEVICE), "interleaved", True, True,
                           backend))
    torch.library.opcheck(torch.ops.janus_fast.cfg_sample,
                          (logits, 3.0, 0.0, 0, 1.0, new_rng_state(5, device=DEVICE), "interleaved", True, True,
                           backend))


@pytest.mark.gpu
def test_opcheck_cuda_extension_op():
    logits = torch.randn(6, 11, device="cuda", dtype=torch.bfloat16)
    no_slots = torch.empty(0, 4, dtype=torch.int64, device="cuda")
    torch.library.opcheck(torch.ops.janus_fast_C.cfg_sample,
                          (logits, 3.0, 0.7, 4, 0.9, new_rng_state(5), "interleaved", True, True, 1, no_slots))
    from janus_fast.ops.sampling import merge_slots

    for top_k, top_p in ((0, 1.0), (4, 0.9)):  # split rows, unfiltered and filtered (one launch per phase)
        torch.library.opcheck(torch.ops.janus_fast_C.cfg_sample,
                              (logits, 3.0, 0.7, top_k, top_p, new_rng_state(5), "halves", True, True, 3,
                               merge_slots(logits.device, 3)))


@pytest.mark.gpu
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 50, 1.0), (1.0, 0, 0.9),
                                                     (0.7, 50, 0.9)])
@pytest.mark.parametrize("b,v", [(1, 102400), (32, 16384), (3, 70000)])
def test_cuda_and_triton_agree_at_decoding_shapes(temperature, top_k, top_p, b, v):
    # The same stream, keys, masses and thresholds: only the hardware log/exp can flip a draw.
    logits = torch.randn(2 * b, v, device="cuda", dtype=torch.bfloat16) * 3
    kept = ref.sampling_probs(logits, 4.0, temperature, top_k, top_p) > 0
    tokens = {be: draw(logits, be, cfg_weight=4.0, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
              for be in ("cuda", "triton")}
    rows = torch.arange(b, device="cuda")
    for t in tokens.values():
        assert kept[rows, t].all()
    assert (tokens["cuda"] == tokens["triton"]).float().mean() >= 0.9


@pytest.mark.gpu
def test_cuda_and_triton_share_the_random_stream():
    # Same Philox stream and counters; only log() rounding differs, so nearly every draw agrees.
    logits = torch.randn(2 * 512, 1000, device="cuda")
    a, b = draw(logits, "cuda", seed=99, offset=2), draw(logits, "triton", seed=99, offset=2)
    assert (a == b).float().mean() > 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("rows,v,filters", [(64, 16384, {}), (2, 102400, {"top_k": 5000, "top_p": 0.9})])
def test_graph_replays_advance_the_rng_state(backend, rows, v, filters):
    # (the second case is a filtered split row: one launch per radix pass, all in the graph; its
    # logits are flat enough that two draws of the one token almost never agree: about 1 in 5000
    # per pair, and the seeded inputs make the outcome fixed)
    torch.manual_seed(0)
    logits = torch.randn(rows, v, device="cuda", dtype=torch.bfloat16) * (1.0 if rows > 2 else 0.1)
    state = new_rng_state(3)
    step = lambda: ops.cfg_sample(logits, cfg_weight=5.0, rng_state=state, return_ids=True, backend=backend,
                                  **filters)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, ids = step()
    start = state[1].item()
    draws = []
    for _ in range(3):
        graph.replay()
        draws.append(tokens.clone())
    assert state[1].item() == start + 3 and state[2].item() == 0
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert torch.equal(draws[2], draw(logits, backend, seed=3, offset=start + 2, cfg_weight=5.0, **filters))
    assert torch.equal(ids, draws[2].repeat_interleave(2))
