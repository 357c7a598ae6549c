"""Block verification (Sun et al. 2024, Alg. 2) as a :class:`~hsd.verify.common.Levels` record.

Weights w_0 = 1, w_k = min(1, w_{k-1} p_k(x_k) / q_k(x_k)) (= R_k / max_{j<=k} R_j for positive
probabilities), kept in log space by that recursion; level masses S_k = sum_v (w_k p_{k+1}(v) -
q_{k+1}(v))_+; thresholds h_k = S_k / (S_k + 1 - w_k) for k = 1..K-1 (h = 1 where that denominator
is <= 0, i.e. w = 1 and p = q), and h_K = w_K. tau is the LAST level whose coin succeeds; the token
comes from (w_tau p_{tau+1} - q_{tau+1})_+.

Fail-closed numerics (docs/verification.md): a draft token with q = 0 (impossible for a real sample,
but fp16 rounding produces it) gives ratio +inf and the recursion returns the correct limit w = 1; a
NaN anywhere (0 * inf, NaN inputs) makes its level fail (w = 0, h = 0), never succeed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common import Levels, before_start, default_start, draft_token_probs, token_probs


def log_weights(log_ratio: Tensor) -> Tensor:
    """[B, K] log(p_k(x_k) / q_k(x_k)) -> [B, K+1] log w_k (log w_0 = 0) by the recursion
    log w_k = min(0, log w_{k-1} + log_ratio_k).

    For finite ratios this is the closed form log R_k - max_{j<=k} log R_j. Unlike the closed form
    (inf - inf = NaN), the recursion gives the right limits: p = 0 (ratio -inf) makes w = 0 from there
    on, q = 0 (ratio +inf) gives w = 1, and a NaN step (an impossible prefix followed by q = 0, or a
    NaN input) is a rejection: w = 0 from there on.
    """
    log_w = [log_ratio.new_zeros(log_ratio.shape[0])]
    for k in range(log_ratio.shape[1]):
        step = log_w[-1] + log_ratio[:, k]
        step = torch.where(torch.isnan(step), float("-inf"), step)
        log_w.append(step.clamp(max=0.0))
    return torch.stack(log_w, dim=1)


def thresholds(s: Tensor, den: Tensor) -> Tensor:
    """h = s / den where den > 0, 1 where den <= 0 (w = 1 and p = q: the level always succeeds), and
    0 where either is NaN (fail closed: a NaN must never turn into an acceptance)."""
    safe = torch.where(den > 0, den, torch.ones_like(den))
    h = torch.where(den > 0, s / safe, (den <= 0).to(s.dtype))
    return torch.where(torch.isnan(h), torch.zeros_like(h), h).clamp(0.0, 1.0)


def level_masses(w: Tensor, draft_tokens: Tensor, draft_probs: Tensor | None, target_probs: Tensor,
                 p_tok: Tensor) -> Tensor:
    """S_k for k = 1..K-1: [B, K-1] = sum_v (w_k p_{k+1}(v) - q_{k+1}(v))_+ (0-based rows k).

    w [B, K+1]. Point-mass drafts use the closed form w_k (1 - p_{k+1}(x_{k+1})), reading no row.
    """
    k = draft_tokens.shape[1]
    wk = w[:, 1:k]
    if draft_probs is None:
        return wk * (1.0 - p_tok[:, 1:]).clamp_min(0.0)
    a = wk.unsqueeze(-1) * target_probs[:, 1:k]
    return a.sub_(draft_probs[:, 1:k]).clamp_min_(0.0).sum(-1)  # in place: one [B, K-1, V] buffer


def levels(draft_tokens: Tensor, draft_probs: Tensor | None, target_probs: Tensor,
           start: Tensor | None = None) -> Levels:
    """draft_tokens [B, K], draft_probs [B, K, V] | None, target_probs [B, K+1, V] -> Levels.

    ``start`` [B] (verify_multi): positions before it are already accepted; the weights restart
    at w = 1 there (their ratio contributions are zeroed).
    """
    start = default_start(draft_tokens, start)
    p_tok = token_probs(target_probs, draft_tokens)
    q_tok = draft_token_probs(draft_probs, draft_tokens, target_probs)
    fixed = before_start(start, draft_tokens.shape[1])
    log_ratio = torch.where(fixed, torch.zeros_like(p_tok), p_tok.log() - q_tok.log())
    log_w = log_weights(log_ratio)
    w = log_w.exp()
    s = level_masses(w, draft_tokens, draft_probs, target_probs, p_tok)
    h = torch.cat([thresholds(s, s + 1.0 - w[:, 1:-1]), w[:, -1:]], dim=-1)
    return Levels(h, log_w, False, p_tok, q_tok, start)
