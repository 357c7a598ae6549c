"""Reduced draft vocabulary (EAGLE-3 ``d2t``/``t2d``, a :class:`~hsd.models.vocab.DraftVocab`) from
assistant-token frequencies.

Recipe (docs/eagle3_contract.md, "Draft vocabulary"): count target token ids where ``loss_mask == 1``; keep the
``Vd`` most frequent, ties broken by the smaller id (sort key ``(-count, id)``, so the result does not
depend on data order); when fewer than ``Vd`` ids were seen, pad with the lowest unused ids; sort the
kept ids ascending -> ``used``. Then ``d2t[i] = used[i] - i`` (an offset: ``target_id = i + d2t[i]``)
and ``t2d[j] = j in used``. Serving engines rebuild ``used`` as ``d2t + arange(Vd)``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from hsd.models.vocab import DraftVocab


def token_counts(rows: Iterable[Mapping[str, Any]], target_vocab_size: int) -> torch.Tensor:
    """Count assistant tokens: LongTensor [V] with the number of ``loss_mask == 1`` occurrences of each id.

    Raises ``ValueError`` for an id outside ``[0, target_vocab_size)`` (data tokenized for another model).
    """
    if target_vocab_size <= 0:
        raise ValueError(f"target_vocab_size must be positive, got {target_vocab_size}")
    counts = torch.zeros(target_vocab_size, dtype=torch.long)
    for i, row in enumerate(rows):
        ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
        mask = torch.as_tensor(row["loss_mask"], dtype=torch.long)
        if ids.shape != mask.shape:
            raise ValueError(f"row {i}: input_ids {tuple(ids.shape)} and loss_mask {tuple(mask.shape)} differ")
        sel = ids[mask == 1]
        if sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= target_vocab_size):
            bad = int(sel.max()) if int(sel.max()) >= target_vocab_size else int(sel.min())
            raise ValueError(f"row {i}: token id {bad} is outside the target vocabulary of size "
                             f"{target_vocab_size} (tokenizer/vocab mismatch between data and target)")
        counts += torch.bincount(sel, minlength=target_vocab_size)
    return counts


def select_ids(counts: torch.Tensor, draft_vocab_size: int) -> torch.Tensor:
    """The ``draft_vocab_size`` ids to keep, ascending: most frequent first (ties: smaller id), padded
    with the lowest unseen ids. counts: [V] -> LongTensor [Vd]."""
    V = counts.numel()
    if not 0 < draft_vocab_size <= V:
        raise ValueError(f"draft_vocab_size must be in [1, target vocab size {V}], got {draft_vocab_size}")
    ids = torch.arange(V)
    # stable sort on -count keeps ascending id order among equal counts: key (-count, id)
    order = ids[torch.sort(-counts, stable=True).indices]
    seen = order[counts[order] > 0][:draft_vocab_size]
    if seen.numel() < draft_vocab_size:
        unused = ids[counts == 0][: draft_vocab_size - seen.numel()]  # already ascending
        seen = torch.cat([seen, unused])
    return torch.sort(seen).values


def build_draft_vocab(rows: Iterable[Mapping[str, Any]], target_vocab_size: int,
                      draft_vocab_size: int) -> tuple[DraftVocab, float]:
    """Draft vocabulary from tokenized rows (``input_ids``/``loss_mask``) -> (DraftVocab, coverage).

    ``coverage`` is the fraction of assistant tokens whose id is in the draft vocabulary (1.0 when every
    assistant token is kept; 0.0 for data without assistant tokens). ``draft_vocab_size`` larger than
    ``target_vocab_size`` raises ``ValueError``.
    """
    if draft_vocab_size > target_vocab_size:
        raise ValueError(f"draft_vocab_size ({draft_vocab_size}) is larger than the target vocabulary "
                         f"({target_vocab_size})")
    counts = token_counts(rows, target_vocab_size)
    vocab = DraftVocab.from_target_ids(select_ids(counts, draft_vocab_size), target_vocab_size)
    return vocab, coverage(counts, vocab)


def coverage(counts: torch.Tensor, vocab: DraftVocab) -> float:
    """Fraction of the counted tokens (``token_counts``) whose id is in ``vocab`` (0.0 when none counted)."""
    total = int(counts.sum())
    return float(counts[vocab.target_ids.cpu()].sum()) / total if total else 0.0
