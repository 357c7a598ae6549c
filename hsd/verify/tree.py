"""Lossless verification of a draft tree (``verify_tree``): greedy, recursive rejection sampling
and the weighted (Traversal-style) tree verifier that is block verification on a chain.

Layout. Row b holds N nodes listed parents first: node i has token ``tokens[b, i]`` and parent
``parents[b, i]`` (-1 = the root, i.e. the committed prefix; -2 = padding, ignored). Children of a
node are visited in index order, which must be the order they were drafted in. Internally "slot"
s = i + 1 addresses node i and slot 0 the root, matching ``target_probs[b, s]`` (the target row
after node i; row 0 after the prefix).

q rows. ``draft_probs[b, i]`` is the law node i's token was actually drawn from, given its path,
its earlier siblings and their subtrees: q(.|path) for i.i.d. siblings, q(.|path) with the earlier
siblings' tokens removed and renormalised for draws without replacement (``without_replacement_rows``
builds these). ``draft_probs=None`` treats every node as a point mass on its token: exact for
deterministic (top-k) trees, and lossless for any tree, but it accepts fewer tokens than the true
rows of a sampled tree. docs/tree_verification.md states the contract and the proofs.

Both random methods reduce to per-node numbers computed in one pass in index order: the state of
a node (weight w, current row P) is updated once per child "as if that child's subtree failed",
which is deterministic. Then
- "rrs": child c is accepted if coin_c * q_c(x_c) <= P(x_c) (P = the parent's row after the
  earlier siblings were rejected); the path follows the first accepted child at every node.
- "weighted": node c passes if coin_c <= h_c, its weight after all its children failed; the
  accepted node is the first passing node in post-order (children before parents, siblings in
  order), found top-down as the first child whose subtree holds a passing node.
The token is drawn with ``u`` from the accepted node's last residual (or its target row).
On a chain the coins, weights and rows are those of ``verify`` (tokenwise / blockwise), so the two
agree draw for draw. Shapes: B rows, N nodes, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .api import draw_uniforms
from .common import RESIDUAL_EPS, compute_dtype, inverse_cdf, normalized, residual
from .tree_validate import PAD, check_method, check_tree_inputs
from .validate import check_uniforms


@dataclass(frozen=True)
class TreeVerifyResult:
    """Outcome per batch row.

    path: [B, D] int64, the accepted nodes from depth 1 down (D = deepest node of the batch), -1 padded.
    num_accepted: [B] int64, number of accepted draft tokens (= number of nodes on ``path``).
    next_token: [B] int64, the token drawn after the last accepted node (residual or bonus).
    Emitted tokens: tokens[b, path[b, :num_accepted[b]]] then next_token[b].
    """

    path: Tensor
    num_accepted: Tensor
    next_token: Tensor

    @property
    def last_node(self) -> Tensor:
        """[B] index of the last accepted node, -1 where only the root was accepted."""
        idx = (self.num_accepted - 1).clamp(min=0).unsqueeze(1)
        if self.path.shape[1] == 0:
            return torch.full_like(self.num_accepted, -1)
        return torch.where(self.num_accepted > 0, self.path.gather(1, idx).squeeze(1), -1)


class Structure(NamedTuple):
    """parent_slot [B, N] (0 = root, -1 = padding), real [B, N] bool, depth [B, N+1] (root 0),
    anc [B, N+1, N+1] bool: ``anc[b, s, a]`` = slot a is slot s itself or one of its ancestors (the root is an
    ancestor of every real node; a padding slot has only itself)."""

    parent_slot: Tensor
    real: Tensor
    depth: Tensor
    anc: Tensor


def ancestors(parent_slot: Tensor) -> Tensor:
    """parent_slot [B, N] (slot of each node's parent, 0 = root, -1 = none) -> ancestors-or-self [B, N+1, N+1]
    bool over the slots (slot 0 = root), by repeated squaring of the parent relation: ceil(log2(N + 1))
    batched matmuls, no loop over nodes."""
    b, n = parent_slot.shape
    dev = parent_slot.device
    step = torch.eye(n + 1, dtype=torch.float32, device=dev).expand(b, n + 1, n + 1).clone()
    has = parent_slot >= 0
    rows = torch.arange(1, n + 1, device=dev).expand(b, n)
    bi = torch.arange(b, device=dev)[:, None].expand(b, n)
    step[bi[has], rows[has], parent_slot[has]] = 1.0
    for _ in range(max(1, (n + 1).bit_length())):  # path lengths <= N: after k squarings, <= 2^k
        step = (torch.bmm(step, step) > 0).float()
    return step > 0


def structure(parents: Tensor) -> Structure:
    real = parents != PAD
    parent_slot = torch.where(real, parents.long() + 1, torch.full_like(parents, -1, dtype=torch.long))
    anc = ancestors(parent_slot)
    depth = anc.sum(-1) - 1  # ancestors-or-self, the root counted once: the depth (padding: 0)
    return Structure(parent_slot, real, depth, anc)


def sibling_rank(struct: Structure) -> Tensor:
    """[B, N] number of earlier real siblings of each node (0 = first child of its parent)."""
    par, real = struct.parent_slot, struct.real
    n = par.shape[1]
    earlier = torch.ones(n, n, dtype=torch.bool, device=par.device).tril(-1)  # [i, j]: j < i
    same = (par.unsqueeze(2) == par.unsqueeze(1)) & earlier & real.unsqueeze(1) & real.unsqueeze(2)
    return same.sum(-1)


def waves(struct: Structure) -> Tensor:
    """[B, N] the step at which ``tree_levels`` can process each node (0 for padding): a node needs its
    parent's initial state and its earlier siblings' updates of it, so wave(i) = wave(parent) + 1 + rank(i)
    (the sum of 1 + rank over its path). Nodes of one wave have distinct parents and depend only on earlier
    waves, so one wave is one batch of row operations."""
    c = torch.where(struct.real, 1 + sibling_rank(struct), 0).to(torch.float32)
    path = struct.anc[:, 1:, 1:].to(torch.float32)  # [B, N, N] ancestors-or-self among the nodes
    return torch.bmm(path, c.unsqueeze(-1)).squeeze(-1).round().long()


def with_root(struct: Structure) -> Tensor:
    """[B, N+1] bool: slots that exist (the root and the real nodes)."""
    root = torch.ones(struct.real.shape[0], 1, dtype=torch.bool, device=struct.real.device)
    return torch.cat([root, struct.real], dim=1)


class TreeLevels(NamedTuple):
    """Per-node numbers of one verifier on one batch of trees.

    h: [B, N] probability that node i's own test passes (rrs: min(1, P(x)/q(x)) for the child test;
       weighted: the node's weight after all its children failed). 0 for padding nodes.
    p_tok, q_tok: [B, N] P(x_i) of the parent's current row and q_i(x_i) (rrs coin test, as tokenwise).
    rows: [B, N+1, V] unnormalised row the token is drawn from when slot s is the last accepted
       (its last residual, or its target row when no child failed).
    fallback: [B, N+1, V] target rows, used where a residual has no mass (measure-zero ties).
    """

    h: Tensor
    p_tok: Tensor
    q_tok: Tensor
    rows: Tensor
    fallback: Tensor


class TreeRule:
    """One random tree verifier: the parent update after a failed child, the node test, and how a
    passing node is selected. Tests plant wrong verifiers by overriding one method."""

    name = "abstract"
    weighted = False  # True: weights carried along paths; a child is taken if its subtree passes

    def update_parent(self, w: Tensor, row: Tensor, q_row: Tensor | None,
                      token: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """State of a node after a child drawn from q_row (token) failed.

        w [B] current weight, row [B, V] current normalised row. Returns (new weight [B], the
        unnormalised residual [B, V] (the row a token is drawn from if the node is accepted),
        its mass [B]); the next child sees residual / mass.
        """
        raise NotImplementedError

    def passes(self, levels: TreeLevels, coins: Tensor) -> Tensor:
        """[B, N] bool: node tests with coins [B, N] in [0, 1)."""
        raise NotImplementedError


class RecursiveRejection(TreeRule):
    """SpecInfer-style recursive rejection sampling over the children of the accepted node."""

    name = "rrs"

    def update_parent(self, w, row, q_row, token):
        r = residual(torch.ones_like(w), row, q_row, token, torch.zeros_like(token, dtype=torch.bool))
        return torch.ones_like(w), r, r.sum(-1)

    def passes(self, levels, coins):
        # Exactly the token-wise test (coin * q <= p, and never for p = 0).
        return (coins.to(levels.p_tok.dtype) * levels.q_tok <= levels.p_tok) & (levels.p_tok > 0)


class Weighted(TreeRule):
    """The weighted tree verifier: a failed child leaves its parent with weight S / N, where
    S = sum (w P - q)_+ and N = sum (q - w P)_+ = S + 1 - w, and row (w P - q)_+ / S."""

    name = "weighted"
    weighted = True

    def update_parent(self, w, row, q_row, token):
        r = residual(w, row, q_row, token, torch.zeros_like(token, dtype=torch.bool))
        mass = r.sum(-1)
        if q_row is None:  # point mass on token: the closed form block verification uses
            s = w * (1.0 - row.gather(-1, token.unsqueeze(-1)).squeeze(-1)).clamp_min(0.0)
        else:
            s = mass
        den = s + 1.0 - w
        h = torch.where(den > 0, s / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(s))
        return h.clamp(0.0, 1.0), r, mass

    def passes(self, levels, coins):
        return (coins.to(levels.h.dtype) <= levels.h) & (levels.h > 0)


RULES: dict[str, TreeRule] = {"rrs": RecursiveRejection(), "weighted": Weighted()}
TREE_METHODS = ("greedy", "rrs", "weighted")


def rule_of(method: str | TreeRule) -> TreeRule:
    if isinstance(method, TreeRule):
        return method
    check_method(method, tuple(RULES))
    return RULES[method]


def tree_levels(tokens: Tensor, parents: Tensor, draft_probs: Tensor | None, target_probs: Tensor,
                rule: TreeRule, struct: Structure | None = None) -> TreeLevels:
    """tokens [B, N] int64, parents [B, N], draft_probs [B, N, V] | None, target_probs [B, N+1, V]
    (compute dtype) -> TreeLevels, one batch of row operations per wave (:func:`waves`) rather than one per
    node: the nodes of a wave (distinct parents) are processed together, [B, M, V] at a time.

    Weights are kept as (log R, running max M) per slot, w = exp(log R - M), exactly as block
    verification computes them on a chain; a failed child restarts its parent at (log h, 0).
    Each slot keeps one unnormalised row (its last residual, or its target row) and that row's
    mass; the row a later child sees is row / mass (the target row where the mass is ~0).
    """
    struct = structure(parents) if struct is None else struct
    b, n = tokens.shape
    dev, dtype = target_probs.device, target_probs.dtype
    cur = target_probs.clone()
    mass = torch.ones(b, n + 1, dtype=dtype, device=dev)
    log_r = torch.zeros(b, n + 1, dtype=dtype, device=dev)
    log_m = torch.zeros(b, n + 1, dtype=dtype, device=dev)
    h = torch.zeros(b, n, dtype=dtype, device=dev)
    p_tok = torch.zeros(b, n, dtype=dtype, device=dev)
    q_tok = torch.ones(b, n, dtype=dtype, device=dev)
    safe_tokens = torch.where(struct.real, tokens, torch.zeros_like(tokens))
    wave = waves(struct)
    rows = torch.arange(b, device=dev).unsqueeze(1)
    for w in range(1, int(wave.max()) + 1 if n else 1):
        sel = wave == w
        m = int(sel.sum(-1).max())
        if m == 0:
            continue
        idx = sel.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[:, :m]  # [B, M] this wave's nodes
        ok = sel.gather(1, idx)  # [B, M] (rows with fewer nodes: padded entries)
        par = struct.parent_slot.gather(1, idx).clamp(min=0)
        x = safe_tokens.gather(1, idx)
        row = current_row(cur, mass, target_probs, rows, par)  # [B, M, V]
        px = row.gather(-1, x.unsqueeze(-1)).squeeze(-1)
        q_row = None if draft_probs is None else draft_probs[rows, idx]
        qx = torch.ones_like(px) if q_row is None else q_row.gather(-1, x.unsqueeze(-1)).squeeze(-1)
        p_tok.scatter_(1, idx, torch.where(ok, px, p_tok.gather(1, idx)))
        q_tok.scatter_(1, idx, torch.where(ok, qx, q_tok.gather(1, idx)))
        lr_par, lm_par = log_r[rows, par], log_m[rows, par]
        if rule.weighted:
            lr = lr_par + (px.log() - qx.log())
            log_r.scatter_(1, idx + 1, torch.where(ok, lr, log_r.gather(1, idx + 1)))
            log_m.scatter_(1, idx + 1, torch.where(ok, torch.maximum(lm_par, lr), log_m.gather(1, idx + 1)))
        else:
            h.scatter_(1, idx, torch.where(ok, (px / qx).clamp(max=1.0), h.gather(1, idx)))
        # The parents' states once these children's subtrees have failed (distinct parents in a wave).
        w_new, r, r_mass = rule.update_parent(*(None if t is None else t.flatten(0, 1)
                                                for t in ((lr_par - lm_par).exp(), row, q_row, x)))
        bi, pi = rows.expand(b, m)[ok], par[ok]
        keep = ok.reshape(-1)
        cur[bi, pi] = r[keep]
        mass[bi, pi] = r_mass[keep]
        log_r[bi, pi] = w_new[keep].log()
        log_m[bi, pi] = 0.0
    if rule.weighted:
        h = torch.where(struct.real, (log_r[:, 1:] - log_m[:, 1:]).exp(), 0.0)
    return TreeLevels(h, p_tok, q_tok, cur, target_probs)


def current_row(cur: Tensor, mass: Tensor, target_probs: Tensor, rows: Tensor, par: Tensor) -> Tensor:
    """[..., V] normalised current row of slot ``par`` of each batch row (``rows`` broadcast with ``par``;
    exact target row while no child of that slot has failed: its mass is 1)."""
    m = mass[rows, par]
    row = cur[rows, par] / m.unsqueeze(-1)
    empty = m <= RESIDUAL_EPS  # a residual without mass (measure-zero ties): use the target row
    if bool(empty.any()):
        target = target_probs[rows, par]
        row = torch.where(empty.unsqueeze(-1), target / target.sum(-1, keepdim=True), row)
    return row


def all_on_path(struct: Structure, ok: Tensor) -> Tensor:
    """[B, N+1] bool: every node on the slot's root path (itself included) has ``ok`` [B, N] set; padding
    slots False, the root True."""
    ok_slot = torch.cat([torch.ones_like(ok[:, :1]), ok & struct.real], dim=1)
    return ~(struct.anc & ~ok_slot.unsqueeze(1)).any(-1) & with_root(struct)


def first_child_path(struct: Structure, chosen: Tensor) -> Tensor:
    """Slot [B] of the last node on the path that starts at the root and, at every node, moves to
    its first child (index order) with ``chosen`` [B, N] set. The root's slot is 0."""
    c = chosen & struct.real
    par = struct.parent_slot
    n = c.shape[1]
    earlier = torch.ones(n, n, dtype=torch.bool, device=c.device).tril(-1)
    claimed = ((par.unsqueeze(2) == par.unsqueeze(1)) & earlier & c.unsqueeze(1)).any(-1)  # an earlier sibling chosen
    on_path = all_on_path(struct, c & ~claimed)
    # The path's nodes have distinct depths: its last node is the deepest one.
    return torch.where(on_path, struct.depth, -1).argmax(-1)


def subtree_any(struct: Structure, flag: Tensor) -> Tensor:
    """[B, N] bool: some node in the subtree of node i (itself included) has ``flag`` set."""
    f = torch.cat([torch.zeros_like(flag[:, :1]), flag & struct.real], dim=1)  # per slot
    return (struct.anc & f.unsqueeze(2)).any(1)[:, 1:]  # slot i: some slot j below-or-at i is flagged


def select(struct: Structure, passed: Tensor, rule: TreeRule) -> Tensor:
    """Slot [B] of the last accepted node, given the node tests ``passed`` [B, N]."""
    if rule.weighted:
        # First passing node in post-order: descend into the first child whose subtree passes.
        return first_child_path(struct, subtree_any(struct, passed))
    return first_child_path(struct, passed)


def path_to(struct: Structure, last: Tensor) -> Tensor:
    """[B, D] node indices from depth 1 to the depth of slot ``last`` [B], -1 padded."""
    b = last.shape[0]
    d_max = int(struct.depth.max()) if struct.depth.numel() else 0
    rows = torch.arange(b, device=last.device)
    on = struct.anc[rows, last].clone()  # [B, N+1] the slots on last's path
    on[:, 0] = False
    at = on.unsqueeze(1) & (struct.depth.unsqueeze(1) == torch.arange(1, d_max + 1, device=last.device).view(1, -1, 1))
    slots = torch.arange(struct.anc.shape[-1], device=last.device)
    return torch.where(at.any(-1), (at * slots).sum(-1) - 1, -1)  # one slot per depth at most


def greedy_tree(tokens: Tensor, parents: Tensor, target: Tensor) -> TreeVerifyResult:
    """Longest root path whose every token is the target's argmax at its parent; ties between
    equally deep matching nodes (duplicate siblings) go to the lowest index. next_token is the
    argmax after the last accepted node. ``target`` may be logits or probabilities."""
    struct = structure(parents)
    b, n = tokens.shape
    rows = torch.arange(b, device=tokens.device)
    best = target.argmax(-1)  # [B, N+1]
    match = tokens == best.gather(1, struct.parent_slot.clamp(min=0))
    ok = all_on_path(struct, match)
    slots = torch.arange(n + 1, device=tokens.device)
    score = torch.where(ok, struct.depth * (n + 1) + (n - slots), -1)
    last = score.argmax(-1)
    return TreeVerifyResult(path_to(struct, last), struct.depth[rows, last], best[rows, last])


def cast_tree_inputs(tokens: Tensor, draft_probs: Tensor | None, target_probs: Tensor):
    dtype = compute_dtype(target_probs)
    q = None if draft_probs is None else draft_probs.to(dtype)
    return tokens.long(), q, target_probs.to(dtype)


def verify_tree(tokens: Tensor, parents: Tensor, draft_probs: Tensor | None, target_probs: Tensor, *,
                method: str | TreeRule = "weighted", backend: str = "torch",
                generator: torch.Generator | None = None, uniforms: tuple[Tensor, Tensor] | None = None,
                validate: bool = True) -> TreeVerifyResult:
    """Lossless verification of one draft tree per row.

    tokens [B, N] int64; parents [B, N] (-1 = child of the root, -2 = padding node, otherwise the
    index of an earlier node: parents come first, siblings in drafting order);
    draft_probs [B, N, V]: row i is the law node i was drawn from given its path and its earlier
    siblings (i.i.d.: q(.|path); without replacement: renormalised without the earlier siblings),
    or None for deterministic trees (point masses, e.g. top-k); target_probs [B, N+1, V]: row 0
    after the prefix, row i+1 after node i (the processed distributions actually sampled).
    method: "weighted" (block verification on a chain), "rrs" (recursive rejection sampling; on a
    chain token-wise verification) or "greedy" (temperature 0: target_probs may be logits, only
    the argmax is used; draft_probs and the uniforms are ignored).
    uniforms: optional (coins [B, N], u [B]) in [0, 1): coin i tests node i, u draws the token;
    otherwise drawn with ``generator`` (coins first, as ``verify``). validate=False skips checks.
    backend: "torch", or "triton" (the fused kernel of hsd.kernels.tree_kernels, one program per tree;
    on a CPU only under TRITON_INTERPRET=1): the same draws from the same uniforms. For a launch with
    in-kernel Philox uniforms and caller-owned buffers (CUDA graphs) use hsd.kernels.tree_launch.
    """
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend: expected 'torch' or 'triton', got {backend!r}")
    greedy = isinstance(method, str) and method == "greedy"
    if validate:
        check_tree_inputs(tokens, parents, draft_probs, target_probs, logits=greedy)
    b, n = tokens.shape
    device = target_probs.device
    if backend == "triton":
        if not isinstance(method, str):
            raise ValueError("backend 'triton': method must be a name ('greedy', 'rrs', 'weighted')")
        return _verify_tree_triton(tokens, parents, draft_probs, target_probs, method, generator, uniforms)
    if greedy:
        return greedy_tree(tokens.long(), parents, target_probs)
    rule = rule_of(method)
    if uniforms is None:
        coins, u = draw_uniforms((b, n), device, generator)
    else:
        coins, u = check_uniforms(uniforms, (b, n), device)
    tokens, q, p = cast_tree_inputs(tokens, draft_probs, target_probs)
    struct = structure(parents)
    levels = tree_levels(tokens, parents, q, p, rule, struct)
    last = select(struct, rule.passes(levels, coins) & struct.real, rule)
    rows = torch.arange(b, device=device)
    token = inverse_cdf(levels.rows[rows, last], u, levels.fallback[rows, last])
    return TreeVerifyResult(path_to(struct, last), struct.depth[rows, last], token)


def _verify_tree_triton(tokens, parents, draft_probs, target_probs, method, generator, uniforms) -> TreeVerifyResult:
    """The fused Triton kernel (hsd.kernels.tree_kernels) with the same uniforms as the torch path, so the
    two backends agree draw for draw; the path is trimmed to the batch's deepest node as there."""
    from hsd.kernels.tree_launch import verify_tree_triton

    b, n = tokens.shape
    if method != "greedy":
        rule_of(method)
        if uniforms is None:
            uniforms = draw_uniforms((b, n), target_probs.device, generator)
        else:
            uniforms = check_uniforms(uniforms, (b, n), target_probs.device)
    path, num, nxt = verify_tree_triton(tokens, parents, draft_probs, target_probs, method,
                                        uniforms=None if method == "greedy" else uniforms)
    d_max = int(structure(parents).depth.max()) if n else 0
    return TreeVerifyResult(path[:, :d_max].clone(), num.clone(), nxt.clone())


def without_replacement_rows(tokens: Tensor, parents: Tensor, draft_probs: Tensor) -> Tensor:
    """q rows for siblings drawn one after the other without replacement (Gumbel-top-k order).

    draft_probs [B, N, V]: row i is the draft's raw q(.|path of node i's parent). Returns [B, N, V]
    where row i has the tokens of node i's earlier siblings removed and is renormalised: the law
    node i was actually drawn from. Siblings must be listed in the order they were drawn.
    """
    struct = structure(parents)
    b, n, v = draft_probs.shape
    idx = torch.arange(n, device=draft_probs.device)
    par, real = struct.parent_slot, struct.real
    # earlier[b, i, j]: real node j is an earlier sibling of real node i (same parent, drawn before it)
    earlier = ((par.unsqueeze(2) == par.unsqueeze(1)) & (idx.view(1, 1, n) < idx.view(1, n, 1))
               & real.unsqueeze(2) & real.unsqueeze(1))
    bi, i, j = earlier.nonzero(as_tuple=True)
    out = draft_probs.clone()
    out[bi, i, tokens[bi, j].long()] = 0.0
    return out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)


def pass_probabilities(levels: TreeLevels, rule: TreeRule, iters: int = 64) -> Tensor:
    """[B, N] measure of {coin in [0, 1): node i passes}, found by bisection on ``rule.passes``
    itself (so a wrong test is measured as it is, not as intended). Assumes the passing set is an
    interval [0, t), which every correct test satisfies."""
    lo = torch.zeros_like(levels.h, dtype=torch.float64)
    hi = torch.ones_like(lo)
    for _ in range(iters):
        mid = (lo + hi) / 2
        ok = rule.passes(levels, mid)
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return torch.where(rule.passes(levels, torch.zeros_like(lo)), hi, torch.zeros_like(hi))


def post_order(struct: Structure) -> Tensor:
    """[B, N+1] rank of every slot in post-order (children before parents, siblings in index
    order; the root last). Padding slots get ranks after the root."""
    b, n1 = struct.depth.shape
    rows = torch.arange(b, device=struct.depth.device)
    size = torch.ones(b, n1, dtype=torch.long, device=struct.depth.device)
    for i in range(n1 - 2, -1, -1):
        par = struct.parent_slot[:, i].clamp(min=0)
        size[rows, par] += torch.where(struct.real[:, i], size[:, i + 1], 0)
    pre = torch.zeros_like(size)
    free = torch.ones_like(size)  # next pre-order index for the next child of each slot
    for i in range(n1 - 1):
        par = struct.parent_slot[:, i].clamp(min=0)
        pre[:, i + 1] = free[rows, par]
        free[rows, par] += torch.where(struct.real[:, i], size[:, i + 1], 0)
        free[:, i + 1] = pre[:, i + 1] + 1
    # finished before v: earlier nodes in pre-order that are not its ancestors, and its descendants.
    post = pre - struct.depth + size - 1
    real = with_root(struct)
    return torch.where(real, post, n1 + torch.arange(n1, device=post.device))


def slot_law(struct: Structure, prob: Tensor, rule: TreeRule) -> Tensor:
    """[B, N+1] P(last accepted slot = s) given independent node tests passing with prob [B, N]."""
    b, n = prob.shape
    rows = torch.arange(b, device=prob.device)
    prob = prob * struct.real
    if rule.weighted:
        # The first passing node in post-order; the root passes with probability 1.
        rank = post_order(struct)
        full = torch.cat([torch.ones(b, 1, dtype=prob.dtype, device=prob.device), prob], dim=1)
        order = rank.argsort(-1)
        sorted_p = full.gather(1, order)
        before = torch.cumprod(torch.cat([torch.ones_like(sorted_p[:, :1]), 1.0 - sorted_p[:, :-1]], 1), 1)
        return torch.zeros_like(full).scatter_(1, order, before * sorted_p)
    # rrs: reach a slot through the first passing child at every node, then fail all its children.
    reach = torch.zeros(b, n + 1, dtype=prob.dtype, device=prob.device)
    reach[:, 0] = 1.0
    alive = torch.ones_like(reach)  # P(all children so far failed), per slot
    for i in range(n):
        par = struct.parent_slot[:, i].clamp(min=0)
        reach[:, i + 1] = reach[rows, par] * alive[rows, par] * prob[:, i]
        alive[rows, par] = alive[rows, par] * (1.0 - prob[:, i])
    return reach * alive


def tree_decision_law(tokens: Tensor, parents: Tensor, draft_probs: Tensor | None, target_probs: Tensor,
                      method: str | TreeRule = "weighted") -> tuple[Tensor, Tensor]:
    """Exact law of verify_tree's output for fixed trees (no sampling).

    Returns (P_slot [B, N+1], rows [B, N+1, V]): P(last accepted slot = s) and the normalised law
    of next_token given it. The node test probabilities are measured on the sampler's own test
    (``pass_probabilities``); the tests also check this law against the sampler run on every
    pattern of test outcomes. Use float64 inputs for exact tests.
    """
    rule = rule_of(method)
    tokens, q, p = cast_tree_inputs(tokens, draft_probs, target_probs)
    struct = structure(parents)
    levels = tree_levels(tokens, parents, q, p, rule, struct)
    law = slot_law(struct, pass_probabilities(levels, rule).to(p.dtype), rule)
    slots = with_root(struct).unsqueeze(-1)
    first = levels.fallback[:, :1].expand_as(levels.rows)  # padding slots: never chosen
    rows = normalized(torch.where(slots, levels.rows, first), torch.where(slots, levels.fallback, first))
    return law, torch.where(slots, rows, 0.0)
