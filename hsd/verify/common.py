"""Math shared by every verifier: per-level decisions, residual rows and the inverse-CDF token draw.

Each method module (``tokenwise``, ``blockwise``, ``hsd``) turns the inputs into a :class:`Levels`
record. Everything downstream (the sampler and the exact decision law) is written once here, so
the exact-enumeration tests exercise the same functions that sample.

Shapes: B rows, K draft tokens, V vocabulary. Level ``k`` (1..K) is "accept x_1..x_k"; column
``k - 1`` of ``Levels.h`` holds its probability. ``tau`` is the number of accepted draft tokens.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Residual rows with less mass than this are measure-zero ties (rounding): draw from p instead.
RESIDUAL_EPS = 1e-12


class Levels(NamedTuple):
    """Per-level decision data of one verifier on one batch of chains.

    h: [B, K] success probability of level k = 1..K (column k-1). Token-wise: min(1, p/q) of
       position k; block/HSD: the threshold h_k (h_K = capped final weight w_K).
    log_w: [B, K+1] log weight of the residual row for tau = 0..K-1, (w_tau p_{tau+1} - q_{tau+1})_+
       (0 for token-wise); column K is unused (bonus row).
    first_failure: True for token-wise (tau = number of leading successes); False for block/HSD
       (tau = last successful level).
    p_tok, q_tok: [B, K] p_i(x_i) and q_i(x_i) (q = 1 for point-mass drafts); the token-wise test
       is ``coin * q <= p``, exactly as the Triton kernel evaluates it.
    start: [B] int64 number of tokens already accepted before this chain (verify_multi); levels
       k <= start are fixed successes and coins are consumed from level start + 1 on.
    """

    h: Tensor
    log_w: Tensor
    first_failure: bool
    p_tok: Tensor
    q_tok: Tensor
    start: Tensor


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64 (exact tests); everything else is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def token_probs(probs: Tensor, tokens: Tensor) -> Tensor:
    """probs [B, >=K, V], tokens [B, K] -> [B, K]: probability of each draft token at its position."""
    k = tokens.shape[-1]
    return probs[..., :k, :].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def draft_token_probs(draft_probs: Tensor | None, tokens: Tensor, like: Tensor) -> Tensor:
    """q_i(x_i) [B, K]; point-mass drafts (None) put q = 1 on the draft token."""
    if draft_probs is None:
        return torch.ones(tokens.shape, dtype=like.dtype, device=like.device)
    return token_probs(draft_probs, tokens)


def before_start(start: Tensor, k: int) -> Tensor:
    """[B, k] bool: position j (0-based) lies inside the already-accepted prefix (j < start)."""
    return torch.arange(k, device=start.device).unsqueeze(0) < start.unsqueeze(1)


def default_start(tokens: Tensor, start: Tensor | None) -> Tensor:
    if start is None:
        return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    return start


def shift_coins(coins: Tensor, start: Tensor) -> Tensor:
    """coins [B, K] -> [B, K] with coins[b, j - start[b]] at column j (j >= start); 0 before start.

    A chain verified from position start + 1 (verify_multi) uses its coins from column 0 on.
    """
    k = coins.shape[-1]
    j = torch.arange(k, device=coins.device).unsqueeze(0) - start.unsqueeze(1)
    shifted = coins.gather(-1, j.clamp(min=0))
    return torch.where(j >= 0, shifted, torch.zeros_like(shifted))


def select_tau(levels: Levels, coins: Tensor) -> Tensor:
    """tau [B] int64 from coins [B, K] in [0, 1) (the uniforms convention of hsd.verify)."""
    coins = shift_coins(coins.to(levels.h.dtype), levels.start)
    k = coins.shape[-1]
    fixed = before_start(levels.start, k)
    # A zero-probability level never succeeds, even for a coin of exactly 0 (so a draft token with
    # p = 0 is never accepted); otherwise the rule is exactly coin * q <= p, resp. coin <= h.
    if levels.first_failure:
        ok = ((coins * levels.q_tok <= levels.p_tok) & (levels.p_tok > 0)) | fixed
        return ok.long().cumprod(-1).sum(-1)
    success = (coins <= levels.h) & (levels.h > 0) & ~fixed
    level = torch.arange(1, k + 1, device=coins.device).unsqueeze(0)
    return torch.where(success, level, levels.start.unsqueeze(1)).amax(-1)


def tau_law(levels: Levels) -> Tensor:
    """Exact law of tau: [B, K+1] with column k = P(tau = k), from the same ``h`` the sampler uses."""
    h = levels.h
    b, k = h.shape
    fixed = before_start(levels.start, k)
    if levels.first_failure:
        a = torch.where(fixed, torch.ones_like(h), h)
        alive = torch.cat([torch.ones_like(h[:, :1]), a.cumprod(-1)], dim=-1)  # P(positions < k accepted)
        law = alive.clone()
        law[:, :k] = alive[:, :k] * (1.0 - a)
        return law
    hm = torch.where(fixed, torch.zeros_like(h), h)
    # tail[:, k'] = P(no success at levels k'+1..K) for k' = 0..K-1, and 1 for k' = K.
    tail = torch.cat([(1.0 - hm).flip(-1).cumprod(-1).flip(-1), torch.ones_like(h[:, :1])], dim=-1)
    law = torch.zeros(b, k + 1, dtype=h.dtype, device=h.device)
    law[:, 1:] = hm * tail[:, 1:]
    # No success after start: tau = start (its tail product equals tail[:, 0] since hm = 0 before).
    law.scatter_add_(1, levels.start.unsqueeze(1), tail[:, :1])
    return law


def residual(w: Tensor, p_rows: Tensor, q_rows: Tensor | None, tokens: Tensor, bonus: Tensor) -> Tensor:
    """Unnormalised residual rows (w p - q)_+, or p itself where ``bonus``; any leading shape.

    w [...], p_rows/q_rows [..., V], tokens [...] (the draft token of that position, used for
    point-mass drafts where q is the one-hot of the token: the residual is w p with the token removed).
    """
    if q_rows is None:
        r = w.unsqueeze(-1) * p_rows
        r = r.scatter(-1, tokens.unsqueeze(-1), 0.0)
    else:
        r = (w.unsqueeze(-1) * p_rows - q_rows).clamp_min(0.0)
    return torch.where(bonus.unsqueeze(-1), p_rows, r)


def residual_at(levels: Levels, tokens: Tensor, draft_probs: Tensor | None, target_probs: Tensor,
                tau: Tensor) -> tuple[Tensor, Tensor]:
    """Residual row [B, V] at the chosen tau (bonus row p_{K+1} where tau = K) and its fallback p row."""
    k = tokens.shape[-1]
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    pos = tau.clamp(max=k - 1)
    p_row = target_probs[rows, tau]
    q_row = None if draft_probs is None else draft_probs[rows, pos]
    w = levels.log_w.gather(1, tau.unsqueeze(1)).squeeze(1).exp()
    r = residual(w, p_row, q_row, tokens[rows, pos], tau == k)
    return r, p_row


def residual_all(levels: Levels, tokens: Tensor, draft_probs: Tensor | None,
                 target_probs: Tensor) -> tuple[Tensor, Tensor]:
    """Residual rows for every tau: [B, K+1, V] (row K = bonus), and the fallback p rows [B, K+1, V]."""
    b, k = tokens.shape
    bonus = torch.zeros(b, k + 1, dtype=torch.bool, device=tokens.device)
    bonus[:, k] = True
    tok = torch.cat([tokens, tokens[:, -1:]], dim=1)
    q_rows = None if draft_probs is None else torch.cat([draft_probs, draft_probs[:, -1:]], dim=1)
    r = residual(levels.log_w.exp(), target_probs, q_rows, tok, bonus)
    return r, target_probs


def normalized(rows: Tensor, fallback: Tensor) -> Tensor:
    """rows / sum, with rows of mass <= RESIDUAL_EPS replaced by the normalised fallback row."""
    total = rows.sum(-1, keepdim=True)
    use = total > RESIDUAL_EPS
    chosen = torch.where(use, rows, fallback)
    return chosen / chosen.sum(-1, keepdim=True)


def inverse_cdf(rows: Tensor, u: Tensor, fallback: Tensor) -> Tensor:
    """token [B] = min{v : cumsum(r)[v] > u * sum(r)} for the unnormalised rows r [B, V].

    Rows of mass <= RESIDUAL_EPS use ``fallback`` (a target row) instead. The result is clamped
    to the last index with positive mass, so a token with zero mass is never returned.
    """
    use = rows.sum(-1, keepdim=True) > RESIDUAL_EPS
    r = torch.where(use, rows, fallback)
    cdf = r.cumsum(-1)
    threshold = u.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    token = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)
    v = r.shape[-1]
    last_positive = v - 1 - (r > 0).flip(-1).to(torch.uint8).argmax(-1)
    return torch.minimum(token, last_positive)
