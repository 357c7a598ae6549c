"""Reduced draft vocabulary (EAGLE-3 ``d2t``/``t2d``) from assistant-token frequencies.

Recipe (research/eagle3_training.md §2.3): count target token ids where ``loss_mask == 1``; keep the
``Vd`` most frequent, ties broken by the smaller id (sort key ``(-count, id)``, so the result does not
depend on data order); when fewer than ``Vd`` ids were seen, pad with the lowest unused ids; sort the
kept ids ascending -> ``used``. Then ``d2t[i] = used[i] - i`` (an offset: ``target_id = i + d2t[i]``)
and ``t2d[j] = j in used``. Serving engines rebuild ``used`` as ``d2t + arange(Vd)``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


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


def mapping_from_ids(used: torch.Tensor, target_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending unique target ids [Vd] -> (d2t LongTensor [Vd] offsets, t2d BoolTensor [V])."""
    used = torch.as_tensor(used, dtype=torch.long)
    d2t = used - torch.arange(used.numel())
    t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
    t2d[used] = True
    check_draft_vocab(d2t, t2d)
    return d2t, t2d


def build_draft_vocab(rows: Iterable[Mapping[str, Any]], target_vocab_size: int,
                      draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Draft vocabulary from tokenized rows (``input_ids``/``loss_mask``) -> (d2t [Vd], t2d [V], coverage).

    ``coverage`` is the fraction of assistant tokens whose id is in the draft vocabulary (1.0 when every
    assistant token is kept; 0.0 for data without assistant tokens). ``draft_vocab_size`` larger than
    ``target_vocab_size`` raises ``ValueError``.
    """
    if draft_vocab_size > target_vocab_size:
        raise ValueError(f"draft_vocab_size ({draft_vocab_size}) is larger than the target vocabulary "
                         f"({target_vocab_size})")
    counts = token_counts(rows, target_vocab_size)
    used = select_ids(counts, draft_vocab_size)
    d2t, t2d = mapping_from_ids(used, target_vocab_size)
    total = int(counts.sum())
    coverage = float(counts[used].sum()) / total if total else 0.0
    return d2t, t2d, coverage


def draft_to_target_ids(d2t: torch.Tensor) -> torch.Tensor:
    """Target id of every draft id: ``arange(Vd) + d2t`` -> LongTensor [Vd]."""
    return torch.arange(d2t.numel(), device=d2t.device) + d2t


def check_draft_vocab(d2t: torch.Tensor, t2d: torch.Tensor) -> None:
    """Raise ``ValueError`` unless d2t [Vd] and t2d [V] describe the same strictly ascending id set.

    Invariants: d2t is int64 and 1-D, t2d bool and 1-D, ``t2d.sum() == Vd``, the target ids
    ``arange(Vd) + d2t`` are strictly ascending, inside ``[0, V)``, and equal ``nonzero(t2d)``.
    """
    if d2t.dim() != 1 or d2t.dtype != torch.long:
        raise ValueError(f"d2t must be a 1-D int64 tensor, got {tuple(d2t.shape)} {d2t.dtype}")
    if t2d.dim() != 1 or t2d.dtype != torch.bool:
        raise ValueError(f"t2d must be a 1-D bool tensor, got {tuple(t2d.shape)} {t2d.dtype}")
    Vd, V = d2t.numel(), t2d.numel()
    if Vd > V:
        raise ValueError(f"d2t has {Vd} entries but the target vocabulary (t2d) only {V}")
    if int(t2d.sum()) != Vd:
        raise ValueError(f"t2d marks {int(t2d.sum())} target ids but d2t has {Vd} draft ids")
    target = draft_to_target_ids(d2t.cpu())
    if Vd and (int(target.min()) < 0 or int(target.max()) >= V):
        raise ValueError(f"d2t maps draft ids outside the target vocabulary [0, {V})")
    if Vd > 1 and not bool((target[1:] > target[:-1]).all()):
        raise ValueError("d2t target ids (arange(Vd) + d2t) must be strictly ascending")
    if not torch.equal(target, torch.nonzero(t2d.cpu()).flatten()):
        raise ValueError("d2t and t2d disagree: nonzero(t2d) != arange(Vd) + d2t")
