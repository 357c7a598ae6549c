"""The speculative decoding loop, read top to bottom.

    prefill the prompt (logits of the last row only; the drafter's features of every row)
    sample the first token                                           <- TTFT
    until EOS or max_new_tokens:
        round: draft -> [exit stage] -> one target pass over root + draft -> verify -> crop caches
        append accepted + next token (cut at EOS / max_new_tokens); tell the drafter what was committed
    (with ``DecodeConfig.tree``: tree_round = draft a tree -> one pass with the tree mask -> verify_tree ->
    keep the accepted path's cache entries)

The "root" is the last committed token: it is appended to the context when sampled but enters the
target (and its cache) only with the next round's pass, together with the draft that follows it.
With ``k = 0`` or :class:`~hsd.decode.drafters.NoDrafter` a round verifies only the root: plain
autoregressive decoding through the same code (this engine's own AR baseline).

Batch size 1 is complete and exact. Tensors keep a batch dimension, but rows that accept different
numbers of tokens need per-row cache lengths, which the loop does not do yet: ``generate`` refuses B > 1
(``generate_many`` runs prompts one after another).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import DecodeConfig
from .drafters import Drafter, NoDrafter
from .exit_stage import ExitStage, lower_layers
from .rowtile import TiledRunner, resolve_row_tile
from .sampling import process, sample
from .stats import DecodeStats, RoundRecord
from .target import KVState, TargetRunner, tree_positions
from .tree_spec import TreeSpec
from .verifier import verify_chain, verify_tree_draft


@dataclass
class DecodeResult:
    """tokens [1, S + n] (prompt + new tokens); new_tokens [1, n]; stats (per-round record, times)."""

    tokens: Tensor
    new_tokens: Tensor
    stats: DecodeStats


@dataclass
class RoundResult:
    """What one round verified: tokens [B, W] (the draft chain, or the exit-stage window), how many were
    accepted, the next token [B], and the drafter features [B, a + 1, F] of the committed positions."""

    tokens: Tensor
    num_accepted: int
    next_token: Tensor
    features: Tensor | None
    record: RoundRecord


@dataclass
class _Run:
    """Mutable state of one ``generate`` call (passed to the round functions)."""

    runner: TargetRunner
    state: KVState
    drafter: Drafter
    config: DecodeConfig
    generator: torch.Generator | None
    feature_layers: tuple[int, ...]
    ctx: Tensor
    remaining: int
    stats: DecodeStats
    clock: Callable[[], float] = time.perf_counter
    times: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timer(self, name: str) -> Iterator[None]:
        t0 = self.clock()
        try:
            yield
        finally:
            self.stats.times[name] += self.clock() - t0


def features_of(captured: dict[int, Tensor], layers: Sequence[int], rows: slice | Tensor = slice(None)) -> Tensor | None:
    """Concatenate the captured hidden states of ``layers`` (in that order) -> [B, T, len(layers) * H]."""
    if not layers:
        return None
    return torch.cat([captured[j][:, rows] for j in layers], dim=-1)


class SpeculativeDecoder:
    """target (a Hugging Face causal LM) + drafter + optional exit stage + :class:`DecodeConfig`.

    ``generate(input_ids)`` decodes one prompt [1, S]. The same object can be reused across prompts and
    configs (``generate(..., config=...)``). The target's values are never changed; with ``cpu_kernels``
    (float32 on the CPU) its linear weights are stored transposed in place (:mod:`hsd.decode.cpu`).

    ``row_tile`` (:mod:`hsd.decode.rowtile`): pad every decoding pass to this many rows, so that a row's
    logits do not depend on how many rows share its pass and greedy speculative output equals this engine's
    plain greedy output bit for bit (with the same tile). "auto": untiled in float32, else the smallest
    multiple of 8 that holds the largest pass of ``config``; "off"; or a number of rows (give one tile to
    every decoder whose outputs are compared: the evaluation CLI does).
    """

    def __init__(self, target: nn.Module, drafter: Drafter | None = None, exit_stage: ExitStage | None = None,
                 config: DecodeConfig | None = None, cpu_kernels: bool = True,
                 stage_clock: Callable[[], float] = time.perf_counter, row_tile: int | str | None = "auto"):
        self.stage_clock = stage_clock  # per-stage timers and pass times (time.process_time on a busy CPU)
        self.target = target
        self.drafter = drafter if drafter is not None else NoDrafter()
        self.exit_stage = exit_stage
        self.config = config or DecodeConfig()
        dtype = next(target.parameters()).dtype
        tile = resolve_row_tile(row_tile, dtype, self.pass_rows(self.config))
        self.runner = (TiledRunner(target, tile, cpu_kernels=cpu_kernels) if tile
                       else TargetRunner(target, cpu_kernels=cpu_kernels))
        n = self.runner.num_layers
        bad = [j for j in getattr(self.drafter, "feature_layers", ()) if not 0 <= int(j) <= n]
        if bad:
            raise ValueError(f"drafter reads target hidden states {bad} but the target has {n} layers (valid "
                             f"indices 0..{n}): was the head trained for another target?")
        if exit_stage is not None and not 1 <= exit_stage.layer < n:
            raise ValueError(f"exit layer {exit_stage.layer} is outside the target's {n} layers")
        reuse = lower_layers(self.drafter)
        if reuse and exit_stage is not None and reuse >= exit_stage.layer:
            raise ValueError(f"exit drafter at layer {reuse} with an exit stage at layer {exit_stage.layer}: the "
                             "drafter's exit must be shallower than the intermediate verifier's (HiSpec: l1 < l2)")

    @property
    def row_tile(self) -> int | None:
        """Rows every decoding pass is padded to (None: untiled)."""
        return getattr(self.runner, "rows", None)

    def pass_rows(self, config: DecodeConfig) -> int:
        """The most rows one target pass of ``config`` carries: root + draft (a chain of k, a tree's nodes,
        or an exit stage's window of up to k + exit_window tokens)."""
        spec = config.tree_spec
        if spec is not None:
            return spec.total_tokens + 1
        return config.k + 1 + (config.exit_window if self.exit_stage is not None else 0)

    def eos_ids(self, config: DecodeConfig) -> set[int]:
        eos = config.eos_token_id
        if eos is None:
            gc = getattr(self.target, "generation_config", None)
            eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

    def _check_prompt(self, input_ids: Tensor, config: DecodeConfig) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [B, S], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[0] != 1:
            raise ValueError(f"input_ids: batch size {input_ids.shape[0]}; the decode loop is exact for B = 1 "
                             "only (use generate_many for several prompts)")
        s = input_ids.shape[1]
        if s == 0:
            raise ValueError("input_ids: empty prompt")
        tile = self.row_tile
        if tile is not None and self.pass_rows(config) > tile:
            raise ValueError(f"row tile {tile}: this configuration makes target passes of {self.pass_rows(config)} "
                             f"rows; build the decoder with row_tile >= {self.pass_rows(config)} (one tile for "
                             "every configuration whose outputs are compared)")
        if tile is not None and config.tree is not None and config.sampling.greedy and not self.runner.tree_exact():
            raise ValueError(f"tree {config.tree!r} at T = 0 with row tile {tile}: this backend's attention rounds a "
                             f"tree row differently from the same row decoded as a chain ({self.runner.dtype}, "
                             f"{self.runner.device}), so greedy trees would not equal plain greedy decoding bit for "
                             "bit; draft chains, or pass row_tile='off' (no exactness claim)")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.runner.vocab_size:
            raise ValueError(f"input_ids: token ids must be in [0, {self.runner.vocab_size})")
        limit = self.runner.max_positions
        if limit and s + config.max_new_tokens > limit:
            raise ValueError(f"prompt of {s} tokens + max_new_tokens {config.max_new_tokens} exceeds the target's "
                             f"context of {limit} positions")

    @torch.no_grad()
    def generate(self, input_ids: Tensor, *, config: DecodeConfig | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 max_rounds: int | None = None, callback: Callable[[_Run], None] | None = None) -> DecodeResult:
        """Decode one prompt ``input_ids`` [1, S] (token ids of the rendered prompt).

        generator / seed: the randomness of drafts, verification and sampling (T > 0). max_rounds: stop
        after this many verification rounds (profiling, tests). callback(run): called after each committed
        round with the loop state (``run.ctx`` [1, S + n] is the text so far; streaming, checks).
        """
        cfg = config or self.config
        self._check_prompt(input_ids, cfg)
        runner, drafter = self.runner, self.drafter
        dev = runner.device
        if generator is None and seed is not None:
            generator = torch.Generator(device=dev).manual_seed(int(seed))
        eos = self.eos_ids(cfg)
        input_ids = input_ids.to(dev).long()
        s = input_ids.shape[1]
        spec = cfg.tree_spec
        if spec is not None:
            self._check_tree(cfg)
        k_max = spec.total_tokens if spec is not None else cfg.k + (cfg.exit_window if self.exit_stage is not None else 0)
        # a tiled runner attends over the whole cache: its size must not depend on the configuration
        state = runner.new_state(1, s + cfg.max_new_tokens + (self.row_tile or k_max) + 4)
        if hasattr(drafter, "bind"):  # drafters that run the target's own layers (ExitDrafter)
            drafter.bind(runner, state)
        feats = tuple(getattr(drafter, "feature_layers", ()))
        stats = DecodeStats(prompt_tokens=s)
        run = _Run(runner, state, drafter, cfg, generator, feats, input_ids, cfg.max_new_tokens, stats,
                   clock=self.stage_clock)
        es = self.exit_stage
        capture = feats + ((es.layer,) if es is not None and es.stateful else ())
        sync = _synchronizer(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        with run.timer("prefill"):
            out = runner.run(state, tokens=input_ids, logit_rows=slice(-1, None), capture=capture)
            first = self._draw(out.logits[:, -1], cfg, generator)
        if es is not None:
            es.reset(out.captured.get(es.layer))
        sync()
        stats.ttft = time.perf_counter() - t0
        new = [int(first[0])]
        run.ctx = torch.cat([input_ids, first[:, None]], dim=1)
        run.remaining = cfg.max_new_tokens - 1
        drafter.commit(run.ctx, features_of(out.captured, feats), 0)
        stats.stopped = "eos" if new[0] in eos else ("length" if run.remaining <= 0 else "")
        while not stats.stopped:
            k = min(cfg.k, run.remaining - 1)
            if spec is not None and run.remaining > 1:
                res = self.tree_round(run, spec)
            elif self.exit_stage is not None and k > 0:
                res = self.exit_stage.round(run, k)
            else:
                res = self.round(run, k)
            emitted = res.tokens[0, : res.num_accepted].tolist() + [int(res.next_token[0])]
            for i, tok in enumerate(emitted):
                if tok in eos:
                    emitted = emitted[: i + 1]
                    stats.stopped = "eos"
                    break
            if len(emitted) >= run.remaining:
                emitted = emitted[: run.remaining]
                stats.stopped = stats.stopped or "length"
            res.record.emitted = len(emitted)
            stats.rounds.append(res.record)
            new += emitted
            run.remaining -= len(emitted)
            base = run.ctx.shape[1] - 1
            run.ctx = torch.cat([run.ctx, torch.tensor([emitted], dtype=torch.long, device=dev)], dim=1)
            if not stats.stopped:
                with run.timer("draft"):
                    drafter.commit(run.ctx, res.features, base)
                if max_rounds is not None and len(stats.rounds) >= max_rounds:
                    stats.stopped = "rounds"
            if callback is not None:
                callback(run)
        sync()
        stats.wall = time.perf_counter() - t0
        stats.cpu = time.process_time() - c0
        stats.new_tokens = len(new)
        stats.target_calls = len(stats.rounds)
        new_t = torch.tensor([new], dtype=torch.long, device=dev)
        return DecodeResult(tokens=torch.cat([input_ids, new_t], dim=1), new_tokens=new_t, stats=stats)

    def generate_many(self, prompts: Sequence[Tensor], **kwargs) -> list[DecodeResult]:
        """One ``generate`` per prompt [1, S_i] (rows one after another)."""
        return [self.generate(p, **kwargs) for p in prompts]

    @staticmethod
    def _draw(logits: Tensor, cfg: DecodeConfig, generator: torch.Generator | None) -> Tensor:
        p = process(logits, cfg.sampling)
        return p.argmax(-1) if cfg.sampling.greedy else sample(p, generator)

    def _check_tree(self, cfg: DecodeConfig) -> None:
        if self.exit_stage is not None:
            raise ValueError(f"tree {cfg.tree!r} with an exit stage: the exit stage verifies chains only; "
                             "drop the exit head or draft a chain (tree=None)")
        if not hasattr(self.drafter, "propose_tree"):
            raise ValueError(f"tree {cfg.tree!r}: the {self.drafter.name!r} drafter drafts chains only; tree "
                             "drafting needs an EAGLE-3 head (Eagle3Drafter)")

    def tree_round(self, run: _Run, spec: TreeSpec) -> RoundResult:
        """draft a tree -> one target pass over [root, tree] (tree mask, positions = prefix + depth) ->
        verify_tree -> keep the accepted path's KV entries in the cache, nothing else."""
        cfg, state = run.config, run.state
        with run.timer("draft"):
            draft, steps = run.drafter.propose_tree(spec, cfg.sampling, run.generator)
        run.stats.draft_steps += steps
        n = draft.size
        base = state.length()
        x = torch.cat([run.ctx[:, -1:], draft.tokens], dim=1)
        parents = torch.cat([draft.parents.new_full((1, 1), -1), draft.parents + 1], dim=1)  # root = row 0
        with run.timer("target"):
            t0 = run.clock()
            out = run.runner.run(state, tokens=x, parents=parents, logit_rows=slice(None), capture=run.feature_layers)
            run.stats.passes[x.shape[1]].append(run.clock() - t0)
        with run.timer("verify"):
            if n == 0:
                a, y = verify_chain(draft.tokens, None, out.logits, cfg.sampling, cfg.verify_method, cfg.backend,
                                    run.generator)
                path = draft.tokens[0, :0]
            else:
                res = verify_tree_draft(draft.tokens, draft.parents, draft.q, out.logits, cfg.sampling,
                                        cfg.tree_method, cfg.backend, run.generator)
                path = res.path[0, : int(res.num_accepted[0])]
                y = res.next_token
        state.keep(base + 1, path)
        rows = torch.cat([path.new_zeros(1), path + 1])
        feats = features_of(out.captured, run.feature_layers, rows)
        depth = int(tree_positions(draft.parents).max()) + 1 if n else 0  # longest drafted path
        return RoundResult(tokens=draft.tokens[:, path], num_accepted=int(path.numel()), next_token=y,
                           features=feats, record=RoundRecord(drafted=depth, accepted=int(path.numel()), emitted=0,
                                                              nodes=n))

    def round(self, run: _Run, k: int) -> RoundResult:
        """draft -> one target pass over [root, draft] -> verify -> crop the target cache."""
        cfg, state = run.config, run.state
        base = state.length()  # before drafting: an exit drafter runs layers < l ahead
        with run.timer("draft"):
            draft = run.drafter.propose(k, cfg.sampling, run.generator) if k > 0 else None
        if draft is None or draft.size == 0:
            tokens = run.ctx[:, :0]
            q = None
        else:
            tokens, q = draft.tokens, draft.q
            if not draft.is_chain:
                raise ValueError("a drafter returned a tree from propose(); trees are drafted with "
                                 "DecodeConfig(tree=...), which calls propose_tree and verify_tree")
            run.stats.draft_steps += draft.size if q is not None else 0
        x = torch.cat([run.ctx[:, -1:], tokens], dim=1)
        es = self.exit_stage if self.exit_stage is not None and self.exit_stage.stateful else None
        capture = run.feature_layers + ((es.layer,) if es is not None else ())
        reuse = lower_layers(run.drafter) if tokens.shape[1] else 0
        with run.timer("target"):
            t0 = run.clock()
            if reuse:  # early-exit drafts: layers < l hold [root, d_1..d_{k-1}]; run them over d_k only
                h = run.drafter.lower_rows()
                out = run.runner.run(state, hidden=h, start=reuse, logit_rows=slice(None), capture=capture)
            else:
                out = run.runner.run(state, tokens=x, logit_rows=slice(None), capture=capture)
            run.stats.passes[x.shape[1]].append(run.clock() - t0)
        with run.timer("verify"):
            a, y = verify_chain(tokens, q, out.logits, cfg.sampling, cfg.verify_method, cfg.backend, run.generator)
            a = int(a[0])
        state.crop(base + 1 + a)
        if es is not None:  # a round without the exit stage (k = 0): queue the committed h_l for the attn head
            es.crop(base + 1 + a, out.captured[es.layer], base)
        feats = features_of(out.captured, run.feature_layers, slice(0, a + 1))
        return RoundResult(tokens=tokens, num_accepted=a, next_token=y, features=feats,
                           record=RoundRecord(drafted=tokens.shape[1], accepted=a, emitted=0))


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None
