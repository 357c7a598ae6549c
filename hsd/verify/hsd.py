"""Hierarchical speculative decoding (HSD, arXiv 2601.05724) with the capped final test.

The hierarchical form works with un-normalised joint masses. For level i = 1..K ("accept
x_1..x_{i-1}, resample position i"):

    P_{i-1}, Q_{i-1}     prefix joints prod_{j<i} p_j(x_j), prod_{j<i} q_j(x_j)
    M_i                  max_{0<=j<=i-1} R_j with R_j = P_j / Q_j (so M_i >= 1)
    P~_{i-1} = P_{i-1} / M_i                      capped prefix weight
    a_i(v)   = P~_{i-1} p_i(v) - Q_{i-1} q_i(v)    per-level branch mass over the vocabulary
    plus_i, minus_i = sum_v (a_i)_+, sum_v (-a_i)_+
    step-back probability b_i = 1 - plus_i / max(plus_i, minus_i)   (0 when both are 0)
    final test: accept all K tokens with probability P~_K / Q_K = R_K / max_{j<=K} R_j  (CAPPED)

The block stops at the last level that does not step back (tau = that level - 1), or takes all K
tokens if the final test succeeds. The token comes from (a_{tau+1})_+. Level 1 never steps back
(plus_1 = minus_1 since P~_0 = Q_0 = 1), so it needs no coin: coin k-1 decides level k+1 for
k = 1..K-1 and coin K-1 is the final test, i.e. ``h`` has the same columns as block verification.

The official code's final test is min(1, R_K) (uncapped), which is not lossless; the capped test
makes HSD equal in law to block verification (docs/verification.md, "HSD is block verification"),
which the tests check exactly. Raw joints underflow float32 for long blocks, so masses are kept in
units of Q_{i-1}: a_i / Q_{i-1} = c_{i-1} p_i - q_i with c_k = P~_k / Q_k = R_k / max_{j<=k} R_j. That
coefficient obeys c_k = min(1, c_{k-1} p_k(x_k) / q_k(x_k)) and is formed by this recursion in log
space (``blockwise.log_weights``), which stays exact at q = 0 and fails closed on NaN.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .blockwise import log_weights
from .common import Levels, before_start, default_start, draft_token_probs, token_probs


def branch_masses(coef: Tensor, draft_tokens: Tensor, draft_probs: Tensor | None, target_probs: Tensor,
                  p_tok: Tensor) -> tuple[Tensor, Tensor]:
    """plus, minus [B, K-1] for levels i = 2..K in units of Q_{i-1}; coef [B, K-1] = P~_{i-1}/Q_{i-1}.

    Point-mass drafts (q_i = one-hot of x_i): plus = coef (1 - p_i(x_i)), minus = 1 - coef p_i(x_i).
    """
    k = draft_tokens.shape[1]
    if draft_probs is None:
        px = p_tok[:, 1:]
        return coef * (1.0 - px).clamp_min(0.0), (1.0 - coef * px).clamp_min(0.0)
    a = (coef.unsqueeze(-1) * target_probs[:, 1:k]).sub_(draft_probs[:, 1:k])
    net = a.sum(-1)  # plus - minus, summed over the actual rows (no normalisation assumed)
    plus = a.clamp_min_(0.0).sum(-1)
    return plus, (plus - net).clamp_min(0.0)


def levels(draft_tokens: Tensor, draft_probs: Tensor | None, target_probs: Tensor,
           start: Tensor | None = None) -> Levels:
    """draft_tokens [B, K], draft_probs [B, K, V] | None, target_probs [B, K+1, V] -> Levels.

    h[:, k-1] = 1 - b_{k+1} (probability that level k+1 does not step back) for k = 1..K-1, and
    h[:, K-1] = P~_K / Q_K (capped final test). ``start`` [B] (verify_multi): the joints restart
    after the accepted prefix, i.e. fresh weights for the new chain.
    """
    start = default_start(draft_tokens, start)
    p_tok = token_probs(target_probs, draft_tokens)
    q_tok = draft_token_probs(draft_probs, draft_tokens, target_probs)
    fixed = before_start(start, draft_tokens.shape[1])
    log_ratio = torch.where(fixed, torch.zeros_like(p_tok), p_tok.log() - q_tok.log())
    log_coef = log_weights(log_ratio)  # log(P~_k / Q_k), k = 0..K
    coef = log_coef.exp()
    plus, minus = branch_masses(coef[:, 1:-1], draft_tokens, draft_probs, target_probs, p_tok)
    d = torch.maximum(plus, minus)
    # 1 - b = plus / max(plus, minus); d = 0 (both 0: w = 1, p = q) never steps back; NaN fails closed.
    safe = torch.where(d > 0, d, torch.ones_like(d))
    not_back = torch.where(d > 0, plus / safe, (d <= 0).to(d.dtype))
    not_back = torch.where(torch.isnan(not_back), torch.zeros_like(not_back), not_back)
    h = torch.cat([not_back.clamp(0.0, 1.0), coef[:, -1:]], dim=-1)
    return Levels(h, log_coef, False, p_tok, q_tok, start)
