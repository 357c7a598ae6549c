"""The target model, run layer by layer over a static KV cache with explicit per-layer lengths.

Why not the stock ``model(input_ids, cache=...)`` forward: the exit stage runs layers ``1..l`` over a
window *before* layers ``l+1..L`` see it, so for a while the shallow layers' caches are longer than the
deep layers'. Hugging Face's forward takes one position offset and one mask for every layer (from layer
0's cache length) and then silently attends with wrong positions and context in the deep layers. Here
every layer owns its length (``KVState.lengths``), and a pass over layers ``[start, end)`` builds its
positions and mask from the length of the layers it runs, which must agree.

What a pass computes, in order (``TargetRunner.run``): embeddings (only when ``start == 0``; times the
family's embedding multiplier), the decoder layers ``[start, end)`` (Hugging Face's own layer modules),
and, when ``end == L`` and rows are asked for, the final norm + LM head + the family's output law
(softcap, logit scaling; :class:`hsd.models.capture.OutputLaw`) on those rows only (the LM head is
~20 % of a small model's weights: prefill needs one row, not the prompt).

What the Hugging Face forward does around the layers is reproduced here, per family:

* attention: always :func:`runner_attention`, whatever ``attn_implementation`` the model was loaded
  with (eager, sdpa, flash...): HF's eager attention *adds* a mask (the runner's masks are boolean) and
  each implementation has its own conventions, so one function that understands the runner's masks,
  the layer's ``scaling``, score softcapping (Gemma 2) and attention sinks (gpt-oss ``s_aux``) is the
  only way every pass computes what the model's own forward computes. The model's own forward and
  ``generate`` are untouched (the implementation is switched for the runner's passes only).
* masks (:func:`pass_mask`): one per distinct :class:`AttentionSpan` of the layers in a pass: full
  causal, a sliding window (``layer_types`` "sliding_attention", or a bare ``sliding_window`` as in
  Mistral / Phi-3 / Mixtral / Starcoder2: key positions ``q - W < k <= q``), or chunked attention
  (Llama 4 "chunked_attention": the query's chunk of ``attention_chunk_size`` positions), for prefill,
  chains, trees (positions by depth) and partial-layer passes alike.
* RoPE: the model's rotary module, once per layer type when it takes one (Gemma 3: local / global).
* KV caches of any per-layer shape (:class:`KVState` allocates at a layer's first write): MLA
  (DeepSeek-V3) caches compressed latents whose "keys" and "values" have different widths.

A family that does something else is caught by :mod:`hsd.decode.target_check`, which compares the
runner with the model's own forward once per target and refuses it in one line.

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

ATTENTION = "hsd_runner"


def _expand_kv(x: Tensor, heads: int) -> Tensor:
    """[B, n_kv, S, d] -> [B, heads, S, d] (grouped-query attention: each KV head serves heads / n_kv)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def runner_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None, softcap: float | None = None,
                     s_aux: Tensor | None = None, **kwargs) -> tuple[Tensor, None]:
    """The runner's attention for every family: query [B, nh, T, d], key [B, n_kv, S, d], value
    [B, n_kv, S, dv] -> [B, T, nh, dv].

    ``attention_mask``: the runner's boolean [B, 1, T, S] (True = may attend; windows and trees are in
    it), or None: causal for T > 1 (then S == T, a prefill from an empty cache), everything for T == 1.
    ``scaling`` as the layer passes it (HF's default head_dim ** -0.5 when None); ``softcap``: scores
    become c * tanh(s / c) before masking (Gemma 2); ``s_aux`` [nh]: one sink logit per head that takes
    part in the softmax and is dropped (gpt-oss). Without those two: one SDPA call on the KV heads
    (``enable_gqa``, no ``repeat_kv`` copy of the cache); with them: scores, softmax in float32, as HF's
    eager functions compute them. ``sliding_window`` and other kwargs are ignored: the mask holds them.
    """
    if scaling is None:
        scaling = getattr(module, "head_dim", query.shape[-1]) ** -0.5
    t, s = query.shape[2], key.shape[2]
    if softcap is None and s_aux is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling, is_causal=attention_mask is None and t > 1,
            enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    heads = query.shape[1]
    scores = torch.matmul(query, _expand_kv(key, heads).transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = attention_mask
    if allowed is None and t > 1:
        allowed = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)
    scores = scores.float()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if s_aux is not None:
        sink = s_aux.float().reshape(1, -1, 1, 1).expand(scores.shape[0], -1, t, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(value.dtype), _expand_kv(value, heads))
    return out.transpose(1, 2).contiguous(), None


def register_attention(name: str, fn) -> bool:
    """Register ``fn`` under ``name`` in transformers' ``AttentionInterface`` (False where it is missing)."""
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(name, fn)
        return True
    except (ImportError, AttributeError):  # pragma: no cover - transformers without the interface
        return False


_HAS_INTERFACE = register_attention(ATTENTION, runner_attention)


class KVState:
    """Static per-layer KV buffers [B, heads, capacity, width] and one committed length per layer.

    ``update`` is what Hugging Face attention modules call (``cache.update(k, v, layer_idx, ...)``): it
    writes the new keys/values after the layer's current length, advances that length and returns the
    keys/values of every entry so far (a view, no copy). ``crop(n, layers)`` sets lengths back (entries
    past a length are dead and get overwritten). Rows of a batch share lengths.

    With ``num_kv_heads`` and ``head_dim`` the buffers are reserved here; with None (MLA: DeepSeek-V3
    caches compressed latents, "keys" [B, 1, S, kv_lora_rank] and "values" [B, 1, S, qk_rope_head_dim])
    each layer's buffers are allocated at its first write, in the shapes its module writes. A layer that
    writes other shapes than its buffers' while empty gets new ones; while it holds entries, ValueError.
    """

    is_compileable = False  # read by some transformers helpers; this cache is never compiled as a whole

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int | None, head_dim: int | None, capacity: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.capacity = int(capacity)
        self.lengths = [0] * num_layers
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        if num_kv_heads and head_dim:
            shape = (batch, num_kv_heads, self.capacity, head_dim)
            self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def _fit(self, i: int, key: Tensor, value: Tensor) -> None:
        """Give layer ``i`` buffers of the shapes its module writes (allocated while the layer is empty)."""
        for bufs, x in ((self.keys, key), (self.values, value)):
            b = bufs[i]
            want = (x.shape[0], x.shape[1], self.capacity, x.shape[3])
            if b is None or tuple(b.shape) != want or b.dtype != x.dtype or b.device != x.device:
                if self.lengths[i]:
                    raise ValueError(f"KV cache: layer {i} holds {self.lengths[i]} entries of shape "
                                     f"{None if b is None else tuple(b.shape)}, the layer now writes {tuple(x.shape)}")
                bufs[i] = torch.zeros(want, dtype=x.dtype, device=x.device)

    @property
    def num_layers(self) -> int:
        return len(self.lengths)

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        n, t = self.lengths[layer_idx], key.shape[2]
        self._fit(layer_idx, key, value)
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
            for i in layers:
                if self.keys[i] is None:  # never written: nothing to move
                    continue
                src = start + idx.to(self.keys[i].device)
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


class UnsupportedTarget(ValueError):
    """The target does something the runner cannot reproduce: refused in one line, before any work."""


@dataclass(frozen=True)
class AttentionSpan:
    """Which earlier positions a layer's queries may see, on top of causality (or tree ancestry).

    window: keys at positions ``q - window < k <= q`` (HF's ``sliding_window_overlay``: ``kv > q - W``).
    chunk: keys in the query's chunk of ``chunk`` positions, ``k // C == q // C`` (HF's ``chunked_overlay``,
    no left padding). Neither: full causal attention.
    """

    window: int | None = None
    chunk: int | None = None

    def cuts(self, n: int) -> bool:
        """Whether the span removes some causal pair among positions ``0..n-1``."""
        return bool(self.window and n > self.window) or bool(self.chunk and n > self.chunk)


FULL = AttentionSpan()


def layer_spans(cfg, num_layers: int) -> list[AttentionSpan]:
    """Per-layer :class:`AttentionSpan` of a Hugging Face text config, as the model's forward builds its masks.

    ``layer_types`` when the config has them ("full_attention"; "sliding_attention" with ``sliding_window``;
    "chunked_attention" with ``attention_chunk_size``); else a bare ``sliding_window`` on every layer when it
    is set (Mistral, Mixtral, Phi-3, Starcoder2 build the sliding mask for all layers whenever it is not
    None); else full attention. Another layer type is :class:`UnsupportedTarget`.
    """
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if not types:
        return [AttentionSpan(window=int(window)) if window else FULL] * num_layers
    if len(types) < num_layers:
        raise UnsupportedTarget(f"config.layer_types lists {len(types)} layers, the model has {num_layers}")
    spans = []
    for i, kind in enumerate(types[:num_layers]):
        if kind == "full_attention":
            spans.append(FULL)
        elif kind == "sliding_attention" and window:
            spans.append(AttentionSpan(window=int(window)))
        elif kind == "chunked_attention" and getattr(cfg, "attention_chunk_size", None):
            spans.append(AttentionSpan(chunk=int(cfg.attention_chunk_size)))
        else:
            raise UnsupportedTarget(f"layer {i} has attention type {kind!r} (sliding_window={window}, "
                                    f"attention_chunk_size={getattr(cfg, 'attention_chunk_size', None)}): the "
                                    "decode engine implements full, sliding-window and chunked attention")
    return spans


def pass_mask(past: int, pos: Tensor, parents: Tensor | None, span: AttentionSpan) -> Tensor | None:
    """Boolean mask [B, 1, T, past + T] (True = may attend) of a pass over T new tokens at positions ``pos``
    [B, T] after ``past`` committed entries (entry i holds position i), or None where plain causal
    attention is exact: a chain from an empty cache or a 1-token step that the span cuts nothing of.

    parents None: a chain (new token j sees new tokens <= j); else [B, T]: a tree, ancestors-or-self. The
    span then removes keys by *position* (a tree node at depth d is at ``past + d``, as on its committed
    path), so prefill, chains, trees and partial-layer passes (``past`` = those layers' length) agree.
    """
    b, t = pos.shape
    if parents is None and (t == 1 or past == 0) and not span.cuts(past + t):
        return None
    dev = pos.device
    new = (tree_mask(parents) if parents is not None
           else torch.ones(t, t, dtype=torch.bool, device=dev).tril().expand(b, t, t))
    allowed = torch.cat([torch.ones(b, t, past, dtype=torch.bool, device=dev), new], dim=-1)
    if span.window or span.chunk:
        keys = torch.cat([torch.arange(past, device=dev).expand(b, past), pos], dim=1)
        q, k = pos[:, :, None], keys[:, None, :]
        if span.window:
            allowed = allowed & (q - k < span.window)
        if span.chunk:
            allowed = allowed & (q // span.chunk == k // span.chunk)
    return allowed[:, None]


def _attention_configs(layers: nn.Module, cfg) -> list:
    """Every config object the layers' modules read ``_attn_implementation`` from (a truncated copy's
    layers keep the original's config), plus ``cfg``; each once."""
    out = {id(cfg): cfg}
    for m in layers.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation_internal"):
            out.setdefault(id(c), c)
    return list(out.values())


class TargetRunner:
    """A frozen Hugging Face causal LM run pass by pass over a :class:`KVState` (batch rows share lengths).

    ``run(tokens or hidden, start, end, ...)`` runs layers ``[start, end)``; ``new_state`` reserves the
    cache. It calls the model's own embedding, decoder layers, final norm and rotary embedding, with its
    own masks and attention function (module docstring). ``cpu_kernels`` (float32 on the CPU only): store
    the linear weights transposed in place (same values, see :mod:`hsd.decode.cpu`) and compute the LM
    head with a oneDNN pre-packed copy. ``check``: compare the runner with the model's own forward once per
    target and process (:func:`hsd.decode.target_check.ensure_checked`); a mismatch raises
    :class:`~hsd.decode.target_check.TargetMismatch` (a ValueError) with one line.
    """

    def __init__(self, model: nn.Module, cpu_kernels: bool = True, check: bool = True):
        self.model = model
        base = cap.base_model(model)
        self.embed = base.embed_tokens
        self.layers = base.layers
        self.norm = base.norm
        self.rotary = getattr(base, "rotary_emb", None)
        family = getattr(model.config, "model_type", type(model).__name__)
        if self.rotary is None:
            raise UnsupportedTarget(f"{family}: no rotary embedding module (model.model.rotary_emb); the decode "
                                    "engine supports RoPE decoder families")
        if not _HAS_INTERFACE:  # pragma: no cover - transformers 4.47 and later have it
            raise UnsupportedTarget("transformers has no AttentionInterface: the runner cannot use its attention")
        self.lm_head = cap.lm_head(model)
        self.config = cfg = cap.text_config(model)
        self.family = str(family)
        self.num_layers = len(self.layers)
        self.spans = layer_spans(cfg, self.num_layers)
        self.law = cap.output_law(model)
        self.layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * self.num_layers)
        self._rope_by_type = "layer_type" in inspect.signature(self.rotary.forward).parameters  # Gemma 3
        self._attn_configs = _attention_configs(self.layers, cfg)
        self._index_floor = _index_position_floor(cfg)
        self._latent_cache = bool(getattr(cfg, "kv_lora_rank", None))  # MLA (DeepSeek-V2/V3)
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
        self.check = None
        if check:
            from .target_check import ensure_checked

            self.check = ensure_checked(self)

    def new_state(self, batch: int, capacity: int) -> KVState:
        if self.max_positions and capacity > self.max_positions + 1:
            capacity = self.max_positions + 1
        if self._latent_cache:  # MLA: the layers' cache shapes are their own (allocated at first write)
            return KVState(self.num_layers, batch, None, None, capacity, self.dtype, self.device)
        return KVState(self.num_layers, batch, self.num_kv_heads, self.head_dim, capacity, self.dtype, self.device)

    def embeddings(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B, T] -> (embedding output [B, T, H] = HF hidden-state index 0, input of layer 0 [B, T, H])."""
        e = self.embed(tokens)
        return e, self.law.embeddings(e)

    def logits(self, hidden: Tensor) -> Tensor:
        """Pre-norm last-layer hidden [..., H] -> float32 logits [..., V] (final norm, LM head, output law)."""
        x = self.norm(hidden)
        return self.law.logits((self._head(x) if self._head is not None else self.lm_head(x)).float())

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
        captured: dict[int, Tensor] = {}
        if tokens is not None:
            e, h = self.embeddings(tokens)
            if 0 in capture:
                captured[0] = e
        else:
            h = hidden.to(self.dtype)
        b, t, _ = h.shape
        chain = parents is None or is_chain(parents)
        if chain:
            pos = torch.arange(past, past + t, device=h.device).expand(b, t)
        else:
            pos = past + tree_positions(parents)
            self._check_tree_positions(past, pos)
        if self.max_positions and int(pos.max()) >= self.max_positions:
            raise ValueError(f"position {int(pos.max())} is past the target's context "
                             f"(max_position_embeddings = {self.max_positions})")
        masks = {span: pass_mask(past, pos, None if chain else parents, span)
                 for span in {self.spans[i] for i in layers}}
        rope = self._rope(h, pos, layers)
        with self._attention():
            for i in layers:
                if i in capture and i not in captured:
                    captured[i] = h
                out = self.layers[i](h, attention_mask=masks[self.spans[i]], position_ids=pos,
                                     position_embeddings=rope[self.layer_types[i]] if self._rope_by_type else rope,
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

    def _rope(self, h: Tensor, pos: Tensor, layers: range):
        """The rotary embedding of ``pos`` [B, T]: one value, or {layer type: value} when the rotary module
        takes the layer type (Gemma 3: local and global bases)."""
        if not self._rope_by_type:
            return self.rotary(h, pos)
        return {lt: self.rotary(h, pos, lt) for lt in {self.layer_types[i] for i in layers}}

    def _check_tree_positions(self, past: int, pos: Tensor) -> None:
        """Llama 4's NoPE layers scale queries by a function of ``floor((p + 1) / floor_scale)`` with p taken
        from the token's *index* in the pass (``past + j``), not its position; for a tree node (position
        past + depth) that is the same value unless a multiple of floor_scale lies between: refused then."""
        if not self._index_floor:
            return
        idx = past + torch.arange(pos.shape[1], device=pos.device)
        fs = self._index_floor
        if not torch.equal(torch.div(idx + 1, fs, rounding_mode="floor").expand_as(pos),
                           torch.div(pos + 1, fs, rounding_mode="floor")):
            raise UnsupportedTarget(f"{self.family}: a tree pass at positions {past}..{int(pos.max())} crosses a "
                                    f"multiple of floor_scale={fs}, where the NoPE layers' attention temperature "
                                    "(computed from token indices) differs from the tree positions'")

    @contextlib.contextmanager
    def _attention(self):
        """Use :func:`runner_attention` for this pass, whatever implementation the model was loaded with
        (restored afterwards, so the model's own forward and ``generate`` are untouched)."""
        saved = [(c, c._attn_implementation_internal) for c in self._attn_configs]
        for c, _ in saved:
            c._attn_implementation_internal = ATTENTION
        try:
            yield
        finally:
            for c, value in saved:
                c._attn_implementation_internal = value


def _index_position_floor(cfg) -> int | None:
    """Llama 4 attention temperature tuning on NoPE layers: its ``floor_scale``, else None."""
    nope = [i for i, r in enumerate(getattr(cfg, "no_rope_layers", None) or []) if not r]
    if getattr(cfg, "attn_temperature_tuning", False) and nope:
        return int(getattr(cfg, "floor_scale", 0) or 0) or None
    return None
