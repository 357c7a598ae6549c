"""hsd.decode.sampling: the one logits -> processed probabilities function, and the draw."""
from __future__ import annotations

import pytest
import torch
from scipy import stats

from hsd.decode.sampling import SamplingParams, process_logits, sample


def test_greedy_is_one_hot_at_first_argmax():
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.0, -1.0, -5.0, -0.5]])
    p = process_logits(logits, temperature=0.0)
    assert torch.equal(p, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))


def test_temperature_softmax_and_dtype():
    logits = torch.randn(3, 7, dtype=torch.float64)
    p = process_logits(logits, temperature=0.7)
    assert p.dtype == torch.float32
    assert torch.allclose(p, torch.softmax(logits.float() / 0.7, -1), atol=1e-7)


def test_top_k_keeps_k_largest_and_renormalises():
    logits = torch.tensor([[0.0, 2.0, 1.0, 3.0, -1.0]])
    p = process_logits(logits, temperature=1.0, top_k=2)
    ref = torch.softmax(torch.tensor([3.0, 2.0]), 0)
    assert torch.allclose(p[0, [3, 1]], ref) and p[0, [0, 2, 4]].eq(0).all()


def test_top_p_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: keep the first two
    p = process_logits(logits, top_p=0.7)
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # exactly reaching the mass keeps no more tokens
    p = process_logits(logits, top_p=0.8)
    assert p[0, 2:].eq(0).all()
    # the most likely token is always kept
    p = process_logits(logits, top_p=0.01)
    assert torch.equal(p, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_minus_inf_outside_support_gets_zero():
    logits = torch.tensor([[float("-inf"), 0.0, 1.0, float("-inf")]])
    for kw in ({}, {"top_k": 3}, {"top_p": 0.9}):
        p = process_logits(logits, **kw)
        assert p[0, [0, 3]].eq(0).all() and torch.isclose(p.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(temperature=float("inf"))])
def test_bad_params_name_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad)
    with pytest.raises(ValueError, match=field):
        process_logits(torch.zeros(1, 3), **bad)


def test_sample_never_returns_zero_mass_and_matches_law():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0])
    draws = sample(probs.expand(20000, -1), generator=g)
    counts = torch.bincount(draws, minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    res = stats.chisquare(counts[[1, 3, 4]].numpy(), (probs[[1, 3, 4]] * 20000).numpy())
    assert res.pvalue > 1e-3
    # the same check fails on a wrong law (sensitivity at this N)
    wrong = stats.chisquare(counts[[1, 3, 4]].numpy(), (torch.tensor([0.25, 0.45, 0.3]) * 20000).numpy())
    assert wrong.pvalue < 1e-6


def test_sample_greedy_rows_and_reproducible():
    p = process_logits(torch.randn(5, 11), temperature=0.0)
    assert torch.equal(sample(p, torch.Generator().manual_seed(1)), p.argmax(-1))
    q = process_logits(torch.randn(4, 9), temperature=1.0)
    a = sample(q, torch.Generator().manual_seed(3))
    b = sample(q, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (4,)
    # rounding can put the draw past the end: the last token with mass is returned
    edge = torch.tensor([[0.5, 0.5 - 1e-7, 0.0]])
    assert int(sample(edge, torch.Generator().manual_seed(0))) in (0, 1)
