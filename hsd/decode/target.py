"""The target model, run layer by layer over a static KV cache with explicit per-layer lengths.

Why not the stock ``model(input_ids, cache=...)`` forward: the exit stage runs layers ``1..l`` over a
window *before* layers ``l+1..L`` see it, so for a while the shallow layers' caches are longer than the
deep layers'. Hugging Face's forward takes one position offset and one mask for every layer (from layer
0's cache length) and then silently attends with wrong positions and context in the deep layers. Here
every layer owns its length (``KVState.lengths``), and a pass over layers ``[start, end)`` builds its
positions and mask from the length of the layers it runs, which must agree.

What a pass computes, in order (``TargetRunner.run``): embeddings (only when ``start == 0``), the decoder
layers ``[start, end)`` (Hugging Face's own layer modules, so any Llama-style family works: Llama, Qwen2,
Mistral, Qwen3...), and, when ``end == L`` and rows are asked for, the final norm + LM head on those
rows only (the LM head is ~20 % of a small model's weights: prefill needs one row, not the prompt).

Hidden-state indices follow :mod:`hsd.models.capture`: index ``j`` is the input of layer ``j`` (0 = the
embedding output, ``L`` = the last layer's pre-norm output). ``capture`` asks a pass to return those.

Draft trees: a pass feeds ``T`` new tokens whose positions are ``length + depth`` and whose attention is
"every committed entry + the ancestors-or-self among the new tokens" (``parents``; a chain is the
causal mask). After verification ``KVState.keep`` keeps the committed path (node indices) and crops.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hsd.models import capture as cap

from .cpu import PackedLinear, relayout_linears

ATTENTION = "hsd_sdpa"


def gqa_sdpa(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, dropout: float = 0.0,
             scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """Attention for the runner's passes: one SDPA call on the key/value heads (``enable_gqa``) instead of
    transformers' ``repeat_kv`` copy of the whole cache for multi-token queries. ``attention_mask`` is the
    runner's boolean [B, 1, T, S] mask, or None (a one-token query, or a prefill from an empty cache)."""
    t = query.shape[2]
    causal = attention_mask is None and t > 1
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                                           is_causal=causal, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> bool:
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION, gqa_sdpa)
        return True
    except (ImportError, AttributeError):  # pragma: no cover - transformers without the interface
        return False


_HAS_INTERFACE = _register_attention()


class KVState:
    """Static per-layer KV buffers [B, n_kv, capacity, d] and one committed length per layer.

    ``update`` is what Hugging Face attention modules call (``cache.update(k, v, layer_idx, ...)``): it
    writes the new keys/values after the layer's current length, advances that length and returns the
    keys/values of every entry so far (a view, no copy). ``crop(n, layers)`` sets lengths back (entries
    past a length are dead and get overwritten). Rows of a batch share lengths.
    """

    is_compileable = False  # read by some transformers helpers; this cache is never compiled as a whole

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, num_kv_heads, int(capacity), head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers
        self.capacity = int(capacity)

    @property
    def num_layers(self) -> int:
        return len(self.lengths)

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        n, t = self.lengths[layer_idx], key.shape[2]
        if n + t > self.capacity:
            raise ValueError(f"KV cache full: layer {layer_idx} holds {n} positions, {t} more do not fit in "
                             f"{self.capacity} (prompt + max_new_tokens + draft exceeds the reserved length)")
        self.keys[layer_idx][:, :, n:n + t] = key
        self.values[layer_idx][:, :, n:n + t] = value
        self.lengths[layer_idx] = n + t
        return self.keys[layer_idx][:, :, :n + t], self.values[layer_idx][:, :, :n + t]

    def length(self, layers: range | None = None) -> int:
        """The common length of ``layers`` (all by default); ValueError when they differ."""
        ls = {self.lengths[i] for i in (layers if layers is not None else range(self.num_layers))}
        if len(ls) != 1:
            raise ValueError(f"layers {layers} have different cache lengths {sorted(ls)}: a pass over them "
                             "would use one position offset for all (the stock-forward bug this class avoids)")
        return ls.pop()

    def crop(self, n: int, layers: range | None = None) -> None:
        """Keep the first ``n`` positions of ``layers`` (all by default)."""
        for i in layers if layers is not None else range(self.num_layers):
            if not 0 <= n <= self.lengths[i]:
                raise ValueError(f"crop: layer {i} holds {self.lengths[i]} positions, cannot keep {n}")
            self.lengths[i] = n

    def keep(self, start: int, nodes: Tensor, layers: range | None = None) -> None:
        """Keep entries ``start + nodes`` (ascending node offsets [n]) as positions ``start..start+n-1``
        and crop there: the commit of an accepted tree path. A prefix ``0..n-1`` is a plain crop."""
        idx = nodes.flatten().long()
        n = int(idx.numel())
        layers = layers if layers is not None else range(self.num_layers)
        if n and not torch.equal(idx.cpu(), torch.arange(n)):
            src = start + idx.to(self.keys[0].device)
            for i in layers:
                self.keys[i][:, :, start:start + n] = self.keys[i].index_select(2, src)
                self.values[i][:, :, start:start + n] = self.values[i].index_select(2, src)
        self.crop(start + n, layers)

    # transformers' Cache API pieces that generic code may query
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]


@dataclass
class PassOutput:
    """hidden: [B, T, H] the pre-norm output of the last layer run (input of layer ``end``);
    captured: HF hidden-state index -> [B, T, H]; logits: [B, R, V] float32 on the requested rows or None."""

    hidden: Tensor
    captured: dict[int, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None


def tree_positions(parents: Tensor) -> Tensor:
    """parents [B, T] (index of each node's parent among the T new tokens, -1 = attached to the cache end)
    -> depth [B, T] (0 for a node whose parent is -1). Parents must precede their children."""
    return _tree_ancestors(parents).sum(-1) - 1


def tree_mask(parents: Tensor) -> Tensor:
    """parents [B, T] -> ancestors-or-self [B, T, T] bool (row t may attend to new token j)."""
    return _tree_ancestors(parents)


def _tree_ancestors(parents: Tensor) -> Tensor:
    """[B, T, T] ancestors-or-self among the new tokens (:func:`hsd.verify.tree.ancestors`, no loop over nodes)."""
    from hsd.verify.tree import ancestors

    t = parents.shape[-1]
    if bool((parents >= torch.arange(t, device=parents.device)).any()):
        raise ValueError("parents: every node's parent must come before it")
    return ancestors(parents.long() + 1)[:, 1:, 1:]


def is_chain(parents: Tensor) -> bool:
    t = parents.shape[-1]
    return bool((parents == torch.arange(-1, t - 1, device=parents.device)).all())


class TargetRunner:
    """A frozen Hugging Face causal LM run pass by pass over a :class:`KVState` (batch rows share lengths).

    ``run(tokens or hidden, start, end, ...)`` runs layers ``[start, end)``; ``new_state`` reserves the
    cache. It calls the model's own embedding, decoder layers, final norm and rotary embedding.
    ``cpu_kernels`` (float32 on the CPU only): store the linear weights transposed in place (same values,
    see :mod:`hsd.decode.cpu`) and compute the LM head with a oneDNN pre-packed copy.
    """

    def __init__(self, model: nn.Module, cpu_kernels: bool = True):
        self.model = model
        base = cap.base_model(model)
        self.embed = base.embed_tokens
        self.layers = base.layers
        self.norm = base.norm
        self.rotary = getattr(base, "rotary_emb", None)
        if self.rotary is None:
            raise TypeError(f"{type(model).__name__}: no rotary embedding module (model.model.rotary_emb); "
                            "the decode engine supports RoPE decoder families (Llama, Qwen2, Mistral, Qwen3...)")
        self.lm_head = cap.lm_head(model)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.config = cfg
        self._check_attention(cfg)
        self.num_layers = len(self.layers)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.hidden_size = int(cfg.hidden_size)
        self.vocab_size = int(cfg.vocab_size)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        params = inspect.signature(self.layers[0].forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5 vs 4
        w = self.lm_head.weight
        self.dtype, self.device = w.dtype, w.device
        self.cpu_kernels = bool(cpu_kernels and w.device.type == "cpu" and w.dtype == torch.float32)
        self._head = None
        if self.cpu_kernels:
            relayout_linears(model)
            self._head = PackedLinear(self.lm_head.weight, getattr(self.lm_head, "bias", None))

    @staticmethod
    def _check_attention(cfg) -> None:
        types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        if types - {"full_attention"} or (getattr(cfg, "use_sliding_window", False)
                                          and getattr(cfg, "sliding_window", None)):
            raise ValueError(f"target uses attention layer types {sorted(types)} / a sliding window: the decode "
                             "engine implements full causal attention only")

    def new_state(self, batch: int, capacity: int) -> KVState:
        if self.max_positions and capacity > self.max_positions + 1:
            capacity = self.max_positions + 1
        return KVState(self.num_layers, batch, self.num_kv_heads, self.head_dim, capacity, self.dtype, self.device)

    def logits(self, hidden: Tensor) -> Tensor:
        """Pre-norm last-layer hidden [..., H] -> float32 logits [..., V] (final norm + LM head)."""
        x = self.norm(hidden)
        return (self._head(x) if self._head is not None else self.lm_head(x)).float()

    @torch.no_grad()
    def run(self, state: KVState, *, tokens: Tensor | None = None, hidden: Tensor | None = None,
            start: int = 0, end: int | None = None, parents: Tensor | None = None,
            logit_rows: Tensor | slice | None = None, capture: tuple[int, ...] = ()) -> PassOutput:
        """Run layers ``[start, end)`` over T new positions and append them to those layers' caches.

        tokens [B, T] (``start == 0``) or hidden [B, T, H] (the input of layer ``start``, e.g. a buffered
        h_l). parents [B, T] (tree; None = chain/causal). logit_rows: which of the T rows get logits
        (only when ``end == L``; None = no logits). capture: HF hidden-state indices in ``[start, end]``.
        """
        end = self.num_layers if end is None else end
        if not 0 <= start < end <= self.num_layers:
            raise ValueError(f"layers [{start}, {end}) are outside the target's {self.num_layers} layers")
        if (tokens is None) == (hidden is None):
            raise ValueError("give exactly one of tokens or hidden")
        if tokens is not None and start != 0:
            raise ValueError("tokens enter at layer 0; give hidden for a pass starting at a later layer")
        layers = range(start, end)
        past = state.length(layers)
        h = self.embed(tokens) if tokens is not None else hidden.to(self.dtype)
        b, t, _ = h.shape
        if parents is None or is_chain(parents):
            pos = torch.arange(past, past + t, device=h.device).expand(b, t)
            mask = None if t == 1 or past == 0 else self._chain_mask(past, t, h.device)
        else:
            pos = past + tree_positions(parents)
            mask = self._tree_mask(past, parents)
        if self.max_positions and int(pos.max()) >= self.max_positions:
            raise ValueError(f"position {int(pos.max())} is past the target's context "
                             f"(max_position_embeddings = {self.max_positions})")
        cos_sin = self.rotary(h, pos)
        captured: dict[int, Tensor] = {}
        with self._attention():
            for i in layers:
                if i in capture:
                    captured[i] = h
                out = self.layers[i](h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin,
                                     use_cache=True, **{self._cache_kw: state})
                h = out[0] if isinstance(out, tuple) else out
        if end in capture:
            captured[end] = h
        logits = None
        if logit_rows is not None:
            if end != self.num_layers:
                raise ValueError("logits need the last layer (end == num_layers)")
            logits = self.logits(h[:, logit_rows])
        return PassOutput(hidden=h, captured=captured, logits=logits)

    @contextlib.contextmanager
    def _attention(self):
        """Use :func:`gqa_sdpa` for this pass when the model runs "sdpa" (restored afterwards, so the
        model's own forward and ``generate`` are untouched)."""
        cfg = self.config
        swap = _HAS_INTERFACE and getattr(cfg, "_attn_implementation", None) == "sdpa"
        if swap:
            cfg._attn_implementation_internal = ATTENTION
        try:
            yield
        finally:
            if swap:
                cfg._attn_implementation_internal = "sdpa"

    @staticmethod
    def _chain_mask(past: int, t: int, device) -> Tensor:
        # query i (absolute past + i) sees keys 0..past + i
        return (torch.arange(past + t, device=device)[None, :]
                <= torch.arange(past, past + t, device=device)[:, None])[None, None]

    @staticmethod
    def _tree_mask(past: int, parents: Tensor) -> Tensor:
        b, t = parents.shape
        prefix = torch.ones(b, t, past, dtype=torch.bool, device=parents.device)
        return torch.cat([prefix, tree_mask(parents)], dim=-1)[:, None]
