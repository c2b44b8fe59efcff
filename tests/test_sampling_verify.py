"""sjd_verify: the Triton kernel (the interpreter on CPU) and the reference.

Deterministic parts (temperature 0, the commit, the drafts entering the window, finished images,
the stored q) are compared exactly with the reference. Draws are checked statistically as in
tests/test_sampling.py: many identical images in ONE launch with a fixed seed, a chi-square test
of each column's outputs against the distribution it must have (the speculative-sampling
lemma: an accepted-or-resampled draft is a draw from p whatever q was), and the acceptance rate
against min(1, p(d) / q(d)). Deterministic, so not flaky.
"""

import pytest
import torch

from janus_fast import ops
from janus_fast.ops import reference as ref
from tests.helpers import DEVICE, FULL, chi_square_pvalue, grid

BACKENDS = ["reference", "triton"]


def make_state(b, w, n_total, v, n, *, seed=0, device=DEVICE):
    """Random drafts and stored q, point masses on even columns, cache lengths 10 + n."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, v, (b, n_total + w), generator=g)
    point = (torch.arange(n_total + w) % 2 == 0).to(torch.int8).expand(b, -1).contiguous()
    q = torch.rand(b, w, v, generator=g) ** 4
    q /= q.sum(-1, keepdim=True)
    n = torch.as_tensor(n).expand(b)
    progress = torch.stack([n, torch.zeros_like(n)], 1).long().contiguous()
    lengths = (10 + n).repeat_interleave(2).to(torch.int32)
    next_ids = torch.full((2 * b, w), -5, dtype=torch.long)
    state = [tokens, point, q, progress, lengths, next_ids]
    return [t.to(device) for t in state] + [ops.new_rng_state(1234, device=device)]


def clone(state):
    return [t.clone() for t in state]


def run(logits, state, backend, **kw):
    kw.setdefault("cfg_weight", 2.0)
    return ops.sjd_verify(logits, *state[:6], rng_state=state[6], backend=backend, **kw)


NAMES = ("tokens", "point", "q", "progress", "lengths", "next_ids", "rng_state")


def assert_states_equal(a, b, skip=()):
    for name, x, y in zip(NAMES, a, b):
        if name not in skip:
            assert torch.equal(x, y), f"{name} differs:\n{x}\n{y}"


# ---------------------------------------------------------------------------- exact parts


@pytest.mark.parametrize("w, grid_width", grid([(4, 3), (1, 0), (5, 0)], [(16, 4), (3, 2), (8, 24)]))
def test_greedy_pass_is_the_reference(w, grid_width):
    """Temperature 0: every column's output is the argmax and a draft is accepted iff it is the
    argmax; drafts at the argmax in the first columns give commits longer than one. Images at
    the start, in the middle, near the end (the count clamped) and finished."""
    b, n_total, v = 5, 12, 37
    logits = torch.randn(2 * b, w, v, device=DEVICE)
    state = make_state(b, w, n_total, v, [1, 4, n_total - 2, n_total - 1, n_total])
    argmax = ref.sampling_probs(logits.transpose(0, 1).reshape(-1, v), 2.0, 0.0).argmax(-1).view(w, b).T
    for row, k in enumerate([w, min(2, w), w, 0, w]):  # row r's drafts are the argmax in its first k columns
        n = int(state[3][row, 0])
        state[0][row, n:n + k] = argmax[row, :k]
    outs = {}
    for backend in BACKENDS:
        s = clone(state)
        outs[backend] = run(logits, s, backend, temperature=0.0, grid_width=grid_width), s
    (acc_ref, s_ref), (acc, s) = outs["reference"], outs["triton"]
    assert torch.equal(acc, acc_ref)
    assert_states_equal(s, s_ref)
    assert torch.equal(s[2], state[2])  # q untouched at temperature 0
    counts = (s[3][:, 0] - state[3][:, 0]).tolist()
    assert counts == [min(w, n_total - 1), min(3, w), min(2, w), 1, 0]
    assert torch.equal(s[3][:, 1], torch.tensor([1, 1, 1, 1, 0], device=DEVICE))
    assert torch.equal(s[4], state[4] + torch.tensor(counts, device=DEVICE).repeat_interleave(2).int())


@pytest.mark.parametrize("backend", BACKENDS)
def test_commit_and_fresh_drafts(backend):
    """One image, W = 4, grid 3, n = 5, drafts at the argmax in columns 0-1: positions 5-7 are
    committed (two accepted, the argmax at the rejection), positions 9-11 enter the window as
    point masses on the token 3 back (6, 7, 8: held before the commit), the next inputs are
    positions 7-10, the cache grows by 3."""
    w, v, n_total = 4, 11, 20
    logits = torch.randn(2, w, v, device=DEVICE)
    state = make_state(1, w, n_total, v, 5)
    argmax = ref.sampling_probs(logits.transpose(0, 1).reshape(-1, v), 2.0, 0.0).argmax(-1)
    tokens = state[0]
    tokens[0, 5:7] = argmax[:2]
    tokens[0, 7] = (argmax[2] + 1) % v  # rejected
    before = tokens.clone()
    run(logits, state, backend, temperature=0.0, grid_width=3)
    assert tokens[0, :5].tolist() == before[0, :5].tolist()
    assert tokens[0, 5:9].tolist() == argmax.tolist()
    assert tokens[0, 9:12].tolist() == tokens[0, 6:9].tolist() and tokens[0, 12:].tolist() == before[0, 12:].tolist()
    assert state[1][0, 5:9].tolist() == [0] * 4 and state[1][0, 9:12].tolist() == [1] * 3
    assert state[5].tolist() == [tokens[0, 7:11].tolist()] * 2
    assert state[3].tolist() == [[8, 1]] and state[4].tolist() == [18, 18]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_drafts_without_a_token_above_copy_the_window_end(backend):
    """grid_width 0, or a position above that has no token yet (grid 1 < W): the window's last output."""
    w, v = 3, 7
    logits = torch.zeros(2, w, v, device=DEVICE)
    logits[:, :, 2] = 5.0  # argmax 2 everywhere
    for grid_width in (0, 1):
        state = make_state(1, w, 10, v, 1)
        state[0][0, 1:4] = 2
        run(logits, state, backend, temperature=0.0, grid_width=grid_width)
        assert state[3][0, 0] == 4 and state[0][0, 4:7].tolist() == [2, 2, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_stores_the_distribution_used(backend):
    """Active images' slots hold p (the filtered guided softmax of their column), finished ones
    keep theirs; tokens outside the filter get exactly 0."""
    b, w, v, n_total = 3, 3, 40, 9
    logits = torch.randn(2 * b, w, v, device=DEVICE)
    state = make_state(b, w, n_total, v, [2, 7, n_total])
    q_before = state[2].clone()
    run(logits, state, backend, temperature=0.8, top_k=9, top_p=0.9)
    p = ref.sampling_probs(logits.transpose(0, 1).reshape(-1, v), 2.0, 0.8, 9, 0.9).view(w, b, v).transpose(0, 1)
    for row, n in enumerate([2, 7]):
        for j in range(w):
            slot = (n + j) % w
            torch.testing.assert_close(state[2][row, slot], p[row, j], atol=1e-6, rtol=1e-5)
            assert torch.equal(state[2][row, slot] == 0, p[row, j] == 0)
    assert torch.equal(state[2][2], q_before[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_logits_give_minus_one_and_a_rejection(backend):
    b, w, v = 2, 3, 9
    logits = torch.randn(2 * b, w, v, device=DEVICE)
    logits[0, 1, 4] = float("nan")  # image 0, column 1
    state = make_state(b, w, 10, v, 3)
    acc = run(logits, state, backend, temperature=1.0)
    assert state[0][0, 4] == -1 and not acc[0, 1]
    assert state[3][0, 0] <= 5 and (state[0][1, 3:6] >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_pass_and_the_offset_moves(backend):
    b, w, v = 4, 4, 30
    logits = torch.randn(2 * b, w, v, device=DEVICE)
    state = make_state(b, w, 12, v, 2)
    a, c = clone(state), clone(state)
    run(logits, a, backend, temperature=1.0, top_k=10)
    run(logits, c, backend, temperature=1.0, top_k=10)
    assert_states_equal(a, c)
    assert a[6].tolist() == [1234, 1, 0]
    run(logits, a, backend, temperature=1.0, top_k=10)
    assert a[6].tolist() == [1234, 2, 0]


# ---------------------------------------------------------------------------- distributions


def replicated(logits_one, state_one, n):
    """n copies of one image (logits [2, W, V], its state) in one batch."""
    logits = logits_one.repeat(n, 1, 1)
    tokens, point, q, progress, lengths, next_ids, rng = state_one
    return logits, [tokens.repeat(n, 1), point.repeat(n, 1), q.repeat(n, 1, 1), progress.repeat(n, 1),
                    lengths.repeat(n), next_ids.repeat(n, 1), rng]


CASES = grid([(1.0, 0, 1.0), (0.7, 4, 1.0)], [(1.5, 0, 0.8), (1.0, 5, 0.9)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature, top_k, top_p", CASES)
def test_outputs_are_draws_from_p_and_acceptance_is_min_p_q(backend, temperature, top_k, top_p):
    """The lemma, column by column. Column 0: drafts drawn from the stored q (each image its own),
    accepted at rate sum min(p, q). Column 1: a point-mass draft (one token, in or out of the
    filtered support), accepted at rate p(d). Each column's output (the accepted draft or the
    residual draw) must be distributed as p, and never outside the filter."""
    n, w, v = 20000 if FULL else 3000, 2, 9
    logits_one = torch.randn(2, w, v, device=DEVICE)
    state_one = make_state(1, w, 6, v, 2)
    p = ref.sampling_probs(logits_one.transpose(0, 1).reshape(-1, v), 2.0, temperature, top_k, top_p).double()
    state_one[1][0, 2:4] = torch.tensor([0, 1], dtype=torch.int8)
    q = state_one[2][0, 2 % w].double()
    for point_draft in (int(p[1].argmax()), int(p[1].argmin()))[:2 if FULL else 1]:
        state_one[0][0, 3] = point_draft
        logits, state = replicated(logits_one, state_one, n)
        g = torch.Generator().manual_seed(point_draft)
        state[0][:, 2] = torch.multinomial(q.cpu(), n, replacement=True, generator=g).to(DEVICE)
        accepted = run(logits, state, backend, temperature=temperature, top_k=top_k, top_p=top_p)
        assert (state[0][:, 3][accepted[:, 1]] == point_draft).all()  # kept, after a rejection at column 0 too
        for j, rate in enumerate([float(torch.minimum(p[0], q.to(p.device)).sum()), float(p[1, point_draft])]):
            counts = torch.bincount(state[0][:, 2 + j].cpu(), minlength=v).double()
            assert counts[p[j].cpu() == 0].sum() == 0, f"column {j}: a filtered-out token was output"
            assert chi_square_pvalue(counts, p[j].cpu()) > 1e-4, (j, counts.tolist(), p[j].tolist())
            hits = float(accepted[:, j].sum())
            sd = (n * rate * (1 - rate)) ** 0.5
            assert abs(hits - n * rate) <= 5 * sd + 1, f"column {j}: accepted {hits} of {n}, expected rate {rate}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_wrong_q_is_detected(backend):
    """The test above catches a q that is not the law the draft was drawn from: the same fixed
    draft verified as the point mass it is gives p-distributed outputs, verified against the
    stored q (the bug) it skews them far beyond the threshold."""
    n, w, v = 6000, 1, 6
    logits_one = torch.randn(2, w, v, device=DEVICE)
    state_one = make_state(1, w, 4, v, 2)
    p = ref.sampling_probs(logits_one[:, 0], 2.0).double()[0].cpu()
    state_one[0][0, 2] = int(p.argmin())
    pvalues = []
    for point in (1, 0):
        state_one[1][0, 2] = point
        logits, state = replicated(logits_one, state_one, n)
        run(logits, state, backend)
        pvalues.append(chi_square_pvalue(torch.bincount(state[0][:, 2].cpu(), minlength=v).double(), p))
    assert pvalues[0] > 1e-4 and pvalues[1] < 1e-6, pvalues


# ---------------------------------------------------------------------------- interface


def test_opcheck():
    b, w, v = 1, 2, 8
    logits = torch.randn(2 * b, w, v)
    for backend in BACKENDS:
        state = make_state(b, w, 8, v, 2, device="cpu")
        torch.library.opcheck(torch.ops.janus_fast.sjd_verify.default,
                              (logits, *state[:6], 2.0, 1.0, 0, 1.0, state[6], 2, backend))


def test_bad_inputs():
    b, w, v = 2, 3, 10
    logits = torch.randn(2 * b, w, v)
    state = make_state(b, w, 8, v, 2, device="cpu")
    with pytest.raises(ValueError, match="logits must be"):
        run(logits[:3], state, "reference")
    with pytest.raises(ValueError, match="tokens must be"):
        run(logits, [state[0][:, :3]] + state[1:], "reference")
    with pytest.raises(ValueError, match="q must be"):
        run(logits, state[:2] + [state[2][:, :, :5]] + state[3:], "reference")
    with pytest.raises(TypeError, match="point"):
        run(logits, state[:1] + [state[1].bool()] + state[2:], "reference")
    with pytest.raises(ValueError, match="lengths must be"):
        run(logits, state[:4] + [state[4][:3]] + state[5:], "reference")
    bad = clone(state)
    bad[3][0, 0] = 0
    with pytest.raises(ValueError, match="committed tokens"):
        run(logits, bad, "reference")
    with pytest.raises(ValueError, match="temperature"):
        run(logits, state, "reference", temperature=-1.0)
    with pytest.raises(TypeError, match="grid_width"):
        run(logits, state, "reference", grid_width=1.5)
    big = torch.randn(2, 1, 16385)
    with pytest.raises(ValueError, match="16384"):
        run(big, make_state(1, 1, 4, 16385, 1, device="cpu"), "triton")
