"""Multi-draft verification of M chains sampled independently from q (``verify_multi``).

Chains are visited in order m = 0..M-1. A chain is verified only if its first n tokens equal the
prefix accepted so far (n tokens of chain ``chain``). It is verified from position n+1 with the
previous chain's normalised residual as the target row there, later rows p, and fresh state:

- method="hsd": recursive block verification. The chain's suffix runs HSD (= block verification)
  with weights restarted at w = 1; if it fails after tau more tokens, the residual
  (w_tau r_{tau+1} - q_{tau+1})_+ becomes the next chain's first target row (docs/verification.md,
  "Several chains"). Lossless because, given a matching prefix, the next chain's suffix is a
  fresh sample from q and block verification is lossless for any target row.
- method="tokenwise": recursive rejection sampling, chain by chain (SpecInfer-style).

A chain that is accepted in full ends the search with the bonus token of that chain. Otherwise
the token is drawn from the last residual. The sampler and the exact law (``multi_law``) share the
chain step functions below; the law expands every random tau into a separate state.
Shapes: B rows, M chains, K tokens per chain, V vocabulary; S = number of states (B for the sampler).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .api import LevelsFn, VerifyResult, cast_inputs, draw_uniforms, levels_fn
from .common import Levels, inverse_cdf, normalized, residual_all, residual_at, select_tau, tau_law
from .validate import check_chain_inputs, check_uniforms

MULTI_METHODS = ("hsd", "tokenwise")
NAMES = ("draft_tokens", "draft_probs", "target_probs")


class ChainState(NamedTuple):
    """Search state of S (batch row, history) pairs.

    rows [S] batch row; n [S] accepted prefix length; chain [S] chain whose prefix was accepted
    (the last chain verified); first [S, V] normalised target row at position n+1 for the next
    chain (valid where has_first [S]); done [S] some chain was accepted in full.
    """

    rows: Tensor
    n: Tensor
    chain: Tensor
    first: Tensor
    has_first: Tensor
    done: Tensor


def initial_state(rows: Tensor, vocab: int, dtype: torch.dtype) -> ChainState:
    s = rows.shape[0]
    zeros = torch.zeros(s, dtype=torch.long, device=rows.device)
    false = torch.zeros(s, dtype=torch.bool, device=rows.device)
    return ChainState(rows, zeros, zeros, torch.zeros(s, vocab, dtype=dtype, device=rows.device), false, false)


def eligible(state: ChainState, m: int, tokens: Tensor) -> Tensor:
    """[S] bool: chain m is still to be verified and its first n tokens equal the accepted prefix."""
    k = tokens.shape[-1]
    current = tokens[state.rows, state.chain]
    candidate = tokens[state.rows, m]
    outside = torch.arange(k, device=tokens.device).unsqueeze(0) >= state.n.unsqueeze(1)
    return ~state.done & ((current == candidate) | outside).all(-1)


def chain_inputs(state: ChainState, m: int, tokens: Tensor, draft_probs: Tensor,
                 target_probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chain m's tokens [S, K], q rows [S, K, V] and target rows [S, K+1, V], with the carried
    residual substituted as the target row at position n+1 (row index n)."""
    k = tokens.shape[-1]
    p = target_probs[state.rows, m]
    at_n = torch.arange(k + 1, device=p.device).unsqueeze(0) == state.n.unsqueeze(1)
    swap = (at_n & state.has_first.unsqueeze(1)).unsqueeze(-1)
    p = torch.where(swap, state.first.unsqueeze(1), p)
    return tokens[state.rows, m], draft_probs[state.rows, m], p


def chain_levels(state: ChainState, m: int, tokens: Tensor, draft_probs: Tensor, target_probs: Tensor,
                 build: LevelsFn) -> tuple[Levels, Tensor, Tensor, Tensor]:
    tok, q, p = chain_inputs(state, m, tokens, draft_probs, target_probs)
    return build(tok, q, p, start=state.n), tok, q, p


def advance(state: ChainState, m: int, ok: Tensor, tau: Tensor, first_new: Tensor, k: int) -> ChainState:
    """State after chain m returned tau (rows where ``ok``): tau = K ends the search, otherwise
    n = tau and first_new [S, V] (the normalised residual) is carried to the next chain."""
    full = tau == k
    fail = ok & ~full
    return ChainState(
        rows=state.rows,
        n=torch.where(ok, tau, state.n),
        chain=torch.where(ok, torch.full_like(state.chain, m), state.chain),
        first=torch.where(fail.unsqueeze(1), first_new, state.first),
        has_first=state.has_first | fail,
        done=state.done | (ok & full),
    )


def final_rows(state: ChainState, target_probs: Tensor) -> tuple[Tensor, Tensor]:
    """Row to draw the token from [S, V] (bonus row of the accepted chain, or the carried residual)
    and its fallback (the target row at position n+1 of the accepted chain)."""
    k = target_probs.shape[2] - 1
    bonus = target_probs[state.rows, state.chain, k]
    at_n = target_probs[state.rows, state.chain, state.n.clamp(max=k)]
    done = state.done.unsqueeze(1)
    return torch.where(done, bonus, state.first), torch.where(done, bonus, at_n)

def _prepare(draft_tokens, draft_probs, target_probs, method, validate):
    if isinstance(method, str) and method not in MULTI_METHODS:
        raise ValueError(f"method: expected one of {MULTI_METHODS} for verify_multi, got {method!r}")
    build = levels_fn(method)
    if validate:
        check_chain_inputs(draft_tokens, draft_probs, target_probs, names=NAMES, lead=2,
                           allow_point_mass=False)
    return build, *cast_inputs(draft_tokens, draft_probs, target_probs)


def verify_multi(draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor, *, method: str = "hsd",
                 generator: torch.Generator | None = None, uniforms: tuple[Tensor, Tensor] | None = None,
                 validate: bool = True) -> VerifyResult:
    """Lossless verification of M chains per row, sampled independently from q.

    draft_tokens [B, M, K]; draft_probs [B, M, K, V] (required); target_probs [B, M, K+1, V] (rows
    of chains that share a prefix must be equal). method: "hsd" (recursive block verification) or
    "tokenwise" (recursive rejection sampling). uniforms: optional (coins [B, M, K], u [B]) in [0, 1);
    chain m uses coins[:, m, j] for its j-th level counted from its first unverified position.
    Returns VerifyResult with ``chain`` [B]: emitted tokens are
    draft_tokens[b, chain[b], :num_accepted[b]] followed by next_token[b].
    """
    build, tokens, q, p = _prepare(draft_tokens, draft_probs, target_probs, method, validate)
    b, m_chains, k = tokens.shape
    device = p.device
    if uniforms is None:
        coins, u = draw_uniforms((b, m_chains, k), device, generator)
    else:
        coins, u = check_uniforms(uniforms, (b, m_chains, k), device)
    state = initial_state(torch.arange(b, device=device), p.shape[-1], p.dtype)
    for m in range(m_chains):
        ok = eligible(state, m, tokens)
        levels, tok, qm, pm = chain_levels(state, m, tokens, q, p, build)
        tau = select_tau(levels, coins[:, m])
        residual, fallback = residual_at(levels, tok, qm, pm, tau)
        state = advance(state, m, ok, tau, normalized(residual, fallback), k)
    rows, fallback = final_rows(state, p)
    return VerifyResult(state.n, inverse_cdf(rows, u, fallback), state.chain)


class MultiLaw(NamedTuple):
    """Exact law of verify_multi as weighted outcomes: rows [S] batch row, prob [S],
    chain [S], num_accepted [S], next_token law [S, V]. Probabilities of one row sum to 1."""

    rows: Tensor
    prob: Tensor
    chain: Tensor
    num_accepted: Tensor
    next_law: Tensor


def multi_law(draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor,
              method: str | LevelsFn = "hsd") -> MultiLaw:
    """Exact law of verify_multi's output for fixed chains (no sampling): every random tau of every
    chain becomes a separate weighted state, advanced with the sampler's own step functions."""
    build, tokens, q, p = _prepare(draft_tokens, draft_probs, target_probs, method, validate=False)
    b, m_chains, k = tokens.shape
    state = initial_state(torch.arange(b, device=p.device), p.shape[-1], p.dtype)
    prob = torch.ones(b, dtype=p.dtype, device=p.device)
    taus = torch.arange(k + 1, device=p.device)
    for m in range(m_chains):
        ok = eligible(state, m, tokens)
        levels, tok, qm, pm = chain_levels(state, m, tokens, q, p, build)
        law = tau_law(levels)  # [S, K+1]
        # A state that skips chain m keeps all its mass on one child (its tau is ignored).
        law = torch.where(ok.unsqueeze(1), law, (taus == 0).to(law.dtype).expand_as(law))
        residual, fallback = residual_all(levels, tok, qm, pm)
        first_all = normalized(residual, fallback)  # [S, K+1, V]
        child_prob = prob.unsqueeze(1) * law
        keep = child_prob > 0
        parent, tau = keep.nonzero(as_tuple=True)
        state = ChainState(*(t[parent] for t in state))
        state = advance(state, m, ok[parent], tau, first_all[parent, tau], k)
        prob = child_prob[parent, tau]
    rows, fallback = final_rows(state, p)
    return MultiLaw(state.rows, prob, state.chain, state.n, normalized(rows, fallback))
