"""The one place the engine calls ``hsd.verify`` (so a tree verifier slots in here).

Inputs are the draft's node tokens, the proposal rows each node was *actually* drawn from (the drafter's
q, or p_l after an exit stage; None = point masses) and the target's logits at the root and at every node.
The target rows are processed by the same :func:`~hsd.decode.sampling.process_logits` as the drafts, so
the verifier reproduces the processed target law (temperature, top-k, top-p).

At T > 0 every verification goes through the serving path :class:`hsd.verify.serving.VerifyPlan` (one
plan per method/backend/vocabulary/device, reused across steps; fail-closed numerics; Philox uniforms in
the kernel). Its per-request seeds are drawn from the engine's generator, so a run stays reproducible
from ``seed`` and every verification gets fresh, independent randomness. T = 0 uses ``greedy_verify``.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from hsd.verify import TreeVerifyResult, greedy_verify, verify_tree
from hsd.verify.serving import ServeResult, VerifyPlan

from .sampling import SamplingParams, process, sample

_SEED_RANGE = 2**62


@lru_cache(maxsize=16)
def verify_plan(method: str, backend: str, vocab: int, device: str, max_batch: int, max_draft: int) -> VerifyPlan:
    """The engine's cached serving plan (created once per configuration, then reused every step)."""
    return VerifyPlan(max_batch=max_batch, max_draft=max_draft, vocab=vocab, device=device, method=method,
                      inputs="probs", backend=backend)


def _plan_for(method: str, backend: str, b: int, k: int, vocab: int, device: torch.device) -> VerifyPlan:
    # Round the sizes up so a decode run needs one plan (K varies round to round with the exit stage).
    return verify_plan(method, backend, vocab, str(device), max(8, 1 << (b - 1).bit_length()),
                       max(8, 1 << max(k - 1, 0).bit_length()))


def verify_chain(tokens: Tensor, proposal: Tensor | None, target_logits: Tensor, params: SamplingParams,
                 method: str, backend: str = "torch",
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Verify one chain per row.

    tokens [B, K]; proposal [B, K, V] or None (point masses); target_logits [B, K+1, V] (row j: the target
    at the position before token j; row K: the bonus position). method: "greedy" or an ``hsd.verify`` method.
    Returns (num_accepted [B], next_token [B]): emit tokens[:, :num_accepted] then next_token.
    """
    k = tokens.shape[1]
    if method == "greedy" or params.greedy:  # T = 0: the processed target is one-hot at the logits' argmax
        if k == 0:
            best = target_logits[:, 0].argmax(-1)
            return torch.zeros_like(best), best
        res = greedy_verify(tokens, target_logits)
        return res.num_accepted, res.next_token
    p = process(target_logits, params)
    if k == 0:  # nothing to verify: a plain draw from the target
        tok = sample(p[:, 0], generator)
        return torch.zeros_like(tok), tok
    res = verify(tokens, proposal, p, method=method, backend=backend, generator=generator)
    return res.num_accepted, res.next_token


def verify(tokens: Tensor, proposal: Tensor | None, p: Tensor, *, method: str, backend: str = "torch",
           generator: torch.Generator | None = None) -> ServeResult:
    """tokens [B, K >= 1], proposal [B, K, V] | None, processed target rows p [B, K+1, V] -> the serving
    plan's result (num_accepted [B], next_token [B], tokens [B, K+1]; copies, safe to keep)."""
    b, k = tokens.shape
    dev = p.device
    plan = _plan_for(method, backend, b, k, p.shape[-1], dev)
    gen_dev = generator.device if generator is not None else "cpu"
    seeds = torch.randint(0, _SEED_RANGE, (b,), generator=generator, device=gen_dev).to(dev)
    res = plan(tokens.contiguous(), p.float(), None if proposal is None else proposal.float(),
               temperature=torch.ones(b, device=dev), seeds=seeds, steps=torch.zeros(b, dtype=torch.int64, device=dev))
    # The plan's outputs are views of its buffers (overwritten by the next call): copy what we keep.
    return ServeResult(*(t.clone() for t in (res.num_accepted, res.next_token, res.tokens, res.flags)))


def verify_tree_draft(tokens: Tensor, parents: Tensor, proposal: Tensor | None, target_logits: Tensor,
                      params: SamplingParams, method: str, backend: str = "torch",
                      generator: torch.Generator | None = None) -> TreeVerifyResult:
    """Verify one draft tree per row (``hsd.verify.verify_tree``).

    tokens, parents [B, N] (-1 = child of the root); proposal [B, N, V] (the rows each node was drawn from)
    or None (point masses); target_logits [B, N+1, V] (row 0 after the root, row i+1 after node i).
    method: "greedy", "rrs" or "weighted". Returns ``verify_tree``'s result: path [B, D] (accepted node
    indices, -1 padded), num_accepted [B], next_token [B].
    """
    # The engine's trees are built by its drafters (topological parents, rows from ``process``): the input
    # checks of the public API (a few ms over [N + 1, V] rows) are skipped here.
    if method == "greedy" or params.greedy:
        res = verify_tree(tokens, parents, None, target_logits, method="greedy", backend=backend, validate=False)
    else:
        p = process(target_logits, params)
        res = verify_tree(tokens, parents, proposal, p, method=method, backend=backend, generator=generator,
                          validate=False)
    return res
