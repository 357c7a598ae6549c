"""Pack tokenized conversations into rows of at most ``max_length`` tokens (``packing: true``).

Chat data mixes short and long conversations, and a padded batch is as wide as its longest row, so
much of its compute goes to padding. Packing concatenates whole conversations into rows of up to
``max_length`` tokens (best-fit decreasing: deterministic, typically > 95 % full), and
``hsd.models.packing`` keeps them apart in attention (block-diagonal, positions restarting per
conversation), so every conversation is computed exactly as alone and the loss masks are unchanged.

A packed row is a dict like a conversation row: ``input_ids`` and ``loss_mask`` (concatenated),
``position_ids`` (0..n-1 per conversation), ``row_id`` (its first conversation's id: unique, since every
conversation is in exactly one row), ``row_ids`` and ``lengths`` (its conversations, in order).
``train.chat_data.collate`` pads ``position_ids`` with a padding segment of its own. Rows are packed
once per run; the loop shuffles their order every epoch.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of ``lengths`` grouped into bins of total <= ``capacity``.

    Items are placed longest first (ties by index) into the open bin with the least room that fits,
    else a new bin; bins are returned in creation order, each listing its items in placement order.
    O(n log n): bins are bucketed by remaining room (at most capacity + 1 distinct values)."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"item {too_long[0]} has length {lengths[too_long[0]]} > capacity {capacity}")
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left -> bins with exactly that room (a stack)
    rooms: list[int] = []  # sorted distinct rooms that have a bin
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        k = bisect.bisect_left(rooms, n)
        if k == len(rooms):
            b, room = len(bins), capacity
            bins.append([])
        else:
            room = rooms[k]
            b = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        bins[b].append(i)
        left = room - n
        if left > 0:  # a full bin is closed
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(b)
    return bins


def pack_rows(rows: Sequence[dict], max_length: int) -> list[dict]:
    """Conversation rows (``row_id``, ``input_ids``, ``loss_mask``) -> packed rows (see the module doc)."""
    packs = pack_lengths([len(r["input_ids"]) for r in rows], max_length)
    out = []
    for members in packs:
        group = [rows[i] for i in members]
        lengths = [len(r["input_ids"]) for r in group]
        out.append({
            "row_id": int(group[0]["row_id"]),
            "row_ids": [int(r["row_id"]) for r in group],
            "lengths": lengths,
            "input_ids": [t for r in group for t in r["input_ids"]],
            "loss_mask": [t for r in group for t in r["loss_mask"]],
            "position_ids": [p for n in lengths for p in range(n)],
        })
    return out


def _fill(lengths: Sequence[int], batch_size: int) -> float:
    """Real tokens / computed tokens of batches of ``batch_size`` rows (in order), each padded to its longest."""
    computed = sum(max(lengths[i:i + batch_size]) * len(lengths[i:i + batch_size])
                   for i in range(0, len(lengths), batch_size))
    return sum(lengths) / max(computed, 1)


def fill_stats(rows: Sequence[dict], packed: Sequence[dict], batch_size: int) -> dict:
    """How full the batches are with and without packing (``batch_size`` rows per batch, in order): the
    share of computed token positions that hold a real token."""
    lengths = [len(r["input_ids"]) for r in rows]
    return {"conversations": len(rows), "packed_rows": len(packed), "tokens": sum(lengths),
            "fill_padded": _fill(lengths, batch_size),
            "fill_packed": _fill([len(r["input_ids"]) for r in packed], batch_size)}
