"""Run a frozen Hugging Face causal LM and capture only the hidden states the heads need.

Index convention (the one everything in hsd-train uses): hidden-state index ``j`` is Hugging Face's
``output_hidden_states`` index, i.e. the residual stream *entering* decoder layer ``j`` (0-based),
which is the output of layer ``j - 1``; ``j = 0`` is the embedding output (``embed_tokens``'s output;
Granite multiplies it by ``embedding_multiplier`` before layer 0, see :class:`OutputLaw`). This equals
vLLM's "capture before layer j" ids for EAGLE-3 (``eagle_aux_hidden_state_layer_ids``), and an early exit
"after layer l" (1-based count of layers run) reads index ``l``. Index ``N`` (= number of layers)
is the *pre-norm* output of the last layer; the post-norm state that feeds the LM head is
``Captured.final_hidden``.

Forward hooks keep just the requested layers instead of materialising every hidden state.

The logits are the target's real output law (:func:`output_logits`): the LM head followed by what the
family's ``*ForCausalLM.forward`` does after it (Gemma 2/3 final-logit softcapping, Granite's
``logits_scaling``, Cohere's ``logit_scale``), so that teacher rows, early-exit ``p_l`` and the decode
engine's target rows all have the law ``model(input_ids).logits`` has.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class OutputLaw:
    """What a family computes around its decoder layers outside any module call.

    embedding_multiplier: the stack's input is ``embed_tokens(ids) * m`` (Granite's ``embedding_multiplier``;
    Gemma's sqrt(H) is inside its embedding module and needs nothing here). logit_scale: logits are
    ``lm_head(x) * s`` (Cohere's ``logit_scale``; Granite's ``1 / logits_scaling``). final_softcap: logits
    are then ``c * tanh(logits / c)`` (Gemma 2/3 ``final_logit_softcapping``). Every transform is
    elementwise, so it commutes with selecting rows or vocabulary columns.
    """

    embedding_multiplier: float = 1.0
    logit_scale: float = 1.0
    final_softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.embedding_multiplier == 1.0 and self.logit_scale == 1.0 and not self.final_softcap

    def embeddings(self, e: torch.Tensor) -> torch.Tensor:
        """embed_tokens output [..., H] -> the first layer's input [..., H]."""
        return e if self.embedding_multiplier == 1.0 else e * self.embedding_multiplier

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """LM-head output [..., V] -> the model's logits [..., V] (same dtype)."""
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.final_softcap:
            z = torch.tanh(z / self.final_softcap) * self.final_softcap
        return z


def text_config(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def output_law(model: nn.Module) -> OutputLaw:
    """The :class:`OutputLaw` of a Hugging Face causal LM, read from its (text) config.

    Unknown families may do more; the decode engine's self-check (:mod:`hsd.decode.target_check`) compares
    against the model's own forward and refuses a target whose law this does not reproduce.
    """
    cfg = text_config(model)
    scale = 1.0
    if getattr(cfg, "logits_scaling", None):  # Granite: logits / logits_scaling
        scale /= float(cfg.logits_scaling)
    if getattr(cfg, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(cfg.logit_scale)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return OutputLaw(embedding_multiplier=float(getattr(cfg, "embedding_multiplier", None) or 1.0),
                     logit_scale=scale, final_softcap=float(cap) if cap else None)


def output_logits(model: nn.Module, final_hidden: torch.Tensor) -> torch.Tensor:
    """Post-norm hidden states [..., H] -> the model's float32 logits [..., V]: the LM head, then the
    family's output law (softcap / scaling), exactly as ``model(...).logits`` on those rows."""
    z = lm_head(model)(final_hidden).float()
    return output_law(model).logits(z)


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

    ``logits`` are the model's own (:func:`output_logits`: LM head + output law), in float32, from the
    post-norm hidden state.
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
        cap.logits = output_logits(model, last)
    return cap


def _output_cache(res: Any) -> Any:
    """The KV cache of a decoder-stack output: field ``cache`` in transformers 5, ``past_key_values`` before
    (read only where ``cache`` does not exist: in transformers 5 the old name is deprecated and warns)."""
    return getattr(res, "cache" if hasattr(type(res), "cache") else "past_key_values", None)
