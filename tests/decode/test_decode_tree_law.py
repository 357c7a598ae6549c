"""T > 0 draft trees: the law of the emitted tokens equals the target's, by exact enumeration through the real
engine (the replay of test_decode_law: every random choice is enumerated: plain draws, the tree's draws
without replacement, and the tree verifier's outcomes from ``tree_decision_law``), for recursive rejection
sampling and the weighted tree verifier, with pruning (total < candidates) and two-level trees.

Planted wrong variants must fail the same test: ranking nodes by their own drawn token (EAGLE-2's score,
lossy at T > 0: a kept token is then a selected one), and declaring the parent's row for every sibling
instead of the row without the earlier siblings. A chi-square test checks the real draw_without_replacement
against the sequential law, and fails for a wrong race."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

import hsd.decode.drafters as drafters_mod
import hsd.decode.engine as engine_mod
import hsd.decode.tree_draft as tree_mod
import hsd.decode.verifier as verifier_mod
from hsd.decode import DecodeConfig, SpeculativeDecoder
from hsd.verify import TreeVerifyResult, tree_decision_law
from hsd.verify.tree import structure as hsd_structure
from tests.decode import decode_fixtures as fx
from tests.decode.test_decode_law import M, Replay, TargetLaw, exact_law, replay_sample, tv

pytestmark = pytest.mark.usefixtures("one_thread")
V = 16


def replay_draws(q, k, generator=None):
    """draw_without_replacement, enumerated: row by row, one token after another from the renormalised rest."""
    out = torch.full((q.shape[0], k), -1, dtype=torch.long)
    for i in range(q.shape[0]):
        row = q[i].double().clone()
        for j in range(k):
            mass = float(row.sum())
            if mass <= 0:
                break
            opts = [(x, float(row[x]) / mass) for x in torch.nonzero(row > 0).flatten().tolist()]
            out[i, j] = Replay.current.choose(opts)
            row[out[i, j]] = 0.0
    return out


def path_of(parents: list[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def replay_verify_tree(tokens, parents, q, p, *, method="weighted", backend="torch", generator=None, **kw):
    law, rows = tree_decision_law(tokens, parents, q.double(), p.double(), method=method)
    opts = [((s, y), float(law[0, s] * rows[0, s, y])) for s in range(tokens.shape[1] + 1)
            for y in torch.nonzero(rows[0, s] > 0).flatten().tolist() if float(law[0, s] * rows[0, s, y]) > 0]
    s, y = Replay.current.choose(opts)
    path = path_of(parents[0].tolist(), s - 1)
    return TreeVerifyResult(torch.tensor([path], dtype=torch.long).reshape(1, -1), torch.tensor([len(path)]),
                            torch.tensor([y]))


def patch_tree_replay(monkeypatch) -> None:
    """Every random choice of tree decoding (draws, samples, tree verification) taken from the replay."""
    for mod in (drafters_mod, engine_mod, verifier_mod):
        monkeypatch.setattr(mod, "sample", replay_sample)
    monkeypatch.setattr(tree_mod, "draw_without_replacement", replay_draws)
    monkeypatch.setattr(verifier_mod, "verify_tree", replay_verify_tree)


@pytest.fixture
def replay(monkeypatch):
    patch_tree_replay(monkeypatch)


@pytest.fixture(scope="module")
def tiny():
    t = fx.target("llama", vocab=V, num_layers=4, seed=3, initializer_range=0.2)
    return t, fx.prompt(V, 6, seed=1)


def tree_law_tv(t, ids, tree, method, top_k, temperature=1.0):
    dec = SpeculativeDecoder(t, fx.drafter("eagle3", t, scale=0.05))
    cfg = DecodeConfig(temperature=temperature, top_k=top_k, method=method, tree=tree, max_new_tokens=M,
                       eos_token_id=[])

    def run():
        return tuple(dec.generate(ids, config=cfg, max_rounds=1).new_tokens[0].tolist())

    law = TargetLaw(t, ids, temperature, top_k)
    got = law.complete(exact_law(run))
    assert abs(sum(got.values()) - 1) < 1e-6
    return tv(got, law.law())


CASES = [  # tree, method (tokenwise -> rrs, hsd -> weighted), processing top-k
    ("2:1:1", "tokenwise", 3),  # two siblings drawn, the second pruned
    ("2:1:1", "hsd", 3),
    ("2:2:4", "tokenwise", 2),  # two levels, 6 candidates pruned to 4
    ("2:2:4", "hsd", 2),
    ("static:2x1", "tokenwise", 3),  # a fixed shape
    ("2:2:3", "hsd", 3),  # pruning inside a partly covered two-level tree (the slow case, ~50 s)
]


@pytest.mark.parametrize("tree,method,top_k", CASES)
def test_tree_emitted_law_equals_target(replay, tiny, tree, method, top_k):
    t, ids = tiny
    d = tree_law_tv(t, ids, tree, method, top_k)
    print(f"TV {d:.2e}")
    assert d < 1e-4


def test_tree_law_at_lower_temperature(replay, tiny):
    t, ids = tiny
    assert tree_law_tv(t, ids, "2:2:4", "tokenwise", 2, temperature=0.7) < 1e-4


@dataclass
class _OwnTokenNode(tree_mod.TreeNode):
    """Planted: rank by the cumulative log-probability including the node's own token (EAGLE-2's T = 0 score)."""

    def __post_init__(self):
        self.value = self.cum


def test_planted_ranking_by_own_token_fails(replay, tiny, monkeypatch):
    t, ids = tiny
    monkeypatch.setattr(tree_mod, "TreeNode", _OwnTokenNode)
    d = tree_law_tv(t, ids, "2:1:1", "hsd", 3)
    print(f"planted TV {d:.3f}")
    assert d > 1e-2


def test_planted_rows_without_sibling_removal_fail(replay, tiny, monkeypatch):
    t, ids = tiny
    monkeypatch.setattr(tree_mod, "sibling_rows", lambda kept, parents: torch.stack([n.row for n in kept]))
    d = tree_law_tv(t, ids, "2:2:4", "tokenwise", 2)
    print(f"planted TV {d:.3f}")
    assert d > 1e-2


def _sequential_law(q: torch.Tensor, k: int) -> dict:
    out = {}
    for seq in itertools.permutations(range(q.shape[0]), k):
        p, rest = 1.0, 1.0
        for x in seq:
            p *= float(q[x]) / rest
            rest -= float(q[x])
        out[seq] = p
    return out


def _chi2(draw, q, k, n=40000):
    g = torch.Generator().manual_seed(0)
    toks = draw(q.expand(n, -1), k, g)
    counts = {}
    for row in toks.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    law = _sequential_law(q, k)
    return sum((counts.get(s, 0) - n * p) ** 2 / (n * p) for s, p in law.items()), len(law) - 1


def test_draw_without_replacement_is_sequential_sampling():
    q = torch.tensor([0.5, 0.25, 0.15, 0.1])
    stat, dof = _chi2(tree_mod.draw_without_replacement, q, 2)
    assert stat < dof + 4 * (2 * dof) ** 0.5, stat  # ~ chi-square(11): mean 11, sd 4.7
    # a wrong race (uniform instead of exponential noise) must fail the same test
    wrong = lambda q, k, g: torch.topk(q * torch.rand(q.shape, generator=g), k, dim=-1).indices  # noqa: E731
    bad, _ = _chi2(wrong, q, 2)
    assert bad > 10 * dof, bad
    assert tree_mod.draw_without_replacement(torch.tensor([[0.0, 1.0, 0.0]]), 2).tolist() == [[1, -1]]


def _rows(prefix: tuple, v: int, salt: int, sharp: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash((salt,) + prefix) % (2**31))
    return torch.randn(v, generator=g, dtype=torch.float64) * sharp


def synthetic_round_law(spec: str, method: str, v: int = 3, length: int = 3) -> float:
    """TV between the target's law of ``length`` tokens and one tree round (build_tree + tree_decision_law,
    every draw enumerated) completed by the target, on synthetic context-dependent draft / target rows. No
    model: large trees with ranking across branches enumerate in seconds."""
    from hsd.decode.sampling import SamplingParams
    from hsd.decode.tree_spec import TreeSpec

    params = SamplingParams(1.0)
    tree = TreeSpec.parse(spec)
    outcomes: dict = {}

    def target(prefix):
        return torch.softmax(_rows(prefix, v, 1), -1)

    def run():
        def expand(ids, nodes):
            return torch.stack([_rows(tuple(nodes[j].token for j in _path(nodes, i)), v, 2) for i in ids])

        draft, _ = tree_mod.build_tree(_rows((), v, 2), expand, tree, params)
        toks, par = draft.tokens[0].tolist(), draft.parents[0].tolist()
        key = (tuple(toks), tuple(par), draft.q.double().numpy().tobytes())
        if key not in outcomes:  # the replay reruns the round once per verifier outcome: compute the law once
            p = torch.stack([target(())] + [target(tuple(toks[j] for j in path_of(par, i))) for i in range(len(toks))])
            law, rows = tree_decision_law(draft.tokens, draft.parents, draft.q.double(), p[None], method=method)
            outcomes[key] = [((s, y), float(law[0, s] * rows[0, s, y])) for s in range(len(toks) + 1)
                             for y in range(v) if float(law[0, s] * rows[0, s, y]) > 0]
        s, y = Replay.current.choose(outcomes[key])
        return tuple(toks[j] for j in path_of(par, s - 1)) + (y,)

    def complete(law):
        out, stack = {}, list(law.items())
        while stack:
            seq, pr = stack.pop()
            if len(seq) >= length:
                out[seq[:length]] = out.get(seq[:length], 0.0) + pr
                continue
            row = target(seq)
            stack += [(seq + (y,), pr * float(row[y])) for y in range(v)]
        return out

    got = complete(exact_law(run))
    assert abs(sum(got.values()) - 1) < 1e-9
    return tv(got, complete({(): 1.0}))


def _path(nodes, i):
    out = []
    while i >= 0:
        out.append(i)
        i = nodes[i].parent
    return out[::-1]


@pytest.mark.parametrize("spec,v,method", [("2:2:3", 3, "rrs"), ("2:2:3", 3, "weighted"), ("2:3:5", 2, "rrs"),
                                           ("2:3:5", 2, "weighted"), ("3:2:4", 3, "rrs"), ("3:2:4", 3, "weighted")])
def test_ranking_across_branches_is_lossless(replay, spec, v, method):
    """Dynamic trees rank nodes across branches (which nodes are expanded and kept depends on the tokens of
    other branches, drawn later in depth-first order). Exact on synthetic rows for both tree verifiers."""
    d = synthetic_round_law(spec, method, v)
    print(f"TV {d:.2e}")
    assert d < 1e-6


def test_synthetic_check_catches_own_token_ranking(replay, monkeypatch):
    monkeypatch.setattr(tree_mod, "TreeNode", _OwnTokenNode)
    d = synthetic_round_law("2:2:3", "weighted")
    print(f"planted TV {d:.3f}")
    assert d > 1e-3


def _rows_one_by_one(tokens, parents, q):
    """Reference: walk the nodes in order, removing each real node's token from its parent's later draws."""
    struct = hsd_structure(parents)
    out, taken = q.clone(), {}
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            p = int(struct.parent_slot[b, i])
            row = q[b, i].clone()
            row[list(taken.get((b, p), []))] = 0.0
            out[b, i] = row / row.sum()
            if struct.real[b, i]:
                taken.setdefault((b, p), []).append(int(tokens[b, i]))
    return out


def test_sibling_rows_equal_without_replacement_rows():
    """The engine's sibling rows and hsd.verify's vectorised construction equal a node-by-node walk, on
    random trees with ragged padding."""
    from hsd.verify import without_replacement_rows

    g = torch.Generator().manual_seed(0)
    parents = [-1, -1, -1, 0, 0, 2, 3, 3]
    raw = torch.softmax(torch.randn(len(parents) + 1, 6, generator=g, dtype=torch.float64), -1)
    nodes, used = [], {}
    for p in parents:  # each node's token: a fresh token of its parent's row
        row = raw[p + 1]
        tok = next(x for x in torch.argsort(row, descending=True).tolist() if x not in used.get(p, ()))
        used.setdefault(p, set()).add(tok)
        nodes.append(tree_mod.TreeNode(tok, p, 0, 0.0, 0.0, row))
    tokens = torch.tensor([[n.token for n in nodes]])
    par = torch.tensor([parents])
    ref = _rows_one_by_one(tokens, par, torch.stack([n.row for n in nodes])[None])
    assert torch.allclose(tree_mod.sibling_rows(nodes, parents), ref[0], atol=1e-12)
    # a batch of two trees, the second padded (parent -2 marks a padding node, as verify_tree takes it)
    tokens = torch.tensor([[0, 2, 1, 1, 0, 3], [4, 4, 1, 0, 0, 0]])
    par = torch.tensor([[-1, -1, -1, 0, 0, 1], [-1, 0, -1, 0, -2, -2]])
    q = torch.softmax(torch.randn(2, 6, 6, generator=g, dtype=torch.float64), -1)
    assert torch.allclose(without_replacement_rows(tokens, par, q), _rows_one_by_one(tokens, par, q), atol=1e-12)
