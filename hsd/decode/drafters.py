"""Drafters: who proposes the tokens the target verifies. One small protocol, four implementations.

A drafter tracks the context it drafts from (committed tokens, then any tentative tokens an exit stage
kept) and whatever state it needs (a KV cache). The engine calls:

* ``commit(tokens, features, start)``: the committed context is ``tokens`` [B, C] (its last token, the
  root, has not been through the target yet); ``features`` [B, P, F] are the target features of
  positions ``start..start+P-1`` (only drafters with ``feature_layers`` get them, e.g. EAGLE-3's
  low/mid/high hidden states). Everything drafted or extended since the last commit is dropped.
* ``propose(k, params, generator) -> Draft``: up to ``k`` tokens after the context, and the processed
  rows they were drawn from (``process_logits`` with the run's temperature/top-k/top-p; T = 0 gives
  one-hot rows, i.e. greedy drafting), or ``q = None`` for deterministic drafts.
* ``extend(tokens)``: the exit stage kept ``tokens`` [B, n] = the first n - 1 tokens of the last proposal
  followed by one other token; drafting continues after them (without target features).

Implementations: :class:`NoDrafter` (plain autoregressive decoding through the same loop),
:class:`Eagle3Drafter`, :class:`ModelDrafter` (a small Hugging Face causal LM with the same vocabulary),
:class:`PromptLookupDrafter` (n-gram lookup in the context, as HF's ``prompt_lookup_num_tokens``).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from hsd.models.kv import KVCache

from .cpu import relayout_linears
from .draft import Draft
from .sampling import SamplingParams, process, sample
from .target import KVState, TargetRunner
from .tree_draft import build_tree
from .tree_spec import TreeSpec


@runtime_checkable
class Drafter(Protocol):
    name: str
    feature_layers: tuple[int, ...]

    def commit(self, tokens: Tensor, features: Tensor | None = None, start: int = 0) -> None: ...

    def propose(self, k: int, params: SamplingParams, generator: torch.Generator | None = None) -> Draft: ...

    def extend(self, tokens: Tensor) -> None: ...


def draw(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Target-vocabulary logits [B, V] -> (token [B], the processed row it was drawn from [B, V])."""
    q = process(logits, params)
    tok = q.argmax(-1) if params.greedy else sample(q, generator)
    return tok, q


class NoDrafter:
    """No draft: every round verifies only the root, i.e. plain autoregressive decoding (the fair AR
    baseline of this engine: same KV cache, same sampling code)."""

    name = "none"
    feature_layers: tuple[int, ...] = ()

    def commit(self, tokens: Tensor, features: Tensor | None = None, start: int = 0) -> None:
        self._batch, self._device = tokens.shape[0], tokens.device

    def propose(self, k: int, params: SamplingParams, generator: torch.Generator | None = None) -> Draft:
        return Draft.empty(self._batch, self._device)

    def extend(self, tokens: Tensor) -> None:
        pass


class PromptLookupDrafter:
    """n-gram prompt lookup: find the most recent earlier occurrence of the context's last n tokens
    (n = max_ngram down to min_ngram) and propose the tokens that followed it. Deterministic given the
    context, so the proposal is a point mass (``q = None``); drafts can be shorter than k (or empty)."""

    name = "lookup"
    feature_layers: tuple[int, ...] = ()

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup: need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def commit(self, tokens: Tensor, features: Tensor | None = None, start: int = 0) -> None:
        if tokens.shape[0] != 1:
            raise ValueError("PromptLookupDrafter drafts one row at a time (B = 1)")
        self.ctx = tokens[0].tolist()

    def extend(self, tokens: Tensor) -> None:
        self.ctx += tokens[0].tolist()

    def lookup(self, k: int) -> list[int]:
        ctx, n_ctx = self.ctx, len(self.ctx)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            tail = ctx[n_ctx - n:]
            for s in range(n_ctx - n - 1, -1, -1):  # most recent earlier occurrence first
                if ctx[s:s + n] == tail:
                    return ctx[s + n: s + n + k]
        return []

    def propose(self, k: int, params: SamplingParams, generator: torch.Generator | None = None) -> Draft:
        found = self.lookup(k) if k > 0 else []
        return Draft.chain(torch.tensor([found], dtype=torch.long))


class ModelDrafter:
    """A small Hugging Face causal LM with the target's vocabulary (its own KV cache, one token a step)."""

    name = "model"
    feature_layers: tuple[int, ...] = ()

    def __init__(self, model: nn.Module, vocab_size: int, capacity: int = 4096, cpu_kernels: bool = True):
        self.runner = TargetRunner(model, cpu_kernels=cpu_kernels)
        self.vocab_size = int(vocab_size)
        self.capacity = capacity
        self.state: KVState | None = None
        self.fed: list[int] = []

    def _to_target(self, logits: Tensor) -> Tensor:
        """Draft logits -> target vocabulary (same tokenizer; embedding matrices may be padded)."""
        v = logits.shape[-1]
        if v == self.vocab_size:
            return logits
        if v > self.vocab_size:  # padded embedding rows beyond the tokenizer
            return logits[..., : self.vocab_size]
        pad = logits.new_full((*logits.shape[:-1], self.vocab_size - v), float("-inf"))
        return torch.cat([logits, pad], dim=-1)

    def commit(self, tokens: Tensor, features: Tensor | None = None, start: int = 0) -> None:
        if tokens.shape[0] != 1:
            raise ValueError("ModelDrafter drafts one row at a time (B = 1)")
        ctx = tokens[0].tolist()
        if self.state is None or len(ctx) + 64 > self.state.capacity:
            self.state = self.runner.new_state(1, max(self.capacity, 2 * len(ctx) + 64))
            self.fed = []
        self.ctx = ctx
        self._sync()

    def extend(self, tokens: Tensor) -> None:
        self.ctx = self.ctx + tokens[0].tolist()

    def _sync(self) -> int:
        """Keep the cached prefix that the context still starts with (never the root: its logits are what a
        proposal needs); returns its length. Prompts sharing a prefix (a system prompt) reuse it."""
        keep, limit = 0, min(len(self.fed), len(self.ctx) - 1)
        while keep < limit and self.fed[keep] == self.ctx[keep]:
            keep += 1
        self.state.crop(keep)
        self.fed = self.fed[:keep]
        return keep

    def propose(self, k: int, params: SamplingParams, generator: torch.Generator | None = None) -> Draft:
        dev = self.runner.device
        if k <= 0:
            return Draft.empty(1, dev)
        keep = self._sync()
        pending = torch.tensor([self.ctx[keep:]], dtype=torch.long, device=dev)
        toks, qs = [], []
        for _ in range(k):
            out = self.runner.run(self.state, tokens=pending, logit_rows=slice(-1, None))
            self.fed += pending[0].tolist()
            tok, q = draw(self._to_target(out.logits[:, -1]), params, generator)
            toks.append(tok)
            qs.append(q)
            pending = tok[:, None]
        return Draft.chain(torch.stack(toks, 1), torch.stack(qs, 1))


def truncated_copy(model: nn.Module, num_layers: int) -> nn.Module:
    """A causal LM made of ``model``'s embedding, first ``num_layers`` decoder layers, final norm and LM
    head, sharing their weights (no copy). The draft-model baseline for targets without a smaller
    sibling (SmolLM2-135M): an untrained early exit, so expect low acceptance."""
    from hsd.models import capture as cap

    n = cap.num_layers(model)
    if not 1 <= num_layers < n:
        raise ValueError(f"truncated draft: num_layers must be in [1, {n - 1}] for a {n}-layer target, "
                         f"got {num_layers}")
    import copy

    def shallow(m: nn.Module) -> nn.Module:  # shares submodules and parameters, not hooks
        c = copy.copy(m)
        for name, value in vars(m).items():
            if isinstance(value, dict):
                setattr(c, name, copy.copy(value))
        return c

    small = shallow(model)
    base = shallow(cap.base_model(model))
    base.layers = nn.ModuleList(list(cap.decoder_layers(model))[:num_layers])
    small.model = base
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = num_layers
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:num_layers]
    small.config = base.config = cfg
    if getattr(model, "generation_config", None) is not None:
        small.generation_config = copy.deepcopy(model.generation_config)
    return small


# ---------------------------------------------------------------------------------------------- EAGLE-3


def head_logits_to_target(head: nn.Module, logits: Tensor) -> Tensor:
    """EAGLE-3 / early-exit head logits [..., Vd] -> target-vocabulary logits [..., V] (-inf outside the
    head's draft vocabulary). The only place that maps a head's draft vocabulary to the target's."""
    return head.draft_vocab.scatter_logits(logits)


class Eagle3Drafter:
    """EAGLE-3 head drafting from the target's low/mid/high hidden states (``feature_layers``).

    Rows (training-time-test alignment): head row ``t`` reads the target features of position ``t``
    (or, chained, the head's own output of row ``t - 1``) and the token at ``t + 1``, has RoPE position
    ``t`` and predicts the token at ``t + 2``. The head cache holds the feature rows of committed
    positions ``0..n_feat-1``; a proposal first feeds the pending feature rows, then chains k - 1 rows.
    """

    name = "eagle3"

    def __init__(self, head: nn.Module, cpu_kernels: bool = True):
        self.head = head.eval()
        if cpu_kernels:
            relayout_linears(head)  # same values; MKL's small-M path (see hsd.decode.cpu)
        ids = list(head.config.aux_layer_ids)
        if len(ids) != 3:
            raise ValueError(f"EAGLE-3 head: expected 3 aux layer ids, got {ids}")
        self.feature_layers = tuple(int(i) for i in ids)
        self.reset()

    def reset(self) -> None:
        self.cache = None
        self.n_feat = 0
        self.pending: Tensor | None = None  # features [B, P, 3H] of rows n_feat..n_feat+P-1
        self.chain_inputs: list[tuple[Tensor | None, int]] = []  # (hidden or None = previous output, ctx index)
        self._last = None

    def _new_cache(self) -> KVCache:
        return KVCache()

    def commit(self, tokens: Tensor, features: Tensor | None = None, start: int = 0) -> None:
        if tokens.shape[0] != 1:
            raise ValueError("Eagle3Drafter drafts one row at a time (B = 1)")
        c = tokens.shape[1]
        if self.cache is None or start == 0:
            self.reset()
            self.cache = self._new_cache()
        self.cache.crop(self.n_feat)  # drop chained rows
        need = c - 1  # feature rows 0..c-2 exist once the target has seen every committed token but the root
        if need > self.n_feat:
            if features is None or start > self.n_feat or start + features.shape[1] < need:
                raise ValueError(f"EAGLE-3 drafter: needs target features for positions {self.n_feat}..{need - 1}, "
                                 f"got {0 if features is None else features.shape[1]} from position {start}")
            self.pending = features[:, self.n_feat - start: need - start]
        else:
            self.pending = None
        self.ctx = tokens
        self.chain_inputs = []
        self._last = None

    def extend(self, tokens: Tensor) -> None:
        """The exit stage kept ``tokens`` = last proposal's first a tokens + one other token."""
        if self._last is None:
            raise RuntimeError("extend() without a proposal")
        drafted, hs, first_chain_len = self._last
        n = tokens.shape[1]
        a = n - 1
        if a > drafted.shape[1] or not torch.equal(tokens[:, :a], drafted[:, :a]):
            raise ValueError("extend: the kept tokens must be a prefix of the last draft plus one token")
        base = self.ctx.shape[1]  # index of the first drafted token in ctx
        k = drafted.shape[1]
        # chained rows fed for this proposal: inputs d_1..d_{k-1}; keep those of d_1..d_a
        self.cache.crop(first_chain_len + min(a, k - 1))
        self.ctx = torch.cat([self.ctx, tokens], dim=1)
        if a <= k - 1:
            self.chain_inputs = [(hs[a], base + a)]
        else:  # every draft kept: the row of d_k was never fed
            self.chain_inputs = [(hs[k - 1], base + k - 1), (None, base + k)]
        self._last = None

    def _step(self, tokens: Tensor, *, position: int, features: Tensor | None = None,
              hidden: Tensor | None = None):
        t = tokens.shape[1]
        pos = torch.arange(position, position + t, device=tokens.device)[None]
        out = self.head.forward_step(input_ids=tokens, position_ids=pos, cache=self.cache, features=features,
                                     hidden=hidden)
        self.cache = out.cache
        return out

    def _feed_context(self):
        """Feed what the head has not read yet (committed feature rows, or the rows an exit stage kept);
        returns the last step's output (its last row predicts the first draft token)."""
        ctx = self.ctx
        if self.pending is not None:
            p = self.pending.shape[1]
            out = self._step(ctx[:, self.n_feat + 1: self.n_feat + 1 + p], position=self.n_feat,
                             features=self.pending)
            self.n_feat += p
            self.pending = None
        elif self.chain_inputs:
            out = None
            for hidden, idx in self.chain_inputs:
                h = hidden if hidden is not None else out.hidden[:, -1:]
                out = self._step(ctx[:, idx: idx + 1], position=idx - 1, hidden=h)
            self.chain_inputs = []
        else:
            raise RuntimeError("propose() twice without commit/extend: the drafter has nothing new to read")
        return out

    @torch.no_grad()
    def propose(self, k: int, params: SamplingParams, generator: torch.Generator | None = None) -> Draft:
        ctx = self.ctx
        dev = ctx.device
        if k <= 0:
            return Draft.empty(1, dev)
        out = self._feed_context()
        first_chain_len = self.cache.length
        h = out.hidden[:, -1:]
        logits = out.logits[:, -1]
        base = ctx.shape[1]
        toks, qs, hs = [], [], [h]
        for j in range(k):
            tok, q = draw(head_logits_to_target(self.head, logits), params, generator)
            toks.append(tok)
            qs.append(q)
            if j == k - 1:
                break
            out = self._step(tok[:, None], position=base + j - 1, hidden=h)
            h = out.hidden[:, -1:]
            logits = out.logits[:, -1]
            hs.append(h)
        drafted = torch.stack(toks, 1)
        self._last = (drafted, hs, first_chain_len)
        return Draft.chain(drafted, torch.stack(qs, 1))

    @torch.no_grad()
    def propose_tree(self, spec: TreeSpec, params: SamplingParams,
                     generator: torch.Generator | None = None) -> tuple[Draft, int]:
        """An EAGLE-2-style dynamic tree (:func:`hsd.decode.tree_draft.build_tree`); returns (draft, head
        steps). Each level is one head step over the expanded nodes: node rows attend to the committed rows
        and their own ancestors' rows (tree mask); a node at depth d has RoPE position ``base + d - 1`` and
        reads its parent's output hidden state, exactly as the chain's row would. The tree rows are dropped
        at the next ``commit``, which feeds the accepted path from the target's features."""
        out = self._feed_context()
        self._last = None  # an exit stage cannot extend a tree
        first = self.cache.length
        ctx = self.ctx
        base, dev = ctx.shape[1], ctx.device
        h_root = out.hidden[:, -1:]
        rows: dict[int, int] = {}  # node -> its row in the head cache
        hidden: dict[int, Tensor] = {}  # node -> the head's output at that row [1, 1, H]

        def expand(ids: list[int], nodes) -> Tensor:
            past, m = self.cache.length, len(ids)
            mask = torch.zeros(1, m, past + m, dtype=torch.bool, device=dev)
            mask[:, :, :first] = True
            for j, i in enumerate(ids):
                a = nodes[i].parent
                while a >= 0:
                    mask[0, j, rows[a]] = True
                    a = nodes[a].parent
                mask[0, j, past + j] = True
            toks = torch.tensor([[nodes[i].token for i in ids]], dtype=torch.long, device=dev)
            pos = torch.tensor([[base + nodes[i].depth - 1 for i in ids]], dtype=torch.long, device=dev)
            h = torch.cat([hidden[nodes[i].parent] if nodes[i].parent >= 0 else h_root for i in ids], dim=1)
            step = self.head.forward_step(input_ids=toks, position_ids=pos, cache=self.cache, hidden=h,
                                          attention_mask=mask)
            self.cache = step.cache
            for j, i in enumerate(ids):
                rows[i] = past + j
                hidden[i] = step.hidden[:, j:j + 1]
            return head_logits_to_target(self.head, step.logits[0])

        root = head_logits_to_target(self.head, out.logits[0, -1])
        draft, steps = build_tree(root, expand, spec, params, generator)
        return draft, steps + 1
