"""Decoding state shared by every head: the KV cache and the result of one step.

``KVCache`` holds the RoPE-rotated keys and the values of every position fed so far, ``[B, n_kv, L, d]``,
one length for the whole batch. After a verification rejects drafts, ``crop(n)`` keeps the first ``n``
positions; the next step continues from there. Every head returns a ``StepOutput``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Keys/values [B, n_kv, L, d] (None before the first step)."""

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.key is None else int(self.key.shape[2])

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' k, v [B, n_kv, T, d]; returns all keys and values [B, n_kv, L + T, d]."""
        if self.key is None:
            self.key, self.value = k, v
        else:
            self.key = torch.cat([self.key, k], dim=2)
            self.value = torch.cat([self.value, v], dim=2)
        return self.key, self.value

    def crop(self, n: int) -> KVCache:
        """Keep the first ``n`` positions (0 <= n <= length); returns the cache itself."""
        if not 0 <= n <= self.length:
            raise ValueError(f"crop: n must be in [0, {self.length}], got {n}")
        if self.key is not None:
            self.key, self.value = self.key[:, :, :n], self.value[:, :, :n]
        return self


@dataclass
class StepOutput:
    """What one head step returns.

    logits: [B, T, Vd] over the head's own (draft) vocabulary, raw (no temperature); ``head.draft_vocab``
    scatters them into the target vocabulary. cache: the head's KVCache after the step (None for heads
    without state). hidden: [B, T, H] the EAGLE-3 head's output, fed back as ``hidden`` next step (None for
    early-exit heads).
    """

    logits: torch.Tensor
    cache: KVCache | None = None
    hidden: torch.Tensor | None = None


@dataclass
class LayerStackCache:
    """One :class:`KVCache` per decoder layer of a multi-layer head (the ``layers`` early-exit head).

    Implements the part of transformers' ``Cache`` API that Hugging Face decoder layers call
    (``update(key, value, layer_idx, ...)`` appends and returns every key/value so far, [B, n_kv, L, d]);
    all layers hold the same positions, so ``length`` and ``crop(n)`` are per stack.
    """

    layers: list[KVCache]

    @classmethod
    def new(cls, num_layers: int) -> LayerStackCache:
        return cls([KVCache() for _ in range(int(num_layers))])

    is_compileable = False  # read by some transformers helpers

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].append(key, value)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length

    def crop(self, n: int) -> LayerStackCache:
        """Keep the first ``n`` positions of every layer; returns the cache itself."""
        for c in self.layers:
            c.crop(n)
        return self
