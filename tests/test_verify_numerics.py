"""Fail-closed numerics with validate=False (the hot path): a drafted token with q(x) = 0, NaN inputs,
float16 probabilities.

A draft token with q(x) = 0 cannot come from a real sample, but float16 draft probabilities produce it
(values below 6e-8 round to 0). The right answer is the limit q(x) -> 0+, where the ratio p/q is
infinite and the block weight is 1. The closed form log w = log R - max log R gives inf - inf = NaN
there, and the old "denominator <= 0 -> h = 1" rule turned that NaN into an acceptance of the next
draft token without looking at p. ``closed_form_levels`` below is that planted bug; the tests must
fail on it.
"""
from __future__ import annotations

import pytest
import torch

from hsd.verify import api, blockwise, exact, verify
from hsd.verify.common import Levels, default_start, draft_token_probs, token_probs

METHODS = ["tokenwise", "blockwise", "hsd"]


def closed_form_levels(draft_tokens, draft_probs, target_probs, start=None):
    """The pre-fix block verification: closed-form log weights and den <= 0 (or NaN) -> h = 1."""
    p_tok = token_probs(target_probs, draft_tokens)
    q_tok = draft_token_probs(draft_probs, draft_tokens, target_probs)
    log_ratio = p_tok.log() - q_tok.log()
    log_r = torch.cat([torch.zeros_like(log_ratio[:, :1]), log_ratio.cumsum(-1)], dim=-1)
    log_w = log_r - log_r.cummax(-1).values
    w = log_w.exp()
    s = blockwise.level_masses(w, draft_tokens, draft_probs, target_probs, p_tok)
    den = s + 1.0 - w[:, 1:-1]
    h_inner = torch.where(den > 0, s / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(s))
    h = torch.cat([h_inner.clamp(0.0, 1.0), w[:, -1:]], dim=-1)
    return Levels(h, log_w, False, p_tok, q_tok, default_start(draft_tokens, start))


def q_zero_case(b=32, k=3, v=50, seed=0, dtype=torch.float32):
    """q(x_1) = 0 on every row (as an fp16 flush would do); on even rows also p_2(x_2) = 0, so that the
    second draft token must never be accepted there."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(b, k + 1, v, generator=g, dtype=torch.float64)
    p = logits.softmax(-1)
    q = (logits[:, :k] + 0.5 * torch.randn(b, k, v, generator=g, dtype=torch.float64)).softmax(-1)
    tokens = torch.multinomial(q.reshape(-1, v), 1, generator=g).view(b, k)
    rows = torch.arange(b)
    q[rows, 0, tokens[:, 0]] = 0.0
    even = rows[::2]
    p[even, 1, tokens[even, 1]] = 0.0
    p = p / p.sum(-1, keepdim=True)
    coins, u = torch.rand(b, k, generator=g), torch.rand(b, generator=g)
    return tokens, q.to(dtype), p.to(dtype), (coins, u), even


def check_no_acceptance_beyond_p(method, backend="torch"):
    """The assertion of this file: nothing with p = 0 is accepted or emitted, and q(x) = 0 gives what the
    limit q(x) = 1e-30 gives, draw for draw."""
    tokens, q, p, uniforms, even = q_zero_case()
    res = verify(tokens, q, p, method=method, backend=backend, uniforms=uniforms, validate=False)
    assert bool((res.num_accepted[even] <= 1).all()), (
        f"{method}: accepted a draft token with p = 0 after a q = 0 token: {res.num_accepted[even].tolist()}")
    rows = torch.arange(tokens.shape[0])
    assert bool((p[rows, res.num_accepted, res.next_token] > 0).all()), "emitted a token with p = 0"
    limit = q.clone()
    limit[rows, 0, tokens[:, 0]] = 1e-30
    ref = verify(tokens, limit, p, method=method, backend=backend, uniforms=uniforms, validate=False)
    assert torch.equal(res.num_accepted, ref.num_accepted) and torch.equal(res.next_token, ref.next_token)
    return res


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("method", METHODS)
def test_q_zero_with_validation_off_accepts_nothing_beyond_p(method, backend):
    res = check_no_acceptance_beyond_p(method, backend)
    assert 0 < int(res.num_accepted.sum()) < 3 * 32  # both outcomes occur: the case is exercised


def test_planted_closed_form_fails_the_q_zero_check():
    """The pre-fix builder accepts x_2 without consulting p_2 on most of these rows."""
    tokens, q, p, uniforms, even = q_zero_case()
    res = verify(tokens, q, p, method=closed_form_levels, uniforms=uniforms, validate=False)
    assert int((res.num_accepted[even] >= 2).sum()) > 8
    with pytest.raises(AssertionError, match="accepted a draft token with p = 0"):
        check_no_acceptance_beyond_p(closed_form_levels)


@pytest.mark.parametrize("method", METHODS)
def test_q_zero_exact_law_is_the_limit(method):
    """Exactly (float64, no sampling): the decision law at q(x_1) = 0 is the limit q(x_1) -> 0+, through
    the law functions and through the sampler itself."""
    tokens, q, p, _, _ = q_zero_case(b=6, k=3, v=5, seed=2, dtype=torch.float64)
    limit = q.clone()
    rows = torch.arange(6)
    limit[rows, 0, tokens[:, 0]] = 1e-300
    for law in (api.decision_law, exact.sampler_decision_law):
        got, want = law(tokens, q, p, method), law(tokens, limit, p, method)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.isfinite(a).all()
            assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("method", ["blockwise", "hsd"])
def test_nan_fails_closed(method):
    """A NaN target probability on a draft token (or 0 * inf after an impossible prefix) rejects its level."""
    tokens, q, p, uniforms, _ = q_zero_case(seed=1)
    rows = torch.arange(32)
    p_nan = p.clone()
    p_nan[rows, 1, tokens[:, 1]] = float("nan")
    res = verify(tokens, q, p_nan, method=method, uniforms=uniforms, validate=False)
    assert bool((res.num_accepted <= 1).all())
    # p_1(x_1) = 0 then q_2(x_2) = 0: -inf + inf inside the weight recursion -> w = 0, never accepted.
    p0, q0 = p.clone(), q.clone()
    p0[rows, 0, tokens[:, 0]] = 0.0
    q0[rows, 1, tokens[:, 1]] = 0.0
    lv = api.levels_fn(method)(tokens, q0.float(), p0.float())
    assert not torch.isnan(lv.h).any() and not torch.isnan(lv.log_w).any()
    res = verify(tokens, q0, p0, method=method, uniforms=(torch.zeros(32, 3), uniforms[1]), validate=False)
    assert bool((res.num_accepted == 0).all())


def test_log_weights_recursion_limits():
    inf = float("inf")
    lr = torch.tensor([[inf, -1.0, 0.5], [-inf, inf, 2.0], [float("nan"), 0.0, 0.0], [0.7, -0.2, -0.9]])
    lw = blockwise.log_weights(lr)
    assert lw[0].tolist() == [0.0, 0.0, -1.0, -0.5]
    assert lw[1].tolist() == [0.0, -inf, -inf, -inf]
    assert lw[2].tolist() == [0.0, -inf, -inf, -inf]
    # Finite ratios: the closed form log R_k - max_{j<=k} log R_j.
    log_r = torch.cat([torch.zeros(1), lr[3].cumsum(0)])
    assert torch.allclose(lw[3], log_r - log_r.cummax(0).values)


def test_float16_probabilities_are_refused():
    tokens, q, p, uniforms, _ = q_zero_case()
    for backend in ("torch", "triton"):
        for validate in (True, False):
            with pytest.raises(ValueError, match="float16"):
                verify(tokens, q.half(), p.float(), backend=backend, uniforms=uniforms, validate=validate)
            with pytest.raises(ValueError, match="float16"):
                verify(tokens, None, p.half(), backend=backend, uniforms=uniforms, validate=validate)
