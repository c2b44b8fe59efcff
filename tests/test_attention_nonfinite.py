"""Contract 1 for attention, on every backend: NaN propagates as in SDPA's math path, a row with no
visible key is 0 (lse -inf), and positions a row cannot see are never read, even if NaN/inf.

Each case poisons one input and compares with the same backend on the clean input: the rows
that cannot see the poison must come out bit-identical, the rows that see it must be NaN exactly
where SDPA's maths puts NaN.
"""

from __future__ import annotations

import math

import pytest
import torch

from janus_fast import ops
from tests.helpers import DEVICE

BACKENDS = ["reference", "triton"]
NAN, INF = math.nan, math.inf


def _dense(backend, q, k, v, causal):
    return ops.flash_attention(q, k, v, causal=causal, backend=backend)


def _inputs(sq, sk, hq, hkv, d, dtype=torch.float32, device=DEVICE):
    return (torch.randn(1, sq, hq, d, dtype=dtype, device=device),
            torch.randn(1, sk, hkv, d, dtype=dtype, device=device),
            torch.randn(1, sk, hkv, d, dtype=dtype, device=device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", [NAN, INF, -INF])
def test_causally_hidden_keys_and_values_are_never_read(backend, poison):
    """Key/value j0 is in the future of rows i < j0 (causal, Sq == Sk): those rows ignore it."""
    q, k, v = _inputs(37, 37, 4, 2, 40)
    clean = _dense(backend, q, k, v, True)
    j0 = 21
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[0, j0, 1] = poison
    v_bad[0, j0, 1] = poison
    for kk, vv in ((k_bad, v), (k, v_bad), (k_bad, v_bad)):
        out = _dense(backend, q, kk, vv, True)
        assert torch.equal(out[:, :j0], clean[:, :j0]), "rows that cannot see key j0 changed"
        assert torch.equal(out[:, :, :2], clean[:, :, :2]), "heads of another kv group changed"
        assert not out[:, j0:, 2:].isfinite().any(), "rows that see a non-finite key/value must not be finite"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_visible_nan_propagates_like_sdpa(backend, causal):
    """NaN in a q row: that row is NaN. NaN in visible k: every row that sees it is NaN. NaN in
    one element v[j0, d0]: only column d0 of the rows that see j0 is NaN."""
    q, k, v = _inputs(19, 19, 2, 1, 32)
    clean = _dense(backend, q, k, v, causal)
    i0, j0, d0 = 5, 11, 7
    sees = torch.arange(19, device=DEVICE) >= j0 if causal else torch.ones(19, dtype=torch.bool, device=DEVICE)

    q_bad = q.clone()
    q_bad[0, i0, 1, 3] = NAN
    out = _dense(backend, q_bad, k, v, causal)
    assert out[0, i0, 1].isnan().all()
    others = torch.ones_like(out, dtype=torch.bool)
    others[0, i0, 1] = False
    assert torch.equal(out[others], clean[others])

    k_bad = k.clone()
    k_bad[0, j0, 0, 0] = NAN
    out = _dense(backend, q, k_bad, v, causal)
    assert out[0, sees].isnan().all() and torch.equal(out[0, ~sees], clean[0, ~sees])

    v_bad = v.clone()
    v_bad[0, j0, 0, d0] = NAN
    out = _dense(backend, q, k, v_bad, causal)
    expected_nan = torch.zeros_like(out, dtype=torch.bool)
    expected_nan[0, sees, :, d0] = True
    assert torch.equal(out.isnan(), expected_nan)
    assert torch.equal(out[~expected_nan], clean[~expected_nan])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_a_visible_key_are_zero_even_with_nan_keys(backend):
    """Causal Sq > Sk: the first Sq - Sk rows see no key: out 0 whatever the cache holds."""
    q, k, v = _inputs(30, 12, 2, 2, 32)
    k[0, 3], v[0, 5] = NAN, NAN
    out = _dense(backend, q, k, v, True)
    assert torch.equal(out[:, :18], torch.zeros_like(out[:, :18]))
    # query row 18 sees keys 0..0 only, row 20 sees 0..2: no poison; row 21 sees key 3
    assert out[:, 18:21].isfinite().all() and out[:, 21:].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_never_reads_another_sequence(backend):
    """Sequence 1's keys and values are all NaN: sequences 0 and 2 are unchanged, sequence 1 is NaN,
    an empty-key sequence is 0."""
    lq, lk = [7, 5, 9, 4], [11, 6, 9, 0]
    cu_q = torch.tensor([0, 7, 12, 21, 25], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 11, 17, 26, 26], dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(lq), 4, 32, device=DEVICE)
    k, v = torch.randn(sum(lk), 2, 32, device=DEVICE), torch.randn(sum(lk), 2, 32, device=DEVICE)

    def run(kk, vv, causal):
        return ops.varlen_attention(q, kk, vv, cu_q, cu_k, 9, 11, causal=causal, backend=backend)

    for causal in (False, True):
        clean = run(k, v, causal)
        k_bad, v_bad = k.clone(), v.clone()
        k_bad[11:17], v_bad[11:17] = NAN, INF
        out = run(k_bad, v_bad, causal)
        assert torch.equal(out[:7], clean[:7]) and torch.equal(out[12:], clean[12:])
        assert out[7:12].isnan().all()
        assert torch.equal(out[21:], torch.zeros_like(out[21:]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s_max", [40, 300])  # 300: several splits on the interpreter's plan
def test_decode_never_reads_past_cache_seqlens(backend, s_max):
    """Garbage (NaN, inf) past cache_seqlens leaves the output bit-identical; length 0 gives 0;
    a NaN inside the cache propagates to the heads of its kv group."""
    b, hq, hkv, d = 4, 8, 2, 64
    q = torch.randn(b, hq, d, device=DEVICE)
    kc, vc = torch.randn(b, s_max, hkv, d, device=DEVICE), torch.randn(b, s_max, hkv, d, device=DEVICE)
    lengths = torch.tensor([0, 1, s_max // 2 + 3, s_max], dtype=torch.int32, device=DEVICE)
    clean = ops.decode_attention(q, kc, vc, lengths, backend=backend)
    kg, vg = kc.clone(), vc.clone()
    for row, n in enumerate(lengths.tolist()):
        kg[row, n:], vg[row, n:] = NAN, INF
    out = ops.decode_attention(q, kg, vg, lengths, backend=backend)
    assert torch.equal(out, clean) and torch.equal(out[0], torch.zeros_like(out[0]))

    j0 = s_max // 2
    vg[2, j0, 1, 5] = NAN  # inside row 2's cache, kv head 1 = query heads 4..7
    out = ops.decode_attention(q, kg, vg, lengths, backend=backend)
    expected_nan = torch.zeros_like(out, dtype=torch.bool)
    expected_nan[2, 4:, 5] = True
    assert torch.equal(out.isnan(), expected_nan)
    kg[2, j0, 0, 0] = NAN  # a NaN score for query heads 0..3 of row 2
    out = ops.decode_attention(q, kg, vg, lengths, backend=backend)
    assert out[2, :4].isnan().all() and torch.equal(out[[0, 1, 3]], clean[[0, 1, 3]])
