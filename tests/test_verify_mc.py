"""Monte Carlo chi-square of the real sampling path (torch backend, drafts sampled from q, torch
generators with fixed seeds). The sample size is checked against the exact non-centrality of the
uncapped recipe (N * nc >= 10 sqrt(2 dof): the expected excess chi-square N * nc is ten standard deviations of a
chi-square with dof degrees of freedom) and that recipe must fail."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from hsd.verify import api, exact, montecarlo, verify, verify_multi
from tests.test_verify_exact import uncapped_levels
from tests.tree_plants import LOSSY_TRANSCRIPTION

N = 20000
INSTANCES = [(3, 2, 2), (2, 3, 2)]  # (V, K, seed): the uncapped recipe is clearly biased on both
P_MIN = 1e-3  # lossless methods: p-value above this (fixed seeds, so the outcome is deterministic)


def p_value(inst, sequences) -> tuple[float, float]:
    chi2, dof, z = montecarlo.chi_square(inst, sequences)
    return float(stats.chi2.sf(chi2, dof)), z


def noncentrality(inst, law) -> float:
    target = exact.target_joint(inst)
    return float(((law - target) ** 2 / target).sum())


def run_single(inst, method, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = montecarlo.sample_chains(inst, N, gen)
    q, p = exact.chain_rows(inst, tokens)
    res = verify(tokens, q.float(), p.float(), method=method, generator=gen)
    return montecarlo.complete(inst, tokens, res.num_accepted, res.next_token, gen), res


def run_multi(inst, chains, method, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.stack([montecarlo.sample_chains(inst, N, gen) for _ in range(chains)], dim=1)
    q, p = exact.chain_rows(inst, tokens.view(-1, inst.depth))
    res = verify_multi(tokens, q.float().view(N, chains, inst.depth, -1),
                       p.float().view(N, chains, inst.depth + 1, -1), method=method, generator=gen)
    prefixes = tokens[torch.arange(N), res.chain]
    return montecarlo.complete(inst, prefixes, res.num_accepted, res.next_token, gen), res


@pytest.mark.parametrize("vocab,depth,seed", INSTANCES)
def test_sample_size_detects_uncapped_bias(vocab, depth, seed):
    inst = exact.random_instance(vocab, depth, seed)
    dof = vocab ** (depth + 1) - 1
    assert N * noncentrality(inst, exact.single_chain_law(inst, uncapped_levels)[0]) >= 10 * math.sqrt(2 * dof)
    assert N * noncentrality(inst, exact.multi_chain_law(inst, 2, LOSSY_TRANSCRIPTION)[0]) >= 10 * math.sqrt(2 * dof)


@pytest.mark.parametrize("vocab,depth,seed", INSTANCES)
@pytest.mark.parametrize("method", ["tokenwise", "blockwise", "hsd"])
def test_chi_square_single_chain(vocab, depth, seed, method):
    inst = exact.random_instance(vocab, depth, seed)
    seq, res = run_single(inst, method, seed=10 + seed)
    pv, z = p_value(inst, seq)
    assert pv > P_MIN, f"{method}: p = {pv:.2g}, z = {z:.1f}"
    # The sampled acceptance matches the exact expectation (5 standard errors).
    _, expected = exact.single_chain_law(inst, method)
    mean = res.num_accepted.double().mean()
    assert abs(float(mean) - expected) < 5 * float(res.num_accepted.double().std()) / math.sqrt(N)


@pytest.mark.parametrize("vocab,depth,seed", INSTANCES)
def test_chi_square_negative_control_fails(vocab, depth, seed):
    inst = exact.random_instance(vocab, depth, seed)
    seq, _ = run_single(inst, uncapped_levels, seed=10 + seed)
    pv, z = p_value(inst, seq)
    assert pv < 1e-6 and z > 10, f"uncapped recipe not detected: p = {pv:.2g}, z = {z:.1f}"


@pytest.mark.parametrize("method", ["tokenwise", "hsd"])
def test_chi_square_multi(method):
    inst = exact.random_instance(3, 2, 2)
    seq, res = run_multi(inst, 2, method, seed=31)
    pv, z = p_value(inst, seq)
    assert pv > P_MIN, f"verify_multi {method}: p = {pv:.2g}, z = {z:.1f}"
    _, expected = exact.multi_chain_law(inst, 2, method)
    mean = res.num_accepted.double().mean()
    assert abs(float(mean) - expected) < 5 * float(res.num_accepted.double().std()) / math.sqrt(N)


def test_chi_square_multi_negative_control_fails():
    inst = exact.random_instance(3, 2, 2)
    seq, _ = run_multi(inst, 2, LOSSY_TRANSCRIPTION, seed=31)
    pv, z = p_value(inst, seq)
    assert pv < 1e-6 and z > 10, f"lossy tree update not detected: p = {pv:.2g}, z = {z:.1f}"


# V = 4, K = 3: an instance where the residual weight w_tau < 1 matters (with V = 2 or 3 the planted
# residual-weight bug moves little or no mass). Seed chosen for a large bias of that bug: N = 20000
# is above the sizing rule for it, and the planted sampler must fail at the same N and seed.
V4_INSTANCE = (4, 3, 4)


def planted_residual_weight_law(inst, method):
    from tests.test_verify_exact import wrong_residual_at

    original = api.residual_at
    api.residual_at = wrong_residual_at
    try:
        return exact.single_chain_law(inst, method, sampler=True)[0]
    finally:
        api.residual_at = original


@pytest.mark.parametrize("method", ["tokenwise", "blockwise", "hsd"])
def test_chi_square_v4_instance(monkeypatch, method):
    vocab, depth, seed = V4_INSTANCE
    inst = exact.random_instance(vocab, depth, seed)
    dof = vocab ** (depth + 1) - 1
    seq, _ = run_single(inst, method, seed=40)
    pv, z = p_value(inst, seq)
    assert pv > P_MIN, f"{method}: p = {pv:.2g}, z = {z:.1f}"
    if method == "tokenwise":  # residual weight is 1 anyway
        return
    assert N * noncentrality(inst, planted_residual_weight_law(inst, method)) >= 10 * math.sqrt(2 * dof)
    from tests.test_verify_exact import wrong_residual_at

    monkeypatch.setattr(api, "residual_at", wrong_residual_at)
    seq, _ = run_single(inst, method, seed=40)
    pv, z = p_value(inst, seq)
    assert pv < 1e-6 and z > 10, f"planted residual weight not detected: p = {pv:.2g}, z = {z:.1f}"
