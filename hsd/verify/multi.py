"""Multi-draft verification of M chains sampled independently from q (``verify_multi``), as one
call of ``verify_tree`` on the chains' grafted tree.

The grafted tree (``chains_to_tree``). Chains are not merged: the root has M children, the first
tokens of the M chains, duplicates included, each drawn i.i.d. from q. In addition, chain j is
grafted under every node of an earlier chain m < j whose path it shares: if chain j equals chain m
on its first d tokens, the node of chain m at depth d gets a child holding chain j's token d+1,
followed by the rest of chain j (and, recursively, the later chains that share that path). So a
chain can continue wherever an earlier one stopped, as in recursive rejection sampling chain by
chain, instead of only at the root as in a plain star of M chains (which accepts fewer tokens).
Every node keeps the q row of its own chain at its position: given its path, a chain's next token
is a fresh draw from q. A grafted node whose token equals an earlier sibling's is dead once that
sibling's subtree fails (the parent's residual is 0 there), which is why the duplicates' shared
information cannot bias the weighted verifier (docs/tree_verification.md).

- method="tokenwise": recursive rejection sampling on the grafted tree. This is exactly the
  chain-by-chain recursive rejection sampling (SpecInfer-style) verify_multi has always done,
  draw for draw with the same uniforms.
- method="hsd": the weighted tree verifier on the grafted tree: block verification (= HSD) on each
  chain, residuals carried across chains. Lossless; in exact enumeration it accepts at least as
  many tokens as recursive block verification (verify_multi's earlier "hsd", which restarted the
  weights at 1 for every chain) on every instance measured.

Coins: node (chain j, position t) grafted at depth d uses coins[:, j, t - d]: its level counted
from the first unverified position of chain j, as before. Copies of a chain share coins; only one
of them can ever decide (the others are dead duplicates or never reached).
Shapes: B rows, M chains, K tokens per chain, V vocabulary, N nodes of the grafted tree.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .api import VerifyResult, cast_inputs, draw_uniforms
from .tree import PAD, TreeRule, TreeVerifyResult, rule_of, tree_decision_law, verify_tree
from .validate import check_chain_inputs, check_uniforms

MULTI_METHODS = ("hsd", "tokenwise")
TREE_METHOD = {"hsd": "weighted", "tokenwise": "rrs"}
NAMES = ("draft_tokens", "draft_probs", "target_probs")


class ChainTree(NamedTuple):
    """The grafted tree of M chains per row: tokens, parents [B, N] (-1 root, -2 padding);
    chain, position [B, N]: the chain and 0-based position whose token, q row and target row the
    node holds; coin [B, N]: index into coins.view(B, M * K)."""

    tokens: Tensor
    parents: Tensor
    chain: Tensor
    position: Tensor
    coin: Tensor


def chains_to_tree(draft_tokens: Tensor) -> ChainTree:
    """[B, M, K] chains -> their grafted tree, built level by level (nodes listed breadth first;
    the children of a node are its own chain's next token, then the later chains that share its
    path, in chain order)."""
    b, m, k = draft_tokens.shape
    dev = draft_tokens.device
    tok = draft_tokens.long()
    same = tok.unsqueeze(2) == tok.unsqueeze(1)  # [B, M, M, K]: chain j and chain m agree at t
    ones = torch.ones(b, m, m, 1, dtype=torch.bool, device=dev)
    shared = torch.cat([ones, same.long().cumprod(-1).bool()], -1)  # [B, M, M, K+1]: first d agree
    chains = torch.arange(m, device=dev)
    # Frontier: one entry per node of the current depth (row, slot, owner chain, graft depth).
    f_row = torch.arange(b, device=dev)
    f_slot = torch.zeros(b, dtype=torch.long, device=dev)
    f_owner = torch.zeros(b, dtype=torch.long, device=dev)
    f_start = torch.zeros(b, dtype=torch.long, device=dev)
    count = torch.ones(b, dtype=torch.long, device=dev)  # slots used per row (root = 0)
    parts = []
    for d in range(k):
        row = f_row.repeat_interleave(m)
        owner = f_owner.repeat_interleave(m)
        j = chains.repeat(f_row.shape[0])
        ok = (j >= owner) & shared[row, j, owner, d]
        row, j, owner = row[ok], j[ok], owner[ok]
        parent = f_slot.repeat_interleave(m)[ok]
        start = torch.where(j == owner, f_start.repeat_interleave(m)[ok], d)
        per_row = torch.bincount(row, minlength=b)
        offset = per_row.cumsum(0) - per_row
        slot = count[row] + torch.arange(row.shape[0], device=dev) - offset[row]
        count = count + per_row
        parts.append((row, slot, tok[row, j, d], parent, j, torch.full_like(j, d), start))
        f_row, f_slot, f_owner, f_start = row, slot, j, start
    n = int(count.max()) - 1
    out = [torch.zeros(b, n, dtype=torch.long, device=dev) for _ in range(5)]
    out[1].fill_(PAD)
    for row, slot, token, parent, j, pos, start in parts:
        i = slot - 1
        out[0][row, i] = token
        out[1][row, i] = parent - 1  # slot 0 (root) -> -1
        out[2][row, i] = j
        out[3][row, i] = pos
        out[4][row, i] = j * k + pos - start
    return ChainTree(*out)


def tree_rows(tree: ChainTree, draft_probs: Tensor, target_probs: Tensor) -> tuple[Tensor, Tensor]:
    """q rows [B, N, V] and target rows [B, N+1, V] of the grafted tree's nodes (slot 0 = root)."""
    rows = torch.arange(tree.tokens.shape[0], device=tree.tokens.device).unsqueeze(1)
    q = draft_probs[rows, tree.chain, tree.position]
    p = torch.cat([target_probs[:, 0, :1], target_probs[rows, tree.chain, tree.position + 1]], dim=1)
    return q, p


def _prepare(draft_tokens, draft_probs, target_probs, method, validate):
    if isinstance(method, str):
        if method not in MULTI_METHODS:
            raise ValueError(f"method: expected one of {MULTI_METHODS} for verify_multi, got {method!r}")
        rule = rule_of(TREE_METHOD[method])
    elif isinstance(method, TreeRule):
        rule = method
    else:
        raise ValueError(f"method: expected one of {MULTI_METHODS} (or a TreeRule), got {method!r}")
    if validate:
        check_chain_inputs(draft_tokens, draft_probs, target_probs, names=NAMES, lead=2,
                           allow_point_mass=False)
    return rule, *cast_inputs(draft_tokens, draft_probs, target_probs)


def owner_of(tree: ChainTree, last_node: Tensor) -> Tensor:
    """[B] chain of the last accepted node (0 where only the root was accepted)."""
    node = last_node.clamp(min=0).unsqueeze(1)
    return torch.where(last_node >= 0, tree.chain.gather(1, node).squeeze(1), 0)


def verify_multi(draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor, *, method: str = "hsd",
                 generator: torch.Generator | None = None, uniforms: tuple[Tensor, Tensor] | None = None,
                 validate: bool = True) -> VerifyResult:
    """Lossless verification of M chains per row, sampled independently from q.

    draft_tokens [B, M, K]; draft_probs [B, M, K, V] (required); target_probs [B, M, K+1, V] (rows
    of chains that share a prefix must be equal). method: "hsd" (weighted tree verifier on the
    grafted tree: block verification along each chain) or "tokenwise" (recursive rejection
    sampling). uniforms: optional (coins [B, M, K], u [B]) in [0, 1); chain m uses coins[:, m, j]
    for its j-th level counted from its first unverified position.
    Returns VerifyResult with ``chain`` [B]: emitted tokens are
    draft_tokens[b, chain[b], :num_accepted[b]] followed by next_token[b].
    """
    rule, tokens, q, p = _prepare(draft_tokens, draft_probs, target_probs, method, validate)
    b, m, k = tokens.shape
    if uniforms is None:
        coins, u = draw_uniforms((b, m, k), p.device, generator)
    else:
        coins, u = check_uniforms(uniforms, (b, m, k), p.device)
    tree, res = verify_chain_tree(tokens, q, p, rule, coins, u)
    return VerifyResult(res.num_accepted, res.next_token, owner_of(tree, res.last_node))


def verify_chain_tree(tokens: Tensor, q: Tensor, p: Tensor, rule: TreeRule, coins: Tensor,
                      u: Tensor) -> tuple[ChainTree, TreeVerifyResult]:
    """verify_multi's sampling path on checked inputs: the grafted tree and verify_tree's result."""
    b, m, k = tokens.shape
    tree = chains_to_tree(tokens)
    q_tree, p_tree = tree_rows(tree, q, p)
    node_coins = coins.reshape(b, m * k).gather(1, tree.coin)
    res = verify_tree(tree.tokens, tree.parents, q_tree, p_tree, method=rule, uniforms=(node_coins, u),
                      validate=False)
    return tree, res


class MultiLaw(NamedTuple):
    """Exact law of verify_multi as weighted outcomes: rows [S] batch row, prob [S],
    chain [S], num_accepted [S], next_token law [S, V]. Probabilities of one row sum to 1."""

    rows: Tensor
    prob: Tensor
    chain: Tensor
    num_accepted: Tensor
    next_law: Tensor


def multi_law(draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor,
              method: str | TreeRule = "hsd") -> MultiLaw:
    """Exact law of verify_multi's output for fixed chains (no sampling): the law of verify_tree
    on the grafted tree, one outcome per node that can be the last accepted one."""
    rule, tokens, q, p = _prepare(draft_tokens, draft_probs, target_probs, method, validate=False)
    tree = chains_to_tree(tokens)
    q_tree, p_tree = tree_rows(tree, q, p)
    law, rows = tree_decision_law(tree.tokens, tree.parents, q_tree, p_tree, rule)
    row, slot = (law > 0).nonzero(as_tuple=True)
    depth = torch.cat([torch.zeros_like(tree.position[:, :1]), tree.position + 1], 1)
    chain = torch.cat([torch.zeros_like(tree.chain[:, :1]), tree.chain], 1)
    return MultiLaw(row, law[row, slot], chain[row, slot], depth[row, slot], rows[row, slot])
