"""TreeSpec: the shape budget of one draft tree.

Dynamic (EAGLE-2): ``TOPK:DEPTH:TOTAL`` (e.g. ``4:5:16``), named ``tree{TOPK}x{DEPTH}n{TOTAL}`` in run names.
Static: ``static:B1xB2x...`` (e.g. ``static:3x2x1``): every node at depth d gets B_{d+1} children (the top
B tokens at T = 0, B draws without replacement at T > 0), nothing is ranked or pruned; named
``static3x2x1``. Only the shape lives here; drafting (:mod:`hsd.decode.tree_draft`) and verification use it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TreeSpec:
    """top_k: children drawn per expanded node, and nodes expanded per level (>= 1); depth: drafting steps,
    i.e. the longest root-to-leaf path (>= 1); total_tokens: nodes kept after pruning, parents before
    children. EAGLE-2 expansion makes ``top_k + (depth - 1) * top_k**2`` candidates (the root's top_k
    children, then top_k children for each of the top_k best nodes of the last level), so
    ``depth <= total_tokens <= candidates``."""

    top_k: int
    depth: int
    total_tokens: int
    branching: tuple[int, ...] | None = None  # static trees: children per node at each depth

    @classmethod
    def static(cls, branching: tuple[int, ...]) -> TreeSpec:
        b = tuple(branching)
        if not b or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in b):
            raise ValueError(f"static tree: branching factors must be integers >= 1, got {list(b)}")
        total, width = 0, 1
        for x in b:
            width *= x
            total += width
        return cls(max(b), len(b), total, b)

    def __post_init__(self) -> None:
        if self.branching is not None:
            return
        for name in ("top_k", "depth", "total_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"tree {name}: must be an integer >= 1, got {v!r}")
        most = self.candidates
        if not self.depth <= self.total_tokens <= most:
            raise ValueError(f"tree total_tokens: must lie in [depth, top_k + (depth - 1) * top_k**2] = "
                             f"[{self.depth}, {most}] for top_k={self.top_k}, depth={self.depth}; "
                             f"got {self.total_tokens}")

    @property
    def candidates(self) -> int:
        """Nodes drafted before pruning (EAGLE-2 expansion; a static tree: all of them)."""
        if self.branching is not None:
            return self.total_tokens
        return self.top_k + (self.depth - 1) * self.top_k ** 2

    @classmethod
    def parse(cls, text: str) -> TreeSpec:
        """``"TOPK:DEPTH:TOTAL"`` or ``"static:B1xB2x..."`` -> TreeSpec; anything else is a ValueError quoting
        the text."""
        if str(text).startswith("static:"):
            try:
                b = tuple(int(x) for x in str(text)[len("static:"):].split("x"))
            except ValueError:
                raise ValueError(f"tree: expected static:B1xB2x... with integers (e.g. static:3x2x1), "
                                 f"got {text!r}") from None
            return cls.static(b)
        parts = str(text).split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            top_k, depth, total = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"tree: expected TOPK:DEPTH:TOTAL with integers (e.g. 4:5:16) or static:B1xB2x..., "
                             f"got {text!r}") from None
        return cls(top_k, depth, total)

    @property
    def name(self) -> str:
        """Run-name fragment, e.g. ``tree4x5n16`` or ``static3x2x1``."""
        if self.branching is not None:
            return "static" + "x".join(map(str, self.branching))
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
