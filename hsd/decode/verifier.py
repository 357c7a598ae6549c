"""The one place the engine calls ``hsd.verify`` (so a serving path or a tree verifier slots in here).

Inputs are the draft's node tokens, the proposal rows each node was *actually* drawn from (the drafter's
q, or p_l after an exit stage; None = point masses) and the target's logits at the root and at every node.
The target rows are processed by the same :func:`~hsd.decode.sampling.process_logits` as the drafts, so
the verifier reproduces the processed target law (temperature, top-k, top-p).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hsd.verify import greedy_verify, verify

from .sampling import SamplingParams, process, sample


def verify_chain(tokens: Tensor, proposal: Tensor | None, target_logits: Tensor, params: SamplingParams,
                 method: str, backend: str = "torch",
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Verify one chain per row.

    tokens [B, K]; proposal [B, K, V] or None; target_logits [B, K+1, V] (row j: the target at the
    position before token j; row K: the bonus position). method: "greedy" or an ``hsd.verify`` method.
    Returns (num_accepted [B], next_token [B]): emit tokens[:, :num_accepted] then next_token.
    """
    k = tokens.shape[1]
    if method == "greedy":
        if k == 0:
            best = target_logits[:, 0].argmax(-1)
            return torch.zeros_like(best), best
        res = greedy_verify(tokens, target_logits)
        return res.num_accepted, res.next_token
    p = process(target_logits, params)
    if k == 0:  # nothing to verify: a plain draw from the target
        tok = p[:, 0].argmax(-1) if params.greedy else sample(p[:, 0], generator)
        return torch.zeros_like(tok), tok
    res = verify(tokens, proposal, p, method=method, backend=backend, generator=generator, validate=False)
    return res.num_accepted, res.next_token
