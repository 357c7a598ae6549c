"""verify_tree: input checks (every error names the argument), result semantics, padding, greedy
against a brute force, the without-replacement rows helper, and verify_multi's grafted tree."""
from __future__ import annotations

import pytest
import torch

from hsd.verify import greedy_verify, tree_decision_law, verify_multi, verify_tree, without_replacement_rows
from hsd.verify.multi import chains_to_tree


def tree_inputs(b=6, v=5, seed=0):
    """A fixed 5-node tree per row: root -> {0, 1}, 0 -> {2, 3}, 1 -> {4}; tokens drawn from q."""
    g = torch.Generator().manual_seed(seed)
    parents = torch.tensor([-1, -1, 0, 0, 1]).expand(b, 5).clone()
    q = torch.softmax(torch.randn(b, 5, v, generator=g), -1)
    p = torch.softmax(torch.randn(b, 6, v, generator=g), -1)
    tokens = torch.multinomial(q.reshape(-1, v), 1, generator=g).view(b, 5)
    return tokens, parents, q, p


# ---------------------------------------------------------------- input checks


def test_bad_parents():
    t, par, q, p = tree_inputs()
    bad = par.clone()
    bad[2, 3] = 3  # itself
    with pytest.raises(ValueError, match=r"parents: row 2 node 3 .*cycle"):
        verify_tree(t, bad, q, p)
    bad = par.clone()
    bad[1, 2], bad[1, 4] = 4, 2  # 2 <- 4 <- 2
    with pytest.raises(ValueError, match=r"parents: row 1 node 2 .*cycle"):
        verify_tree(t, bad, q, p)
    bad = par.clone()
    bad[0, 1] = 3  # later node, no cycle
    with pytest.raises(ValueError, match=r"parents: row 0 node 1 has parent 3 .*not topological"):
        verify_tree(t, bad, q, p)
    bad = par.clone()
    bad[0, 4] = 9
    with pytest.raises(ValueError, match=r"parents: row 0 node 4 has parent 9, outside"):
        verify_tree(t, bad, q, p)
    bad = par.clone()
    bad[0, 0] = -3
    with pytest.raises(ValueError, match="parents: ids must be"):
        verify_tree(t, bad, q, p)
    bad = par.clone()
    bad[0, 0] = -2  # node 0 is padding, but nodes 2 and 3 hang under it
    with pytest.raises(ValueError, match=r"parents: row 0 node 2 hangs under padding node 0"):
        verify_tree(t, bad, q, p)
    with pytest.raises(ValueError, match="parents: expected shape"):
        verify_tree(t, par[:, :4], q, p)
    with pytest.raises(ValueError, match="parents: expected dtype"):
        verify_tree(t, par.float(), q, p)


def test_bad_shapes_and_values():
    t, par, q, p = tree_inputs()
    with pytest.raises(ValueError, match="tokens: expected 2 dims"):
        verify_tree(t[0], par, q, p)
    with pytest.raises(ValueError, match="tokens: expected dtype"):
        verify_tree(t.float(), par, q, p)
    with pytest.raises(ValueError, match=r"target_probs: expected shape \(6, 6, 'V'\)"):
        verify_tree(t, par, q, p[:, :5])
    with pytest.raises(ValueError, match="draft_probs: expected shape"):
        verify_tree(t, par, q[:, :4], p)
    with pytest.raises(ValueError, match="draft_probs: vocabulary size 4 does not match target_probs"):
        verify_tree(t, par, q[..., :4] / q[..., :4].sum(-1, keepdim=True), p)
    with pytest.raises(ValueError, match="draft_probs: dtype"):
        verify_tree(t, par, q.double(), p)
    with pytest.raises(ValueError, match="tokens: token ids must lie in"):
        verify_tree(t + 5, par, q, p)
    with pytest.raises(ValueError, match="target_probs: rows must sum to 1"):
        verify_tree(t, par, q, p * 1.5)
    with pytest.raises(ValueError, match="draft_probs: contains NaN"):
        verify_tree(t, par, q * float("nan"), p)
    neg = p.clone()
    neg[0, 0, 0], neg[0, 0, 1] = -0.1, neg[0, 0, 1] + neg[0, 0, 0] + 0.1
    with pytest.raises(ValueError, match="target_probs: contains negative"):
        verify_tree(t, par, q, neg)
    zero = q.clone()
    zero[3, 2, t[3, 2]] = 0.0
    zero = zero / zero.sum(-1, keepdim=True)
    with pytest.raises(ValueError, match=r"draft_probs: row 3 node 2 has zero draft probability"):
        verify_tree(t, par, zero, p)
    with pytest.raises(ValueError, match="method"):
        verify_tree(t, par, q, p, method="hsd")
    with pytest.raises(ValueError, match="backend"):
        verify_tree(t, par, q, p, backend="cuda")
    with pytest.raises(ValueError, match=r"coins.*shape"):
        verify_tree(t, par, q, p, uniforms=(torch.rand(6, 4), torch.rand(6)))
    logits = torch.randn(6, 6, 5)
    logits[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="target_probs: contains NaN or \\+inf"):
        verify_tree(t, par, None, logits, method="greedy")


def test_padding_rows_are_not_read():
    """Padding nodes may carry any token and any rows (even NaN): nothing changes."""
    t, par, q, p = tree_inputs(b=64, seed=3)
    g = torch.Generator().manual_seed(0)
    coins, u = torch.rand(64, 5, generator=g), torch.rand(64, generator=g)
    par_pad = par.clone()
    par_pad[:, 4] = -2  # drop node 4 (a leaf)
    t_pad, q_pad, p_pad = t.clone(), q.clone(), p.clone()
    t_pad[:, 4], q_pad[:, 4], p_pad[:, 5] = 99, float("nan"), float("nan")
    for method in ("rrs", "weighted", "greedy"):
        a = verify_tree(t_pad, par_pad, q_pad, p_pad, method=method, uniforms=(coins, u))
        b = verify_tree(t[:, :4], par[:, :4], q[:, :4], p[:, :5], method=method, uniforms=(coins[:, :4], u))
        assert torch.equal(a.num_accepted, b.num_accepted) and torch.equal(a.next_token, b.next_token)
        assert bool((a.path != 4).all())


def test_empty_trees():
    """N = 0, or rows whose nodes are all padding: the next token is drawn from target row 0."""
    p = torch.softmax(torch.randn(4, 1, 6), -1)
    u = torch.rand(4)
    res = verify_tree(torch.zeros(4, 0, dtype=torch.long), torch.zeros(4, 0, dtype=torch.long), None, p,
                      uniforms=(torch.zeros(4, 0), u))
    assert res.path.shape == (4, 0) and bool((res.num_accepted == 0).all())
    cdf = p[:, 0].cumsum(-1)
    assert torch.equal(res.next_token, torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1))
    t, par, q, pp = tree_inputs(b=4)
    par[1] = -2
    res = verify_tree(t, par, q, pp, method="weighted", generator=torch.Generator().manual_seed(0))
    assert int(res.num_accepted[1]) == 0 and bool((res.path[1] == -1).all()) and int(res.last_node[1]) == -1


# ---------------------------------------------------------------- result semantics


@pytest.mark.parametrize("method", ["rrs", "weighted"])
def test_result_is_a_root_path(method):
    t, par, q, p = tree_inputs(b=2000, seed=5)
    res = verify_tree(t, par, q, p, method=method, generator=torch.Generator().manual_seed(1))
    assert res.path.shape == (2000, 2) and res.path.dtype == torch.int64
    assert torch.equal((res.path >= 0).sum(1), res.num_accepted)
    rows = torch.arange(2000)
    for d in range(2):
        has = res.num_accepted > d
        node = res.path[has, d]
        expect_parent = torch.full_like(node, -1) if d == 0 else res.path[has, d - 1]
        assert torch.equal(par[has].gather(1, node.unsqueeze(1)).squeeze(1), expect_parent)
    # next_token has positive target probability after the last accepted node.
    assert bool((p[rows, res.last_node + 1, res.next_token] > 0).all())
    # Every outcome the sampler produced has positive probability under the exact law.
    law, _ = tree_decision_law(t, par, q.double(), p.double(), method)
    assert bool((law[rows, res.last_node + 1] > 0).all())
    assert torch.allclose(law.sum(1), torch.ones(2000, dtype=torch.float64), atol=1e-12)


# ---------------------------------------------------------------- greedy


def brute_greedy(tokens, parents, logits):
    """Longest all-argmax root path, ties to the lowest node index (plain Python)."""
    n = len(tokens)
    best, best_depth = -1, 0
    for i in range(n):
        if parents[i] == -2:
            continue
        path, j = [], i
        while j >= 0:
            path.append(j)
            j = parents[j]
        path.reverse()
        ok = all(tokens[a] == int(logits[(parents[a] + 1)].argmax()) for a in path)
        if ok and len(path) > best_depth:
            best, best_depth = i, len(path)
    return best, best_depth, int(logits[best + 1].argmax())


def test_greedy_matches_brute_force():
    g = torch.Generator().manual_seed(4)
    b, n, v = 300, 8, 3
    parents = torch.full((b, n), -2, dtype=torch.long)
    for r in range(b):
        for i in range(n):
            if torch.rand(1, generator=g) < 0.85:
                real = [j for j in range(i) if parents[r, j] != -2]
                choice = torch.randint(len(real) + 1, (1,), generator=g).item()
                parents[r, i] = -1 if choice == len(real) else real[choice]
    tokens = torch.randint(v, (b, n), generator=g)
    logits = torch.randn(b, n + 1, v, generator=g)
    logits[0, 0] = float("-inf")
    logits[0, 0, 1] = 0.0  # -inf logits are allowed
    res = verify_tree(tokens, parents, None, logits, method="greedy")
    probs = verify_tree(tokens, parents, None, torch.softmax(logits, -1), method="greedy")
    for r in range(b):
        node, depth, nxt = brute_greedy(tokens[r].tolist(), parents[r].tolist(), logits[r])
        assert int(res.last_node[r]) == node and int(res.num_accepted[r]) == depth and int(res.next_token[r]) == nxt
    assert torch.equal(res.path, probs.path) and torch.equal(res.next_token, probs.next_token)


def test_greedy_chain_equals_greedy_verify():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(500, 4, 3, generator=g)
    tokens = torch.where(torch.rand(500, 3, generator=g) < 0.7, logits[:, :3].argmax(-1), torch.randint(3, (500, 3), generator=g))
    a = greedy_verify(tokens, logits)
    r = verify_tree(tokens, torch.arange(-1, 2).expand(500, 3), None, logits, method="greedy")
    assert torch.equal(a.num_accepted, r.num_accepted) and torch.equal(a.next_token, r.next_token)


# ---------------------------------------------------------------- helpers


def test_without_replacement_rows():
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).expand(1, 5, 3)
    tokens = torch.tensor([[0, 2, 1, 1, 0]])
    parents = torch.tensor([[-1, -1, -1, 0, 0]])  # root: 0, 2, 1 ; node 0: 1, 0
    rows = without_replacement_rows(tokens, parents, q)
    expect = torch.tensor([[0.5, 0.3, 0.2], [0.0, 0.6, 0.4], [0.0, 1.0, 0.0], [0.5, 0.3, 0.2], [0.5 / 0.7, 0.0, 0.2 / 0.7]],
                          dtype=torch.float64)
    assert torch.allclose(rows[0], expect, atol=1e-15)


def test_chains_to_tree_grafts():
    """A = (0, 1), B = (0, 2), C = (3, 1): root -> A0, B0, C0; A0 -> A1, B1 (grafted); B0 -> B1;
    C0 -> C1. Node coins: chain j at position t grafted at depth d uses coin j*K + t - d."""
    tree = chains_to_tree(torch.tensor([[[0, 1], [0, 2], [3, 1]]]))
    assert tree.tokens.tolist() == [[0, 0, 3, 1, 2, 2, 1]]
    assert tree.parents.tolist() == [[-1, -1, -1, 0, 0, 1, 2]]
    assert tree.chain.tolist() == [[0, 1, 2, 0, 1, 1, 2]]
    assert tree.position.tolist() == [[0, 0, 0, 1, 1, 1, 1]]
    assert tree.coin.tolist() == [[0, 2, 4, 1, 2, 3, 5]]


@pytest.mark.parametrize("method", ["tokenwise", "hsd"])
def test_multi_chain_index_is_valid(method):
    g = torch.Generator().manual_seed(6)
    b, m, k, v = 3000, 3, 3, 3  # V = 3: chains share prefixes often
    q = torch.softmax(torch.randn(b, 1, k, v, generator=g), -1).expand(b, m, k, v).contiguous()
    p = torch.softmax(torch.randn(b, 1, k + 1, v, generator=g), -1).expand(b, m, k + 1, v).contiguous()
    tokens = torch.multinomial(q.reshape(-1, v), 1, generator=g).view(b, m, k)
    res = verify_multi(tokens, q, p, method=method, generator=g)
    rows = torch.arange(b)
    assert bool(((res.chain >= 0) & (res.chain < m)).all())
    assert bool((p[rows, res.chain, res.num_accepted, res.next_token] > 0).all())
    # Some rows accept a later chain that shares chain 0's first token: a duplicate root child is
    # dead once its twin failed, so these prefixes were accepted through a graft.
    grafted = (res.num_accepted >= 2) & (tokens[rows, 0, 0] == tokens[rows, res.chain, 0]) & (res.chain > 0)
    assert bool(grafted.any())
