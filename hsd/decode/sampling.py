"""The one place where logits become the probability rows a token is drawn from.

Every drafter, the exit stage and the target use :func:`process_logits`, so the rows a verifier
compares are exactly the rows each stage sampled from (temperature, top-k, top-p applied once, in
that order, as Hugging Face's ``generate`` does). Temperature 0 is greedy: a one-hot row at the
argmax (the first index on ties, as ``torch.argmax``).

Lossless here means lossless for the *processed* target law: the verifier reproduces
``process_logits(target_logits, T, top_k, top_p)``, which is what plain sampling with the same
settings draws from.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """temperature >= 0 (0 = greedy), top_k >= 0 (0 = off), top_p in (0, 1] (1 = off)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t, k, p = float(self.temperature), int(self.top_k), float(self.top_p)
        if not (t >= 0 and t != float("inf")):
            raise ValueError(f"temperature: must be a finite number >= 0, got {self.temperature}")
        if k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < p <= 1:
            raise ValueError(f"top_p: must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return float(self.temperature) == 0.0


def process_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits [..., V] -> processed probabilities [..., V] in float32 (each row sums to 1).

    Temperature first, then top-k (keeps every token whose logit is >= the k-th largest, so ties at the
    boundary are kept), then top-p (keeps the smallest set of most likely tokens whose mass reaches
    ``top_p``; the most likely token is always kept). ``-inf`` logits (tokens outside a draft
    vocabulary) get probability 0. ``temperature == 0``: one-hot at the argmax of the raw logits.
    """
    SamplingParams(temperature, top_k, top_p)  # validates
    x = logits.float()
    if float(temperature) == 0.0:
        return torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).to(torch.float32)
    x = x / float(temperature)
    v = x.shape[-1]
    if 0 < int(top_k) < v:
        kth = torch.topk(x, int(top_k), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if float(top_p) < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= float(top_p)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def process(logits: Tensor, params: SamplingParams) -> Tensor:
    """:func:`process_logits` with a :class:`SamplingParams`."""
    return process_logits(logits, params.temperature, params.top_k, params.top_p)


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row: probs [..., V] -> ids [...] int64 (inverse CDF of one uniform per row).

    One-hot rows (greedy) return their argmax without consuming randomness differently from other rows:
    every row always consumes exactly one uniform, so a run is reproducible from its seed.
    """
    flat = probs.reshape(-1, probs.shape[-1]).float()
    v = flat.shape[-1]
    gen_device = generator.device if generator is not None else flat.device
    u = torch.rand(flat.shape[0], 1, generator=generator, device=gen_device).to(flat.device)
    cdf = flat.cumsum(-1)
    # First index whose CDF exceeds u * total: that token always has positive mass. Only rounding can
    # push the draw past the end; then take the last token with positive mass.
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    last = torch.where(flat > 0, torch.arange(v, device=flat.device), -1).amax(-1, keepdim=True)
    idx = torch.where(idx >= v, last, idx)
    return idx.reshape(probs.shape[:-1])
