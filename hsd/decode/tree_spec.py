"""TreeSpec: the shape budget of one EAGLE-2-style dynamic draft tree (top-k, depth, total nodes).

Parsed from the CLI form ``TOPK:DEPTH:TOTAL`` (e.g. ``4:5:16``) and named ``tree{TOPK}x{DEPTH}n{TOTAL}`` in
run names. Only the shape lives here; drafting and verification use it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TreeSpec:
    """top_k: children expanded per frontier node per step (>= 1); depth: drafting steps, i.e. the longest
    root-to-leaf path (>= 1); total_tokens: nodes kept after pruning by cumulative draft log-probability,
    parents before children (depth <= total_tokens <= top_k + top_k**2 + ... + top_k**depth)."""

    top_k: int
    depth: int
    total_tokens: int

    def __post_init__(self) -> None:
        for name in ("top_k", "depth", "total_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"tree {name}: must be an integer >= 1, got {v!r}")
        most = sum(self.top_k ** d for d in range(1, self.depth + 1))
        if not self.depth <= self.total_tokens <= most:
            raise ValueError(f"tree total_tokens: must lie in [depth, top_k + ... + top_k**depth] = "
                             f"[{self.depth}, {most}] for top_k={self.top_k}, depth={self.depth}; "
                             f"got {self.total_tokens}")

    @classmethod
    def parse(cls, text: str) -> TreeSpec:
        """``"TOPK:DEPTH:TOTAL"`` -> TreeSpec; anything else is a ValueError quoting the text."""
        parts = str(text).split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            top_k, depth, total = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"tree: expected TOPK:DEPTH:TOTAL with integers (e.g. 4:5:16), got {text!r}") from None
        return cls(top_k, depth, total)

    @property
    def name(self) -> str:
        """Run-name fragment, e.g. ``tree4x5n16``."""
        return f"tree{self.top_k}x{self.depth}n{self.total_tokens}"


def prune_tree(parents: Tensor, scores: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """Keep the ``total`` best nodes of a candidate tree by cumulative draft log-probability (EAGLE-2 re-rank).

    parents [N] int64 (-1 = child of the root, parents before children); scores [N] float, each node's
    cumulative log-probability (so a child never scores above its parent). Ties go to the earlier node,
    which is the parent, so the kept set is closed under ancestors. Returns (keep [total] old indices in
    their original, topological order; new_parents [total] re-indexed into ``keep``, -1 = root).
    """
    n = int(parents.shape[0])
    if not 1 <= total <= n:
        raise ValueError(f"prune_tree: total must lie in [1, {n}], got {total}")
    order = sorted(range(n), key=lambda j: (-float(scores[j]), j))
    keep = torch.tensor(sorted(order[:total]), dtype=torch.long)
    new_index = {int(old): new for new, old in enumerate(keep.tolist())}
    new_parents = []
    for old in keep.tolist():
        p = int(parents[old])
        if p >= 0 and p not in new_index:
            raise ValueError("prune_tree: a child scores above its parent; scores must be cumulative log-probs")
        new_parents.append(-1 if p < 0 else new_index[p])
    return keep, torch.tensor(new_parents, dtype=torch.long)
