"""Batch-invariant target passes: every decoding pass padded to one fixed row tile.

Why. Speculative greedy decoding equals plain greedy decoding only if a row's logits do not depend on how
many rows share the pass. Kernels do not promise that: they pick code paths and reduction orders by the
number of rows M. Measured here (AMD EPYC, AVX2, torch 2.13 CPU; ``docs/decoding_speed.md``):

* bf16 SDPA (the CPU flash kernel): row 0 of a query block gives one result for M = 1..3 query rows and
  another for M >= 4 (same keys, same mask); the first divergence of a 5-row SmolLM2 pass against five
  1-row steps is the attention output of layer 3-7, and the logits then differ by up to 0.5;
* fp32 linears (MKL): M <= 3 (GEMV-like) and M >= 4 (GEMM) differ in the last bits;
* bf16 linears on this CPU are row-invariant (a fallback GEMM); on a CPU with AMX-BF16 the 49152-row LM
  head has two kernels (M <= 32 and M >= 33).

So the construction: every pass of ``t <= rows`` new tokens is padded to exactly ``rows`` rows before the
layers (the pad rows come after the real ones and no real row attends to them), the LM head's input is
padded to ``rows`` rows too, and attention always runs over the whole static cache (``FullKVState``: every
pass sees ``capacity`` keys, the mask hides the ones past each row), because the bf16 CPU kernel also rounds
a row differently when only the number of masked keys after it changes (rarely: about 1 row in 100 of random
data). Every decoding pass then has one shape (``rows`` query rows x ``capacity`` keys, the same mask layout):
one kernel and one reduction order compute every row, whichever 1-token step, chain or exit-stage window it
belongs to, and a row's visible keys sit at the same key positions as in plain decoding.

Trees. In a tree pass a node's ancestors are not contiguous in the keys (earlier siblings' subtrees sit
between them, masked), while plain decoding has the committed path contiguous. The tile fixes the number
of query rows, not where a row's visible keys sit; an attention kernel whose reductions over keys group
entries by their index (vector lanes, warp shuffles) can round such a row differently. Measured here: the
bf16 CPU flash kernel is invariant to masked gaps except where the tree straddles one of its 512-key blocks,
the fp32 one is not invariant at all. :meth:`TiledRunner.tree_exact` probes the
runner's attention with the target's head shapes on its device (cached), and the engine refuses greedy trees
with a tile where the probe fails (one line: use chains, or ``row_tile="off"`` without the exactness claim).

Passes longer than the tile (a prompt's prefill) run as one pass: every decoding run of a prompt starts
with the same prefill call, so its rows are identical in the runs that are compared. A decoding
configuration whose passes would exceed the tile is refused before it starts (:func:`resolve_row_tile`,
``SpeculativeDecoder.generate``).

Cost: the pad rows' compute and attention over the whole cache (small where a pass is memory-bound, as on a
GPU or with AMX; on this AVX2 CPU an fp32 tiled step costs ~2x an untiled 1-row step, which is why ``auto``
leaves fp32 untiled; ``docs/decoding_speed.md`` has the measured costs).
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor, nn

from . import target as target_mod
from .target import KVState, PassOutput, TargetRunner, tree_mask

TILED_ATTENTION = "hsd_tiled"


def runner_attention_fn():
    """The runner's own attention function (the one its ``_attention`` context installs)."""
    return getattr(target_mod, "runner_attention", None) or target_mod.gqa_sdpa


def tiled_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, *args,
                    **kwargs):
    """The runner's attention over the whole cache (:class:`FullKVState` returns ``capacity`` keys): the
    runner's mask [B, 1, T, past + T] is widened with hidden keys; None (a prefill from an empty cache)
    becomes the explicit causal mask over the first T keys."""
    t, s = query.shape[2], key.shape[2]
    if attention_mask is None:
        if t == 1:
            raise RuntimeError("tiled attention: a 1-row pass without a mask (tiles have >= 2 rows)")
        attention_mask = torch.ones(t, s, dtype=torch.bool, device=query.device).tril()[None, None]
        attention_mask = attention_mask.expand(query.shape[0], 1, t, s)
    else:
        attention_mask = _widen(attention_mask, s)
    return runner_attention_fn()(module, query, key, value, attention_mask, *args, **kwargs)


_HAS_INTERFACE = target_mod.register_attention(TILED_ATTENTION, tiled_attention)

TILE_ALIGN = 8  # tiles are multiples of this (kernels block rows by 4-16)


def tile_for(rows: int) -> int:
    """The smallest multiple of :data:`TILE_ALIGN` that holds ``rows`` rows (at least one align)."""
    return max(TILE_ALIGN, -(-int(rows) // TILE_ALIGN) * TILE_ALIGN)


def resolve_row_tile(setting: int | str | None, dtype: torch.dtype, rows: int) -> int | None:
    """``setting`` -> the tile (rows per pass) or None (untiled).

    "auto": untiled in float32 (fp32 rows differ only in the last bits, logits ~1e-5 relative, while the tile
    costs ~2x per step on an AVX2 CPU; ``docs/decoding_speed.md``), else :func:`tile_for`
    ``(rows)``, where ``rows`` is the largest pass the decoding configurations make. "off" / None / 0:
    untiled. An int: that tile (>= ``rows``)."""
    if setting is None or setting == "off" or setting == 0:
        return None
    if setting == "auto":
        return None if dtype == torch.float32 else tile_for(rows)
    if isinstance(setting, str) and setting.isdigit():
        setting = int(setting)
    if isinstance(setting, bool) or not isinstance(setting, int):
        raise ValueError(f"row_tile: expected 'auto', 'off' or a number of rows, got {setting!r}")
    if setting < 2:
        raise ValueError(f"row_tile: must be >= 2 rows, got {setting!r}")
    if int(setting) < rows:
        raise ValueError(f"row_tile {setting}: the decoding configuration makes passes of {rows} rows; the tile "
                         f"must hold them (row_tile >= {rows})")
    return int(setting)


class FullKVState(KVState):
    """A :class:`KVState` whose ``update`` returns every cache entry (the whole ``capacity``), so that every
    pass attends over the same number of keys; the runner's masks hide the entries past each row."""

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        super().update(key, value, layer_idx, *args, **kwargs)
        return self.keys[layer_idx], self.values[layer_idx]


class TiledRunner(TargetRunner):
    """A :class:`TargetRunner` whose passes of ``t <= rows`` new tokens run as ``rows``-row passes.

    Pad rows repeat the last token (or zero hidden states), come after the real rows, and are children of
    the chain's last row (chains) or of the committed prefix (trees, or a chain near the context limit),
    so no real row attends to them. After the pass the caches are cropped back to ``past + t`` and the
    outputs (hidden, captured, logits) cover the real rows only: callers see an untiled runner.
    """

    def __init__(self, model: nn.Module, rows: int, cpu_kernels: bool = True):
        if int(rows) < 2:
            raise ValueError(f"row tile: must be >= 2 rows, got {rows}")
        self.rows = int(rows)  # before the base class's self-check, which runs this runner's tiled passes
        super().__init__(model, cpu_kernels=cpu_kernels)

    def new_state(self, batch: int, capacity: int) -> FullKVState:
        """Room for the pad rows of the last pass too (they are written, then cropped). Every pass attends
        over the whole capacity: give the same ``capacity`` to the runs whose outputs are compared."""
        state = super().new_state(batch, capacity)
        return FullKVState(self.num_layers, batch, self.num_kv_heads, self.head_dim, state.capacity + self.rows,
                           self.dtype, self.device)

    @contextlib.contextmanager
    def _attention(self):
        """The runner's attention context, then :func:`tiled_attention` on top of it: the runner's masks
        cover the keys written so far, the keys here are the whole cache (``FullKVState``)."""
        if not _HAS_INTERFACE:  # pragma: no cover
            raise RuntimeError("row tiles need transformers' AttentionInterface")
        configs = getattr(self, "_attn_configs", None) or [self.config]
        with super()._attention():
            saved = [(c, c._attn_implementation_internal) for c in configs]
            for c, _ in saved:
                c._attn_implementation_internal = TILED_ATTENTION
            try:
                yield
            finally:
                for c, value in saved:
                    c._attn_implementation_internal = value

    def tree_exact(self) -> bool:
        """Whether a tree row equals the same row stepped as a chain on this runner (see the module notes):
        :func:`gap_invariant` for this tile, the target's attention shapes, dtype and device."""
        return tree_exact_for(self.model, self.rows)

    def logits(self, hidden: Tensor) -> Tensor:
        """The LM head on exactly ``rows`` rows (pads dropped): one kernel for every row count."""
        lead, n = hidden.shape[:-1], hidden[..., 0].numel()
        flat = hidden.reshape(n, hidden.shape[-1])
        padded = -(-n // self.rows) * self.rows if n else self.rows
        x = torch.cat([flat, flat.new_zeros(padded - n, flat.shape[-1])]) if padded != n else flat
        return super().logits(x)[:n].reshape(*lead, -1)

    @torch.no_grad()
    def run(self, state: KVState, *, tokens: Tensor | None = None, hidden: Tensor | None = None,
            start: int = 0, end: int | None = None, parents: Tensor | None = None,
            logit_rows: Tensor | slice | None = None, capture: tuple[int, ...] = ()) -> PassOutput:
        if not isinstance(state, FullKVState):
            raise TypeError("TiledRunner.run: the state must come from this runner's new_state (a FullKVState)")
        x = tokens if tokens is not None else hidden
        if x is None or (tokens is not None and hidden is not None):
            return super().run(state, tokens=tokens, hidden=hidden, start=start, end=end, parents=parents,
                               logit_rows=logit_rows, capture=capture)  # the base class names the error
        b, t = x.shape[:2]
        if t > self.rows or t == 0:  # a prefill: one pass (identical in every run of the prompt)
            return super().run(state, tokens=tokens, hidden=hidden, start=start, end=end, parents=parents,
                               logit_rows=logit_rows, capture=capture)
        end_ = self.num_layers if end is None else end
        layers = range(start, end_)
        past = state.length(layers)
        pad = self.rows - t
        if tokens is not None:
            tokens = torch.cat([tokens, tokens[:, -1:].expand(b, pad)], dim=1)
        else:
            hidden = torch.cat([hidden, hidden.new_zeros(b, pad, *hidden.shape[2:])], dim=1)
        parents = pad_parents(parents, b, t, self.rows, past, self.max_positions, x.device)
        rows = None if logit_rows is None else torch.arange(t, device=x.device)[logit_rows]
        out = super().run(state, tokens=tokens, hidden=hidden, start=start, end=end, parents=parents,
                          logit_rows=rows, capture=capture)
        state.crop(past + t, layers)
        return PassOutput(hidden=out.hidden[:, :t], captured={i: h[:, :t] for i, h in out.captured.items()},
                          logits=out.logits)


def _widen(mask: Tensor, keys: int) -> Tensor:
    """[..., T, S] bool -> [..., T, keys] (the added keys hidden)."""
    extra = keys - mask.shape[-1]
    if extra < 0:
        raise ValueError(f"mask over {mask.shape[-1]} keys is wider than the cache ({keys})")
    return torch.cat([mask, mask.new_zeros(*mask.shape[:-1], extra)], dim=-1) if extra else mask


def pad_parents(parents: Tensor | None, batch: int, t: int, rows: int, past: int, max_positions: int,
                device) -> Tensor | None:
    """Parents [B, rows] for a pass of ``t`` real rows padded to ``rows``.

    A chain (None) stays a chain (pad rows continue it: the mask layout of every chain pass is the causal
    one) unless the pad positions would pass the target's context, then pad rows hang below the prefix.
    A tree's pad rows hang below the prefix (-1): they see the committed entries and themselves only."""
    if parents is None:
        if not max_positions or past + rows <= max_positions:
            return None
        parents = torch.arange(-1, t - 1, device=device).expand(batch, t)
    return torch.cat([parents.to(device).long(), torch.full((batch, rows - t), -1, dtype=torch.long, device=device)],
                     dim=1)


def tree_exact_for(model: nn.Module, rows: int) -> bool:
    """:func:`gap_invariant` for a Hugging Face causal LM's attention shapes, dtype and device."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    w = next(model.parameters())
    return gap_invariant(int(rows), heads, kv, head_dim, w.dtype, str(w.device))


@functools.cache
def gap_invariant(rows: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str,
                  pasts: tuple[int, ...] | None = None) -> bool:
    """Does the runner's attention give every tree row the same bits as the same row in a chain pass?

    Random queries/keys of the target's shapes (float32 draws cast to ``dtype``, three per context) after
    contexts that put the tree across every power-of-two key block from 64 to 1024 (kernels split the keys into such blocks; the CPU
    flash kernel's are 512 wide, and a tree straddling a block boundary is where its rows differ) and one
    short context; a ``rows``-node tree (copies of a 6-node pattern that puts masked siblings between a node's
    ancestors) against, for each node, a chain pass with its ancestors contiguous after the prefix; both with
    the same number of keys (more than written, as a :class:`FullKVState` gives) and the runner's attention.
    True when every node's row is bitwise equal."""
    if pasts is None:  # three random draws per context: a rounding difference shows on some data only
        pasts = (3, *(block - rows // 2 for block in (64, 128, 256, 512, 1024) for _ in range(3)))
    g = torch.Generator().manual_seed(0)
    pattern = [-1, 0, -1, 1, 2, 3]
    par = [p if p < 0 else p + 6 * (i // 6) for i, p in enumerate(pattern * (rows // 6 + 1))][:rows]
    paths = []
    for j in range(rows):
        path = [j]
        while par[path[-1]] >= 0:
            path.append(par[path[-1]])
        paths.append(path[::-1])
    parents = torch.tensor([par], device=device)
    scale = head_dim ** -0.5
    attend = runner_attention_fn()
    for past in pasts:
        keys = past + rows + 29

        def mask(new: Tensor, past: int = past, keys: int = keys) -> Tensor:  # [rows, rows] new -> [1, 1, rows, keys]
            full = torch.cat([torch.ones(rows, past, dtype=torch.bool, device=device), new], dim=-1)
            return _widen(full[None, None], keys)

        q = 2 * torch.randn(1, heads, rows, head_dim, generator=g)
        k = torch.randn(1, kv_heads, keys, head_dim, generator=g)
        v = torch.randn(1, kv_heads, keys, head_dim, generator=g)
        q, k, v = (x.to(device=device, dtype=dtype) for x in (q, k, v))
        out_tree, _ = attend(None, q, k, v, mask(tree_mask(parents)[0]), scaling=scale)
        chain_mask = mask(torch.ones(rows, rows, dtype=torch.bool, device=device).tril())
        for j, path in enumerate(paths):
            idx = list(range(past)) + [past + a for a in path]
            idx = torch.tensor(idx + [0] * (keys - len(idx)), device=device)
            qc = q.clone()
            qc[:, :, len(path) - 1] = q[:, :, j]
            out_chain, _ = attend(None, qc, k.index_select(2, idx), v.index_select(2, idx), chain_mask, scaling=scale)
            if not torch.equal(out_tree[:, j], out_chain[:, len(path) - 1]):
                return False
    return True
