"""Token-wise verification (Leviathan et al. 2023, Alg. 1) as a :class:`~hsd.verify.common.Levels` record.

Position i (1-based) is accepted with probability min(1, p_i(x_i) / q_i(x_i)); the first rejection
stops the block and the token comes from (p_i - q_i)_+ (point-mass drafts: p_i without x_i), or
from the bonus row p_{K+1} when every position was accepted.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common import Levels, default_start, draft_token_probs, token_probs


def levels(draft_tokens: Tensor, draft_probs: Tensor | None, target_probs: Tensor,
           start: Tensor | None = None) -> Levels:
    """draft_tokens [B, K], draft_probs [B, K, V] | None, target_probs [B, K+1, V] -> Levels.

    ``h`` [B, K] is the acceptance probability min(1, p/q) of each position; the residual weight
    is 1 at every position (log_w = 0).
    """
    p_tok = token_probs(target_probs, draft_tokens)
    q_tok = draft_token_probs(draft_probs, draft_tokens, target_probs)
    # q_tok > 0 is guaranteed by validation; p_tok may be 0 (then the position is always rejected).
    h = (p_tok / q_tok).clamp(max=1.0)
    b, k = draft_tokens.shape
    log_w = torch.zeros(b, k + 1, dtype=target_probs.dtype, device=target_probs.device)
    return Levels(h, log_w, True, p_tok, q_tok, default_start(draft_tokens, start))
