"""The layer pieces every head is built from (and the decode engine reuses): RMSNorm, RoPE, GQA attention.

Conventions are Llama's, which is what vLLM and SGLang run for these heads:

* ``RMSNorm`` normalises in float32 and returns ``weight * normed.to(x.dtype)``: one dtype rule for every
  norm in hsd (the output has the input's dtype promoted with the weight's; equal dtypes in practice).
* RoPE is the rotate-half form. ``RotaryEmbedding`` builds the cos/sin tables from the *recorded*
  settings (``rope_theta`` plus the ``rope_parameters`` of transformers: default, llama3, yarn, linear...)
  with transformers' own Llama rotary code, in float32, and returns them in the query dtype.
* Attention tensors are ``[B, heads, T, d]``; keys/values have ``n_kv`` heads and are repeated for
  grouped-query attention (``repeat_kv``: head ``h`` reads KV head ``h // (heads / n_kv)``).
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension (weight initialised to ones)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _llama_rotary(head_dim: int, rope_parameters: dict[str, Any], max_position_embeddings: int) -> nn.Module:
    """transformers' ``LlamaRotaryEmbedding`` for these settings, on the CPU."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    theta = float(rope_parameters.get("rope_theta", 10000.0))
    base = dict(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim,
                max_position_embeddings=max_position_embeddings)
    try:
        config = LlamaConfig(**base, rope_parameters=copy.deepcopy(rope_parameters))
        ok = float(config.rope_parameters["rope_theta"]) == theta
    except (TypeError, KeyError, AttributeError):
        ok = False
    if not ok:  # transformers 4.x spelling: rope_theta + rope_scaling
        scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        plain = scaling.get("rope_type", "default") == "default" and len(scaling) <= 1
        config = LlamaConfig(**base, rope_theta=theta, rope_scaling=None if plain else scaling)
    with torch.device("cpu"):
        return LlamaRotaryEmbedding(config=config)


class RotaryEmbedding:
    """cos/sin of RoPE for ``head_dim`` from recorded settings (``rope_parameters`` holds ``rope_type``,
    ``rope_theta`` and any scaling keys). Not an ``nn.Module``: nothing to save, nothing for meta-device
    loading to touch; the tables are built on first use."""

    def __init__(self, head_dim: int, rope_parameters: dict[str, Any], max_position_embeddings: int = 8192):
        self.head_dim = int(head_dim)
        self.rope_parameters = copy.deepcopy(dict(rope_parameters))
        self.max_position_embeddings = int(max_position_embeddings)
        self._rotary: nn.Module | None = None

    def __call__(self, position_ids: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> (cos, sin) [B, T, head_dim] in ``like``'s dtype and device."""
        if self._rotary is None:
            self._rotary = _llama_rotary(self.head_dim, self.rope_parameters, self.max_position_embeddings)
        return self._rotary(like, position_ids.to(like.device))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, d]; cos/sin [B, T, d] -> x rotated by its positions."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, n_kv, L, d] -> [B, n_kv * n_rep, L, d] (grouped-query attention)."""
    if n_rep == 1:
        return x
    b, h, L, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, L, d).reshape(b, h * n_rep, L, d)


def causal_mask(past: int, new: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[new, past + new] bool (True = attend): new row i sees every cached position and new rows <= i."""
    return torch.ones(new, past + new, dtype=torch.bool, device=device).tril(diagonal=past)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention with GQA: q [B, nh, T, d], keys/values [B, n_kv, L, d], mask
    broadcastable to [B, nh, T, L] (True = attend) -> [B, nh, T, d]."""
    n_rep = q.shape[1] // keys.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(keys, n_rep), repeat_kv(values, n_rep), attn_mask=mask,
                                          scale=1.0 / math.sqrt(q.shape[-1]))
