"""Early-exit drafting: the target's own layers 1..l plus an exit head draft; no extra model in memory.

``ExitDrafter(head)`` drafts with an :class:`~hsd.models.early_exit.EarlyExitHead` at layer ``l`` of the
target it is attached to (LayerSkip / Kangaroo self-speculation with a frozen trunk; ``--drafter exit:L``
in the decode script). One draft step, batch size 1::

    layers 1..l over the token not yet through them (the root, then each new draft) -> h_l, KV of layers < l
    p_l = process(exit_head(h_l))  (the run's temperature / top-k / top-p, as for every drafter)
    d ~ p_l  (argmax at T = 0); the proposal row q = p_l

The drafter writes into the *target's* cache (layers < l) through the engine's runner: while it drafts,
layers < l run ahead of layers >= l (the runner keeps one length per layer). The verification then reuses
that work: :meth:`lower_rows` runs layers 1..l over the last draft only and returns the buffered h_l rows
of [root, d_1..d_k], so the target pass runs layers l+1..L from them (no recomputation of layers <= l);
after verification the engine crops every layer to the committed length, so the rejected drafts' KV
entries are dropped everywhere. Since the rows q are exactly the laws the drafts were drawn from, any
verifier is lossless with them (T = 0: the output equals ``generate``; tests/decode).

With an exit stage at a deeper layer l2 (HiSpec's three levels: exit drafter at l1 -> exit verifier at
l2 -> target) stage 1 runs layers l1+1..l2 from the drafter's rows the same way.

A stateful head (``attn``, ``layers``) keeps its own KV cache over the layers-<=l frontier
(:class:`~hsd.decode.exit_stage.HeadFeed`); the drafter's ``feature_layers`` is ``(l,)``, so the engine hands
it the h_l rows of committed positions it has not read (the prompt, a window's last token).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from hsd.models.early_exit import check_exit_layer

from .cpu import relayout_linears
from .draft import Draft
from .drafters import draw
from .exit_stage import HeadFeed
from .sampling import SamplingParams
from .target import KVState, TargetRunner


class ExitDrafter:
    """Draft from target layers 1..l + an early-exit head (see the module docstring).

    The engine calls :meth:`bind` with its runner and cache at the start of every ``generate``; the head
    must be attached to the engine's target (the drafter runs that target's layers).
    """

    name = "exit"

    def __init__(self, head: nn.Module, cpu_kernels: bool = True):
        self.head = head.eval()
        if cpu_kernels:
            relayout_linears(head)  # the body's linears (same values); the LM head is the target's
        self.layer = int(head.config.exit_layer)
        self.reuses_layers = self.layer  # the verification reuses layers < l of the drafts
        self.feature_layers = (self.layer,)
        self.feed = HeadFeed(self.head)
        self.runner: TargetRunner | None = None
        self.state: KVState | None = None
        self._rows: Tensor | None = None  # h_l rows [B, R, H] of positions _row_start.. computed this round
        self._row_start = 0
        self._drafted: Tensor | None = None
        self._tokens: list[int] = []  # token at each position whose h_l the head has read or queued

    @property
    def label(self) -> str:
        return f"exit:{self.layer}"

    def bind(self, runner: TargetRunner, state: KVState) -> None:
        """The engine's target runner and the cache of the ``generate`` call now starting."""
        if self.head.target is not runner.model:
            raise ValueError(f"exit drafter: its head (layer {self.layer}) is attached to another model than the "
                             "decoder's target; attach it to the target it drafts from")
        check_exit_layer(self.layer, runner.num_layers)
        self.runner, self.state = runner, state

    # -- drafter protocol ---------------------------------------------------------------------------------
    def commit(self, tokens: Tensor, features: Tensor | None = None, start: int = 0) -> None:
        """``features`` [B, P, H]: h_l of committed positions start..start+P-1 (prefill: the prompt)."""
        if tokens.shape[0] != 1:
            raise ValueError("ExitDrafter drafts one row at a time (B = 1)")
        if self.state is None:
            raise RuntimeError("exit drafter: not bound to a decoder (SpeculativeDecoder.generate binds it)")
        self.ctx = tokens
        if start == 0:
            self.feed.reset(features)
            self._tokens = tokens[0, : 0 if features is None else features.shape[1]].tolist()
        else:
            self._sync(*self._rows_with(features, start))
        self._rows, self._drafted = None, None

    def extend(self, tokens: Tensor) -> None:
        """An exit stage kept ``tokens`` = the first n - 1 drafts + one other token (not through layers < l)."""
        if self._drafted is None:
            raise RuntimeError("extend() without a proposal")
        self.ctx = torch.cat([self.ctx, tokens], dim=1)
        self._sync(self._rows, self._row_start)
        self._drafted = None

    def _sync(self, rows: Tensor | None, start: int) -> None:
        """Make the head's cache hold exactly the context positions that are through layers < l: drop the
        entries of drafts the context does not contain (a rejected draft's position may hold another token
        now), then queue the rows it has not read (``rows`` [B, R, H] = h_l of positions start..)."""
        n = self._lower_length()
        ctx = self.ctx[0, :n].tolist()
        same = 0
        for a, b in zip(self._tokens, ctx):
            if a != b:
                break
            same += 1
        self.feed.crop(min(same, n))
        self.feed.crop(n, rows, start)
        self._tokens = ctx

    def _lower_length(self) -> int:
        return self.state.length(range(self.layer))

    def _rows_with(self, features: Tensor | None, start: int) -> tuple[Tensor | None, int]:
        """The h_l rows to queue for the head: the engine's features, else this round's own rows."""
        if features is not None:
            return features[..., -self.runner.hidden_size:], start
        return self._rows, self._row_start

    @torch.no_grad()
    def propose(self, k: int, params: SamplingParams, generator: torch.Generator | None = None) -> Draft:
        dev = self.ctx.device
        if k <= 0:
            return Draft.empty(1, dev)
        runner, state, layer = self.runner, self.state, self.layer
        m = self._lower_length()
        pending = self.ctx[:, m:]  # tokens not yet through layers < l (the root; a kept correction)
        if pending.shape[1] == 0:
            raise RuntimeError("exit drafter: every context token is already through layers < l")
        rows, toks, qs = [], [], []
        x, pos = pending, m
        for _ in range(k):
            o = runner.run(state, tokens=x, end=layer)
            rows.append(o.hidden)
            logits = self.feed.logits(o.hidden, pos)
            self._tokens = self._tokens[:pos] + x[0].tolist()
            tok, q = draw(logits[:, -1], params, generator)
            toks.append(tok)
            qs.append(q)
            pos += x.shape[1]
            x = tok[:, None]
        self._rows, self._row_start = torch.cat(rows, dim=1), m
        self._drafted = torch.stack(toks, 1)
        return Draft.chain(self._drafted, torch.stack(qs, 1))

    def lower_rows(self) -> Tensor:
        """Run layers 1..l over the last draft (the only one not through them yet) and return the h_l rows
        [B, k + 1, H] of [root, d_1..d_k]: the input of layer l for the verification pass."""
        if self._drafted is None:
            raise RuntimeError("lower_rows() without a proposal")
        o = self.runner.run(self.state, tokens=self._drafted[:, -1:], end=self.layer)
        self._rows = torch.cat([self._rows, o.hidden], dim=1)
        k = self._drafted.shape[1]
        return self._rows[:, -(k + 1):]
