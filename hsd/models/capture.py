"""Run a frozen Hugging Face causal LM and capture only the hidden states the heads need.

Index convention (the one everything in hsd-train uses): hidden-state index ``j`` is Hugging Face's
``output_hidden_states`` index, i.e. the residual stream *entering* decoder layer ``j`` (0-based),
which is the output of layer ``j - 1``; ``j = 0`` is the embedding output. This equals vLLM's
"capture before layer j" ids for EAGLE-3 (``eagle_aux_hidden_state_layer_ids``), and an early exit
"after layer l" (1-based count of layers run) reads index ``l``. Index ``N`` (= number of layers)
is the *pre-norm* output of the last layer; the post-norm state that feeds the LM head is
``Captured.final_hidden``.

Forward hooks keep just the requested layers instead of materialising every hidden state.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Captured:
    """What one target forward returns.

    hidden_states: HF index -> [B, S, H] (detached, in the model's dtype).
    final_hidden: [B, S, H] post-final-norm hidden state (the LM head's input), or None.
    logits: [B, S, V] float32 logits, or None when not requested.
    cache: the model's KV cache object when ``use_cache=True`` was passed.
    """

    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)
    final_hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel``/``Qwen2Model``) of a ``*ForCausalLM``."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner
    if hasattr(model, "layers"):
        return model
    raise TypeError(f"{type(model).__name__}: cannot find the decoder layers (expected `.model.layers`)")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return base_model(model).layers


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def final_norm(model: nn.Module) -> nn.Module:
    return base_model(model).norm


def lm_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return head


def validate_layers(model: nn.Module, layers: Sequence[int]) -> list[int]:
    """Check that every requested hidden-state index exists; return them as a sorted unique list."""
    n = num_layers(model)
    bad = [j for j in layers if not 0 <= int(j) <= n]
    if bad:
        raise ValueError(f"target has {n} decoder layers, so hidden-state indices must be in [0, {n}]; "
                         f"got {bad}")
    return sorted({int(j) for j in layers})


@torch.no_grad()
def capture(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
            layers: Sequence[int] = (), logits: bool = True, final_hidden: bool = False,
            **forward_kwargs) -> Captured:
    """One frozen forward of ``model`` over ``input_ids`` [B, S], capturing ``layers`` by HF index.

    ``logits`` are computed from the post-norm hidden state with the model's own LM head, in float32.
    Extra keyword arguments (``cache``, ``use_cache``, ``position_ids``…) go to the decoder stack.
    """
    wanted = validate_layers(model, layers)
    base = base_model(model)
    layer_mods = base.layers
    out: dict[int, torch.Tensor] = {}
    handles = []

    def keep(index: int):
        def hook(_module, _inputs, output):
            hs = output[0] if isinstance(output, tuple) else output
            out[index] = hs.detach()
        return hook

    for j in wanted:
        # index j = input of layer j = output of layer j-1; index 0 = embedding output.
        mod = base.embed_tokens if j == 0 else layer_mods[j - 1]
        handles.append(mod.register_forward_hook(keep(j)))
    try:
        res = base(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    last = res.last_hidden_state
    cap = Captured(hidden_states=out, cache=_output_cache(res))
    if final_hidden:
        cap.final_hidden = last.detach()
    if logits:
        cap.logits = lm_head(model)(last).float()
    return cap


def _output_cache(res: Any) -> Any:
    """The KV cache of a decoder-stack output: field ``cache`` in transformers 5, ``past_key_values`` before
    (read only where ``cache`` does not exist: in transformers 5 the old name is deprecated and warns)."""
    return getattr(res, "cache" if hasattr(type(res), "cache") else "past_key_values", None)
