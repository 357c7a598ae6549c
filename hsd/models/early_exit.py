"""Early-exit verifier heads on a *frozen* target (HiSpec-style intermediate verifiers).

An early-exit head turns the target's hidden state after layer ``l`` into a next-token distribution:

    p_l = softmax( lm_head( final_norm( head(h_l) ) ) / T )

* ``h_l`` is the target's residual stream after ``l`` decoder layers, i.e. Hugging Face
  ``output_hidden_states`` index ``l`` (see :mod:`hsd.models.capture`), shape [B, S, H].
* ``final_norm`` and ``lm_head`` are the target's own modules: frozen, shared, *not* part of the head's
  state dict and never saved with it. Attach them after construction or loading with
  :meth:`EarlyExitHead.attach_target`.
* ``head`` is the only trainable piece, chosen by ``head_type``:

  ========  ====================================================  ==========================
  lens      identity (the logit lens)                              0 parameters
  affine    z = h + W h + b, W = 0, b = 0 at init (tuned lens)     H*H + H
  lowrank   z = h + s * B(A h) + b, rank r, B = 0 at init (LoRA)   2*H*r + H
  mlp       z = h + down(silu(gate(n)) * up(n)), n = RMSNorm(h)    H + 3*H*I  (down = 0 at init)
  attn      z = h + o_proj(Attn(RMSNorm(h))), causal, RoPE,        H + H*(nh+2*nkv)*hd + nh*hd*H
            own KV cache (Kangaroo-style adapter), o_proj = 0
  layers    z = k decoder layers of the target's own class on h,   k * (one target layer)
            initialised from the target's last k layers, own
            KV cache over the k layers
  ========  ====================================================  ==========================

  ``lens``..``attn`` are zero-initialised *residual* maps, so an untrained head equals ``lens`` bit for
  bit. ``layers`` is the exception: :meth:`EarlyExitHead.init_from_target` copies the target's last k
  decoder layers into it (k = ``num_head_layers``), so at step 0 it is the target with layers l+1..L-k
  skipped; its layers are the head's own copies (trained, saved with the head), never the target's
  modules, so the residual-stream rule holds. They are built from the target's recorded config
  (``layer_config``) and decoder-layer class (``layer_class``), so the family's own layer code runs
  (biases, q/k norms...); full-attention layer types only.

HARD RULE (enforced, not just documented): no trainable parameter on the target's residual stream.
The head reads ``h_l`` and writes only to its own side branch; the target's layers (in particular layers
1..l, whose KV cache and ``h_l`` the final verification pass reuses), its final norm and its LM head
stay frozen and unmodified. LoRA or any other adapter *inside* the target (layers <= l or anywhere else)
would change the model being verified against and make the stage-1 states unusable by the final pass.
:func:`assert_frozen_target` raises :class:`ResidualStreamError` when a target parameter requires grad,
when a PEFT adapter has been injected into the target, or when head and target share a parameter;
:func:`target_checksum` fingerprints the target so a trainer can prove the target did not change.

Why ``lowrank`` does not use ``peft``: PEFT's LoRA layers wrap an existing ``nn.Linear`` and add
``B(A x)`` to that base layer's output. The head's base map is the identity (a residual branch), which
PEFT cannot wrap without a dense H x H base matrix (identity or zero): that costs as much memory and
bandwidth per token as the ``affine`` head and defeats the point of a low-rank head. So ``lowrank`` is
the same parametrisation written directly (PEFT names ``lora_A``/``lora_B``, PEFT's default init:
Kaiming-uniform A, zero B, scaling ``lora_alpha / r``); ``peft`` is used only to *detect* adapters that
were (wrongly) injected into the target.

Optional reduced output vocabulary (as for EAGLE-3): ``d2t`` [V_d] int64 offsets,
``target_id = draft_id + d2t[draft_id]``; the LM head rows are restricted to those target ids, so the
head's logits are [.., V_d]; ``head.draft_vocab`` (:class:`~hsd.models.vocab.DraftVocab`) scatters rows
back to [.., V]. The head returns raw logits: temperature, top-k and top-p are applied by the decoder's
one sampling function (``hsd.decode.sampling.process_logits``), the same for every stage.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from hsd.models import capture as cap
from hsd.models.kv import KVCache, LayerStackCache, StepOutput
from hsd.models.layers import RMSNorm, RotaryEmbedding, apply_rope, attend, causal_mask
from hsd.models.vocab import DraftVocab

try:  # transformers >= 5: init functions that skip tensors already loaded from a checkpoint
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4.x
    _init = nn.init

HEAD_TYPES = ("lens", "affine", "lowrank", "mlp", "attn", "layers")
STATEFUL_HEAD_TYPES = ("attn", "layers")  # attend over earlier positions: own KV cache


class ResidualStreamError(ValueError):
    """The target's residual stream could be (or was) modified: a trainable or adapted target."""


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------
class EarlyExitConfig(PretrainedConfig):
    """Configuration of one early-exit head.

    Records what the head was trained for: the base (target) model name and revision, ``exit_layer``
    (number of target layers run = HF hidden-state index), ``head_type``, ``rank`` (lowrank),
    ``training_temperature`` (the temperature T > 0 it was trained at; the default serving T), the target's ``hidden_size``,
    ``vocab_size`` and ``num_target_layers``, and the optional ``draft_vocab_size`` (reduced vocab).
    Attention geometry (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``rope_theta``)
    is used by ``attn`` only; ``intermediate_size`` by ``mlp`` only. ``layers`` only: ``num_head_layers``
    (k), ``layer_config`` (the target's text config as a dict, to rebuild its decoder layers without the
    target), ``layer_class`` ("module.ClassName" of the target's decoder layer) and ``init_layers`` (the
    target layer indices the head's layers were initialised from).
    """

    model_type = "hsd_early_exit"

    def __init__(self, base_model_name_or_path: str = "", base_model_revision: str | None = None,
                 exit_layer: int = 1, num_target_layers: int = 0, head_type: str = "lens", rank: int = 0,
                 lora_alpha: float | None = None, intermediate_size: int = 0, num_attention_heads: int = 0,
                 num_key_value_heads: int = 0, head_dim: int = 0, rope_theta: float = 10000.0,
                 rms_norm_eps: float = 1e-6, hidden_size: int = 0, vocab_size: int = 0,
                 draft_vocab_size: int | None = None, training_temperature: float = 1.0,
                 target_model_type: str = "", num_head_layers: int = 0, layer_config: dict | None = None,
                 layer_class: str = "", init_layers: list[int] | None = None, **kwargs):
        self.base_model_name_or_path = base_model_name_or_path
        self.base_model_revision = base_model_revision
        self.exit_layer = int(exit_layer)
        self.num_target_layers = int(num_target_layers)
        self.head_type = head_type
        self.rank = int(rank)
        self.lora_alpha = float(lora_alpha) if lora_alpha is not None else (float(rank) if rank else None)
        self.intermediate_size = int(intermediate_size)
        self.num_attention_heads = int(num_attention_heads)
        self.num_key_value_heads = int(num_key_value_heads)
        self.head_dim = int(head_dim)
        self.rope_theta = float(rope_theta)
        self.rms_norm_eps = float(rms_norm_eps)
        self.hidden_size = int(hidden_size)
        self.vocab_size = int(vocab_size)
        self.draft_vocab_size = int(draft_vocab_size) if draft_vocab_size else None
        self.training_temperature = float(training_temperature)
        self.target_model_type = target_model_type
        self.num_head_layers = int(num_head_layers)
        self.layer_config = dict(layer_config) if layer_config else None
        self.layer_class = layer_class
        self.init_layers = [int(i) for i in init_layers] if init_layers else None
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.validate_head()

    def validate_head(self) -> None:
        """ValueError naming the field for settings no head can have."""
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"head_type: unknown head type {self.head_type!r}; choose one of {HEAD_TYPES}")
        if self.head_type == "lowrank" and self.rank <= 0:
            raise ValueError(f"rank: lowrank heads need rank > 0, got {self.rank}")
        if self.head_type == "lowrank" and self.hidden_size and self.rank > self.hidden_size:
            raise ValueError(f"rank: {self.rank} exceeds hidden_size {self.hidden_size}")
        if self.head_type == "mlp" and self.intermediate_size < 0:
            raise ValueError(f"intermediate_size: must be >= 0 (0 = hidden_size), got {self.intermediate_size}")
        if not (self.training_temperature > 0 and math.isfinite(self.training_temperature)):
            raise ValueError(f"training_temperature: must be a finite number > 0, got {self.training_temperature}")
        if self.num_target_layers > 0:
            check_exit_layer(self.exit_layer, self.num_target_layers)
        if self.draft_vocab_size is not None and self.vocab_size and not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size: must be in [1, vocab_size={self.vocab_size}], "
                             f"got {self.draft_vocab_size}")
        if self.head_type == "layers":
            if self.num_head_layers < 1:
                raise ValueError(f"num_head_layers: a layers head needs >= 1 decoder layer, got {self.num_head_layers}")
            if self.num_target_layers and self.num_head_layers > self.num_target_layers:
                raise ValueError(f"num_head_layers: {self.num_head_layers} exceeds the target's "
                                 f"{self.num_target_layers} layers")
            if self.hidden_size and (not self.layer_config or not self.layer_class):
                raise ValueError("layer_config / layer_class: a layers head needs the target's config and "
                                 "decoder-layer class (use EarlyExitConfig.from_target)")
            types = set((self.layer_config or {}).get("layer_types") or ["full_attention"])
            if types - {"full_attention"}:
                raise ValueError(f"layer_config: a layers head supports full-attention layers only, the target "
                                 f"has layer types {sorted(types)}")
        if self.head_type == "attn" and self.hidden_size:
            nh, nkv = self.num_attention_heads, self.num_key_value_heads
            if nh <= 0 or nkv <= 0 or nh % nkv:
                raise ValueError(f"num_attention_heads / num_key_value_heads: need positive counts with "
                                 f"heads divisible by kv heads, got {nh} / {nkv}")
            if self.head_dim <= 0 or self.head_dim % 2:
                raise ValueError(f"head_dim: must be a positive even number (RoPE), got {self.head_dim}")

    _LAYERS_ONLY = ("num_head_layers", "layer_config", "layer_class", "init_layers")

    def to_dict(self) -> dict[str, Any]:
        """As ``PretrainedConfig.to_dict``; the ``layers``-only fields are left out of other heads' configs, so
        their ``config.json`` stays what earlier versions wrote (loading fills the defaults)."""
        d = super().to_dict()
        if self.head_type != "layers":
            for key in self._LAYERS_ONLY:
                d.pop(key, None)
        return d

    @classmethod
    def from_target(cls, target: nn.Module, exit_layer: int, head_type: str = "lens", *, rank: int = 0,
                    lora_alpha: float | None = None, intermediate_size: int = 0, training_temperature: float = 1.0,
                    draft_vocab_size: int | None = None, base_model_name_or_path: str | None = None,
                    base_model_revision: str | None = None, num_attention_heads: int = 0,
                    num_key_value_heads: int = 0, num_head_layers: int = 1) -> EarlyExitConfig:
        """Fill the target-dependent fields from a Hugging Face causal LM (``*ForCausalLM``)."""
        tc = target.config
        n = cap.num_layers(target)
        check_exit_layer(exit_layer, n)
        nh = num_attention_heads or int(getattr(tc, "num_attention_heads", 0) or 0)
        nkv = num_key_value_heads or int(getattr(tc, "num_key_value_heads", 0) or 0) or nh
        hd = int(getattr(tc, "head_dim", 0) or 0) or (tc.hidden_size // nh if nh else 0)
        rope = getattr(tc, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", 0) or getattr(tc, "rope_theta", 0) or 10000.0)
        name = base_model_name_or_path if base_model_name_or_path is not None else getattr(tc, "_name_or_path", "")
        extra: dict[str, Any] = {}
        if head_type == "layers":
            layer = cap.decoder_layers(target)[0]
            text = tc.get_text_config() if hasattr(tc, "get_text_config") else tc
            extra = dict(num_head_layers=num_head_layers, layer_config=_layer_config_dict(text),
                         layer_class=f"{type(layer).__module__}.{type(layer).__name__}")
        return cls(base_model_name_or_path=name or "", base_model_revision=base_model_revision,
                   exit_layer=exit_layer, num_target_layers=n, head_type=head_type, rank=rank,
                   lora_alpha=lora_alpha, intermediate_size=intermediate_size, num_attention_heads=nh,
                   num_key_value_heads=nkv, head_dim=hd, rope_theta=theta,
                   rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-6) or 1e-6),
                   hidden_size=int(tc.hidden_size), vocab_size=int(tc.vocab_size),
                   draft_vocab_size=draft_vocab_size, training_temperature=training_temperature,
                   target_model_type=str(getattr(tc, "model_type", "")), **extra)


def _layer_config_dict(text_config) -> dict[str, Any]:
    """The target's text config as a JSON-able dict (what a ``layers`` head rebuilds its layers from)."""
    d = text_config.to_dict()
    for key in ("architectures", "transformers_version", "_name_or_path", "auto_map", "torch_dtype", "dtype",
                "id2label", "label2id", "quantization_config"):
        d.pop(key, None)
    return d


def check_exit_layer(exit_layer: int, num_target_layers: int) -> int:
    """An exit after ``l`` layers needs 1 <= l <= L - 1 (l = L would be the target itself)."""
    if isinstance(exit_layer, bool) or int(exit_layer) != exit_layer:
        raise ValueError(f"exit_layer: must be an integer, got {exit_layer!r}")
    if not 1 <= int(exit_layer) <= num_target_layers - 1:
        raise ValueError(f"exit_layer: {exit_layer} is out of range; the target has {num_target_layers} "
                         f"decoder layers, so an exit layer must be in [1, {num_target_layers - 1}]")
    return int(exit_layer)


def default_exit_layers(num_target_layers: int) -> list[int]:
    """HiSpec-style candidates L/8, L/4, 3L/8, L/2 (rounded half up), deduplicated, in [1, L-1]."""
    out = []
    for frac in (1 / 8, 1 / 4, 3 / 8, 1 / 2):
        layer = min(max(math.floor(num_target_layers * frac + 0.5), 1), num_target_layers - 1)
        if layer not in out:
            out.append(layer)
    return out


# ----------------------------------------------------------------------------------------------------
# Residual-stream rule
# ----------------------------------------------------------------------------------------------------
def _is_peft_module(module: nn.Module) -> bool:
    # Without importing peft (slow): every PEFT tuner layer / wrapper class lives in the `peft` package.
    return type(module).__module__.split(".")[0] == "peft"


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def assert_frozen_target(target: nn.Module, exit_layer: int | None = None,
                         head: nn.Module | None = None) -> None:
    """Raise :class:`ResidualStreamError` unless the target is frozen and unadapted.

    Checks: (1) no PEFT adapter anywhere in the target (LoRA on layers <= ``exit_layer`` would change
    ``h_l`` and the layers-1..l KV cache the final pass reuses; anywhere else it changes the target);
    (2) no target parameter requires grad; (3) ``head`` (if given) shares no parameter with the target.
    """
    where = f" (exit layer {exit_layer})" if exit_layer is not None else ""
    if _is_peft_module(target):
        raise ResidualStreamError(f"target is a PEFT model ({type(target).__name__}): early-exit heads need "
                                  f"the original frozen target{where}; merge or remove the adapter first")
    adapted = [name for name, mod in target.named_modules() if _is_peft_module(mod)]
    if adapted:
        low = [n for n in adapted if exit_layer is not None and (_layer_of(n) or 0) < exit_layer]
        raise ResidualStreamError(
            f"a PEFT adapter was injected into the target at {adapted[:4]}{'...' if len(adapted) > 4 else ''}"
            + (f"; {len(low)} of them on layers <= {exit_layer}, the residual stream the early exit reads"
               if low else "")
            + ": no trainable parameter may sit on the target's residual stream")
    trainable = [n for n, p in target.named_parameters() if p.requires_grad]
    if trainable:
        low = [n for n in trainable if exit_layer is not None and (_layer_of(n) is not None)
               and _layer_of(n) < exit_layer]
        raise ResidualStreamError(
            f"{len(trainable)} target parameters require grad (e.g. {trainable[:3]})"
            + (f", {len(low)} of them in layers <= {exit_layer}" if low else "")
            + f"{where}: the target must be frozen (requires_grad=False); only the head trains")
    if head is not None:
        ids = {id(p) for p in target.parameters()}
        shared = [n for n, p in head.named_parameters() if id(p) in ids]
        if shared:
            raise ResidualStreamError(f"head parameters {shared[:3]} are target parameters: the head must "
                                      f"own its weights and reach the target only through attach_target")


@torch.no_grad()
def target_checksum(target: nn.Module) -> str:
    """Fingerprint of every target parameter and buffer (computed on their device, float64).

    Per tensor: numel, sum, sum of squares and a position-weighted sum (catches permutations); any
    optimiser update changes it. Cheap enough to recompute at every checkpoint, even for large targets.
    """
    import hashlib

    h = hashlib.sha256()
    tensors = list(target.named_parameters()) + list(target.named_buffers())
    chunk = 1 << 22  # float64 temporaries stay small even for a 128k x 8k LM head on a GPU
    for name, t in tensors:
        flat = t.detach().reshape(-1)
        acc = torch.zeros(3, dtype=torch.float64, device=flat.device)
        for start in range(0, flat.numel(), chunk):
            x = flat[start:start + chunk].double()
            w = (torch.arange(start, start + x.numel(), device=x.device) % 7 + 1).double()
            acc += torch.stack([x.sum(), (x * x).sum(), (x * w).sum()])
        h.update(f"{name}:{tuple(t.shape)}:{acc.cpu().tolist()!r};".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Head bodies (the trainable part); each maps h [B, S, H] -> z [B, S, H]
# ----------------------------------------------------------------------------------------------------
def _tag(module: nn.Module, kind: str) -> nn.Module:
    """Mark how :meth:`EarlyExitHead._init_weights` initialises ``module`` (zeros | kaiming | ones)."""
    module._ee_init = kind
    return module


def _init_tagged(module: nn.Module) -> None:
    kind = getattr(module, "_ee_init", None)
    if kind is None:
        if isinstance(module, LowRankBody):
            _init.zeros_(module.bias)
        return
    if kind == "zeros":
        _init.zeros_(module.weight)
    elif kind == "kaiming":  # nn.Linear's / PEFT's default
        _init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    else:
        _init.ones_(module.weight)
    if getattr(module, "bias", None) is not None:
        _init.zeros_(module.bias)


class _Body(nn.Module):
    """Trainable map h [B, S, H] -> z [B, S, H]. Output maps are tagged "zeros" so the head starts as lens."""

    def forward(self, h, position_ids=None, attention_mask=None, cache=None):  # pragma: no cover
        raise NotImplementedError



class LensBody(_Body):
    def forward(self, h, position_ids=None, attention_mask=None, cache=None):
        return h


class AffineBody(_Body):
    def __init__(self, config: EarlyExitConfig):
        super().__init__()
        self.proj = _tag(nn.Linear(config.hidden_size, config.hidden_size, bias=True), "zeros")

    def forward(self, h, position_ids=None, attention_mask=None, cache=None):
        return h + self.proj(h)



class LowRankBody(_Body):
    def __init__(self, config: EarlyExitConfig):
        super().__init__()
        hsz, r = config.hidden_size, config.rank
        self.lora_A = _tag(nn.Linear(hsz, r, bias=False), "kaiming")  # PEFT default LoRA init
        self.lora_B = _tag(nn.Linear(r, hsz, bias=False), "zeros")
        self.bias = nn.Parameter(torch.zeros(hsz))
        self.scaling = (config.lora_alpha or r) / r

    def forward(self, h, position_ids=None, attention_mask=None, cache=None):
        return h + self.lora_B(self.lora_A(h)) * self.scaling + self.bias



class MLPBody(_Body):
    def __init__(self, config: EarlyExitConfig):
        super().__init__()
        hsz = config.hidden_size
        inner = config.intermediate_size or hsz
        self.norm = _tag(RMSNorm(hsz, config.rms_norm_eps), "ones")
        self.gate_proj = _tag(nn.Linear(hsz, inner, bias=False), "kaiming")
        self.up_proj = _tag(nn.Linear(hsz, inner, bias=False), "kaiming")
        self.down_proj = _tag(nn.Linear(inner, hsz, bias=False), "zeros")

    def forward(self, h, position_ids=None, attention_mask=None, cache=None):
        n = self.norm(h)
        return h + self.down_proj(F.silu(self.gate_proj(n)) * self.up_proj(n))



class AttnBody(_Body):
    """One causal self-attention layer on RMSNorm(h), residual, RoPE, GQA, with its own KV cache."""

    def __init__(self, config: EarlyExitConfig):
        super().__init__()
        hsz = config.hidden_size
        self.nh, self.nkv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.rotary = RotaryEmbedding(self.hd, {"rope_type": "default", "rope_theta": config.rope_theta})
        self.norm = _tag(RMSNorm(hsz, config.rms_norm_eps), "ones")
        self.q_proj = _tag(nn.Linear(hsz, self.nh * self.hd, bias=False), "kaiming")
        self.k_proj = _tag(nn.Linear(hsz, self.nkv * self.hd, bias=False), "kaiming")
        self.v_proj = _tag(nn.Linear(hsz, self.nkv * self.hd, bias=False), "kaiming")
        self.o_proj = _tag(nn.Linear(self.nh * self.hd, hsz, bias=False), "zeros")

    def forward(self, h, position_ids=None, attention_mask=None, cache: KVCache | None = None):
        """h [B, T, H] new positions; ``cache`` holds the previous P positions (appended in place).

        position_ids [B, T] (default P + arange(T)); attention_mask [B, P + T] (1 = real token) or None,
        or [B, T, P + T] bool (True = attend; e.g. ``hsd.models.packing.block_causal_mask`` of packed rows),
        which replaces the causal rule. Query t (absolute index P + t) attends to keys 0..P + t that are
        real tokens, and always to itself (so padded queries stay finite; their outputs are ignored).
        """
        b, t, _ = h.shape
        cache = cache if cache is not None else KVCache()
        past = cache.length
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=h.device).expand(b, t)
        n = self.norm(h)
        q = self.q_proj(n).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(n).view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(n).view(b, t, self.nkv, self.hd).transpose(1, 2)
        cos, sin = self.rotary(position_ids, n)
        keys, values = cache.append(apply_rope(k, cos, sin), v)
        out = attend(apply_rope(q, cos, sin), keys, values, head_attention_mask(past, t, attention_mask, h.device))
        return h + self.o_proj(out.transpose(1, 2).reshape(b, t, self.nh * self.hd))


def head_attention_mask(past: int, t: int, attention_mask: torch.Tensor | None, device) -> torch.Tensor:
    """The attention pattern of an attention-bearing head (``attn``, ``layers``): [B or 1, 1, T, past + T] bool.

    Query t (absolute index past + t) attends to keys 0..past + t that are real tokens
    (``attention_mask`` [B, past + T], 1 = real; or a packed batch's own [B, T, past + T] pattern, used as
    given) and always to itself (padded queries stay finite; their
    outputs are ignored). The one place both heads build their mask.
    """
    s = past + t
    allowed = causal_mask(past, t, device)[None]  # [1, T, S]
    if attention_mask is not None and attention_mask.dim() == 3:  # packed rows: [B, T, P+T] block-diagonal
        if tuple(attention_mask.shape[1:]) != (t, s):
            raise ValueError(f"attention_mask: a [B, T, P+T] mask needs shape [*, {t}, {s}], "
                             f"got {list(attention_mask.shape)}")
        allowed = attention_mask.bool()
    elif attention_mask is not None:
        if attention_mask.shape[-1] != s:
            raise ValueError(f"attention_mask: needs {s} columns (cached + new), got {attention_mask.shape[-1]}")
        allowed = allowed & attention_mask[:, None, :].bool()
    itself = torch.arange(past, s, device=device)[:, None] == torch.arange(s, device=device)[None, :]
    return (allowed | itself)[:, None]


def _import_layer_class(path: str) -> type:
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"layer_class: cannot import the target's decoder layer {path!r} ({err})") from None


def build_layer_config(config: EarlyExitConfig):
    """The target's text config (``config.layer_config``) for ``num_head_layers`` layers, SDPA attention."""
    from transformers import AutoConfig

    d = dict(config.layer_config)
    model_type = d.pop("model_type")
    d["num_hidden_layers"] = config.num_head_layers
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = d["layer_types"][-config.num_head_layers:]
    lc = AutoConfig.for_model(model_type, **d)
    lc._attn_implementation = "sdpa"
    return lc


class LayersBody(_Body):
    """k decoder layers of the target's own class on h (causal, RoPE from the target's rotary module,
    which the head borrows at ``attach_target``), with one KV cache per layer (:class:`LayerStackCache`)."""

    def __init__(self, config: EarlyExitConfig):
        super().__init__()
        import inspect

        self.layer_config = build_layer_config(config)
        cls = _import_layer_class(config.layer_class)
        self.layers = nn.ModuleList([cls(self.layer_config, layer_idx=i) for i in range(config.num_head_layers)])
        params = inspect.signature(self.layers[0].forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5 vs 4
        self._rotary: list[nn.Module] = []  # the target's rotary embedding (borrowed, not a submodule)

    def forward(self, h, position_ids=None, attention_mask=None, cache: LayerStackCache | None = None):
        """h [B, T, H] new positions (the conventions of :class:`AttnBody`); ``cache`` (extended in place)
        holds the previous P positions of every layer. Returns [B, T, H], the last layer's pre-norm output."""
        if not self._rotary:
            raise RuntimeError("no target attached: a layers head uses the target's rotary embedding")
        b, t, _ = h.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=h.device).expand(b, t)
        mask = None if (t == 1 and attention_mask is None) else head_attention_mask(past, t, attention_mask, h.device)
        cos_sin = self._rotary[0](h, position_ids)
        kw = {self._cache_kw: cache} if cache is not None else {}
        for layer in self.layers:
            out = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=cos_sin,
                        use_cache=cache is not None, **kw)
            h = out[0] if isinstance(out, tuple) else out
        return h


_BODIES = {"lens": LensBody, "affine": AffineBody, "lowrank": LowRankBody, "mlp": MLPBody, "attn": AttnBody,
           "layers": LayersBody}


# ----------------------------------------------------------------------------------------------------
# The head
# ----------------------------------------------------------------------------------------------------
class EarlyExitHead(PreTrainedModel):
    """One early-exit head for exit layer ``config.exit_layer`` (see the module docstring).

    The target's final norm and LM head are *borrowed* with :meth:`attach_target` (not submodules, not
    saved, not trained); :meth:`attach_target` enforces the residual-stream rule.
    """

    config_class = EarlyExitConfig
    base_model_prefix = "early_exit"
    main_input_name = "hidden_states"
    _no_split_modules: list[str] = []

    def __init__(self, config: EarlyExitConfig):
        super().__init__(config)
        config.validate_head()
        if not config.hidden_size or not config.vocab_size:
            raise ValueError("config: hidden_size and vocab_size must be set (use EarlyExitConfig.from_target)")
        self.body = _BODIES[config.head_type](config) if config.head_type != "lens" else LensBody()
        if config.draft_vocab_size:
            self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self._borrowed: tuple[nn.Module, nn.Module] | None = None  # (final_norm, lm_head): not submodules
        self._law = cap.OutputLaw()
        self._target_ref: list[nn.Module] = []
        self._sub_head = None  # cached draft-vocabulary rows of the LM head (see _draft_rows)
        self.post_init()

    # -- init / target ------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Called per module (children first) by post_init and for keys missing from a checkpoint; the
        # `_init` functions skip tensors already loaded. Bodies tag their modules (see `_tag`).
        _init_tagged(module)

    @property
    def draft_vocab(self) -> DraftVocab:
        """The head's output columns as target ids (the whole vocabulary without ``draft_vocab_size``)."""
        if not self.config.draft_vocab_size:
            return DraftVocab.full(self.config.vocab_size, self.device)
        return DraftVocab(self.d2t + torch.arange(self.d2t.numel(), device=self.d2t.device), self.config.vocab_size)

    def set_draft_vocab(self, vocab: DraftVocab | torch.Tensor) -> EarlyExitHead:
        """Set the reduced vocabulary: a DraftVocab or d2t [V_d] int64 offsets (target_id = draft_id + d2t)."""
        vd = self.config.draft_vocab_size
        if not vd:
            raise ValueError("d2t: this head has no draft vocabulary (config.draft_vocab_size is None)")
        if not isinstance(vocab, DraftVocab):
            d2t = torch.as_tensor(vocab, dtype=torch.long)
            if d2t.shape != (vd,):
                raise ValueError(f"d2t: expected shape [{vd}], got {list(d2t.shape)}")
            vocab = DraftVocab.from_d2t(d2t, self.config.vocab_size)
        if (vocab.size, vocab.vocab_size) != (vd, self.config.vocab_size):
            raise ValueError(f"d2t: a draft vocabulary of {vocab.size} of {vocab.vocab_size} ids does not fit "
                             f"draft_vocab_size {vd} of vocab_size {self.config.vocab_size}")
        self.d2t.copy_(vocab.d2t.to(self.d2t.device))
        return self

    def attach_target(self, target: nn.Module) -> EarlyExitHead:
        """Borrow the target's final norm and LM head (frozen, not saved); check the residual-stream rule.

        Raises :class:`ResidualStreamError` if the target is trainable or adapted, and ValueError if it
        does not match the config (layers, hidden size, vocab).
        """
        n = cap.num_layers(target)
        tc = target.config
        cfg = self.config
        if cfg.num_target_layers and n != cfg.num_target_layers:
            raise ValueError(f"target: has {n} decoder layers, head was built for {cfg.num_target_layers}")
        check_exit_layer(cfg.exit_layer, n)
        if int(tc.hidden_size) != cfg.hidden_size or int(tc.vocab_size) != cfg.vocab_size:
            raise ValueError(f"target: hidden/vocab {tc.hidden_size}/{tc.vocab_size} do not match the head's "
                             f"{cfg.hidden_size}/{cfg.vocab_size}")
        assert_frozen_target(target, cfg.exit_layer, head=self)
        self._borrowed = (cap.final_norm(target), cap.lm_head(target))
        self._law = cap.output_law(target)  # softcap / logit scaling after the LM head: p_l has the target's law
        self._target_ref = [target]
        self._sub_head = None
        if isinstance(self.body, LayersBody):
            rotary = getattr(cap.base_model(target), "rotary_emb", None)
            if rotary is None:
                raise ValueError(f"target: {type(target).__name__} has no rotary embedding module "
                                 "(model.model.rotary_emb), which a layers head needs")
            self.body._rotary = [rotary]
        return self

    @torch.no_grad()
    def init_from_target(self, target: nn.Module) -> EarlyExitHead:
        """``layers`` heads: copy the target's last k decoder layers into the head's k layers (its step-0
        weights: the target with layers l+1..L-k skipped). The copies are the head's own tensors."""
        if not isinstance(self.body, LayersBody):
            raise ValueError(f"init_from_target: only layers heads copy target layers (this is {self.config.head_type!r})")
        src = list(cap.decoder_layers(target))
        k = len(self.body.layers)
        if len(src) < k:
            raise ValueError(f"init_from_target: the target has {len(src)} layers, the head needs {k}")
        for mine, theirs in zip(self.body.layers, src[-k:]):
            mine.load_state_dict({n: t.detach().clone() for n, t in theirs.state_dict().items()})
        self.config.init_layers = list(range(len(src) - k, len(src)))
        return self

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As ``PreTrainedModel.save_pretrained``; a weightless ``lens`` head still gets an (empty)
        ``model.safetensors`` so that every saved head loads with ``from_pretrained``."""
        import os

        out = super().save_pretrained(save_directory, *args, **kwargs)
        path = os.path.join(save_directory, "model.safetensors")
        if not self.state_dict() and not os.path.exists(path):
            from safetensors.torch import save_file

            save_file({}, path, metadata={"format": "pt"})
        return out

    # ``lens`` owns no parameter: dtype/device fall back to the borrowed LM head (or the defaults).
    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return self._borrowed[1].weight.dtype if self._borrowed else torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return self._borrowed[1].weight.device if self._borrowed else torch.device("cpu")

    @property
    def target(self) -> nn.Module | None:
        return self._target_ref[0] if self._target_ref else None

    @property
    def stateful(self) -> bool:
        """True for heads that attend over earlier positions (``attn``, ``layers``): they keep a KV cache."""
        return self.config.head_type in STATEFUL_HEAD_TYPES

    def new_cache(self) -> KVCache | LayerStackCache | None:
        """An empty decoding cache of the right kind (None for position-wise heads)."""
        if self.config.head_type == "attn":
            return KVCache()
        if self.config.head_type == "layers":
            return LayerStackCache.new(self.config.num_head_layers)
        return None

    def check_target(self) -> None:
        """Re-run the residual-stream checks on the attached target (cheap; call once per step)."""
        if self.target is None:
            raise RuntimeError("no target attached: call head.attach_target(target) first")
        assert_frozen_target(self.target, self.config.exit_layer, head=self)

    # -- forward ------------------------------------------------------------------------------------
    def output_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Target final norm + LM head (rows restricted to the draft vocab) + the target's output law
        (:func:`hsd.models.capture.output_law`: softcap, logit scaling) on z [..., H] -> [..., V']."""
        if self._borrowed is None:
            raise RuntimeError("no target attached: call head.attach_target(target) first")
        norm, head = self._borrowed
        x = norm(z.to(head.weight.dtype))
        if not self.config.draft_vocab_size:
            return self._law.logits(head(x))
        weight, bias = self._draft_rows(head)
        return self._law.logits(F.linear(x, weight, bias))

    def _draft_rows(self, head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head rows of the draft vocabulary [V_d, H] (+ bias), gathered once and kept until the LM
        head or ``d2t`` changes (a per-call gather would copy V_d x H floats every step). The LM head is
        frozen, so the copy carries no gradient."""
        w = head.weight
        key = (w.data_ptr(), w.device, w.dtype, w._version, self.d2t.data_ptr(), self.d2t._version)
        cached = getattr(self, "_sub_head", None)
        if cached is None or cached[0] != key:
            ids = self.draft_vocab.target_ids.to(w.device)
            b = head.bias[ids].detach() if getattr(head, "bias", None) is not None else None
            cached = (key, w[ids].detach().contiguous(), b)
            self._sub_head = cached
        return cached[1], cached[2]

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                select: torch.Tensor | None = None) -> StepOutput:
        """hidden_states [B, S, H] = target h_l -> logits [B, S, V'] (or [N, V'] at ``select`` [B, S] bool).

        ``position_ids``, ``attention_mask`` and ``cache`` (extended in place) matter only for ``attn`` and
        ``layers``; the other heads are position-wise. ``select`` computes the LM head only where needed (training on
        assistant positions). Logits are raw (no temperature).
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.config.hidden_size:
            raise ValueError(f"hidden_states: expected [B, S, {self.config.hidden_size}], "
                             f"got {list(hidden_states.shape)}")
        dtype = next(self.body.parameters()).dtype if self.config.head_type != "lens" else hidden_states.dtype
        h = hidden_states.to(dtype)
        if self.stateful:
            z = self.body(h, position_ids, attention_mask, cache)
            if select is not None:
                z = z[select]
        else:
            cache = None
            if select is not None:
                h = h[select]
            z = self.body(h)
        return StepOutput(self.output_logits(z), cache)

    @torch.no_grad()
    def step(self, hidden_states: torch.Tensor, position_ids: torch.Tensor | None = None,
             cache: KVCache | None = None, attention_mask: torch.Tensor | None = None) -> StepOutput:
        """Decode: h_l of the T new positions [B, T, H] (+ their positions, the head's cache) -> logits
        [B, T, V'] (``draft_vocab.scatter_logits`` puts them into the target vocabulary).

        For ``attn`` and ``layers`` the cache is created when None and extended in place; crop it with
        ``cache.crop(n)`` after rejections. Other head types keep no state (the cache stays None).
        """
        if cache is None:
            cache = self.new_cache()
        return self.forward(hidden_states, position_ids=position_ids, attention_mask=attention_mask, cache=cache)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def extra_repr(self) -> str:
        c = self.config
        return f"head_type={c.head_type}, exit_layer={c.exit_layer}, hidden={c.hidden_size}"


def expected_num_parameters(config: EarlyExitConfig) -> int:
    """Trainable parameter count implied by the table in the module docstring."""
    h = config.hidden_size
    t = config.head_type
    if t == "lens":
        return 0
    if t == "affine":
        return h * h + h
    if t == "lowrank":
        return 2 * h * config.rank + h
    if t == "mlp":
        return h + 3 * h * (config.intermediate_size or h)
    if t == "layers":  # the target's own layer class: count it (on the meta device, nothing allocated)
        with torch.device("meta"):
            return sum(p.numel() for p in LayersBody(config).parameters())
    nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    return h + h * (nh + 2 * nkv) * hd + nh * hd * h


def load_head(path: str, target: nn.Module, **kwargs: Any) -> EarlyExitHead:
    """``EarlyExitHead.from_pretrained(path)``, moved to the target's device and attached to it."""
    head = EarlyExitHead.from_pretrained(path, **kwargs)
    return head.to(next(target.parameters()).device).eval().attach_target(target)
