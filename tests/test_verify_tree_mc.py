"""The real sampling path of verify_tree: chi-square of trees drawn by the drafting schemes and
verified with generator-drawn uniforms (sample size checked against the exact non-centrality of a
planted variant, which must fail at the same N), and draw-for-draw equality with verify on chains."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from hsd.verify import exact, montecarlo, verify, verify_multi, verify_tree
from hsd.verify.tree import tree_decision_law
from hsd.verify.tree_exact import Scheme, completed_law, law_tensor, sample_trees
from tests.tree_plants import LOSSY_TRANSCRIPTION, RRSNoRenorm

N = 20000
P_MIN = 1e-3
CASES = [(Scheme((2, 2)), 5), (Scheme((2, 2), "without_replacement", stop_token=1), 6)]  # (scheme, seed)
PLANTS = {"weighted": LOSSY_TRANSCRIPTION, "rrs": RRSNoRenorm()}


def case_id(case) -> str:
    scheme, seed = case
    return f"{'x'.join(map(str, scheme.branching))}-{scheme.mode}-seed{seed}"


def run(inst, scheme, method, seed):
    """Draw N trees, verify them (float32, generator-drawn uniforms), complete with the target."""
    gen = torch.Generator().manual_seed(seed)
    draft = sample_trees(inst, scheme, N, gen)
    res = verify_tree(draft.tokens, draft.parents, draft.q.float(), draft.p.float(), method=method, generator=gen)
    slot = res.last_node + 1
    prefixes = draft.paths[torch.arange(N), slot]
    return montecarlo.complete(inst, prefixes, res.num_accepted, res.next_token, gen), res, draft


def exact_law(inst, scheme, method):
    from hsd.verify.tree_exact import enumerate_trees

    draft = enumerate_trees(inst, scheme)
    return completed_law(inst, draft, law_tensor(*tree_decision_law(draft.tokens, draft.parents, draft.q,
                                                                    draft.p, method)))


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("method", ["rrs", "weighted"])
def test_chi_square_tree(case, method):
    scheme, seed = case
    inst = exact.random_instance(3, 2, seed=seed)
    target = exact.target_joint(inst)
    dof = 3**3 - 1
    # The sample size detects the planted variant: N * non-centrality >= 10 sqrt(2 dof).
    bad_law, _ = exact_law(inst, scheme, PLANTS[method])
    assert N * float(((bad_law - target) ** 2 / target).sum()) >= 10 * math.sqrt(2 * dof)
    seq, res, _ = run(inst, scheme, method, seed=100 + seed)
    chi2, dof_used, z = montecarlo.chi_square(inst, seq)
    pv = float(stats.chi2.sf(chi2, dof_used))
    assert pv > P_MIN, f"{method}: p = {pv:.2g}, z = {z:.1f}"
    _, expected = exact_law(inst, scheme, method)
    mean, sd = float(res.num_accepted.double().mean()), float(res.num_accepted.double().std())
    assert abs(mean - expected) < 5 * sd / math.sqrt(N)
    # The planted variant on the same path, the same N and the same seed fails.
    seq, _, _ = run(inst, scheme, PLANTS[method], seed=100 + seed)
    chi2, dof_used, z = montecarlo.chi_square(inst, seq)
    assert float(stats.chi2.sf(chi2, dof_used)) < 1e-6 and z > 10, f"{PLANTS[method].name} not detected: z = {z:.1f}"


# ---------------------------------------------------------------- chains: draw for draw


def chain_inputs(b, k, v, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(2 * torch.randn(b, k + 1, v, generator=g, dtype=torch.float64), -1).to(dtype)
    q = torch.softmax(2 * torch.randn(b, k, v, generator=g, dtype=torch.float64), -1).to(dtype)
    tokens = torch.multinomial(q.double().reshape(-1, v), 1, generator=g).view(b, k)
    uniforms = (torch.rand(b, k, generator=g), torch.rand(b, generator=g))
    return tokens, q, p, uniforms


PAIRS = [("tokenwise", "rrs"), ("blockwise", "weighted"), ("hsd", "weighted")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("point_mass", [False, True])
def test_chain_equals_verify_draw_for_draw(dtype, point_mass):
    tokens, q, p, uniforms = chain_inputs(4096, 5, 7, seed=3, dtype=dtype)
    q = None if point_mass else q
    parents = torch.arange(-1, 4).expand(4096, 5)
    for chain_method, tree_method in PAIRS:
        a = verify(tokens, q, p, method=chain_method, uniforms=uniforms)
        r = verify_tree(tokens, parents, q, p, method=tree_method, uniforms=uniforms)
        assert torch.equal(a.num_accepted, r.num_accepted), (chain_method, tree_method)
        assert torch.equal(a.next_token, r.next_token), (chain_method, tree_method)
        # The path is the chain's first num_accepted nodes.
        cols = torch.arange(5).expand(4096, 5)
        assert torch.equal(r.path, torch.where(cols < r.num_accepted.unsqueeze(1), cols, -1))


def test_generator_draws_match_verify():
    """Without explicit uniforms both draw coins then u from the generator in the same order."""
    tokens, q, p, _ = chain_inputs(512, 4, 6, seed=8, dtype=torch.float32)
    parents = torch.arange(-1, 3).expand(512, 4)
    for chain_method, tree_method in PAIRS:
        a = verify(tokens, q, p, method=chain_method, generator=torch.Generator().manual_seed(5))
        r = verify_tree(tokens, parents, q, p, method=tree_method, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a.num_accepted, r.num_accepted) and torch.equal(a.next_token, r.next_token)


def test_padded_chains_equal_verify():
    """Ragged batches: a chain of length L < K, with padding nodes (parent -2) interleaved and at
    the end, gives the same draws as verify on the length-L chain."""
    b, k, v = 256, 4, 5
    tokens, q, p, (coins, u) = chain_inputs(b, k, v, seed=21, dtype=torch.float64)
    # Layout of 6 slots: node0, pad, node1, node2, pad, pad  -> chain of length 3.
    slots = [0, None, 1, 2, None, None]
    t6 = torch.zeros(b, 6, dtype=torch.long)
    par6 = torch.full((b, 6), -2, dtype=torch.long)
    q6 = torch.full((b, 6, v), float("nan"), dtype=torch.float64)  # padding rows are never read
    p7 = torch.full((b, 7, v), float("nan"), dtype=torch.float64)
    c6 = torch.rand(b, 6, dtype=torch.float64)
    p7[:, 0] = p[:, 0]
    prev = -1
    for i, j in enumerate(slots):
        if j is None:
            continue
        t6[:, i], par6[:, i], q6[:, i], p7[:, i + 1], c6[:, i] = tokens[:, j], prev, q[:, j], p[:, j + 1], coins[:, j]
        prev = i
    for chain_method, tree_method in PAIRS:
        a = verify(tokens[:, :3], q[:, :3], p[:, :4], method=chain_method, uniforms=(coins[:, :3], u))
        r = verify_tree(t6, par6, q6, p7, method=tree_method, uniforms=(c6, u))
        assert torch.equal(a.num_accepted, r.num_accepted) and torch.equal(a.next_token, r.next_token)
        where = torch.tensor([0, 2, 3])
        expect = torch.where(torch.arange(3) < a.num_accepted.unsqueeze(1), where, -1)
        assert torch.equal(r.path, expect)


@pytest.mark.parametrize("method", ["tokenwise", "hsd"])
def test_multi_with_one_chain_equals_verify(method):
    tokens, q, p, (coins, u) = chain_inputs(1024, 4, 6, seed=13, dtype=torch.float32)
    chain = {"tokenwise": "tokenwise", "hsd": "blockwise"}[method]
    a = verify(tokens, q, p, method=chain, uniforms=(coins, u))
    r = verify_multi(tokens[:, None], q[:, None], p[:, None], method=method, uniforms=(coins[:, None], u))
    assert torch.equal(a.num_accepted, r.num_accepted) and torch.equal(a.next_token, r.next_token)
    assert bool((r.chain == 0).all())


def test_batch_of_different_trees_equals_row_by_row():
    """Rows of one batch are independent: a batch of different (ragged) trees gives the same draws
    as verifying each row alone."""
    inst = exact.random_instance(4, 3, seed=2)
    draft = sample_trees(inst, Scheme((3, 2, 1), "without_replacement", stop_token=0), 24, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    n = draft.tokens.shape[1]
    coins, u = torch.rand(24, n, generator=g), torch.rand(24, generator=g)
    for method in ("rrs", "weighted", "greedy"):
        whole = verify_tree(draft.tokens, draft.parents, draft.q, draft.p, method=method, uniforms=(coins, u))
        for i in range(24):
            one = verify_tree(draft.tokens[i : i + 1], draft.parents[i : i + 1], draft.q[i : i + 1],
                              draft.p[i : i + 1], method=method, uniforms=(coins[i : i + 1], u[i : i + 1]))
            d = one.path.shape[1]
            assert torch.equal(one.path[0], whole.path[i, :d]) and bool((whole.path[i, d:] == -1).all())
            assert int(one.next_token) == int(whole.next_token[i])
