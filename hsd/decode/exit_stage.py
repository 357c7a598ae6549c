"""Exit stage: an early-exit head at target layer l pre-verifies drafts toward p_l (HiSpec's intermediate
verifier), and the full target then verifies the kept window with p_l as the proposal law.

One window (``ExitStage.round``), batch size 1::

    repeat (stage-1 rounds) until the window holds >= exit_window tokens:
        draft k tokens d (rows q) after the window so far
        layers 1..l over [w, d_1..d_k] (w: the root, then the last kept token)   -> h_l, KV of layers <= l
        p_l = process(exit_head(h_l))  (the same processing as target and drafter)
        stage-1 verification of d against p_l, q  -> a accepted, z           (rule A: lossless toward p_l)
        keep [d_1..d_a, z]; crop layers <= l (and an attn head's cache) to the kept tokens
    layers 1..l over the last z (it never went through them), then layers l+1..L over the buffered h_l of
    [root, window] (no recomputation of layers <= l)                          -> target logits
    final verification of the window with proposal rows p_l (NOT the drafter's q: after stage 1 every
    window token is an exact autoregressive sample of p_l, whatever the drafter proposed), commit, crop.

Why p_l: stage 1 is a lossless verifier toward p_l, so the stream of kept tokens has exactly the law of
sampling p_l autoregressively. The window length depends on stage-1 events; token-wise verification is
lossless for that per position, and exact enumeration (tests/decode) shows block verification and HSD are
too. Verifying with q instead is the classic mistake (tested as a planted variant that must fail).

Caches: while stage 1 runs, layers <= l hold more positions than layers > l (two frontiers); the target
runner keeps one length per layer. An ``attn`` exit head has its own KV cache over the layers-<=l
frontier; the last kept token of a window is only fed to it with the next window (``pending``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from hsd.models.early_exit import check_exit_layer

from .cpu import relayout_linears
from .drafters import head_logits_to_target
from .sampling import process
from .verifier import verify_chain

if TYPE_CHECKING:  # pragma: no cover
    from .engine import RoundResult, _Run


def lower_layers(drafter) -> int:
    """How many bottom target layers a drafter has already run over its drafts (an exit drafter: its exit
    layer l, whose layers-<l KV entries and h_l rows the verification reuses); 0 for every other drafter."""
    return int(getattr(drafter, "reuses_layers", 0) or 0)


def window_proposal(p_l_rows: Tensor, draft_q_rows: Tensor | None) -> Tensor:
    """The proposal law of the window the final verifier sees: the exit head's processed rows p_l.

    ``draft_q_rows`` (what the drafter sampled from) is passed only so that a test can plant the wrong
    law here and show the law test fails; it is not the law of the window after stage 1.
    """
    return p_l_rows


class HeadFeed:
    """What a stateful exit head (``attn``, ``layers``: its own KV cache) has read of the layers-<=l frontier.

    ``fed``: positions 0..fed-1 are in the head's cache; ``pending`` [B, P, H]: h_l rows of positions
    fed..fed+P-1 that it has not read yet (the last token of a window, which only went through layers <= l
    with the final pass, or the prompt). Position-wise heads keep nothing. Used by the exit stage and the
    exit drafter alike.
    """

    def __init__(self, head: nn.Module):
        self.head = head
        self.stateful = bool(head.stateful)
        self.reset()

    def reset(self, prompt_h: Tensor | None = None) -> None:
        """New prompt; ``prompt_h`` [B, S, H]: h_l of the prompt rows (a stateful head reads them first)."""
        self.cache = None
        self.fed = 0
        self.pending: Tensor | None = prompt_h if self.stateful else None

    def logits(self, h_l: Tensor, start: int) -> Tensor:
        """h_l [B, T, H] of positions start..start+T-1 -> target-vocabulary logits [B, T, V] of p_l."""
        t = h_l.shape[1]
        if not self.stateful:
            out = self.head.step(hidden_states=h_l)
            return head_logits_to_target(self.head, out.logits)
        rows = h_l if self.pending is None else torch.cat([self.pending, h_l], dim=1)
        if self.fed + rows.shape[1] != start + t:
            raise RuntimeError(f"exit head cache out of step: fed {self.fed} + {rows.shape[1]} rows != {start + t}")
        pos = torch.arange(self.fed, start + t, device=h_l.device)[None]
        out = self.head.step(hidden_states=rows, position_ids=pos, cache=self.cache)
        self.cache = out.cache
        self.fed = start + t
        self.pending = None
        return head_logits_to_target(self.head, out.logits[:, -t:])

    def crop(self, n: int, h_rows: Tensor | None = None, h_start: int = 0) -> None:
        """Committed/kept positions end at ``n``; ``h_rows`` [B, R, H] are h_l of positions h_start.. so that
        rows the head has not seen yet can be fed with the next pass."""
        if not self.stateful:
            return
        if self.fed > n:
            self.cache.crop(n)
            self.fed = n
            self.pending = None
        have = self.fed + (0 if self.pending is None else self.pending.shape[1])
        if have > n:
            self.pending = self.pending[:, : n - self.fed] if n > self.fed else None
        elif have < n:
            if h_rows is None or h_start > have or h_start + h_rows.shape[1] < n:
                raise RuntimeError("exit head: missing h_l rows for positions it has not seen")
            new = h_rows[:, have - h_start: n - h_start]
            self.pending = new if self.pending is None else torch.cat([self.pending, new], dim=1)


class ExitStage:
    """Wraps an :class:`~hsd.models.early_exit.EarlyExitHead` attached to the target."""

    def __init__(self, head: nn.Module, num_target_layers: int, cpu_kernels: bool = True):
        self.head = head.eval()
        if cpu_kernels:
            relayout_linears(head)  # the body's linears; the LM head is the target's (see hsd.decode.cpu)
        self.layer = check_exit_layer(int(head.config.exit_layer), num_target_layers)
        self.feed = HeadFeed(self.head)
        self.stateful = self.feed.stateful  # attn / layers heads keep a KV cache over the layers-<=l frontier

    # the head's cache bookkeeping (HeadFeed), under the names the engine and the tests read
    cache = property(lambda self: self.feed.cache)
    fed = property(lambda self: self.feed.fed)
    pending = property(lambda self: self.feed.pending)

    def reset(self, prompt_h: Tensor | None = None) -> None:
        self.feed.reset(prompt_h)

    def head_logits(self, h_l: Tensor, start: int) -> Tensor:
        return self.feed.logits(h_l, start)

    def crop(self, n: int, h_rows: Tensor | None = None, h_start: int = 0) -> None:
        self.feed.crop(n, h_rows, h_start)

    @torch.no_grad()
    def round(self, run: _Run, k: int) -> RoundResult:
        from .engine import RoundResult
        from .stats import RoundRecord

        runner, state, cfg = run.runner, run.state, run.config
        params, layer = cfg.sampling, self.layer
        method = cfg.verify_method
        lower = range(0, layer)
        base = state.length()
        reuse = lower_layers(run.drafter)  # an exit drafter already ran layers < reuse over its drafts
        if reuse >= layer:
            raise ValueError(f"exit drafter at layer {reuse} with an exit stage at layer {layer}: the drafter's "
                             "exit must be shallower than the intermediate verifier's")
        low = tuple(j for j in run.feature_layers if j <= layer)
        high = tuple(j for j in run.feature_layers if j > layer)
        first = run.ctx[:, -1:]
        budget = max(1, run.remaining - 1)  # window tokens worth verifying
        window, props, qrows, h_rows, records = [], [], [], [], []
        low_rows: dict[int, list[Tensor]] = {j: [] for j in low}
        size = 0
        while True:
            kk = min(k, budget - size)
            with run.timer("draft"):
                draft = run.drafter.propose(kk, params, run.generator)
            run.stats.draft_steps += draft.size if draft.q is not None else 0
            x = torch.cat([first, draft.tokens], dim=1)
            with run.timer("stage1"):
                start = state.length(range(reuse, layer))
                if reuse:  # layers < reuse hold [first, d_1..d_{k-1}]; only d_k still needs them
                    o = runner.run(state, hidden=run.drafter.lower_rows(), start=reuse, end=layer, capture=low)
                else:
                    o = runner.run(state, tokens=x, end=layer, capture=low)
                logits_l = self.head_logits(o.hidden, start)
                a, z = verify_chain(draft.tokens, draft.q, logits_l, params, method, cfg.backend, run.generator)
                a = int(a[0])
                state.crop(start + 1 + a, lower)
                self.crop(start + 1 + a)
            kept = torch.cat([draft.tokens[:, :a], z[:, None]], dim=1)
            p_l = process(logits_l[:, : a + 1], params)
            window.append(kept)
            props.append(p_l)
            if draft.q is not None:
                q = draft.q[:, :a] if a == draft.size else draft.q[:, : a + 1]
                qrows.append(q if a < draft.size else torch.cat([q, p_l[:, a:]], dim=1))
            h_rows.append(o.hidden[:, : a + 1])
            for j in low:
                low_rows[j].append(o.captured[j][:, : a + 1])
            records.append((draft.size, a))
            size += a + 1
            first = z[:, None]
            if size >= min(cfg.exit_window, budget):
                break
            run.drafter.extend(kept)
        with run.timer("stage1"):  # the window's last token through layers <= l
            o = runner.run(state, tokens=first, end=layer, capture=low)
        h_rows.append(o.hidden)
        for j in low:
            low_rows[j].append(o.captured[j])
        h = torch.cat(h_rows, dim=1)  # [B, W + 1, H]: root + window
        win = torch.cat(window, dim=1)  # [B, W]
        with run.timer("target"):
            t0 = run.clock()
            of = runner.run(state, hidden=h, start=layer, logit_rows=slice(None), capture=high)
            run.stats.passes[h.shape[1]].append(run.clock() - t0)
        proposal = window_proposal(torch.cat(props, dim=1),
                                   torch.cat(qrows, dim=1) if len(qrows) == len(props) else None)
        with run.timer("verify"):
            a2, y = verify_chain(win, proposal, of.logits, params, method, cfg.backend, run.generator)
            a2 = int(a2[0])
        keep = base + 1 + a2
        state.crop(keep)
        self.crop(keep, h, base)
        feats = None
        if run.feature_layers:
            parts = {j: torch.cat(low_rows[j], dim=1) for j in low}
            parts.update(of.captured)
            feats = torch.cat([parts[j][:, : a2 + 1] for j in run.feature_layers], dim=-1)
        record = RoundRecord(drafted=win.shape[1], accepted=a2, emitted=0, stage1=records)
        return RoundResult(tokens=win, num_accepted=a2, next_token=y, features=feats, record=record)
