"""EAGLE-2-style dynamic draft trees (and static shapes), built level by level from a drafter that scores
nodes in batches.

    level 0: top_k children of the root
    level d: expand the top_k best nodes of level d - 1 (one batched drafter step), top_k children each
    prune:   keep the best ``total_tokens`` nodes (ancestor-closed, creation order = topological order)

A static shape (``static:B1xB2x...``) expands every node of a level and prunes nothing, so it never ranks.

T = 0 (deterministic, EAGLE-2 exactly): children are the top_k tokens of the draft's softmax, a node's
score is its cumulative draft log-probability, and the tree is verified as point masses (greedy).

T > 0 (sampled; the verifier must know the law of every node): siblings are drawn one after another
*without replacement* from the processed draft row (``q`` with the earlier siblings' tokens removed and
renormalised: the row handed to the verifier). Which nodes exist may depend on anything but the node's
own token, or a kept token would be a selected one and its law no longer its row. So at T > 0 nodes are
ranked by a *value* that leaves the node's own token out: the parent's cumulative log-probability plus
the log of the expected draft probability of the draw, ``log sum_x q'(x) q(x)``, capped by the parent's
and the previous sibling's values (a child never outranks its parent, a later sibling never outranks an
earlier one, ties go to the earlier node). Every node that depends on a token (its descendants, its later
siblings and theirs) then ranks after it, so its own keep/expand decisions never see its token. Siblings
are drawn without replacement rather than i.i.d. because a duplicate sibling is rejected for sure after
its twin: it spends a node for nothing (and merging duplicates would change the declared rows).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hsd.verify import without_replacement_rows

from .draft import Draft
from .sampling import SamplingParams, process
from .tree_spec import TreeSpec, prune_tree


@dataclass
class TreeNode:
    token: int
    parent: int  # index of the parent node, -1 = the root
    depth: int  # 0 = child of the root
    cum: float  # cumulative draft log-probability of the path, own token included
    value: float  # the rank used for expansion / pruning (T = 0: cum; T > 0: without the own token)
    row: Tensor | None = None  # T > 0: the parent's processed draft row [V] (before removing earlier siblings)


def draw_without_replacement(q: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k ordered draws without replacement from each row of q [M, V]: the top k of q / E with E ~ Exp(1)
    i.i.d. (an exponential race, i.e. Gumbel-top-k: its order is the law of drawing one token after another
    from the renormalised rest). Returns [M, k] token ids, -1 where a row has fewer than k tokens of
    positive mass."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    u = torch.rand(q.shape, generator=generator, device=q.device, dtype=dtype)
    race = q.to(dtype) / -(1.0 - u).log()  # 1 - u in (0, 1]: E in [0, inf), E = 0 only when u = 0 exactly
    top = torch.topk(race, min(k, q.shape[-1]), dim=-1)
    return torch.where(top.values > 0, top.indices, -1)


def _children(logits: Tensor, parents: list[int], nodes: list[TreeNode], k: int, params: SamplingParams,
              generator: torch.Generator | None) -> list[int]:
    """Append up to k children for each node of ``parents`` (-1 = the root), drawn from the drafter's
    target-vocabulary logits [M, V] after them (one row per parent); returns the new nodes' indices."""
    made: list[int] = []
    if params.greedy:
        logp = torch.log_softmax(logits.float(), -1)
        top = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
        vals, toks = top.values.tolist(), top.indices.tolist()
    else:
        q = process(logits, params)
        toks = draw_without_replacement(q, k, generator)
        qt = q.gather(1, toks.clamp(min=0)).double().tolist()
        sq = (q.double() ** 2).sum(-1).tolist()
        toks = toks.tolist()
    for i, parent in enumerate(parents):
        par = nodes[parent] if parent >= 0 else None
        depth = par.depth + 1 if par is not None else 0
        p_cum = par.cum if par is not None else 0.0
        p_val = par.value if par is not None else 0.0
        if params.greedy:
            for lp, tok in zip(vals[i], toks[i]):
                if lp == float("-inf"):  # outside the draft vocabulary
                    break
                nodes.append(TreeNode(int(tok), parent, depth, p_cum + lp, p_cum + lp))
                made.append(len(nodes) - 1)
            continue
        prev, gone, gone_sq = p_val, 0.0, 0.0
        for tok, qx in zip(toks[i], qt[i]):
            if tok < 0:  # fewer tokens of positive mass than top_k
                break
            # expected draft probability of this draw, sum_x q'(x) q(x) with q' = q without the earlier
            # siblings, renormalised: it does not depend on the token drawn here
            e = max((sq[i] - gone_sq) / max(1.0 - gone, 1e-300), 1e-300)
            prev = min(prev, p_cum + math.log(e))
            nodes.append(TreeNode(int(tok), parent, depth, p_cum + math.log(qx), prev, q[i]))
            made.append(len(nodes) - 1)
            gone, gone_sq = gone + qx, gone_sq + qx * qx
    return made


def build_tree(root_logits: Tensor, expand: Callable[[list[int], list[TreeNode]], Tensor], spec: TreeSpec,
               params: SamplingParams, generator: torch.Generator | None = None) -> tuple[Draft, int]:
    """Draft one tree (batch row 0).

    root_logits [V]: the drafter's target-vocabulary logits after the root (the last committed token).
    expand(ids, nodes) -> logits [len(ids), V]: feed nodes ``ids`` (one level, ascending) to the drafter and
    return the logits after each. Returns (the draft: tokens [1, N], parents [1, N], q [1, N, V] at T > 0 (the
    rows the nodes were drawn from: the parent's row without the earlier siblings, renormalised) or None at
    T = 0, N <= total_tokens; the number of drafter steps taken).
    """
    static = spec.branching
    nodes: list[TreeNode] = []
    level = _children(root_logits[None], [-1], nodes, static[0] if static else spec.top_k, params, generator)
    steps = 0
    for d in range(1, spec.depth):
        if not level:
            break
        if static:  # a fixed shape: every node of the level gets static[d] children
            best = level
        else:
            best = sorted(level, key=lambda i: (-nodes[i].value, i))[: spec.top_k]
            best.sort()
            if params.greedy and hopeless(nodes, best, spec.total_tokens):
                break  # the remaining levels would only add nodes that the final prune drops: same tree
        logits = expand(best, nodes)
        steps += 1
        level = _children(logits, best, nodes, static[d] if static else spec.top_k, params, generator)
    dev = root_logits.device
    if not nodes:
        return Draft.empty(1, dev), steps
    parents = torch.tensor([n.parent for n in nodes], dtype=torch.long)
    values = torch.tensor([n.value for n in nodes], dtype=torch.float64)
    keep, new_parents = prune_tree(parents, values, min(spec.total_tokens, len(nodes)))  # static: keeps all
    kept = [nodes[i] for i in keep.tolist()]
    tokens = torch.tensor([[n.token for n in kept]], dtype=torch.long, device=dev)
    new_parents = new_parents.to(dev)[None]
    q = None if params.greedy else sibling_rows(kept, new_parents[0].tolist())[None]
    return Draft(tokens, new_parents, q), steps


def hopeless(nodes: list[TreeNode], best: list[int], total: int) -> bool:
    """True when no descendant of ``best`` can survive pruning to ``total`` nodes: ``total`` nodes already
    rank above every node of ``best`` (values never increase along a path, and ties go to earlier nodes),
    so expanding further levels only costs head steps. Exact at T = 0, where the draft is deterministic."""
    if len(nodes) < total:
        return False
    kth = sorted((n.value for n in nodes), reverse=True)[total - 1]
    return all(nodes[i].value < kth for i in best)


def sibling_rows(kept: list[TreeNode], parents: list[int]) -> Tensor:
    """The rows the kept nodes were drawn from [N, V]: each node's parent row without the tokens of its
    earlier siblings, renormalised (:func:`hsd.verify.without_replacement_rows`). Kept siblings are a
    prefix of the drawn order, so removing the kept earlier siblings is exact."""
    rows = torch.stack([n.row for n in kept])
    tokens = torch.tensor([[n.token for n in kept]], device=rows.device)
    return without_replacement_rows(tokens, torch.tensor([parents], device=rows.device), rows[None])[0]
