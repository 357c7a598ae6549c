"""Sequence packing: several conversations back to back in one row, attention block-diagonal per conversation.

A packed batch is described by ``position_ids`` [B, S] alone: each conversation's positions restart at 0
(0, 1, ..., n - 1) and the right-padding tail of a row is one more segment of its own (0, 1, ...). A
token's segment is therefore the number of 0-positions up to it (:func:`segment_ids`), and a query
attends to the keys of its own segment at positions <= its own (:func:`block_causal_mask`). Padding
only ever attends to padding, so no real token sees it, and RoPE positions are per conversation: a
packed conversation gets exactly the attention and positions it gets alone.

The frozen Hugging Face target is told the same thing the way transformers itself describes packed
("padding-free") rows: ``position_ids`` with ``attention_mask=None`` and no cache
(:func:`target_inputs`); its mask builder (``masking_utils.find_packed_sequence_indices``) then derives
the block-diagonal mask for sdpa, eager and flex attention, and flash-attention reads the same
positions as ``cu_seqlens``. That detection needs ``use_cache=False`` (a cache switches it off) and no
2-D mask, and a family that builds its mask another way would silently leak across conversations, so
:func:`check_packed_target` runs two short conversations packed and alone through the target once and
refuses packing in one line when they differ.
"""
from __future__ import annotations

from typing import Any

import torch


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids [B, S] (restarting at 0 per conversation) -> [B, S] int64 segment index per row (0, 1, ...)."""
    return (position_ids == 0).long().cumsum(-1) - 1


def same_segment(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S, S] bool: query q and key k are in the same segment (same conversation, or both padding)."""
    seg = segment_ids(position_ids)
    return seg[:, :, None] == seg[:, None, :]


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S, S] bool (True = attend): key k <= query q and both in the same segment. Every row attends to
    itself (no empty softmax)."""
    s = position_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril()
    return same_segment(position_ids) & causal


def positions_for_lengths(lengths: list[int], width: int) -> torch.Tensor:
    """[width] int64: arange(n) per segment length n, then arange of the padding tail (its own segment)."""
    used = sum(lengths)
    if used > width:
        raise ValueError(f"segments of {used} tokens do not fit a row of {width}")
    parts = [torch.arange(n) for n in lengths if n > 0]
    if width > used:
        parts.append(torch.arange(width - used))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def target_inputs(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> dict[str, Any]:
    """Keyword arguments for a frozen Hugging Face decoder stack (``hsd.models.capture.capture``): the
    2-D padding mask for an unpacked batch; for a packed one (``position_ids`` given) the per-conversation
    positions, no 2-D mask and no cache, which transformers turns into the block-diagonal causal mask."""
    if position_ids is None:
        return {"attention_mask": attention_mask}
    return {"attention_mask": None, "position_ids": position_ids, "use_cache": False}


@torch.no_grad()
def check_packed_target(model: torch.nn.Module, vocab_size: int, *, lengths: tuple[int, int] = (7, 5),
                        pad: int = 3) -> None:
    """ValueError unless ``model`` (a frozen HF causal LM) computes a packed row exactly as its conversations
    alone: two random conversations of ``lengths`` plus ``pad`` padding tokens in one row vs each alone;
    the last hidden state must agree to float rounding (a leak across conversations changes it at O(1))."""
    from hsd.models.capture import base_model

    base = base_model(model)
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    segs = [torch.randint(0, vocab_size, (1, n), generator=g).to(dev) for n in lengths]
    ids = torch.cat([*segs, torch.zeros(1, pad, dtype=torch.long, device=dev)], dim=1)
    pos = positions_for_lengths(list(lengths), ids.shape[1])[None].to(dev)
    packed = base(input_ids=ids, **target_inputs(None, pos)).last_hidden_state.float()
    start, worst, scale = 0, 0.0, 0.0
    for s in segs:
        alone = base(input_ids=s, use_cache=False).last_hidden_state.float()
        n = s.shape[1]
        worst = max(worst, float((packed[:, start:start + n] - alone).abs().max()))
        scale = max(scale, float(alone.abs().max()))
        start += n
    dtype = next(model.parameters()).dtype
    tol = (2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4) * max(1.0, scale)
    if not worst <= tol:
        name = type(model).__name__
        impl = getattr(model.config, "_attn_implementation", "?")
        raise ValueError(f"packing=true: {name} ({impl} attention) does not keep packed conversations apart "
                         f"(max difference {worst:.3g} vs each conversation alone); set packing=false")
