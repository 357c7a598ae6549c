"""A draft is a tree of proposed tokens; a chain is the tree with one child per node.

Node ``j`` of row ``b`` holds ``tokens[b, j]``, hangs below ``parents[b, j]`` (``-1`` = below the root, the
last committed token, which the target has not seen yet) and was drawn from the processed proposal row
``q[b, j]`` (``None`` for deterministic drafts such as prompt lookup: point masses). Parents come before
their children, so node order is a topological order. The target pass, the verifier and the cache commit
all work on node indices; tree drafts come from :mod:`hsd.decode.tree_draft`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Draft:
    """tokens [B, N] int64; parents [B, N] int64 (-1 = child of the root); q [B, N, V] float or None."""

    tokens: Tensor
    parents: Tensor
    q: Tensor | None = None

    @classmethod
    def chain(cls, tokens: Tensor, q: Tensor | None = None) -> Draft:
        """tokens [B, K] (+ q [B, K, V]) as the chain root -> t_0 -> ... -> t_{K-1}."""
        b, k = tokens.shape
        parents = torch.arange(-1, k - 1, device=tokens.device).expand(b, k).clone()
        return cls(tokens.long(), parents, q)

    @classmethod
    def empty(cls, batch: int, device: torch.device | str = "cpu") -> Draft:
        z = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return cls(z, z.clone(), None)

    @property
    def size(self) -> int:
        """N, the number of draft nodes per row."""
        return int(self.tokens.shape[1])

    @property
    def is_chain(self) -> bool:
        k = self.size
        return bool((self.parents == torch.arange(-1, k - 1, device=self.parents.device)).all())

    def chain_path(self, num_accepted: int) -> Tensor:
        """Node indices [n] of the first ``num_accepted`` nodes of a chain (the accepted path)."""
        if not self.is_chain:
            raise ValueError("chain_path: this draft is a tree; use the tree verifier's path")
        return torch.arange(int(num_accepted), device=self.tokens.device)

    def prefix(self, n: int) -> Draft:
        """The first ``n`` nodes of a chain (a shorter chain)."""
        if not self.is_chain:
            raise ValueError("prefix: only chains can be cut to a prefix")
        return Draft(self.tokens[:, :n], self.parents[:, :n], None if self.q is None else self.q[:, :n])
