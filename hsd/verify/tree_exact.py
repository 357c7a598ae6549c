"""Exact laws of tree verification on small instances: drafting schemes, every tree they can draw,
an independent reference implementation of each verifier's law, and the completed output law.

A drafting scheme grows a tree level by level from a ``TreeInstance`` (context-dependent target
and draft rows, see exact.py): every node at depth d gets ``branching[d]`` children unless its
token is ``stop_token`` (an early leaf, so trees are ragged and use padding nodes). Children of a
node are drawn
- "iid": independently from q(.|path); duplicates stay separate siblings;
- "without_replacement": one after the other from q(.|path) without the earlier siblings
  (Gumbel-top-k order), each with its renormalised row;
- "merged": like "iid", then duplicate siblings merged into one (first-appearance order); the k-th
  distinct child's row is q without the earlier distinct children, renormalised;
- "top_k": deterministically the k most likely tokens (point masses).
Nodes are listed breadth first, so parents come first and siblings in drawing order.

The reference laws (``reference_law``) follow the verifiers' definitions node by node with their
own arithmetic (no code shared with tree.py): they check the vectorised sampler, and with a wrong
``update`` they are the planted variants. ``completed_law`` turns any per-tree law into the law of
D+1 tokens after completing every emission with target sampling.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .exact import Emissions, TreeInstance

MODES = ("iid", "without_replacement", "merged", "top_k")


class Scheme(NamedTuple):
    """branching[d]: children per node at depth d (root = depth 0); mode: one of MODES;
    stop_token: nodes with this token get no children (None: never)."""

    branching: tuple[int, ...]
    mode: str = "iid"
    stop_token: int | None = None


class TreeDraft(NamedTuple):
    """T trees of one scheme, N template nodes each (padding where a node was not drawn).

    tokens, parents [T, N] (parents -2 for padding); q [T, N, V] the row each node was drawn from
    (one-hot for top_k); p [T, N+1, V] target rows (slot 0 = root); prob [T] probability of each
    tree (enumeration) or 1/T (samples); paths [T, N+1, D] tokens from the root to each slot;
    depth [T, N+1]; point_mass: the q rows are one-hot (verify with draft_probs=None).
    """

    tokens: Tensor
    parents: Tensor
    q: Tensor
    p: Tensor
    prob: Tensor
    paths: Tensor
    depth: Tensor
    point_mass: bool


def template(branching: tuple[int, ...]) -> tuple[list[int], list[tuple[int, list[int]]]]:
    """Parents of the full tree listed breadth first, and its sibling groups (parent, children)."""
    parents: list[int] = []
    groups: list[tuple[int, list[int]]] = []
    frontier = [-1]
    for k in branching:
        nxt = []
        for par in frontier:
            kids = list(range(len(parents), len(parents) + k))
            parents.extend([par] * k)
            groups.append((par, kids))
            nxt.extend(kids)
        frontier = nxt
    return parents, groups


def sibling_rows(base: Tensor, draws: Tensor, mode: str) -> Tensor:
    """Row each sibling was drawn from: base [T, V] and draws [T, k] -> [T, k, V]."""
    k = draws.shape[1]
    if mode == "top_k":
        return torch.nn.functional.one_hot(draws.clamp(min=0), base.shape[-1]).to(base.dtype)
    if mode == "iid":
        return base.unsqueeze(1).expand(-1, k, -1).clone()
    rows, cur = [], base.clone()
    for j in range(k):  # without the earlier siblings, renormalised
        rows.append(cur / cur.sum(-1, keepdim=True))
        cur = cur.scatter(-1, draws[:, j : j + 1].clamp(min=0), 0.0)
    return torch.stack(rows, 1)


def group_outcomes(base: Tensor, k: int, mode: str) -> tuple[Tensor, Tensor]:
    """All ways a sibling group can come out: (draws [C, k] with -1 = no such child, prob [T, C])."""
    v = base.shape[-1]
    if mode == "top_k":
        order = torch.sort(base, stable=True, dim=-1, descending=True).indices[:, :k]
        return order, torch.ones(base.shape[0], 1, dtype=base.dtype)  # per-tree draws: handled by caller
    tuples = torch.tensor(list(itertools.product(range(v), repeat=k)), dtype=torch.long)
    iid = base[:, tuples].prod(-1) if k else torch.ones(base.shape[0], 1, dtype=base.dtype)  # [T, C]
    if mode == "iid":
        return tuples, iid
    if mode == "merged":
        distinct = [list(dict.fromkeys(t)) for t in tuples.tolist()]
        keys = sorted({tuple(d) for d in distinct})
        index = torch.tensor([keys.index(tuple(d)) for d in distinct])
        prob = torch.zeros(base.shape[0], len(keys), dtype=base.dtype).index_add_(1, index, iid)
        draws = torch.tensor([list(d) + [-1] * (k - len(d)) for d in keys], dtype=torch.long)
        return draws, prob
    perms = torch.tensor(list(itertools.permutations(range(v), k)), dtype=torch.long)
    rows = sibling_rows(base.unsqueeze(1).expand(-1, perms.shape[0], -1).reshape(-1, v),
                        perms.repeat(base.shape[0], 1), mode).view(base.shape[0], perms.shape[0], k, v)
    prob = rows.gather(-1, perms.view(1, -1, k, 1).expand(base.shape[0], -1, -1, 1)).squeeze(-1).prod(-1)
    return perms, prob


def _finish(inst: TreeInstance, tokens: Tensor, parents: Tensor, q: Tensor, prob: Tensor,
            point_mass: bool) -> TreeDraft:
    t, n = tokens.shape
    v, d_max = inst.vocab, inst.depth
    depth = torch.zeros(t, n + 1, dtype=torch.long)
    ids = torch.zeros(t, n + 1, dtype=torch.long)
    paths = torch.zeros(t, n + 1, d_max, dtype=torch.long)
    p = torch.zeros(t, n + 1, v, dtype=torch.float64)
    p[:, 0] = inst.p[0][0]
    rows = torch.arange(t)
    for i in range(n):
        real = parents[:, i] != -2
        par = (parents[:, i] + 1).clamp(min=0)
        depth[:, i + 1] = torch.where(real, depth[rows, par] + 1, 0)
        ids[:, i + 1] = torch.where(real, ids[rows, par] * v + tokens[:, i], 0)
        paths[:, i + 1] = paths[rows, par]
        col = (depth[:, i + 1] - 1).clamp(min=0)
        paths[rows[real], i + 1, col[real]] = tokens[real, i]
        for d in range(1, d_max + 1):
            sel = real & (depth[:, i + 1] == d)
            p[sel, i + 1] = inst.p[d][ids[sel, i + 1]]
    return TreeDraft(tokens, parents, q, p, prob, paths, depth, point_mass)


class Partial(NamedTuple):
    """Trees being drawn, one row each: tokens, parents [T, N]; q [T, N, V]; base-V prefix id and
    depth of every slot [T, N+1]."""

    tokens: Tensor
    parents: Tensor
    q: Tensor
    ids: Tensor
    depth: Tensor

    @staticmethod
    def empty(count: int, n: int, vocab: int) -> Partial:
        return Partial(torch.zeros(count, n, dtype=torch.long), torch.full((count, n), -2, dtype=torch.long),
                       torch.zeros(count, n, vocab, dtype=torch.float64),
                       torch.zeros(count, n + 1, dtype=torch.long), torch.zeros(count, n + 1, dtype=torch.long))

    def take(self, index: Tensor) -> Partial:
        return Partial(*(t[index].clone() for t in self))

    def parent_row(self, inst: TreeInstance, scheme: Scheme, par: int) -> tuple[Tensor, Tensor]:
        """(grow [T]: the node gets children, base [T, V]: its draft row q(.|path))."""
        slot = par + 1
        grow = torch.ones(self.tokens.shape[0], dtype=torch.bool) if par < 0 else self.parents[:, par] != -2
        if scheme.stop_token is not None and par >= 0:
            grow &= self.tokens[:, par] != scheme.stop_token
        d = int(self.depth[grow, slot].max()) if bool(grow.any()) else 0  # one depth per template slot
        return grow, inst.q[d][self.ids[:, slot]]

    def place(self, par: int, kids: list[int], draws: Tensor, rows: Tensor) -> None:
        """Write the sibling group of ``par``: draws [T, k] (-1 = no such child), rows [T, k, V]."""
        slot, v = par + 1, self.q.shape[-1]
        for j, node in enumerate(kids):
            real = draws[:, j] >= 0
            self.tokens[:, node] = torch.where(real, draws[:, j], 0)
            self.parents[:, node] = torch.where(real, par, -2)
            self.q[:, node] = torch.where(real.unsqueeze(1), rows[:, j], 0.0)
            self.ids[:, node + 1] = torch.where(real, self.ids[:, slot] * v + draws[:, j].clamp(min=0), 0)
            self.depth[:, node + 1] = torch.where(real, self.depth[:, slot] + 1, 0)


def enumerate_trees(inst: TreeInstance, scheme: Scheme) -> TreeDraft:
    """Every tree the scheme can draw, with its probability (they sum to 1)."""
    if len(scheme.branching) > inst.depth:
        raise ValueError(f"scheme: depth {len(scheme.branching)} exceeds the instance depth {inst.depth}")
    if scheme.mode not in MODES:
        raise ValueError(f"scheme: mode must be one of {MODES}, got {scheme.mode!r}")
    tmpl_parents, groups = template(scheme.branching)
    state = Partial.empty(1, len(tmpl_parents), inst.vocab)
    prob = torch.ones(1, dtype=torch.float64)
    for par, kids in groups:
        grow, base = state.parent_row(inst, scheme, par)
        if scheme.mode == "top_k":  # one outcome per tree
            draws, probs = group_outcomes(base, len(kids), "top_k")[0].unsqueeze(1), torch.ones(base.shape[0], 1)
        else:
            outcomes, probs = group_outcomes(base, len(kids), scheme.mode)
            draws = outcomes.unsqueeze(0).expand(base.shape[0], -1, -1)
        c = draws.shape[1]
        counts = torch.where(grow, c, 1)  # a node without children keeps one (empty) outcome
        src = torch.arange(prob.shape[0]).repeat_interleave(counts)
        within = torch.cat([torch.arange(int(m)) for m in counts]).clamp(max=c - 1)
        state, base, g = state.take(src), base[src], grow[src]
        new = torch.where(g.unsqueeze(1), draws[src, within], -1)  # [T', k]
        prob = prob[src] * torch.where(g, probs[src, within].to(prob.dtype), 1.0)
        state.place(par, kids, new, sibling_rows(base, new, scheme.mode))
        keep = prob > 0
        state, prob = state.take(keep), prob[keep]
    return _finish(inst, state.tokens, state.parents, state.q, prob, scheme.mode == "top_k")


def draw_group(base: Tensor, k: int, mode: str, generator: torch.Generator) -> Tensor:
    """[T, k] sibling tokens drawn from the rows base [T, V] (-1 = no such child, for merged)."""
    if mode == "top_k":
        return torch.sort(base, stable=True, dim=-1, descending=True).indices[:, :k]
    if mode in ("iid", "merged"):
        draws = torch.multinomial(base, k, replacement=True, generator=generator)
        if mode == "merged":
            out = torch.full_like(draws, -1)
            for r, row in enumerate(draws.tolist()):
                uniq = list(dict.fromkeys(row))
                out[r, : len(uniq)] = torch.tensor(uniq)
            draws = out
        return draws
    cur, cols = base.clone(), []
    for _ in range(k):  # one after the other, without the earlier siblings
        x = torch.multinomial(cur, 1, generator=generator)
        cols.append(x)
        cur = cur.scatter(-1, x, 0.0)
    return torch.cat(cols, 1)


def sample_trees(inst: TreeInstance, scheme: Scheme, count: int, generator: torch.Generator) -> TreeDraft:
    """``count`` trees drawn from the scheme (the real drafting path for Monte Carlo tests)."""
    tmpl_parents, groups = template(scheme.branching)
    state = Partial.empty(count, len(tmpl_parents), inst.vocab)
    for par, kids in groups:
        grow, base = state.parent_row(inst, scheme, par)
        draws = torch.where(grow.unsqueeze(1), draw_group(base, len(kids), scheme.mode, generator), -1)
        state.place(par, kids, draws, sibling_rows(base, draws, scheme.mode))
    prob = torch.full((count,), 1.0 / count, dtype=torch.float64)
    return _finish(inst, state.tokens, state.parents, state.q, prob, scheme.mode == "top_k")


# ---------------------------------------------------------------- reference laws

Update = Callable[..., tuple[Tensor, Tensor]]


def weighted_update(w: Tensor, row: Tensor, q_row: Tensor, token: Tensor) -> tuple[Tensor, Tensor]:
    """After a child drawn from q_row failed: a = w P - q, S = sum a_+, N = sum a_-;
    new weight S / N and new row a_+ / S (the row is kept where S = 0: that state has no mass)."""
    a = w.unsqueeze(1) * row - q_row
    s = a.clamp(min=0).sum(1)
    neg = (-a).clamp(min=0).sum(1)
    new_row = torch.where((s > 0).unsqueeze(1), a.clamp(min=0) / s.clamp(min=1e-300).unsqueeze(1), row)
    return torch.where(neg > 0, s / neg.clamp(min=1e-300), torch.ones_like(s)), new_row


def rrs_update(w: Tensor, row: Tensor, q_row: Tensor, token: Tensor) -> tuple[Tensor, Tensor]:
    """After a rejected child: row (P - q)_+ / S, weight stays 1."""
    r = (row - q_row).clamp(min=0)
    s = r.sum(1)
    return w, torch.where((s > 0).unsqueeze(1), r / s.clamp(min=1e-300).unsqueeze(1), row)


def reference_law(draft: TreeDraft, method: str, update: Update | None = None) -> Tensor:
    """[T, N+1, V]: probability that slot s is the last accepted and the next token is v, for each
    fixed tree of ``draft``, computed node by node from the verifier's definition.

    "weighted": visit(node, w): for each child c in order, visit it with weight min(1, w P(x_c) /
    q_c(x_c)); if its subtree fails, (w, P) <- update(w, P, q_c); then accept the node with
    probability w (the root always). "rrs": accept child c with probability min(1, P(x_c)/q_c(x_c))
    and move into it, otherwise P <- update; stop at the node whose children are all rejected.
    """
    if method not in ("weighted", "rrs"):
        raise ValueError(f"method: expected 'weighted' or 'rrs', got {method!r}")
    update = update or (weighted_update if method == "weighted" else rrs_update)
    t, n = draft.tokens.shape
    law = torch.zeros(t, n + 1, draft.p.shape[-1], dtype=torch.float64)
    shapes, group = torch.unique(draft.parents, dim=0, return_inverse=True)
    for gi, shape in enumerate(shapes.tolist()):
        sel = (group == gi).nonzero().squeeze(1)
        children: dict[int, list[int]] = {s: [] for s in range(n + 1)}
        for i, par in enumerate(shape):
            if par != -2:
                children[par + 1].append(i + 1)
        law[sel] = _shape_law(children, draft.tokens[sel], draft.q[sel], draft.p[sel], method, update)
    return law


def _shape_law(children: dict[int, list[int]], tok: Tensor, q: Tensor, p: Tensor, method: str,
               update: Update) -> Tensor:
    """reference_law for trees of one shape (children lists by slot), batched over the trees."""
    out = torch.zeros(tok.shape[0], p.shape[1], p.shape[-1], dtype=torch.float64)

    def ratio(row: Tensor, c: int) -> Tensor:
        x = tok[:, c - 1 : c]
        px, qx = row.gather(1, x).squeeze(1), q[:, c - 1].gather(1, x).squeeze(1)
        return torch.where(px > 0, px / qx, torch.zeros_like(px))

    def visit_weighted(slot: int, w: Tensor, scale: Tensor) -> Tensor:
        row, alive = p[:, slot].clone(), torch.ones_like(w)
        for c in children[slot]:
            fail = visit_weighted(c, (w * ratio(row, c)).clamp(max=1.0), scale * alive)
            alive = alive * fail
            w, row = update(w, row, q[:, c - 1], tok[:, c - 1])
        accept = torch.ones_like(w) if slot == 0 else w
        out[:, slot] += (scale * alive * accept).unsqueeze(1) * row
        return alive * (1.0 - accept)

    def visit_rrs(slot: int, scale: Tensor) -> None:
        row, alive = p[:, slot].clone(), torch.ones_like(scale)
        for c in children[slot]:
            take = ratio(row, c).clamp(max=1.0)
            visit_rrs(c, scale * alive * take)
            alive = alive * (1.0 - take)
            _, row = update(torch.ones_like(scale), row, q[:, c - 1], tok[:, c - 1])
        out[:, slot] += (scale * alive).unsqueeze(1) * row

    ones = torch.ones(tok.shape[0], dtype=torch.float64)
    if method == "weighted":
        visit_weighted(0, ones, ones)
    else:
        visit_rrs(0, ones)
    return out


def completed_law(inst: TreeInstance, draft: TreeDraft, law: Tensor) -> tuple[Tensor, float]:
    """(law of D+1 tokens [V^(D+1)], E[num_accepted]) from per-tree laws [T, N+1, V]: each tree is
    weighted by its probability and each emission completed by target sampling."""
    t, slots, v = law.shape
    mass = draft.prob.unsqueeze(1) * law.sum(-1)  # [T, N+1]
    out = Emissions(inst)
    out.add(draft.paths.reshape(t * slots, -1), draft.depth.reshape(-1),
            draft.prob.repeat_interleave(slots), law.reshape(t * slots, v))
    return out.completed(), float((mass * draft.depth).sum())


def law_tensor(slot_law: Tensor, rows: Tensor) -> Tensor:
    """(P_slot [T, N+1], next-token rows [T, N+1, V]) from tree_decision_law -> [T, N+1, V]."""
    return slot_law.unsqueeze(-1) * rows
