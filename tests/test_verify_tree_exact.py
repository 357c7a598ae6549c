"""Exact-enumeration losslessness of verify_tree (no sampling noise).

For every drafting scheme (i.i.d., without replacement, merged, top-k, ragged trees) every tree is
enumerated with its probability, and three laws of the verifier's output are computed per tree:
- the independent reference law (tree_exact.reference_law, the verifier's definition node by node),
- the analytic law (tree.tree_decision_law, from the sampler's own node tests),
- the law of the sampler itself: verify_tree run on every pattern of node-test outcomes, with one
  coin inside each outcome's interval, each pattern weighted by its measure.
All three must agree per tree, and the completed output law must equal the target's (TV < 1e-12).
The same check rejects planted wrong verifiers, in the reference and in the sampler.
"""
from __future__ import annotations

import pytest
import torch

from hsd.verify import exact, tree
from hsd.verify.multi import chains_to_tree, tree_rows, verify_chain_tree
from hsd.verify.tree import pass_probabilities, rule_of, tree_decision_law, tree_levels, verify_tree
from hsd.verify.tree_exact import Scheme, completed_law, enumerate_trees, law_tensor, reference_law
from tests.test_verify_exact import check_lossless as chain_check_lossless
from tests.tree_plants import REFERENCE_PLANTS, SAMPLER_PLANTS

TOL = 1e-12
METHODS = ("rrs", "weighted")
SAMPLER_MAX_NODES = 6  # the sampler law runs verify_tree on T * 2^N rows ...
SAMPLER_MAX_ROWS = 50_000  # ... on a fixed subset of the trees beyond this

CONFIGS = [  # (V, scheme, seed); depth = len(branching). Seeds: every planted variant is detected.
    (3, Scheme((2, 2)), 0),
    (4, Scheme((2, 2)), 0),
    (3, Scheme((3, 1)), 0),
    (3, Scheme((2, 1, 1)), 8),
    (3, Scheme((2, 2), "without_replacement"), 0),
    (4, Scheme((3, 1), "without_replacement"), 0),
    (4, Scheme((2, 1, 1), "without_replacement"), 0),
    (3, Scheme((3, 2), "without_replacement"), 0),
    (3, Scheme((2, 2), "merged"), 0),
    (4, Scheme((3, 2, 1), "top_k"), 0),
    (3, Scheme((2, 2, 1), stop_token=0), 0),
    (3, Scheme((2, 2), "without_replacement", stop_token=1), 1),
]


def config_id(cfg) -> str:
    v, s, _ = cfg
    stop = "" if s.stop_token is None else f"-stop{s.stop_token}"
    return f"V{v}-{'x'.join(map(str, s.branching))}-{s.mode}{stop}"


def instance(vocab: int, scheme: Scheme, seed: int = 0) -> exact.TreeInstance:
    return exact.random_instance(vocab, len(scheme.branching), seed=3000 + 10 * vocab + seed)


def draft_rows(draft):
    return None if draft.point_mass else draft.q


def check_lossless(law: torch.Tensor, inst: exact.TreeInstance) -> float:
    return chain_check_lossless(law, inst, tol=TOL)


def subset(draft, pick):
    return draft._replace(**{f: getattr(draft, f)[pick] for f in ("tokens", "parents", "q", "p", "prob", "paths", "depth")})


def analytic_law(draft, method) -> torch.Tensor:
    return law_tensor(*tree_decision_law(draft.tokens, draft.parents, draft_rows(draft), draft.p, method))


def sampler_law(draft, method) -> torch.Tensor:
    """[T, N+1, V] law of verify_tree's output: every pattern of node tests, one coin inside each
    test's passing (pi / 2) or failing ((1 + pi) / 2) interval, weighted by the pattern's measure."""
    tokens, parents, q, p = draft.tokens, draft.parents, draft_rows(draft), draft.p
    levels = tree_levels(tokens, parents, q, p, rule_of(method))
    pi = pass_probabilities(levels, rule_of(method))  # measured on the sampler's own test
    t, n = tokens.shape
    patterns = ((torch.arange(2**n).unsqueeze(1) >> torch.arange(n)) & 1).bool()
    inside = torch.where(patterns, pi.unsqueeze(1) / 2, ((1 + pi.unsqueeze(1)) / 2).clamp(max=1 - 2**-53))
    weight = torch.where(patterns, pi.unsqueeze(1), 1 - pi.unsqueeze(1)).prod(-1)  # [T, 2^N]

    def rep(x):
        return None if x is None else x.repeat_interleave(2**n, 0)

    res = verify_tree(rep(tokens), rep(parents), rep(q), rep(p), method=method, validate=False,
                      uniforms=(inside.reshape(-1, n), torch.zeros(t * 2**n, dtype=torch.float64)))
    slot = (res.last_node + 1).view(t, 2**n)
    law = torch.zeros(t, n + 1, dtype=torch.float64).scatter_add_(1, slot, weight)
    # next_token: the row the sampler draws from with u (inverse CDF, tested with the chain code).
    return law_tensor(law, tree_decision_law(tokens, parents, q, p, method)[1])


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_tree_lossless_three_ways(cfg):
    vocab, scheme, seed = cfg
    inst = instance(vocab, scheme, seed)
    draft = enumerate_trees(inst, scheme)
    assert abs(float(draft.prob.sum()) - 1.0) < 1e-12
    for method in METHODS:
        ref = reference_law(draft, method)
        check_lossless(completed_law(inst, draft, ref)[0], inst)
        fast = analytic_law(draft, method)
        assert float((fast - ref).abs().max()) < TOL
        check_lossless(completed_law(inst, draft, fast)[0], inst)
        t, n = draft.tokens.shape
        if n > SAMPLER_MAX_NODES:
            continue
        if t * 2**n <= SAMPLER_MAX_ROWS:
            sampled = sampler_law(draft, method)
            check_lossless(completed_law(inst, draft, sampled)[0], inst)
        else:  # per-tree agreement on a fixed subset
            pick = torch.randperm(t, generator=torch.Generator().manual_seed(0))[: SAMPLER_MAX_ROWS // 2**n]
            sampled, ref = sampler_law(subset(draft, pick), method), ref[pick]
        assert float((sampled - ref).abs().max()) < TOL


SAMPLED_CONFIGS = [c for c in CONFIGS if c[1].mode != "top_k"]


@pytest.mark.parametrize("cfg", SAMPLED_CONFIGS, ids=config_id)
def test_planted_variants_fail(cfg):
    """The same check rejects each planted verifier, in the reference law and in the sampler."""
    vocab, scheme, seed = cfg
    inst = instance(vocab, scheme, seed)
    draft = enumerate_trees(inst, scheme)
    t, n = draft.tokens.shape
    small = n <= SAMPLER_MAX_NODES and t * 2**n <= SAMPLER_MAX_ROWS
    for method in METHODS:
        for update in REFERENCE_PLANTS[method]:
            law, _ = completed_law(inst, draft, reference_law(draft, method, update))
            assert exact.total_variation(law, exact.target_joint(inst)) > 1e-3, update.__name__
            with pytest.raises(AssertionError):
                check_lossless(law, inst)
        for plant in SAMPLER_PLANTS[method]:
            law, _ = completed_law(inst, draft, sampler_law(draft, plant) if small else analytic_law(draft, plant))
            assert exact.total_variation(law, exact.target_joint(inst)) > 1e-3, plant.name
            with pytest.raises(AssertionError):
                check_lossless(law, inst)


@pytest.mark.parametrize("mode", ["without_replacement", "merged"])
def test_planted_drafter_without_renormalised_rows_fails(mode):
    """Siblings drawn without replacement (or merged duplicates) but verified with the raw row
    q(.|path): the rows do not describe the draws, and both methods become lossy."""
    inst = instance(3, Scheme((2, 2), mode), seed=1)  # seed 0 is too easy: the ratios saturate
    draft = enumerate_trees(inst, Scheme((2, 2), mode))
    first = torch.tensor([0, 0, 2, 2, 4, 4])  # first sibling of each node in the (2, 2) template
    wrong = draft._replace(q=draft.q[:, first])  # a first sibling's row is always the raw row
    for method in METHODS:
        check_lossless(completed_law(inst, draft, sampler_law(draft, method))[0], inst)
        law, _ = completed_law(inst, wrong, sampler_law(wrong, method))
        assert exact.total_variation(law, exact.target_joint(inst)) > 1e-3


def test_planted_selection_bug_fails_the_sampler_law_only(monkeypatch):
    """A wrong selection in the sampler (first passing node in pre-order instead of post-order) is
    caught by the sampler's law, which the analytic law (not using ``select``) cannot see."""
    inst = instance(3, Scheme((2, 2)))
    draft = enumerate_trees(inst, Scheme((2, 2)))

    def pre_order_select(struct, passed, rule):
        return tree.first_child_path(struct, passed)  # ignores the subtree: parents before children

    monkeypatch.setattr(tree, "select", pre_order_select)
    check_lossless(completed_law(inst, draft, analytic_law(draft, "weighted"))[0], inst)
    law, _ = completed_law(inst, draft, sampler_law(draft, "weighted"))
    assert exact.total_variation(law, exact.target_joint(inst)) > 1e-3


@pytest.mark.parametrize("vocab,depth", [(3, 3), (4, 2), (2, 4)])
def test_chain_tree_equals_chain_verifiers(vocab, depth):
    """A chain (branching 1) is verified exactly as verify: rrs = tokenwise, weighted = block
    verification = HSD, in law and in expected accepted tokens."""
    inst = exact.random_instance(vocab, depth, seed=40 + vocab + depth)
    draft = enumerate_trees(inst, Scheme((1,) * depth))
    for method, chain_methods in (("rrs", ["tokenwise"]), ("weighted", ["blockwise", "hsd"])):
        law, acc = completed_law(inst, draft, analytic_law(draft, method))
        for chain_method in chain_methods:
            chain_law, chain_acc = exact.single_chain_law(inst, chain_method)
            assert exact.total_variation(law, chain_law) < TOL
            assert acc == pytest.approx(chain_acc, abs=TOL)


def test_weighted_beats_rrs_and_unmerged_beats_merged():
    """Averaged over instances: the weighted verifier accepts more than rrs; merging i.i.d.
    duplicates into one node (with renormalised rows) costs acceptance for both methods."""
    gain, merge_cost = [], {m: [] for m in METHODS}
    for seed in range(4):
        for vocab, branching in ((3, (2, 2)), (4, (3, 1))):
            inst = exact.random_instance(vocab, len(branching), seed=7100 + seed)
            acc = {}
            for mode in ("iid", "merged"):
                draft = enumerate_trees(inst, Scheme(branching, mode))
                for method in METHODS:
                    law, acc[mode, method] = completed_law(inst, draft, analytic_law(draft, method))
                    check_lossless(law, inst)
            gain.append(acc["iid", "weighted"] - acc["iid", "rrs"])
            for method in METHODS:
                merge_cost[method].append(acc["iid", method] - acc["merged", method])
    assert sum(gain) / len(gain) > 1e-3
    for method in METHODS:
        assert min(merge_cost[method]) > -1e-12, f"{method}: merging helped on some instance"
        assert sum(merge_cost[method]) / len(merge_cost[method]) > 1e-3


def test_point_mass_verification_of_sampled_trees_is_lossless_but_slower():
    """Ignoring q (treating sampled children as point masses, as top-k trees are verified) is still
    lossless for any tree, but accepts fewer tokens than using the rows the children came from."""
    inst = instance(3, Scheme((2, 2)))
    draft = enumerate_trees(inst, Scheme((2, 2)))
    as_points = draft._replace(point_mass=True)
    for method in METHODS:
        law, acc_points = completed_law(inst, draft, analytic_law(as_points, method))
        check_lossless(law, inst)
        _, acc_q = completed_law(inst, draft, analytic_law(draft, method))
        assert acc_q > acc_points + 1e-3


def test_top_k_point_masses_equal_one_hot_rows():
    inst = instance(4, Scheme((3, 2, 1), "top_k"))
    draft = enumerate_trees(inst, Scheme((3, 2, 1), "top_k"))
    for method in METHODS:
        none_rows = analytic_law(draft, method)
        one_hot = law_tensor(*tree_decision_law(draft.tokens, draft.parents, draft.q, draft.p, method))
        assert float((none_rows - one_hot).abs().max()) < TOL


# ---------------------------------------------------------------- verify_multi (grafted tree)


@pytest.mark.parametrize("vocab,depth,chains", [(3, 2, 2), (2, 3, 2), (2, 2, 3)])
def test_multi_sampler_with_shared_coins_is_exact(vocab, depth, chains):
    """verify_multi's real path, where copies of a chain share that chain's coins: enumerate every
    coin interval between the thresholds of the nodes that share it, run the sampler once inside
    each combination, and compare with multi_law (independent coins) and the target."""
    inst = exact.random_instance(vocab, depth, seed=880 + vocab + depth + chains)
    k = depth
    tokens = exact.all_sequences(vocab, k * chains).view(-1, chains, k)
    flat = tokens.reshape(-1, k)
    q, p = exact.chain_rows(inst, flat)
    r = tokens.shape[0]
    q, p = q.view(r, chains, k, -1), p.view(r, chains, k + 1, -1)
    weight = exact.draft_prob(inst, flat).view(r, chains).prod(-1)
    for method, name in (("hsd", "weighted"), ("tokenwise", "rrs")):
        rule = rule_of(name)
        ctree = chains_to_tree(tokens)
        q_tree, p_tree = tree_rows(ctree, q, p)
        pi = pass_probabilities(tree_levels(ctree.tokens, ctree.parents, q_tree, p_tree, rule), rule)
        coins = chains * k
        # Breakpoints of coin c: 0, 1 and the thresholds of the real nodes that use it.
        real = ctree.parents != -2
        users = [real & (ctree.coin == c) for c in range(coins)]
        width = max(int(u.sum(1).max()) for u in users) + 2
        cut = torch.ones(r, coins, width, dtype=torch.float64)
        cut[:, :, 0] = 0.0
        for c, uses in enumerate(users):
            vals = torch.where(uses, pi, 1.0).sort(-1).values  # thresholds first, then 1.0 padding
            cut[:, c, 1:] = vals[:, : width - 1]
        cut = cut.sort(-1).values
        mids, lens = (cut[..., 1:] + cut[..., :-1]) / 2, cut[..., 1:] - cut[..., :-1]  # [R, C, I]
        combos = torch.cartesian_prod(*[torch.arange(width - 1)] * coins).view(-1, coins)  # [X, C]
        pick = combos.T.unsqueeze(0).expand(r, -1, -1)  # [R, C, X]
        coin_vals = mids.gather(2, pick).transpose(1, 2)  # [R, X, C]
        mass = lens.gather(2, pick).prod(1)  # [R, X]
        keep = mass > 0
        rows, combo = keep.nonzero(as_tuple=True)
        coin_vals = coin_vals[rows, combo].clamp(max=1 - 2**-53).view(-1, chains, k)
        _, res = verify_chain_tree(tokens[rows], q[rows].double(), p[rows].double(), rule, coin_vals,
                                   torch.zeros(rows.shape[0], dtype=torch.float64))
        slot_law = torch.zeros(r, ctree.tokens.shape[1] + 1, dtype=torch.float64)
        slot_law.index_put_((rows, res.last_node + 1), mass[rows, combo], accumulate=True)
        # Against the analytic law, which assumes one independent coin per node.
        indep, next_rows = tree_decision_law(ctree.tokens, ctree.parents, q_tree, p_tree, rule)
        assert float((slot_law - indep).abs().max()) < TOL, method
        depth_of = torch.cat([torch.zeros(r, 1, dtype=torch.long), ctree.position + 1], 1)
        # Completed law against the target.
        prefixes = torch.cat([torch.zeros(r, 1, k, dtype=torch.long),
                              tokens.gather(1, ctree.chain.unsqueeze(-1).expand(-1, -1, k))], 1)
        out = exact.Emissions(inst)
        slots = slot_law.shape[1]
        out.add(prefixes.reshape(r * slots, k), depth_of.reshape(-1),
                (weight.unsqueeze(1) * slot_law).reshape(-1), next_rows.reshape(r * slots, -1))
        check_lossless(out.completed(), inst)


def test_multi_grafted_tree_beats_the_star():
    """Grafting later chains under earlier ones accepts more than a star of M chains (root with M
    children, nothing grafted), for both methods, on every instance."""
    for seed in range(3):
        inst = exact.random_instance(3, 2, seed=950 + seed)
        for method, name in (("hsd", "weighted"), ("tokenwise", "rrs")):
            _, grafted = exact.multi_chain_law(inst, 2, method)
            tokens = exact.all_sequences(3, 4).view(-1, 2, 2)
            flat = tokens.reshape(-1, 2)
            q, p = exact.chain_rows(inst, flat)
            w = exact.draft_prob(inst, flat).view(-1, 2).prod(-1)
            r = tokens.shape[0]
            star_tokens = tokens.reshape(r, 4)
            parents = torch.tensor([-1, 0, -1, 2]).expand(r, 4)
            p_star = torch.cat([p.view(r, 2, 3, 3)[:, 0, :1], p.view(r, 2, 3, 3)[:, :, 1:].reshape(r, 4, 3)], 1)
            slot, _ = tree_decision_law(star_tokens, parents, q.view(r, 4, 3), p_star, name)
            depth = torch.tensor([0, 1, 2, 1, 2], dtype=torch.float64)
            star = float((w.unsqueeze(1) * slot * depth).sum())
            assert grafted > star + 1e-6, (method, seed)
