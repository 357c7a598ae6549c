"""Exact-enumeration losslessness of hsd.verify (no sampling), reference numbers, and the negative
control: the official HSD recipe (uncapped final test min(1, R_K)) must be rejected by the same check.

Two exact laws are checked: the law functions' (``decision_law``) and the sampler's own
(``sampler_decision_law``: ``verify`` run on an enumeration of its uniforms). The second one catches
bugs in the sampling code that the first cannot see; planted examples below.
"""
from __future__ import annotations

import pytest
import torch

from hsd.verify import api, blockwise, exact
from hsd.verify.common import before_start, default_start, residual
from tests.tree_plants import LOSSY_TRANSCRIPTION

TOL = 1e-9
SINGLE_CONFIGS = [(2, 2), (3, 2), (5, 2), (3, 3), (4, 3), (2, 4), (3, 4), (5, 4)]
SEEDS = [0, 1, 2]
MULTI_CONFIGS = [(2, 2, 2), (3, 2, 2), (4, 2, 2), (2, 3, 2), (3, 3, 2), (2, 2, 3), (3, 2, 3), (2, 3, 3)]
METHODS = ["tokenwise", "blockwise", "hsd"]


def uncapped_levels(draft_tokens, draft_probs, target_probs, start=None):
    """The official HSD code's recipe: block verification levels with the final test min(1, R_K)
    instead of the capped w_K = R_K / max_{j<=K} R_j. Lossy; exists only here, as a negative control."""
    lv = blockwise.levels(draft_tokens, draft_probs, target_probs, start)
    fixed = before_start(default_start(draft_tokens, start), draft_tokens.shape[1])
    log_ratio = torch.where(fixed, torch.zeros_like(lv.p_tok), lv.p_tok.log() - lv.q_tok.log())
    h = lv.h.clone()
    h[:, -1] = log_ratio.sum(-1).exp().clamp(max=1.0)
    return lv._replace(h=h)


def check_lossless(law: torch.Tensor, inst: exact.TreeInstance, tol: float = TOL) -> float:
    """The losslessness assertion used for every verifier (and the negative control)."""
    target = exact.target_joint(inst)
    assert abs(float(law.sum()) - 1.0) < tol, "output law does not sum to 1"
    tv = exact.total_variation(law, target)
    assert tv < tol, f"not lossless: TV to the target joint = {tv:.3g}"
    return tv


def rises_then_falls(inst: exact.TreeInstance) -> bool:
    """Some draft chain has a prefix ratio R_j > max(1, R_K) (j < K): where the uncapped test is wrong."""
    tokens = exact.all_sequences(inst.vocab, inst.depth)
    q, p = exact.chain_rows(inst, tokens)
    ratio = (p[:, :-1].gather(-1, tokens.unsqueeze(-1)) / q.gather(-1, tokens.unsqueeze(-1))).squeeze(-1)
    log_r = ratio.log().cumsum(-1)
    peak = log_r[:, :-1].max(-1).values
    return bool((peak > log_r[:, -1].clamp(min=0.0) + 1e-6).any())


def instance(vocab: int, depth: int, seed: int) -> exact.TreeInstance:
    # Seeds chosen so that every instance has a prefix ratio that rises above 1 and falls again.
    return exact.random_instance(vocab, depth, seed=100 * vocab + 10 * depth + seed + 7)


@pytest.mark.parametrize("vocab,depth", SINGLE_CONFIGS)
@pytest.mark.parametrize("seed", SEEDS)
def test_single_chain_lossless_and_negative_control(vocab, depth, seed):
    inst = instance(vocab, depth, seed)
    accepted = {}
    for method in METHODS:
        law, accepted[method] = exact.single_chain_law(inst, method)
        check_lossless(law, inst)
    # Block verification is optimal among lossless verifiers, and HSD has the same law.
    assert accepted["blockwise"] == pytest.approx(accepted["hsd"], abs=1e-12)
    assert accepted["blockwise"] >= accepted["tokenwise"] - 1e-12
    # Negative control: the same check on the same instance rejects the uncapped recipe.
    assert rises_then_falls(inst), "instance must exercise the case the uncapped test gets wrong"
    law, _ = exact.single_chain_law(inst, uncapped_levels)
    assert exact.total_variation(law, exact.target_joint(inst)) > 1e-3
    with pytest.raises(AssertionError, match="not lossless"):
        check_lossless(law, inst)


def test_negative_control_toy_counterexample():
    """Toy, K = 2: the uncapped recipe emits (B, A) with probability 1/3 instead of 2/9."""
    inst = exact.fixed_instance([1 / 3, 2 / 3], [2 / 3, 1 / 3], 2)
    bad, _ = exact.single_chain_law(inst, uncapped_levels)
    good, _ = exact.single_chain_law(inst, "hsd")
    # Marginal of the first two tokens (y1, y2) = (B, A) = (1, 0) in the completed law over V^3.
    assert float(bad.view(2, 2, 2)[1, 0].sum()) == pytest.approx(1 / 3, abs=1e-12)
    assert float(good.view(2, 2, 2)[1, 0].sum()) == pytest.approx(2 / 9, abs=1e-12)
    with pytest.raises(AssertionError):
        check_lossless(bad, inst)


TOY_EXACT_X9 = {  # 9 * E[accepted] for K = 1..5 as exact fractions (docs/verification.md)
    "tokenwise": [6, 10, 114 / 9, 1170 / 81, 11394 / 729],
    "blockwise": [6, 11, 15, 166 / 9, 64 / 3],
}
TOY_EXACT_X9["hsd"] = TOY_EXACT_X9["blockwise"]
TOY_ISSUE_TABLE = {  # the rounded values printed in issue 2
    "tokenwise": [6, 10, 12.667, 14.444, 15.630],
    "blockwise": [6, 11, 15, 18.444, 21.333],
}
TOY_ISSUE_TABLE["hsd"] = TOY_ISSUE_TABLE["blockwise"]


@pytest.mark.parametrize("method", METHODS)
def test_toy_reference_numbers(method):
    beta = 2 / 3
    measured = []
    for k in range(1, 6):
        inst = exact.fixed_instance([1 / 3, 2 / 3], [2 / 3, 1 / 3], k)
        law, acc = exact.single_chain_law(inst, method)
        check_lossless(law, inst)
        assert 9 * acc == pytest.approx(TOY_EXACT_X9[method][k - 1], abs=1e-9)
        if method == "tokenwise":  # E[acc] = beta + ... + beta^K for a context-free pair
            assert acc == pytest.approx(sum(beta**j for j in range(1, k + 1)), abs=1e-12)
        measured.append(round(9 * acc, 3))
    assert measured == pytest.approx(TOY_ISSUE_TABLE[method], abs=1e-9)


@pytest.mark.parametrize("vocab,depth,chains", MULTI_CONFIGS)
def test_multi_lossless_and_not_worse_than_tokenwise(vocab, depth, chains):
    gains = []
    for seed in range(2):
        inst = exact.random_instance(vocab, depth, seed=1000 + 100 * vocab + 10 * depth + chains + seed)
        acc = {}
        for method in ("tokenwise", "hsd"):
            law, acc[method] = exact.multi_chain_law(inst, chains, method)
            check_lossless(law, inst)
        gains.append(acc["hsd"] - acc["tokenwise"])
        # More chains never hurt: M chains accept at least as much as the first one alone.
        assert acc["hsd"] >= exact.single_chain_law(inst, "hsd")[1] - 1e-12
    assert sum(gains) / len(gains) >= 0.0


def test_multi_hsd_beats_tokenwise_on_average():
    """Averaged over random instances, recursive BV accepts strictly more than recursive RS."""
    gains = []
    for seed in range(6):
        inst = exact.random_instance(3, 2, seed=5000 + seed)
        gains.append(exact.multi_chain_law(inst, 2, "hsd")[1] - exact.multi_chain_law(inst, 2, "tokenwise")[1])
    assert sum(gains) / len(gains) > 1e-3


def test_multi_with_one_chain_equals_single_chain():
    inst = exact.random_instance(3, 3, seed=77)
    for method in ("tokenwise", "hsd"):
        multi, acc_multi = exact.multi_chain_law(inst, 1, method)
        single, acc_single = exact.single_chain_law(inst, method)
        assert exact.total_variation(multi, single) < 1e-12
        assert acc_multi == pytest.approx(acc_single, abs=1e-12)


def test_multi_negative_control_is_rejected():
    """verify_multi runs the tree verifier; its negative control is the lossy tree update rule."""
    inst = exact.random_instance(3, 2, seed=4242)
    law, _ = exact.multi_chain_law(inst, 2, LOSSY_TRANSCRIPTION)
    assert exact.total_variation(law, exact.target_joint(inst)) > 1e-3
    with pytest.raises(AssertionError, match="not lossless"):
        check_lossless(law, inst)


@pytest.mark.parametrize("keep_p,keep_q", [(2, 4), (4, 2), (2, 2), (1, 3)])
def test_truncated_supports_lossless(keep_p, keep_q):
    """Top-k on p and/or q: zero target probability on draft tokens and zero draft mass off-support."""
    inst = exact.truncated(exact.random_instance(4, 3, seed=11), keep_p, keep_q)
    for method in METHODS:
        law, _ = exact.single_chain_law(inst, method)
        assert torch.isfinite(law).all()
        check_lossless(law, inst)
    for method in ("tokenwise", "hsd"):
        small = exact.truncated(exact.random_instance(3, 2, seed=12), min(keep_p, 3), min(keep_q, 3))
        check_lossless(exact.multi_chain_law(small, 2, method)[0], small)


def test_draft_equals_target_accepts_everything():
    """p = q: w = 1 and zero denominators (h = 1), no NaN, every draft token accepted."""
    inst = exact.draft_equals_target(exact.random_instance(3, 3, seed=5))
    for method in METHODS:
        law, acc = exact.single_chain_law(inst, method)
        check_lossless(law, inst)
        assert acc == pytest.approx(3.0, abs=1e-12)
    law, acc = exact.multi_chain_law(inst, 2, "hsd")
    check_lossless(law, inst)
    assert acc == pytest.approx(3.0, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_point_mass_drafts_lossless(seed):
    """q = one-hot of a fixed chain (EAGLE-style deterministic draft): closed forms, still lossless,
    and block verification = HSD = token-wise in law here (docs/verification.md, point-mass drafts)."""
    inst = exact.random_instance(4, 3, seed=900 + seed)
    chain = torch.tensor([seed % 4, (seed + 1) % 4, (seed + 3) % 4])
    results = {}
    for method in METHODS:
        law, acc = exact.point_mass_chain_law(inst, chain, method)
        check_lossless(law, inst)
        explicit, acc_explicit = exact.point_mass_chain_law(inst, chain, method, one_hot_rows=True)
        assert exact.total_variation(law, explicit) < 1e-12
        assert acc == pytest.approx(acc_explicit, abs=1e-12)
        results[method] = acc
    # With q = 1, tokenwise accepts k tokens with prob P_k - P_{k+1}, and BV cannot do better.
    assert results["blockwise"] == pytest.approx(results["tokenwise"], abs=1e-12)
    assert results["hsd"] == pytest.approx(results["tokenwise"], abs=1e-12)


# ---------------------------------------------------------------- the sampler's own exact law


@pytest.mark.parametrize("vocab,depth", [(2, 2), (3, 2), (5, 2), (3, 3), (4, 3), (2, 4)])
def test_sampler_exact_law_is_lossless(vocab, depth):
    """verify() itself, run on every success pattern of its coins and every inverse-CDF interval of u,
    reproduces the target joint exactly (and its E[accepted] equals the law functions')."""
    inst = instance(vocab, depth, 0)
    for method in METHODS:
        law, acc = exact.single_chain_law(inst, method, sampler=True)
        check_lossless(law, inst)
        assert acc == pytest.approx(exact.single_chain_law(inst, method)[1], abs=1e-12)
    law, _ = exact.single_chain_law(inst, uncapped_levels, sampler=True)
    with pytest.raises(AssertionError, match="not lossless"):
        check_lossless(law, inst)


@pytest.mark.parametrize("keep_p,keep_q", [(2, 4), (1, 3)])
def test_sampler_exact_law_truncated_and_point_mass(keep_p, keep_q):
    inst = exact.truncated(exact.random_instance(4, 3, seed=11), keep_p, keep_q)
    for method in METHODS:
        check_lossless(exact.single_chain_law(inst, method, sampler=True)[0], inst)
    inst = exact.random_instance(4, 3, seed=901)
    chain = torch.tensor([[1, 2, 0]])
    _, p = exact.chain_rows(inst, chain)
    for method in METHODS:
        joint = exact.sampler_decision_law(chain, None, p, method)
        tau_law, rows = api.decision_law(chain, None, p, method)
        assert torch.allclose(joint, tau_law.unsqueeze(-1) * rows, atol=1e-12)


def wrong_residual_at(levels, tokens, draft_probs, target_probs, tau):
    """Planted bug (review plant G): residual weight w_tau forced to 1, i.e. (p - q)_+ instead of
    (w_tau p - q)_+ at the chosen level. The law functions never call this, so only the sampler's law sees it."""
    k = tokens.shape[-1]
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    pos = tau.clamp(max=k - 1)
    p_row = target_probs[rows, tau]
    q_row = None if draft_probs is None else draft_probs[rows, pos]
    r = residual(torch.ones_like(tau, dtype=p_row.dtype), p_row, q_row, tokens[rows, pos], tau == k)
    return r, p_row


def first_failure_select_tau(levels, coins):
    """Planted bug (review plant E): block methods stop at the first failed level instead of taking the
    last successful one."""
    ok = (coins.to(levels.h.dtype) <= levels.h) & (levels.h > 0)
    return ok.long().cumprod(-1).sum(-1)


@pytest.mark.parametrize("plant", [wrong_residual_at, first_failure_select_tau], ids=["residual_weight", "first_failure"])
@pytest.mark.parametrize("vocab,depth", [(4, 3), (5, 2)])
def test_sampler_exact_law_catches_planted_sampler_bugs(monkeypatch, plant, vocab, depth):
    inst = instance(vocab, depth, 1)
    for method in ("blockwise", "hsd"):
        with monkeypatch.context() as m:
            m.setattr(api, plant.__name__.replace("wrong_", "").replace("first_failure_", ""), plant)
            law, _ = exact.single_chain_law(inst, method, sampler=True)
            # The law functions do not run the sampler: they cannot see the plant.
            check_lossless(exact.single_chain_law(inst, method)[0], inst)
        assert exact.total_variation(law, exact.target_joint(inst)) > 1e-3
        with pytest.raises(AssertionError, match="not lossless"):
            check_lossless(law, inst)
