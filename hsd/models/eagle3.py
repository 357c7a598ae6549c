"""EAGLE-3 draft head: config, model and the draft-step API the decoding loop uses.

Architecture (docs/eagle3_contract.md; module names ARE the vLLM/SGLang checkpoint keys)::

    g  = fc(cat(h_low, h_mid, h_high))                 # [B, T, 3*H_t] -> [B, T, H], no bias
    x  = cat(input_layernorm(e), hidden_norm(g))       # e = frozen target token embedding; [B, T, 2H]
    h  = g + o_proj(attn(q_proj(x), k_proj(x), v_proj(x)))   # residual = UN-normalised g (EAGLE original)
    h  = h + mlp(post_attention_layernorm(h))          # SwiGLU
    logits = lm_head(norm(h))                          # [B, T, Vd] over the draft vocabulary

``h`` (pre-final-norm) is what the next draft step receives in place of ``g``. Draft ids map to target
ids through the ``d2t`` offsets (``target_id = draft_id + d2t[draft_id]``); ``t2d`` [V] marks the target
ids that are in the draft vocabulary; ``head.draft_vocab`` is the same as a :class:`DraftVocab`.

Saved keys (exactly ``hsd.export.layout.EAGLE3_KEYS``): ``fc.weight``,
``midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight``,
``midlayer.self_attn.{q,k,v,o}_proj.weight``, ``midlayer.mlp.{gate,up,down}_proj.weight``, ``norm.weight``,
``lm_head.weight``, ``d2t``, ``t2d``. The frozen token embedding is a *non-persistent* buffer
(``embed_tokens``, [V, H]): never trained, never saved; after ``from_pretrained`` call
``attach_target(target)`` before using token ids (training passes embeddings directly).

Saved heads open with ``Eagle3DraftModel.from_pretrained`` (or ``AutoModel`` once this module is imported);
so do exported folders (``hsd-train export``: ``model_type: llama`` / ``LlamaForCausalLMEagle3``, or the
speculators twin), whose ``config.json`` is translated by :meth:`Eagle3Config.from_exported`.

Captured target layers: ``config.eagle_config["eagle_aux_hidden_state_layer_ids"]`` are Hugging Face
``output_hidden_states`` indices (= vLLM's "capture before layer j"); default ``[2, N//2, N-3]``.

Positions / RoPE: the draft row whose fused features come from target position ``t`` has RoPE position
``t``; the k-th chained draft step from it has position ``t + k`` (the same in training and decoding).
RoPE is Llama's, built from the recorded settings (``rope_theta`` + ``rope_parameters``; hsd.models.layers).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from hsd.models.kv import KVCache, StepOutput
from hsd.models.layers import RMSNorm, RotaryEmbedding, apply_rope, attend, causal_mask
from hsd.models.vocab import DraftVocab

try:  # transformers >= 5: init helpers that respect "already loaded" flags
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4.x
    _init = nn.init


def default_aux_layer_ids(num_target_layers: int) -> list[int]:
    """EAGLE-3's default captured hidden-state indices ``[2, N//2, N-3]`` (HF ``hidden_states`` indices)."""
    n = int(num_target_layers)
    if n < 4:
        raise ValueError(f"the default aux layers [2, N//2, N-3] need a target with >= 4 layers, got N={n}; "
                         "pass aux_layer_ids explicitly")
    return [2, n // 2, n - 3]


def _target_rope(tc: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, extra rope parameters or None) of a target config (transformers 4 or 5 spelling)."""
    params = getattr(tc, "rope_parameters", None)
    if isinstance(params, dict) and params:
        if "rope_type" not in params and "rope_theta" not in params:  # nested per layer type
            params = params.get("full_attention") or next(iter(v for v in params.values() if isinstance(v, dict)))
        theta = params.get("rope_theta", getattr(tc, "rope_theta", None))
        extra = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = getattr(tc, "rope_theta", None)
        scaling = getattr(tc, "rope_scaling", None)
        extra = dict(scaling) if isinstance(scaling, dict) else None
    return float(theta if theta is not None else 10000.0), extra


def _normalise_rope(rope_theta: float | None, rope_scaling: dict | None,
                    rope_parameters: dict | None) -> tuple[float, dict[str, Any]]:
    """One canonical RoPE record: (theta, {"rope_type", "rope_theta", ...scaling keys})."""
    params: dict[str, Any] = {}
    for src in (rope_scaling, rope_parameters):
        if isinstance(src, dict):
            params.update(copy.deepcopy(src))
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.pop("type", None)
    theta = params.get("rope_theta", rope_theta)
    theta = float(10000.0 if theta is None else theta)
    params["rope_theta"] = theta
    params.setdefault("rope_type", "default")
    return theta, params


class Eagle3Config(PretrainedConfig):
    """Config of an EAGLE-3 draft head (one decoder layer; fields as vLLM/SGLang read them, see
    docs/eagle3_contract.md).

    ``vocab_size`` is the target's vocabulary V, ``draft_vocab_size`` the head's output size Vd.
    ``target_hidden_size`` is None when it equals ``hidden_size`` (then ``fc`` reads ``3 * hidden_size``).
    RoPE: ``rope_theta`` and ``rope_parameters`` (transformers-5 spelling) are stored; ``config.json`` also
    gets the legacy ``rope_scaling`` (None for plain RoPE) so transformers-4-era readers see the same RoPE.
    """

    model_type = "eagle3_draft"

    def __init__(self, hidden_size: int = 4096, intermediate_size: int = 14336, num_attention_heads: int = 32,
                 num_key_value_heads: int | None = None, head_dim: int | None = None,
                 rms_norm_eps: float = 1e-5, rope_theta: float | None = None, rope_scaling: dict | None = None,
                 rope_parameters: dict | None = None, max_position_embeddings: int = 8192,
                 vocab_size: int = 128256, draft_vocab_size: int | None = None,
                 target_hidden_size: int | None = None, hidden_act: str = "silu", attention_bias: bool = False,
                 mlp_bias: bool = False, num_hidden_layers: int = 1, tie_word_embeddings: bool = False,
                 eagle_config: dict | None = None, norm_before_residual: bool = False,
                 initializer_range: float = 0.02, **kwargs):
        self.hidden_size = int(hidden_size)
        self.intermediate_size = int(intermediate_size)
        self.num_attention_heads = int(num_attention_heads)
        self.num_key_value_heads = int(num_key_value_heads or num_attention_heads)
        self.head_dim = int(head_dim or self.hidden_size // self.num_attention_heads)
        self.rms_norm_eps = float(rms_norm_eps)
        self.rope_theta, self.rope_parameters = _normalise_rope(rope_theta, rope_scaling, rope_parameters)
        self.max_position_embeddings = int(max_position_embeddings)
        self.vocab_size = int(vocab_size)
        self.draft_vocab_size = int(draft_vocab_size if draft_vocab_size is not None else vocab_size)
        self.target_hidden_size = (None if target_hidden_size in (None, hidden_size)
                                   else int(target_hidden_size))
        self.hidden_act = hidden_act
        self.attention_bias = bool(attention_bias)
        self.mlp_bias = bool(mlp_bias)
        self.num_hidden_layers = int(num_hidden_layers)
        self.tie_word_embeddings = bool(tie_word_embeddings)
        ec = dict(eagle_config or {})
        ec.setdefault("use_aux_hidden_state", True)
        ec.setdefault("eagle_aux_hidden_state_layer_ids", [])
        ec["eagle_aux_hidden_state_layer_ids"] = [int(i) for i in ec["eagle_aux_hidden_state_layer_ids"]]
        self.eagle_config = ec
        self.norm_before_residual = bool(norm_before_residual)
        self.initializer_range = float(initializer_range)
        kwargs.pop("rope_type", None)
        super().__init__(tie_word_embeddings=self.tie_word_embeddings, **kwargs)
        self._check()

    def _check(self) -> None:
        if self.num_hidden_layers != 1:
            raise ValueError(f"num_hidden_layers must be 1 for an EAGLE-3 head (SGLang refuses more), "
                             f"got {self.num_hidden_layers}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in [1, vocab_size={self.vocab_size}], "
                             f"got {self.draft_vocab_size}")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings must be False: the head has its own lm_head over the draft vocab")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE), got {self.head_dim}")

    # -- derived ------------------------------------------------------------------------------------
    @property
    def aux_layer_ids(self) -> list[int]:
        return list(self.eagle_config.get("eagle_aux_hidden_state_layer_ids") or [])

    @property
    def fc_input_size(self) -> int:
        return 3 * (self.target_hidden_size or self.hidden_size)

    @property
    def rope_scaling_legacy(self) -> dict[str, Any] | None:
        """transformers-4 ``rope_scaling``: None for plain RoPE, else the parameters without ``rope_theta``."""
        extra = {k: v for k, v in self.rope_parameters.items() if k != "rope_theta"}
        if extra.get("rope_type", "default") == "default" and len(extra) <= 1:
            return None
        return extra

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["rope_theta"] = self.rope_theta
        out["rope_scaling"] = self.rope_scaling_legacy
        out["rope_parameters"] = copy.deepcopy(self.rope_parameters)
        if out.get("target_hidden_size") is None:  # engines read it only when it differs from hidden_size
            out.pop("target_hidden_size", None)
        return out

    @classmethod
    def from_exported(cls, cfg: dict[str, Any]) -> Eagle3Config:
        """Config of an exported folder (its ``config.json`` as a dict): the native serving layout
        (``model_type: llama``, ``architectures: [LlamaForCausalLMEagle3]``) or the speculators twin
        (``speculators_model_type: eagle3``, the layer's fields under ``transformer_layer_config``)."""
        ids_key = "eagle_aux_hidden_state_layer_ids"
        if cfg.get("speculators_model_type"):
            flat = dict(cfg["transformer_layer_config"])
            for key in ("draft_vocab_size", "target_hidden_size", "norm_before_residual", "norm_before_fc", "fc_norm",
                        "norm_output"):
                if key in cfg:
                    flat[key] = cfg[key]
            flat["eagle_config"] = {"use_aux_hidden_state": True, ids_key: list(cfg.get(ids_key) or [])}
        else:
            flat = dict(cfg)
            if not (flat.get("eagle_config") or {}).get(ids_key) and flat.get(ids_key):
                flat["eagle_config"] = {"use_aux_hidden_state": True, ids_key: list(flat[ids_key])}
        for flag in ("norm_before_fc", "fc_norm", "norm_output"):
            if flat.get(flag):
                raise ValueError(f"exported head sets {flag}: a layer hsd-train EAGLE-3 heads do not have")
        serving_only = {"model_type", "architectures", "torch_dtype", "dtype", ids_key, "auto_map", "_name_or_path",
                        "transformers_version", "use_cache", "pretraining_tp", "attention_dropout", "norm_before_fc",
                        "fc_norm", "norm_output"}
        return cls(**{k: v for k, v in flat.items() if k not in serving_only})

    @classmethod
    def from_target(cls, target_config: Any, draft_vocab_size: int | None = None,
                    aux_layer_ids: Sequence[int] | None = None, **overrides) -> Eagle3Config:
        """Head config for a target (``PretrainedConfig`` of a Llama/Qwen2/Qwen3-style causal LM).

        Copies sizes, RoPE, norm eps, activation, bos/eos ids; ``aux_layer_ids`` default ``[2, N//2, N-3]``;
        ``draft_vocab_size`` default = target vocab. ``overrides`` replace any field (e.g. a smaller
        ``intermediate_size``). ValueError for ids outside ``[0, N]`` or a draft vocab larger than V.
        """
        tc = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        n_layers = int(tc.num_hidden_layers)
        vocab = int(tc.vocab_size)
        ids = list(aux_layer_ids) if aux_layer_ids else default_aux_layer_ids(n_layers)
        if len(ids) != 3:
            raise ValueError(f"aux_layer_ids must name exactly 3 hidden-state indices (fc reads 3*H), got {ids}")
        bad = [i for i in ids if not 0 <= int(i) <= n_layers]
        if bad:
            raise ValueError(f"aux_layer_ids {bad} do not exist in the target: it has {n_layers} layers, so "
                             f"hidden-state indices must be in [0, {n_layers}]")
        vd = vocab if draft_vocab_size is None else int(draft_vocab_size)
        if not 1 <= vd <= vocab:
            raise ValueError(f"draft_vocab_size ({vd}) must be in [1, target vocab size {vocab}]")
        theta, extra = _target_rope(tc)
        h = int(tc.hidden_size)
        heads = int(tc.num_attention_heads)
        eos = getattr(tc, "eos_token_id", None)
        kw: dict[str, Any] = dict(
            hidden_size=h, intermediate_size=int(tc.intermediate_size), num_attention_heads=heads,
            num_key_value_heads=int(getattr(tc, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(tc, "head_dim", None) or h // heads),
            rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-6)), rope_theta=theta, rope_parameters=extra,
            max_position_embeddings=int(getattr(tc, "max_position_embeddings", 8192)), vocab_size=vocab,
            draft_vocab_size=vd, target_hidden_size=h, hidden_act=getattr(tc, "hidden_act", "silu"),
            eagle_config={"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": [int(i) for i in ids]},
            bos_token_id=getattr(tc, "bos_token_id", None), eos_token_id=eos,
            pad_token_id=getattr(tc, "pad_token_id", None),
        )
        kw.update(overrides)
        if "hidden_size" in overrides and "target_hidden_size" not in overrides:
            kw["target_hidden_size"] = h
        return cls(**kw)


# ---------------------------------------------------------------------------------------------------------
# Layers


class Eagle3Attention(nn.Module):
    """Projections of the draft attention; q/k/v read the 2H concat [norm(e) ‖ norm(g)]."""

    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(2 * c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)


class Eagle3MLP(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.act_fn = ACT2FN[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Eagle3DecoderLayer(nn.Module):
    """The single draft layer (``midlayer``). Attention itself is done by the caller (cache or TTT), so
    the same projections serve the step API and the training-time-test unroll."""

    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.norm_before_residual = c.norm_before_residual
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Eagle3Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = Eagle3MLP(c)

    def qkv(self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """embeds, hidden [B, T, H]; cos/sin [B, T, d] -> (q [B, nh, T, d], k, v [B, nkv, T, d], residual [B, T, H]).

        q and k are RoPE-rotated. ``residual`` is the un-normalised ``hidden`` (or the normalised one with
        ``norm_before_residual``)."""
        a = self.self_attn
        b, t, _ = hidden.shape
        g_n = self.hidden_norm(hidden)
        x = torch.cat([self.input_layernorm(embeds), g_n], dim=-1)
        q = a.q_proj(x).view(b, t, a.num_heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(b, t, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(b, t, a.num_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v, (g_n if self.norm_before_residual else hidden)

    def finish(self, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """attn [B, nh, T, d] (attention output per head), residual [B, T, H] -> h [B, T, H] (pre-final-norm)."""
        b, _, t, _ = attn.shape
        h = residual + self.self_attn.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        return h + self.mlp(self.post_attention_layernorm(h))


# ---------------------------------------------------------------------------------------------------------
# The model


class Eagle3DraftModel(PreTrainedModel):
    """EAGLE-3 draft head (see the module docstring). ``forward`` = ``forward_step``."""

    config_class = Eagle3Config
    base_model_prefix = ""
    supports_gradient_checkpointing = False
    _no_split_modules = ["Eagle3DecoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"embed_tokens\.weight"]  # a bit-exact copy some exports carry

    def __init__(self, config: Eagle3Config):
        super().__init__(config)
        c = config
        self.fc = nn.Linear(c.fc_input_size, c.hidden_size, bias=False)
        self.midlayer = Eagle3DecoderLayer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.arange(c.vocab_size) < c.draft_vocab_size)
        self.register_buffer("embed_tokens", None, persistent=False)  # [V, H] frozen target copy, not saved
        self.rotary = RotaryEmbedding(c.head_dim, c.rope_parameters, c.max_position_embeddings)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        """``PreTrainedModel.from_pretrained``, also for exported folders (native or speculators layout)."""
        import json
        import os

        cfg_file = os.path.join(os.fspath(pretrained_model_name_or_path), "config.json")
        if config is None and os.path.isfile(cfg_file):
            with open(cfg_file) as fh:
                raw = json.load(fh)
            if raw.get("model_type") != Eagle3Config.model_type:
                config = Eagle3Config.from_exported(raw)
                if raw.get("speculators_model_type"):
                    kwargs.setdefault("key_mapping", {r"^layers\.0\.": "midlayer."})
        return super().from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            _init.ones_(module.weight)

    # -- vocabulary and target ------------------------------------------------------------------------
    @property
    def draft_vocab(self) -> DraftVocab:
        """The head's output columns as target ids (from the ``d2t`` buffer)."""
        return DraftVocab(torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t, self.config.vocab_size)

    def set_draft_vocab(self, vocab: DraftVocab | torch.Tensor, t2d: torch.Tensor | None = None) -> Eagle3DraftModel:
        """Install the draft vocabulary: a DraftVocab, or d2t [Vd] int64 offsets (t2d [V] derived when omitted)."""
        c = self.config
        if not isinstance(vocab, DraftVocab):
            d2t = torch.as_tensor(vocab, dtype=torch.long).flatten()
            if d2t.numel() != c.draft_vocab_size:
                raise ValueError(f"d2t has {d2t.numel()} entries but draft_vocab_size is {c.draft_vocab_size}")
            vocab = DraftVocab.from_d2t(d2t, c.vocab_size, t2d)
        if (vocab.size, vocab.vocab_size) != (c.draft_vocab_size, c.vocab_size):
            raise ValueError(f"draft vocabulary of {vocab.size} of {vocab.vocab_size} ids does not fit a head with "
                             f"draft_vocab_size {c.draft_vocab_size} and vocab_size {c.vocab_size}")
        with torch.no_grad():
            self.d2t.copy_(vocab.d2t.to(self.d2t.device))
            self.t2d.copy_(vocab.t2d.to(self.t2d.device))
        return self

    def attach_target(self, target: nn.Module | torch.Tensor) -> Eagle3DraftModel:
        """Copy the target's input embedding [V, H] into the (non-saved, frozen) ``embed_tokens`` buffer
        (ValueError when the head and the target disagree on the vocabulary or the hidden size)."""
        weight = target if torch.is_tensor(target) else target.get_input_embeddings().weight
        c = self.config
        if weight.shape[0] != c.vocab_size:
            raise ValueError(f"the head was trained for a vocabulary of {c.vocab_size} tokens but the target has "
                             f"{weight.shape[0]} (tokenizer/vocab mismatch)")
        if tuple(weight.shape) != (c.vocab_size, c.hidden_size):
            raise ValueError(f"target embedding has shape {tuple(weight.shape)} but the head expects "
                             f"[vocab_size={c.vocab_size}, hidden_size={c.hidden_size}]")
        self.embed_tokens = weight.detach().to(self.fc.weight.device).clone()
        return self

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> frozen target embeddings [B, T, H]."""
        if self.embed_tokens is None:
            raise ValueError("the head has no token embedding: call attach_target(target) after from_pretrained "
                             "(the embedding is the target's and is not saved with the head)")
        if input_ids.numel() and int(input_ids.max()) >= self.embed_tokens.shape[0]:
            raise ValueError(f"input_ids contain id {int(input_ids.max())} >= vocab_size {self.embed_tokens.shape[0]}")
        return F.embedding(input_ids, self.embed_tokens)

    # -- pieces shared by the step API and the TTT unroll ---------------------------------------------
    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """Captured target features [B, T, 3*H_t] (low ‖ mid ‖ high) -> g [B, T, H]."""
        if features.shape[-1] != self.config.fc_input_size:
            raise ValueError(f"features have last dim {features.shape[-1]}, expected 3 * target_hidden_size = "
                             f"{self.config.fc_input_size}")
        return self.fc(features.to(self.fc.weight.dtype))

    def rope(self, position_ids: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> (cos, sin) [B, T, d] in ``like``'s dtype/device."""
        return self.rotary(position_ids, like)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """h [..., H] (pre-final-norm) -> draft logits [..., Vd]."""
        return self.lm_head(self.norm(hidden))

    # -- step API ---------------------------------------------------------------------------------------
    def forward_step(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                     cache: KVCache | None = None, *, features: torch.Tensor | None = None,
                     hidden: torch.Tensor | None = None, input_embeds: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None) -> StepOutput:
        """One draft forward over T new rows, appended to ``cache``.

        Exactly one of ``features`` [B, T, 3*H_t] (fused target features; a prefill / first step) or
        ``hidden`` [B, T, H] (the previous draft step's output) is given, plus the tokens at those rows as
        ``input_ids`` [B, T] (or ``input_embeds`` [B, T, H]). Row t's token is the one *after* the target
        position whose features it reads. ``position_ids`` [B, T] (default: continue after the cache).
        ``attention_mask`` [B, T, L + T] bool (True = attend; L = cached length) overrides the default
        (every cached entry + causal among the new rows), e.g. for tree drafts.
        Returns StepOutput(logits [B, T, Vd], cache, hidden [B, T, H]).
        """
        if (features is None) == (hidden is None):
            raise ValueError("give exactly one of features (fused target features) or hidden (previous step)")
        g = self.fuse(features) if features is not None else hidden.to(self.fc.weight.dtype)
        if input_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or input_embeds")
            input_embeds = self.embed(input_ids)
        e = input_embeds.to(g.dtype)
        b, t, _ = g.shape
        if e.shape[:2] != (b, t):
            raise ValueError(f"tokens {tuple(e.shape[:2])} and hidden rows {(b, t)} differ")
        cache = cache if cache is not None else KVCache()
        past = cache.length
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=g.device).expand(b, t)
        cos, sin = self.rope(position_ids, g)
        q, k, v, residual = self.midlayer.qkv(e, g, cos, sin)
        keys, values = cache.append(k, v)
        if attention_mask is None:
            mask = causal_mask(past, t, g.device)
        else:
            if tuple(attention_mask.shape) != (b, t, past + t):
                raise ValueError(f"attention_mask must be [B, T, L+T] = {(b, t, past + t)}, "
                                 f"got {tuple(attention_mask.shape)}")
            mask = attention_mask.bool()[:, None]
        h = self.midlayer.finish(attend(q, keys, values, mask), residual)
        return StepOutput(self.compute_logits(h), cache, h)

    def forward(self, *args, **kwargs) -> StepOutput:  # noqa: D102 - see forward_step
        return self.forward_step(*args, **kwargs)

    # -- initialisation from the target ---------------------------------------------------------------
    @torch.no_grad()
    def init_from_target(self, lm_head_weight: torch.Tensor | None, norm_weight: torch.Tensor | None) -> list[str]:
        """Start ``lm_head`` from the target's LM-head rows of the draft vocabulary ([V, H] given; the rows
        of ``draft_vocab.target_ids`` taken) and ``norm`` from the target's final norm. Returns what was
        initialised (shapes that do not fit, e.g. a draft hidden size != the target's, are skipped)."""
        done = []
        h = self.config.hidden_size
        if lm_head_weight is not None and tuple(lm_head_weight.shape) == (self.config.vocab_size, h):
            rows = lm_head_weight.detach()[self.draft_vocab.target_ids.to(lm_head_weight.device)]
            self.lm_head.weight.copy_(rows.to(self.lm_head.weight.dtype))
            done.append("lm_head")
        if norm_weight is not None and tuple(norm_weight.shape) == (h,):
            self.norm.weight.copy_(norm_weight.detach().to(self.norm.weight.dtype))
            done.append("norm")
        return done


def load_draft(path: str, target: nn.Module | None = None, **kwargs) -> Eagle3DraftModel:
    """``Eagle3DraftModel.from_pretrained(path)`` (a training folder or an exported one; ``dtype=`` picks the
    weights' dtype, exports are usually bfloat16); with a ``target``, moved to its device and attached (its
    token embedding; ValueError naming ``path`` when the head and the target disagree on the vocabulary)."""
    model = Eagle3DraftModel.from_pretrained(path, **kwargs)
    if target is None:
        return model
    try:
        return model.to(next(target.parameters()).device).eval().attach_target(target)
    except ValueError as err:
        raise ValueError(f"head {str(path)!r}: {err}") from None


def _register_auto_classes() -> None:
    """Let ``AutoConfig``/``AutoModel`` open saved heads (model_type "eagle3_draft") once this module is imported."""
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register(Eagle3Config.model_type, Eagle3Config)
        AutoModel.register(Eagle3Config, Eagle3DraftModel)
    except ValueError:  # already registered (module reloaded)
        pass


_register_auto_classes()
