"""Test-only re-implementations, in plain PyTorch, of how vLLM and SGLang load and run an EAGLE-3 head.

Nothing here imports ``hsd``: an engine sees only the files of an exported folder (``config.json`` and
``model.safetensors``) plus the target's token embedding, as a server does. The rules, paraphrased from
the engines' ``llama_eagle3`` loaders and model code:

config
  vLLM: ``architectures[0]`` in its registry (``LlamaForCausalLMEagle3``, ``Eagle3LlamaForCausalLM``);
  ``draft_vocab_size`` missing -> ``vocab_size``; fc input ``3 * target_hidden_size`` when the attribute
  exists, else ``3 * hidden_size``; ``norm_before_residual`` (native path default False); aux ids from the
  top level first, then ``eagle_config``, used verbatim. SGLang: ``architectures[0]`` must be
  ``LlamaForCausalLMEagle3``; aux ids only from ``eagle_config``, +1 when the first id is 1; no
  ``norm_before_residual`` switch (residual is always the un-normed state).
weights
  vLLM: ``t2d`` dropped; ``d2t`` -> ``draft_id_to_target_id``; names without ``lm_head`` get ``model.``;
  ``midlayer.`` -> ``layers.0.``; q/k/v stacked into ``qkv_proj``, gate/up into ``gate_up_proj``; an
  unknown name raises; a missing one keeps its (here: NaN) initial value. SGLang: ``d2t`` ->
  ``hot_token_id = d2t + arange``; ``t2d`` skipped; the same stacking; a name is looked up as is, then with
  ``model.``; unknown names are skipped silently. Floating weights are cast to the serving dtype.
forward (one decoder layer)
  ``g = fc(cat(aux states))`` (first step) or the previous step's pre-norm output; ``x = cat(
  input_layernorm(embed(token)), hidden_norm(g))``; ``qkv = qkv_proj(x)``; neox-style (rotate-half) RoPE at
  the row's position; causal attention over the draft KV cache; fused add+RMSNorm chains
  ``residual = o_proj(attn) + g`` -> ``post_attention_layernorm`` -> SwiGLU -> ``h = mlp + residual``;
  logits ``lm_head(norm(h))`` over the draft vocabulary, mapped to target ids by ``arange + d2t``
  (vLLM: ``-inf`` scatter into ``V``; SGLang: ``hot_token_id`` of the sampled draft id); ``h`` feeds the
  next chained step.

``variant`` plants the mistakes the harness must catch: ``"swap_concat"`` (``[g ‖ e]``),
``"normed_residual"`` (residual = ``hidden_norm(g)``), ``"interleaved_rope"`` (GPT-J style rotation).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

VLLM_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
SGLANG_ARCHITECTURES = ("LlamaForCausalLMEagle3",)
STACKED = ((".qkv_proj", ".q_proj", 0), (".qkv_proj", ".k_proj", 1), (".qkv_proj", ".v_proj", 2),
           (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1))
VARIANTS = (None, "swap_concat", "normed_residual", "interleaved_rope")


class EngineLoadError(RuntimeError):
    """What the engine would refuse at start-up."""


@dataclass
class EngineCache:
    key: torch.Tensor | None = None    # [B, nkv, L, d], RoPE applied
    value: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.key is None else int(self.key.shape[2])


@dataclass
class Eagle3Engine:
    """One engine's view of a head folder (``engine`` = "vllm" | "sglang")."""

    engine: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    eps: float
    vocab: int
    draft_vocab: int
    fc_in: int
    theta: float
    norm_before_residual: bool
    aux_ids: list[int] | None
    dtype: torch.dtype
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    draft_to_target: torch.Tensor | None = None   # [Vd] target id of each draft id
    embed: torch.Tensor | None = None              # the target's token embedding [V, H]
    variant: str | None = None
    skipped: list[str] = field(default_factory=list)

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, engine: str, folder: str | Path, target_embedding: torch.Tensor, dtype: torch.dtype,
             variant: str | None = None) -> Eagle3Engine:
        from safetensors import safe_open

        if engine not in ("vllm", "sglang") or variant not in VARIANTS:
            raise ValueError(f"unknown engine {engine!r} or variant {variant!r}")
        cfg = json.loads((Path(folder) / "config.json").read_text())
        arch = (cfg.get("architectures") or [None])[0]
        allowed = VLLM_ARCHITECTURES if engine == "vllm" else SGLANG_ARCHITECTURES
        if arch not in allowed:
            raise EngineLoadError(f"{engine}: architecture {arch!r} is not supported (needs one of {allowed})")
        if cfg.get("model_type") != "llama":
            raise EngineLoadError(f"{engine}: AutoConfig does not recognise model_type {cfg.get('model_type')!r}")
        h, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        nkv = int(cfg.get("num_key_value_heads") or nh)
        d = int(cfg.get("head_dim") or h // nh)
        v = int(cfg["vocab_size"])
        vd = cfg.get("draft_vocab_size")
        if vd is None:
            if engine == "sglang":
                raise EngineLoadError("sglang: draft_vocab_size null means 'lm_head from the target' (not tested)")
            vd = v
        fc_in = 3 * int(cfg["target_hidden_size"]) if "target_hidden_size" in cfg else 3 * h
        rope = cfg.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        ec = cfg.get("eagle_config") or {}
        if engine == "vllm":
            ids = cfg.get("eagle_aux_hidden_state_layer_ids") or ec.get("eagle_aux_hidden_state_layer_ids")
            nbr = bool(cfg.get("norm_before_residual", False))
        else:
            ids = ec.get("eagle_aux_hidden_state_layer_ids")
            if ids and ids[0] == 1:
                ids = [i + 1 for i in ids]
            nbr = False
        eng = cls(engine=engine, hidden=h, heads=nh, kv_heads=nkv, head_dim=d, inter=int(cfg["intermediate_size"]),
                  eps=float(cfg["rms_norm_eps"]), vocab=v, draft_vocab=int(vd), fc_in=fc_in, theta=theta,
                  norm_before_residual=nbr, aux_ids=list(ids) if ids else None, dtype=dtype, variant=variant)
        eng._init_params()
        with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as fh:
            for name in fh.keys():
                eng._load_one(name, fh.get_tensor(name))
        if tuple(target_embedding.shape) != (v, h):
            raise EngineLoadError(f"{engine}: target embedding {tuple(target_embedding.shape)} != [{v}, {h}]")
        if "model.embed_tokens.weight" in eng.params and not torch.isnan(eng.params["model.embed_tokens.weight"]).any():
            eng.embed = eng.params["model.embed_tokens.weight"]  # vLLM uses a saved copy instead of the target's
        else:
            eng.embed = target_embedding.to(dtype)
        return eng

    def _init_params(self) -> None:
        h, nh, nkv, d, i = self.hidden, self.heads, self.kv_heads, self.head_dim, self.inter
        layer = "model.layers.0." if self.engine == "vllm" else "model.midlayer."
        shapes = {
            "model.fc.weight": (h, self.fc_in),
            f"{layer}input_layernorm.weight": (h,),
            f"{layer}hidden_norm.weight": (h,),
            f"{layer}self_attn.qkv_proj.weight": ((nh + 2 * nkv) * d, 2 * h),
            f"{layer}self_attn.o_proj.weight": (h, nh * d),
            f"{layer}post_attention_layernorm.weight": (h,),
            f"{layer}mlp.gate_up_proj.weight": (2 * i, h),
            f"{layer}mlp.down_proj.weight": (h, i),
            "model.norm.weight": (h,),
            "lm_head.weight": (self.draft_vocab, h),
        }
        if self.engine == "vllm":
            shapes["model.embed_tokens.weight"] = (self.vocab, h)
        # NaN: a parameter the checkpoint never filled poisons every logit (engines would keep random init)
        self.params = {k: torch.full(s, float("nan"), dtype=self.dtype) for k, s in shapes.items()}
        self.layer = layer

    def _shard_rows(self, param: str, shard: int) -> slice:
        nh, nkv, d, i = self.heads, self.kv_heads, self.head_dim, self.inter
        if param.endswith("qkv_proj.weight"):
            bounds = [0, nh * d, (nh + nkv) * d, (nh + 2 * nkv) * d]
        else:
            bounds = [0, i, 2 * i]
        return slice(bounds[shard], bounds[shard + 1])

    def _load_one(self, name: str, w: torch.Tensor) -> None:
        if "t2d" in name:
            return
        if "d2t" in name:
            if w.dtype.is_floating_point:
                raise EngineLoadError(f"{self.engine}: d2t is {w.dtype}, an index table must be an integer tensor")
            self.draft_to_target = torch.arange(w.numel()) + w.long()
            return
        if self.engine == "vllm":
            if "lm_head" not in name:
                name = "model." + name
            name = name.replace("midlayer.", "layers.0.")
        shard = None
        for param, part, sid in STACKED:
            if part in name:
                name, shard = name.replace(part, param), sid
                break
        if name not in self.params and self.engine == "sglang" and "model." + name in self.params:
            name = "model." + name
        if name not in self.params:
            if self.engine == "vllm":
                raise EngineLoadError(f"vllm: checkpoint weight {name!r} has no parameter in the model")
            self.skipped.append(name)  # SGLang: silently skipped
            return
        target = self.params[name]
        rows = self._shard_rows(name, shard) if shard is not None else slice(None)
        if tuple(target[rows].shape) != tuple(w.shape):
            raise EngineLoadError(f"{self.engine}: {name} shard {shard} expects {tuple(target[rows].shape)}, "
                                  f"checkpoint has {tuple(w.shape)}")
        target[rows] = w.to(self.dtype)

    # -- forward -------------------------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(self.dtype) * weight

    def _fused_add_rms(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor):
        s = x.float() + residual.float()
        residual = s.to(self.dtype)
        return self._rms(residual, weight), residual

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, heads, T, d]; positions [B, T]."""
        d = self.head_dim
        inv = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        ang = positions.float()[..., None] * inv  # [B, T, d/2]
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]
        xf = x.float()
        if self.variant == "interleaved_rope":
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        else:  # neox style: rotate halves
            x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)

    def step(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: EngineCache, *,
             aux_states: torch.Tensor | None = None, hidden: torch.Tensor | None = None):
        """T new rows -> (target-space logits [B, T, V] float32, pre-norm hidden [B, T, H]).

        aux_states [B, T, 3*H_t] (the captured states, concatenated in layer order) or hidden [B, T, H].
        """
        p, L = self.params, self.layer
        if aux_states is not None:
            g = aux_states.to(self.dtype) @ p["model.fc.weight"].T
        else:
            g = hidden.to(self.dtype)
        b, t, _ = g.shape
        e = F.embedding(token_ids, self.embed)
        e_n = self._rms(e, p[f"{L}input_layernorm.weight"])
        g_n = self._rms(g, p[f"{L}hidden_norm.weight"])
        residual = g_n if (self.norm_before_residual or self.variant == "normed_residual") else g
        x = torch.cat([g_n, e_n], -1) if self.variant == "swap_concat" else torch.cat([e_n, g_n], -1)
        qkv = x @ p[f"{L}self_attn.qkv_proj.weight"].T
        nh, nkv, d = self.heads, self.kv_heads, self.head_dim
        q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
        q = self._rope(q.view(b, t, nh, d).transpose(1, 2), positions)
        k = self._rope(k.view(b, t, nkv, d).transpose(1, 2), positions)
        v = v.view(b, t, nkv, d).transpose(1, 2)
        past = cache.length
        cache.key = k if cache.key is None else torch.cat([cache.key, k], 2)
        cache.value = v if cache.value is None else torch.cat([cache.value, v], 2)
        rep = nh // nkv
        keys, values = cache.key.repeat_interleave(rep, 1), cache.value.repeat_interleave(rep, 1)
        scores = (q.float() @ keys.float().transpose(-1, -2)) / math.sqrt(d)
        allowed = torch.ones(t, past + t, dtype=torch.bool).tril(diagonal=past)
        scores = scores.masked_fill(~allowed, float("-inf"))
        attn = (scores.softmax(-1) @ values.float()).to(self.dtype)
        o = attn.transpose(1, 2).reshape(b, t, nh * d) @ p[f"{L}self_attn.o_proj.weight"].T
        m_in, residual = self._fused_add_rms(o, residual, p[f"{L}post_attention_layernorm.weight"])
        gate, up = (m_in @ p[f"{L}mlp.gate_up_proj.weight"].T).split([self.inter, self.inter], -1)
        mlp = (F.silu(gate.float()) * up.float()).to(self.dtype) @ p[f"{L}mlp.down_proj.weight"].T
        normed, h = self._fused_add_rms(mlp, residual, p["model.norm.weight"])
        draft_logits = (normed @ p["lm_head.weight"].T).float()
        full = draft_logits.new_full((b, t, self.vocab), float("-inf"))
        ids = self.draft_to_target if self.draft_to_target is not None else torch.arange(self.draft_vocab)
        full[..., ids] = draft_logits
        return full, h
