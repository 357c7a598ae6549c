"""A head's draft vocabulary: which target-vocabulary ids its ``Vd`` output columns stand for.

Column ``j`` of a head's logits is target id ``target_ids[j]``; ``target_ids`` is strictly ascending in
``[0, V)``. Saved form (EAGLE-3, as vLLM and SGLang read it): ``d2t`` [Vd] int64 offsets,
``target_id = j + d2t[j]``, and ``t2d`` [V] bool, True on the kept target ids. A head over the whole
target vocabulary has ``target_ids = arange(V)`` (``DraftVocab.full``).

``scatter_logits`` / ``scatter_probs`` put rows over the draft vocabulary into the target vocabulary
(-inf / 0 elsewhere), which is how every drafter and stage hands its rows to the verifier.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class DraftVocab:
    """target_ids [Vd] int64 (strictly ascending, in [0, vocab_size)); vocab_size = V of the target."""

    target_ids: torch.Tensor
    vocab_size: int

    # -- construction (checked) --------------------------------------------------------------------
    @classmethod
    def full(cls, vocab_size: int, device: torch.device | str | None = None) -> DraftVocab:
        return cls(torch.arange(int(vocab_size), device=device), int(vocab_size))

    @classmethod
    def from_target_ids(cls, ids: torch.Tensor, vocab_size: int) -> DraftVocab:
        """Strictly ascending target ids [Vd] -> DraftVocab (ValueError otherwise)."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        return cls.from_d2t(ids - torch.arange(ids.numel(), device=ids.device), vocab_size)

    @classmethod
    def from_d2t(cls, d2t: torch.Tensor, vocab_size: int, t2d: torch.Tensor | None = None) -> DraftVocab:
        """Saved offsets d2t [Vd] (and, when given, t2d [V]) -> DraftVocab, after ``check``."""
        d2t = torch.as_tensor(d2t, dtype=torch.long).flatten()
        vocab = cls(torch.arange(d2t.numel(), device=d2t.device) + d2t, int(vocab_size))
        _check_ids(vocab.target_ids.cpu(), vocab.vocab_size)
        if t2d is None:
            t2d = vocab.t2d
        elif torch.as_tensor(t2d).numel() != vocab.vocab_size:
            raise ValueError(f"t2d has {torch.as_tensor(t2d).numel()} entries but the target vocabulary "
                             f"has {vocab.vocab_size}")
        cls.check(d2t, torch.as_tensor(t2d))
        return vocab

    @staticmethod
    def check(d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        """ValueError unless d2t [Vd] and t2d [V] describe the same strictly ascending set of target ids.

        Invariants: d2t is 1-D int64, t2d 1-D bool, ``t2d.sum() == Vd``, the ids ``arange(Vd) + d2t`` are
        strictly ascending, inside ``[0, V)`` and equal ``nonzero(t2d)``.
        """
        if d2t.dim() != 1 or d2t.dtype != torch.long:
            raise ValueError(f"d2t must be a 1-D int64 tensor, got {tuple(d2t.shape)} {d2t.dtype}")
        if t2d.dim() != 1 or t2d.dtype != torch.bool:
            raise ValueError(f"t2d must be a 1-D bool tensor, got {tuple(t2d.shape)} {t2d.dtype}")
        vd, v = d2t.numel(), t2d.numel()
        if vd > v:
            raise ValueError(f"d2t has {vd} entries but the target vocabulary (t2d) only {v}")
        if int(t2d.sum()) != vd:
            raise ValueError(f"t2d marks {int(t2d.sum())} target ids but d2t has {vd} draft ids")
        ids = torch.arange(vd) + d2t.cpu()
        _check_ids(ids, v)
        if not torch.equal(ids, torch.nonzero(t2d.cpu()).flatten()):
            raise ValueError("d2t and t2d disagree: nonzero(t2d) != arange(Vd) + d2t")

    # -- views ---------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Vd, the number of draft ids."""
        return int(self.target_ids.numel())

    @property
    def is_full(self) -> bool:
        """True when the draft vocabulary is the whole target vocabulary (scatters are the identity)."""
        return self.size == self.vocab_size

    @property
    def d2t(self) -> torch.Tensor:
        """[Vd] int64 offsets: target_id = draft_id + d2t[draft_id]."""
        return self.target_ids - torch.arange(self.size, device=self.target_ids.device)

    @property
    def t2d(self) -> torch.Tensor:
        """[V] bool: True on the target ids in the draft vocabulary."""
        out = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.target_ids.device)
        out[self.target_ids] = True
        return out

    def to(self, device: torch.device | str) -> DraftVocab:
        return DraftVocab(self.target_ids.to(device), self.vocab_size)

    # -- draft rows -> target rows ------------------------------------------------------------------------
    def _scatter(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"rows have {x.shape[-1]} columns but the draft vocabulary has {self.size}")
        if self.is_full:
            return x
        out = x.new_full((*x.shape[:-1], self.vocab_size), fill)
        out[..., self.target_ids.to(x.device)] = x
        return out

    def scatter_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[..., Vd] logits -> [..., V], -inf outside the draft vocabulary (``x`` itself when full)."""
        return self._scatter(x, float("-inf"))

    def scatter_probs(self, x: torch.Tensor) -> torch.Tensor:
        """[..., Vd] probabilities -> [..., V], 0 outside the draft vocabulary (``x`` itself when full)."""
        return self._scatter(x, 0.0)


def _check_ids(ids: torch.Tensor, vocab_size: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"d2t maps draft ids outside the target vocabulary [0, {vocab_size})")
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError("d2t target ids (arange(Vd) + d2t) must be strictly ascending")
