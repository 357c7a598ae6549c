"""Monte Carlo helpers: sample drafts from an exact instance, complete verifier outputs with target
sampling, and run Pearson's chi-square against the exact target joint (no scipy needed)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .exact import TreeInstance, prefix_ids, target_joint


def sample_chains(inst: TreeInstance, n: int, generator: torch.Generator) -> Tensor:
    """[n, K] draft chains sampled from q, one token at a time."""
    tokens = torch.zeros(n, inst.depth, dtype=torch.long)
    for j in range(inst.depth):
        rows = inst.q[j][prefix_ids(tokens[:, :j], inst.vocab)]
        tokens[:, j] = torch.multinomial(rows, 1, generator=generator).squeeze(1)
    return tokens


def complete(inst: TreeInstance, prefixes: Tensor, num_accepted: Tensor, next_token: Tensor,
             generator: torch.Generator) -> Tensor:
    """[N, K+1] sequences: prefixes[:, :n], then next_token, then target samples up to K+1 tokens."""
    n_rows, k = prefixes.shape[0], inst.depth
    seq = torch.zeros(n_rows, k + 1, dtype=torch.long)
    seq[:, :k] = prefixes
    for j in range(k + 1):
        rows = inst.p[j][prefix_ids(seq[:, :j], inst.vocab)]
        drawn = torch.multinomial(rows, 1, generator=generator).squeeze(1)
        keep = seq[:, j] if j < k else torch.zeros_like(drawn)
        seq[:, j] = torch.where(j < num_accepted, keep, torch.where(j == num_accepted, next_token, drawn))
    return seq


def chi_square(inst: TreeInstance, sequences: Tensor, min_expected: float = 5.0) -> tuple[float, int, float]:
    """Pearson chi-square of the sequences' histogram against the target joint.

    Cells expected to hold fewer than ``min_expected`` samples are pooled into one cell (otherwise
    the statistic is far from its chi-square law). Returns (chi2, dof, z) with
    z = (chi2 - dof) / sqrt(2 dof); a sequence of target probability 0 gives chi2 = inf.
    """
    probs = target_joint(inst)
    counts = torch.bincount(prefix_ids(sequences, inst.vocab), minlength=probs.numel()).double()
    expected = probs * sequences.shape[0]
    if bool((counts[expected == 0] > 0).any()):
        return math.inf, probs.numel() - 1, math.inf
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = obs.numel() - 1
    return chi2, dof, (chi2 - dof) / math.sqrt(2 * dof)
