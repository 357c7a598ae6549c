"""Exact-enumeration harness: output laws of the verifiers over V^(K+1), with no sampling.

An instance holds context-dependent target and draft rows for every prefix. Every draft chain
(or every tuple of M chains) is enumerated as one batch row, weighted by its draft probability;
the verifier's exact decision law gives the law of the emitted prefix, which is completed by target
sampling up to K+1 tokens. A lossless verifier reproduces the target joint prod_t p(y_t | y_<t)
exactly. Prefixes of length j are numbered in base V (first token most significant).

Two sources of the decision law:
- ``decision_law`` / ``multi_law``: the law functions (``tau_law``, ``residual_all``) applied to the
  same ``Levels`` the sampler uses;
- ``sampler_decision_law``: the sampler itself (``verify``, either backend) run on an enumeration of
  its uniforms. Coin k-1 only matters through the event {level k succeeds}, which has probability
  h_k, so every success pattern is run once with coins just inside / just outside the thresholds and
  weighted by prod h^s (1 - h)^(1-s); u only matters through the inverse-CDF interval it falls in,
  so every interval is run at both of its ends (which must give the same outcome) and weighted by
  its length. The result is the exact law of the sampling code, with no randomness.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import api
from .api import LevelsFn, decision_law
from .common import RESIDUAL_EPS
from .multi import multi_law


class TreeInstance(NamedTuple):
    """p[j] [V^j, V]: target row after each prefix of length j = 0..K (row K+1 is the bonus row);
    q[j] [V^j, V]: draft row after each prefix of length j = 0..K-1. float64."""

    vocab: int
    depth: int
    p: list[Tensor]
    q: list[Tensor]


def random_instance(vocab: int, depth: int, seed: int, alpha: float = 1.0) -> TreeInstance:
    """Context-dependent rows, each an independent Dirichlet(alpha) draw."""
    rng = np.random.default_rng(seed)

    def rows(j: int) -> Tensor:
        return torch.from_numpy(rng.dirichlet([alpha] * vocab, size=vocab**j))

    p = [rows(j) for j in range(depth + 1)]
    q = [rows(j) for j in range(depth)]
    return TreeInstance(vocab, depth, p, q)


def fixed_instance(p_row, q_row, depth: int) -> TreeInstance:
    """Context-free instance: the same p and q rows after every prefix."""
    p_row = torch.as_tensor(p_row, dtype=torch.float64)
    q_row = torch.as_tensor(q_row, dtype=torch.float64)
    v = p_row.shape[0]
    return TreeInstance(v, depth, [p_row.expand(v**j, v) for j in range(depth + 1)],
                        [q_row.expand(v**j, v) for j in range(depth)])


def prefix_ids(tokens: Tensor, vocab: int) -> Tensor:
    """[N, j] -> [N] base-V id of each prefix (0 for the empty prefix)."""
    ids = torch.zeros(tokens.shape[0], dtype=torch.long)
    for j in range(tokens.shape[1]):
        ids = ids * vocab + tokens[:, j]
    return ids


def all_sequences(vocab: int, length: int) -> Tensor:
    """[V^length, length] every sequence, in base-V id order."""
    ids = torch.arange(vocab**length)
    powers = vocab ** torch.arange(length - 1, -1, -1)
    return (ids.unsqueeze(1) // powers) % vocab


def chain_rows(inst: TreeInstance, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """tokens [N, K] -> draft rows q [N, K, V] and target rows p [N, K+1, V] along each chain."""
    k = tokens.shape[1]
    q = torch.stack([inst.q[j][prefix_ids(tokens[:, :j], inst.vocab)] for j in range(k)], dim=1)
    p = torch.stack([inst.p[j][prefix_ids(tokens[:, :j], inst.vocab)] for j in range(k + 1)], dim=1)
    return q, p


def draft_prob(inst: TreeInstance, tokens: Tensor) -> Tensor:
    """[N] probability that the draft samples each chain."""
    q, _ = chain_rows(inst, tokens)
    return q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).prod(-1)


def target_joint(inst: TreeInstance) -> Tensor:
    """[V^(K+1)] target law of K+1 tokens."""
    joint = torch.ones(1, dtype=torch.float64)
    for j in range(inst.depth + 1):
        joint = (joint.unsqueeze(1) * inst.p[j]).reshape(-1)
    return joint


class Emissions:
    """Accumulates the law of emitted prefixes y_1..y_{n+1} (n accepted tokens + next token)."""

    def __init__(self, inst: TreeInstance):
        self.inst = inst
        self.mass = [torch.zeros(inst.vocab ** (n + 1), dtype=torch.float64) for n in range(inst.depth + 1)]

    def add(self, prefixes: Tensor, n: Tensor, weight: Tensor, next_law: Tensor) -> None:
        """prefixes [N, K] (first n[i] tokens used), n [N], weight [N], next_law [N, V]."""
        for length in range(self.inst.depth + 1):
            sel = n == length
            if bool(sel.any()):
                ids = prefix_ids(prefixes[sel, :length], self.inst.vocab)
                table = self.mass[length].view(-1, self.inst.vocab)
                table.index_add_(0, ids, weight[sel].unsqueeze(1) * next_law[sel])

    def completed(self) -> Tensor:
        """[V^(K+1)] law after completing every emitted prefix by target sampling."""
        out = self.mass[0]
        for j in range(1, self.inst.depth + 1):
            out = (out.unsqueeze(1) * self.inst.p[j]).reshape(-1) + self.mass[j]
        return out


def success_patterns(k: int) -> Tensor:
    """[2^K, K] bool: every success/failure pattern of K levels."""
    ids = torch.arange(2**k).unsqueeze(1)
    return (ids >> torch.arange(k - 1, -1, -1)) & 1 == 1


def sampler_decision_law(draft_tokens: Tensor, draft_probs: Tensor | None, target_probs: Tensor,
                         method: str | LevelsFn = "hsd", *, backend: str = "torch", margin: float = 1e-9,
                         run=None, both_ends: bool = True) -> Tensor:
    """Exact joint law [B, K+1, V] of (num_accepted, next_token) of the sampler for fixed drafts.

    The sampler is ``verify(..., backend=backend, uniforms=...)`` (or ``run(tokens, q, p, coins, u)
    -> (n, token)`` when given, e.g. the serving plan). Coins are placed ``margin`` inside/outside
    each threshold h_k (h from the torch ``Levels`` in float64), u at both ends of every inverse-CDF
    interval of the row the torch sampler functions choose (shrunk by ``margin`` of its length); an
    interval whose two ends give different outcomes raises AssertionError (the sampler's boundaries
    are not where its own rows put them). both_ends=False runs the interval midpoints only (half the
    runs, for slow samplers). Use float64 inputs; margin 1e-9 for the float64 torch sampler, ~1e-4
    for float32 kernels.
    """
    if run is None:
        def run(tok, q, p, coins, u):
            res = api.verify(tok, q, p, method=method, backend=backend, uniforms=(coins, u), validate=False)
            return res.num_accepted, res.next_token
    tokens, q, p = api.cast_inputs(draft_tokens, draft_probs, target_probs)
    levels = api.levels_fn(method)(tokens, q, p)
    b, k = tokens.shape
    v = p.shape[-1]
    pats = success_patterns(k).to(p.device)  # [P, K]
    h = levels.h.unsqueeze(1)  # [B, 1, K]
    weight = torch.where(pats, h, 1.0 - h).prod(-1)  # [B, P]
    inside = h - torch.minimum(torch.full_like(h, margin), h / 2)
    outside = h + torch.minimum(torch.full_like(h, margin), (1.0 - h) / 2)
    coins = torch.where(pats, inside, outside).clamp(0.0, 1.0 - 2.0**-53)  # [B, P, K]
    row, pat = (weight > 0).nonzero(as_tuple=True)
    coins, w_e = coins[row, pat], weight[row, pat]
    lv = levels._replace(h=levels.h[row], log_w=levels.log_w[row], p_tok=levels.p_tok[row],
                         q_tok=levels.q_tok[row], start=levels.start[row])
    tok_e, q_e, p_e = tokens[row], None if q is None else q[row], p[row]
    tau = api.select_tau(lv, coins)
    r, fallback = api.residual_at(lv, tok_e, q_e, p_e, tau)
    r = torch.where(r.sum(-1, keepdim=True) > RESIDUAL_EPS, r, fallback)
    cdf = r.cumsum(-1) / r.sum(-1, keepdim=True)
    hi, lo = cdf, torch.cat([torch.zeros_like(cdf[:, :1]), cdf[:, :-1]], dim=-1)
    e_idx, tok_idx = (r > 0).nonzero(as_tuple=True)  # one interval per positive-mass token
    lo, hi = lo[e_idx, tok_idx], hi[e_idx, tok_idx]
    width = hi - lo
    if both_ends:
        ends = torch.stack([lo + margin * width, hi - margin * width], dim=1)
    else:
        ends = ((lo + hi) / 2).unsqueeze(1)
    ends = ends.clamp(0.0, 1.0 - 2.0**-53)
    sel = e_idx.repeat_interleave(ends.shape[1])
    n, token = run(tok_e[sel], None if q_e is None else q_e[sel], p_e[sel], coins[sel], ends.reshape(-1))
    n, token = n.view(-1, ends.shape[1]), token.view(-1, ends.shape[1])
    bad = ((n != n[:, :1]) | (token != token[:, :1])).any(-1)
    assert not bool(bad.any()), (f"sampler output changes inside {int(bad.sum())} inverse-CDF intervals "
                                 "(its token boundaries are not those of its own residual rows)")
    law = torch.zeros(b * (k + 1) * v, dtype=p.dtype, device=p.device)
    cell = (row[e_idx] * (k + 1) + n[:, 0].long()) * v + token[:, 0].long()
    law.index_add_(0, cell, w_e[e_idx] * width)
    return law.view(b, k + 1, v)


def single_chain_law(inst: TreeInstance, method: str | LevelsFn, *, sampler: bool = False,
                     backend: str = "torch", margin: float = 1e-9, run=None,
                     both_ends: bool = True) -> tuple[Tensor, float]:
    """(completed output law [V^(K+1)], E[num_accepted]) of verify with drafts sampled from q.

    sampler=False: from the law functions (``decision_law``); sampler=True: from the sampling code
    itself (``sampler_decision_law`` with ``backend``, ``margin`` and ``run``).
    """
    tokens = all_sequences(inst.vocab, inst.depth)
    tokens = tokens[draft_prob(inst, tokens) > 0]  # chains the draft never samples (truncated q)
    q, p = chain_rows(inst, tokens)
    weight = draft_prob(inst, tokens)
    if sampler:
        joint = sampler_decision_law(tokens, q, p, method, backend=backend, margin=margin, run=run,
                                     both_ends=both_ends)
        tau_law, rows = joint.sum(-1), joint
    else:
        tau_law, rows = decision_law(tokens, q, p, method)
    out = Emissions(inst)
    for n in range(inst.depth + 1):
        if sampler:  # rows are the joint law already: weight each chain by its draft probability only
            out.add(tokens, torch.full_like(weight, n, dtype=torch.long), weight, rows[:, n])
        else:
            out.add(tokens, torch.full_like(weight, n, dtype=torch.long), weight * tau_law[:, n], rows[:, n])
    k = torch.arange(inst.depth + 1, dtype=torch.float64)
    return out.completed(), float((weight.unsqueeze(1) * tau_law * k).sum())


def multi_chain_law(inst: TreeInstance, chains: int, method: str | LevelsFn) -> tuple[Tensor, float]:
    """(completed output law, E[num_accepted]) of verify_multi with ``chains`` i.i.d. chains from q."""
    k = inst.depth
    tokens = all_sequences(inst.vocab, k * chains).view(-1, chains, k)
    tokens = tokens[draft_prob(inst, tokens.reshape(-1, k)).view(-1, chains).prod(-1) > 0]
    flat = tokens.reshape(-1, k)
    q, p = chain_rows(inst, flat)
    weight = draft_prob(inst, flat).view(-1, chains).prod(-1)
    n_rows = tokens.shape[0]
    law = multi_law(tokens, q.view(n_rows, chains, k, -1), p.view(n_rows, chains, k + 1, -1), method)
    mass = weight[law.rows] * law.prob
    out = Emissions(inst)
    out.add(tokens[law.rows, law.chain], law.num_accepted, mass, law.next_law)
    return out.completed(), float((mass * law.num_accepted).sum())


def total_variation(a: Tensor, b: Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def point_mass_chain_law(inst: TreeInstance, chain: Tensor, method: str | LevelsFn,
                         one_hot_rows: bool = False) -> tuple[Tensor, float]:
    """(completed output law, E[num_accepted]) of verify on one deterministic draft chain [K].

    The draft probabilities are None (point-mass path), or explicit one-hot rows if ``one_hot_rows``.
    """
    tokens = chain.view(1, -1)
    _, p = chain_rows(inst, tokens)
    q = torch.nn.functional.one_hot(tokens, inst.vocab).double() if one_hot_rows else None
    tau_law, rows = decision_law(tokens, q, p, method)
    out = Emissions(inst)
    for n in range(inst.depth + 1):
        out.add(tokens, torch.full((1,), n, dtype=torch.long), tau_law[:, n], rows[:, n])
    return out.completed(), float((tau_law * torch.arange(inst.depth + 1, dtype=torch.float64)).sum())


def truncated(inst: TreeInstance, keep_p: int, keep_q: int) -> TreeInstance:
    """Top-k truncation of every target row (k = keep_p) and draft row (k = keep_q), renormalised."""
    def top(rows: Tensor, keep: int) -> Tensor:
        kth = rows.topk(keep, dim=-1).values[:, -1:]
        cut = torch.where(rows >= kth, rows, torch.zeros_like(rows))
        return cut / cut.sum(-1, keepdim=True)

    return TreeInstance(inst.vocab, inst.depth, [top(r, keep_p) for r in inst.p], [top(r, keep_q) for r in inst.q])


def draft_equals_target(inst: TreeInstance) -> TreeInstance:
    """q = p after every prefix (w = 1 everywhere: zero denominators in block verification)."""
    return TreeInstance(inst.vocab, inst.depth, inst.p, inst.p[: inst.depth])
