"""Run a grid of decoding configurations and the Hugging Face baselines over a prompt set, in one process.

Each configuration (:class:`RunSpec`) decodes every prompt (every user turn of multi-turn prompts) with
the same seeds; the result keeps per-prompt :class:`~hsd.decode.stats.DecodeStats` and the new tokens.
:func:`report_run` turns one configuration's results into the JSON entry (pooled, per-source, cost
ratios, speed-ups, exact match at T = 0) that ``scripts/decode.py`` prints, saves and plots.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .baselines import hf_generate, hf_settings
from .config import DecodeConfig
from .drafters import Eagle3Drafter, ModelDrafter, NoDrafter, PromptLookupDrafter
from .engine import SpeculativeDecoder
from .exit_draft import ExitDrafter
from .exit_stage import ExitStage
from .prompts import Prompt, render
from .stats import DecodeStats, summarize
from .tree_spec import TreeSpec

ENGINE_DRAFTERS = ("none", "eagle3", "model", "lookup", "exit:L")


def parse_exit_drafter(name: str) -> tuple[int, int | None] | None:
    """``"exit:L"`` or ``"exit:L:K"`` (early-exit drafting from target layer L, K drafts per round instead of
    the run's --k) -> (L, K or None); None for every other drafter name. ValueError naming the problem for a
    malformed ``exit:`` spec."""
    if not str(name).startswith("exit:"):
        return None
    parts = str(name)[5:].split(":")
    if len(parts) > 2 or not all(x.isdigit() and int(x) >= 1 for x in parts):
        raise ValueError(f"drafter {name!r}: expected exit:L or exit:L:K with L, K >= 1 (the exit layer to draft "
                         "from, e.g. exit:4, and optionally its own draft length, e.g. exit:4:2)")
    return int(parts[0]), (int(parts[1]) if len(parts) == 2 else None)


def exit_drafter_layer(name: str) -> int | None:
    """The exit layer of an ``exit:L[:K]`` drafter name, None for every other drafter."""
    parsed = parse_exit_drafter(name)
    return None if parsed is None else parsed[0]


HF_KINDS = ("hf_generate", "hf_lookup", "hf_assisted")


@dataclass
class RunSpec:
    """One configuration. kind: "engine" or an HF baseline; drafter (engine): none | eagle3 | model |
    lookup | exit:L (target layers 1..L + the exit head of layer L); exit_layer: None = no exit stage."""

    name: str
    kind: str
    temperature: float
    drafter: str = "none"
    k: int = 0
    method: str = "auto"
    backend: str = "torch"
    exit_layer: int | None = None
    exit_window: int = 1
    top_k: int = 0
    top_p: float = 1.0
    tree: str | None = None  # "TOPK:DEPTH:TOTAL": a draft tree (k = its depth); None = a chain of k

    def decode_config(self, max_new_tokens: int) -> DecodeConfig:
        return DecodeConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, k=self.k,
                            method=self.method, backend=self.backend, exit_window=self.exit_window,
                            max_new_tokens=max_new_tokens, tree=self.tree)


def _t(temp: float) -> str:
    return f"T{temp:g}"


def build_grid(temperatures: list[float], ks: list[int], methods: list[str], backends: list[str], *,
               head: bool, exit_layers: list[int], draft_model: bool, lookup: bool = True,
               hf: bool = True, exit_window: int = 1, top_k: int = 0, top_p: float = 1.0,
               baseline_ks: list[int] | None = None, model_drafter: bool = True,
               trees: list[str] = (), chains: bool = True, ar: bool = True,
               exit_drafters: list[int | tuple[int, int | None]] = ()) -> list[RunSpec]:
    """The default grid: per temperature, HF generate, this engine without a drafter, then per K the HF
    prompt-lookup / assisted baselines and every EAGLE-3 method x backend, with and without each exit
    layer, then every draft tree ("TOPK:DEPTH:TOTAL") x method x backend (trees have no exit stage; at
    T > 0 "tokenwise" verifies a tree by recursive rejection sampling, "blockwise"/"hsd" by the weighted
    tree verifier). ``chains=False``: no engine chains (the baselines of ``baseline_ks`` still run).
    ``ar=False``: no plain decoding by this engine (τ-only studies; no speed-up column). At T = 0
    all verifiers see one-hot rows and agree (tested), so only "greedy" runs there. ``exit_drafters``: exit
    layers L1 to draft from (``exit:L1``; ``(L1, K)``: at draft length K instead of ``ks``), each alone and
    under every deeper exit stage L2 > L1 of ``exit_layers`` (HiSpec's three levels)."""
    specs: list[RunSpec] = []
    kw = dict(top_k=top_k, top_p=top_p)
    for temp in temperatures:
        tn = _t(temp)
        if hf:
            specs.append(RunSpec(f"{tn}/hf_generate", "hf_generate", temp, **kw))
        if ar:
            specs.append(RunSpec(f"{tn}/ar", "engine", temp, "none", 0, **kw))
        meths = ["greedy"] if temp == 0 else [m for m in methods if m != "greedy"]
        for k in sorted(set(ks) | set(baseline_ks or [])):
            if hf and k in (baseline_ks or ks):
                specs.append(RunSpec(f"{tn}/hf_lookup-k{k}", "hf_lookup", temp, k=k, **kw))
                if draft_model:
                    specs.append(RunSpec(f"{tn}/hf_assisted-k{k}", "hf_assisted", temp, k=k, **kw))
            if k not in ks or not chains:
                continue
            if lookup:
                specs.append(RunSpec(f"{tn}/lookup-k{k}-{meths[0]}", "engine", temp, "lookup", k, meths[0], **kw))
            if draft_model and model_drafter:
                specs.append(RunSpec(f"{tn}/model-k{k}-{meths[0]}", "engine", temp, "model", k, meths[0], **kw))
            for l1, own in (x if isinstance(x, tuple) else (x, None) for x in exit_drafters):
                if own is not None and k != min(ks):
                    continue  # a drafter with its own K runs once, in the first K's slot
                for m in meths:
                    for b in backends:
                        sfx = f"-{b}" if b != "torch" else ""
                        kd = own or k
                        name = f"{tn}/exit{l1}-k{kd}-{m}{sfx}"
                        specs.append(RunSpec(name, "engine", temp, f"exit:{l1}", kd, m, b, **kw))
                        for layer in (x for x in exit_layers if x > l1):
                            specs.append(RunSpec(f"{name}+exit{layer}", "engine", temp, f"exit:{l1}", kd, m, b, layer,
                                                 exit_window, **kw))
            if head:
                for m in meths:
                    for b in backends:
                        sfx = f"-{b}" if b != "torch" else ""
                        specs.append(RunSpec(f"{tn}/eagle3-k{k}-{m}{sfx}", "engine", temp, "eagle3", k, m, b, **kw))
                        for layer in exit_layers:
                            specs.append(RunSpec(f"{tn}/eagle3-k{k}-{m}{sfx}+exit{layer}", "engine", temp, "eagle3",
                                                 k, m, b, layer, exit_window, **kw))
        if head:
            for tree in trees:
                spec = TreeSpec.parse(tree)
                seen = set()
                for m in meths:
                    tm = DecodeConfig(temperature=temp, method=m, tree=tree).tree_method
                    for b in backends:
                        sfx = f"-{b}" if b != "torch" else ""
                        if (tm, b) in seen:
                            continue
                        seen.add((tm, b))
                        specs.append(RunSpec(f"{tn}/eagle3-{spec.name}-{tm}{sfx}", "engine", temp, "eagle3",
                                             spec.depth, m, b, tree=tree, **kw))
    return sorted(specs, key=lambda sp: priority(sp, min(ks) if ks else 0))


def priority(spec: RunSpec, k_first: int) -> int:
    """Run order, so that an interrupted run has the most telling results (a stable sort keeps the grid's
    order inside a tier): 0 plain baselines of every temperature (every speed-up needs them), 1 the head at
    the first K, 2 other engine drafters at the first K, 3 HF prompt lookup / assisted, 4 the rest."""
    if spec.kind == "hf_generate" or (spec.kind == "engine" and spec.drafter == "none"):
        return 0
    if spec.tree is not None:
        return 1
    if spec.kind == "engine" and spec.drafter.startswith("exit:"):
        return 1  # exit drafters run at their own K (exit:L:K)
    if spec.kind == "engine" and spec.k == k_first:
        return 1 if spec.drafter == "eagle3" else 2
    return 3 if spec.kind in HF_KINDS else 4


@dataclass
class PromptResult:
    id: str
    group: str
    turns: list[list[int]]          # new token ids per user turn
    stats: list[DecodeStats]        # per turn
    texts: list[str] = field(default_factory=list)


@dataclass
class Models:
    """What the evaluation decodes with. ``stock_target`` (optional): an untouched copy of the target for
    the Hugging Face baselines (the engine stores linear weights transposed on the CPU, which also
    changes HF's speed); ``draft_model``: the HF draft model (``draft_note`` says what it is)."""

    target: nn.Module
    tokenizer: Any
    head: nn.Module | None = None
    exit_heads: dict[int, nn.Module] = field(default_factory=dict)
    draft_model: nn.Module | None = None
    draft_note: str = ""
    stock_target: nn.Module | None = None
    stock_draft: nn.Module | None = None


class Evaluator:
    def __init__(self, models: Models, max_new_tokens: int = 128, seed: int = 0, cpu_kernels: bool = True,
                 stage_clock: Callable[[], float] = time.perf_counter, row_tile: int | None = None,
                 untiled_greedy_trees: bool = False):
        self.m = models
        self.row_tile = row_tile  # one tile for every engine configuration (hsd.decode.rowtile): None = untiled
        # greedy trees where the gap probe says the tile cannot make them exact: run untiled (flagged in the entry)
        self.untiled_greedy_trees = untiled_greedy_trees
        self.stage_clock = stage_clock
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.cpu_kernels = cpu_kernels
        self._decoders: dict[tuple, SpeculativeDecoder] = {}
        tok = models.tokenizer
        gc = getattr(models.target, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        if eos is None:
            eos = tok.eos_token_id
        self.eos = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])} if eos is not None else set()
        self.pad_id = tok.pad_token_id

    def tile_of(self, spec: RunSpec) -> int | None:
        """The row tile a configuration decodes with (None: untiled)."""
        if self.untiled_greedy_trees and spec.tree is not None and spec.temperature == 0:
            return None
        return self.row_tile

    def decoder(self, spec: RunSpec) -> SpeculativeDecoder:
        key = (spec.drafter, spec.exit_layer, self.tile_of(spec))
        if key not in self._decoders:
            m, ck = self.m, self.cpu_kernels
            if spec.drafter == "eagle3":
                if m.head is None:
                    raise ValueError("an eagle3 configuration needs --head")
                drafter = Eagle3Drafter(m.head, cpu_kernels=ck)
            elif spec.drafter == "model":
                if m.draft_model is None:
                    raise ValueError("a model-drafter configuration needs --draft-model")
                drafter = ModelDrafter(m.draft_model, int(m.target.config.vocab_size), cpu_kernels=ck)
            elif spec.drafter == "lookup":
                drafter = PromptLookupDrafter()
            elif exit_drafter_layer(spec.drafter) is not None:
                layer = exit_drafter_layer(spec.drafter)
                if layer not in m.exit_heads:
                    raise ValueError(f"drafter {spec.drafter}: no exit head for layer {layer} (have {sorted(m.exit_heads)})")
                drafter = ExitDrafter(m.exit_heads[layer], cpu_kernels=ck)
            else:
                drafter = NoDrafter()
            es = None
            if spec.exit_layer is not None:
                if spec.exit_layer not in m.exit_heads:
                    raise ValueError(f"no exit head for layer {spec.exit_layer} (have {sorted(m.exit_heads)})")
                es = ExitStage(m.exit_heads[spec.exit_layer], int(m.target.config.num_hidden_layers), cpu_kernels=ck)
            self._decoders[key] = SpeculativeDecoder(m.target, drafter, es, cpu_kernels=ck,
                                                     stage_clock=self.stage_clock, row_tile=self.tile_of(spec) or "off")
        return self._decoders[key]

    def _one(self, spec: RunSpec, ids: list[int], seed: int, max_new: int | None = None) -> tuple[list[int], DecodeStats]:
        cfg = spec.decode_config(max_new or self.max_new_tokens)
        x = torch.tensor([ids], dtype=torch.long)
        if spec.kind == "engine":
            cfg.eos_token_id = sorted(self.eos)
            res = self.decoder(spec).generate(x, config=cfg, seed=seed)
            return res.new_tokens[0].tolist(), res.stats
        model = self.m.stock_target if self.m.stock_target is not None else self.m.target
        x = x.to(next(model.parameters()).device)
        if spec.kind == "hf_generate":
            return hf_generate(model, x, cfg, self.eos, pad_id=self.pad_id, seed=seed)
        if spec.kind == "hf_lookup":
            return hf_generate(model, x, cfg, self.eos, pad_id=self.pad_id, lookup=spec.k, seed=seed)
        if spec.kind == "hf_assisted":
            draft = self.m.stock_draft if self.m.stock_draft is not None else self.m.draft_model
            if draft is None:
                raise ValueError("hf_assisted needs a draft model")
            return hf_generate(model, x, cfg, self.eos, pad_id=self.pad_id, assistant=draft,
                               k=spec.k, seed=seed)
        raise ValueError(f"unknown run kind {spec.kind!r}")

    def run(self, spec: RunSpec, prompts: list[Prompt], on_prompt: Callable[[], None] | None = None,
            warmup: bool = True) -> list[PromptResult]:
        tok = self.m.tokenizer
        if warmup:  # first-call costs (allocation, kernel selection) stay out of the measurement
            self._one(spec, render(tok, prompts[0], []), self.seed, max_new=8)
        out = []
        for i, p in enumerate(prompts):
            replies, turns, stats = [], [], []
            for t in range(len(p.user_turns)):
                ids = render(tok, p, replies)
                new, st = self._one(spec, ids, self.seed + 1000 * i + t)
                turns.append(new)
                stats.append(st)
                replies.append(tok.decode([x for x in new if x not in self.eos], skip_special_tokens=True))
            out.append(PromptResult(p.id, p.group, turns, stats, replies))
            if on_prompt is not None:
                on_prompt()
        return out


def merge_turns(r: PromptResult) -> DecodeStats:
    """One DecodeStats per prompt (turns pooled: tokens, calls, rounds and times add; TTFT of turn 1)."""
    if len(r.stats) == 1:
        return r.stats[0]
    m = DecodeStats()
    for s in r.stats:
        m.prompt_tokens += s.prompt_tokens
        m.new_tokens += s.new_tokens
        m.wall += s.wall
        m.cpu += s.cpu
        m.rounds += s.rounds
        m.draft_steps += s.draft_steps
        m.target_calls += s.target_calls
        for k, v in s.times.items():
            m.times[k] += v
        for n, ts in s.passes.items():
            m.passes[n] += ts
    m.prefills = sum(s.prefills for s in r.stats)  # each turn's first token comes from a prefill
    m.ttft = r.stats[0].ttft
    m.stopped = r.stats[-1].stopped
    return m


def report_run(spec: RunSpec, results: list[PromptResult], *, reference: list[PromptResult] | None = None,
               t1_ms: float | None = None, baselines: dict[str, dict] | None = None, settings: dict | None = None,
               generate: list[PromptResult] | None = None) -> dict[str, Any]:
    """The JSON entry of one configuration (see the script's documentation for the keys).

    reference: the greedy outputs ``exact_match`` compares with (this engine's plain decoding when it ran:
    the bit-for-bit claim; else HF generate); generate: HF generate's, for ``exact_match_vs_generate`` and
    the first divergences (the margins are filled in by the caller, which holds the model)."""
    merged = [merge_turns(r) for r in results]
    summ = summarize(merged)
    groups = sorted({r.group for r in results}, key=lambda g: ("gsm8k", "chat", "code", "multiturn").index(g)
                    if g in ("gsm8k", "chat", "code", "multiturn") else 9)
    per_group = {}
    for g in groups:
        sub = [m for m, r in zip(merged, results) if r.group == g]
        sg = summarize(sub)
        per_group[g] = {key: sg[key] for key in ("prompts", "tau", "tau_macro", "reach_rate", "cond_rate",
                                                 "draft_accept_rate", "tokens_per_s", "tokens_per_s_macro",
                                                 "tokens_per_cpu_s", "ttft_ms", "tpot_ms", "new_tokens")}
    entry: dict[str, Any] = {
        "name": spec.name, "kind": spec.kind, "drafter": spec.drafter, "temperature": spec.temperature,
        "top_k": spec.top_k, "top_p": spec.top_p, "k": spec.k,
        "method": (spec.decode_config(1).verify_method if spec.kind == "engine" else "target-only (lossless)"),
        "backend": spec.backend, "exit_layer": spec.exit_layer,
        "exit_window": spec.exit_window if spec.exit_layer is not None else None,
        "draft_shape": spec.tree or "chain", "tree": spec.tree, **summ,
        "per_position_acceptance": summ["reach_rate"], "per_position_acceptance_conditional": summ["cond_rate"],
        "per_source": per_group, "settings": settings or {},
    }
    if spec.kind == "engine" and t1_ms:
        passes = summ["target_pass_ms"]
        full = spec.k + 1 if spec.tree is None else TreeSpec.parse(spec.tree).total_tokens + 1
        entry["t1_ms"] = t1_ms
        entry["verify_cost_ratio"] = passes[full] / t1_ms if full in passes and spec.exit_layer is None else None
        entry["draft_cost_ratio"] = summ["draft_step_ms"] / t1_ms if summ["draft_step_ms"] else None
        if spec.exit_layer is not None:
            st = summ.get("stage1") or {}
            n1 = st.get("rounds") or 0
            entry["stage1_cost_ratio"] = (1e3 * summ["time_breakdown_s"].get("stage1", 0.0) / n1 / t1_ms) if n1 else None
            final = [passes[n] for n in passes]
            entry["final_pass_cost_ratio"] = (sum(final) / len(final) / t1_ms) if final else None
    else:
        entry["verify_cost_ratio"] = None
    if spec.temperature == 0 and reference is not None:
        ref = {r.id: r.turns for r in reference}
        same = [r.turns == ref.get(r.id) for r in results if r.id in ref]
        entry["exact_match"] = sum(same) / len(same) if same else None
        entry["exact_match_prompts"] = f"{sum(same)}/{len(same)}"
    else:
        entry["exact_match"] = None
    if spec.temperature == 0 and generate is not None and spec.kind == "engine":
        gen = {r.id: r.turns for r in generate}
        same = [r.turns == gen.get(r.id) for r in results if r.id in gen]
        entry["exact_match_vs_generate"] = sum(same) / len(same) if same else None
        entry["exact_match_vs_generate_prompts"] = f"{sum(same)}/{len(same)}"
        entry["generate_divergences"] = first_divergences(results, generate)
    if baselines:
        for key, base in baselines.items():
            entry[f"speedup_vs_{key}"] = (summ["tokens_per_s_macro"] / base["tokens_per_s_macro"]
                                         if base and base.get("tokens_per_s_macro") else None)
            entry[f"speedup_vs_{key}_pooled"] = (summ["tokens_per_s"] / base["tokens_per_s"]
                                                if base and base.get("tokens_per_s") else None)
            entry[f"speedup_vs_{key}_cpu"] = (summ["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
                                             if base and base.get("tokens_per_cpu_s") and summ["tokens_per_cpu_s"]
                                             else None)
    return entry


def first_divergences(results: list[PromptResult], generate: list[PromptResult]) -> list[dict[str, Any]]:
    """Where each prompt's output first leaves HF generate's: prompt id, turn, position (new-token index),
    and the two tokens; ``margin`` (the target's top-2 logit gap there) is None until measured."""
    gen = {r.id: r for r in generate}
    out = []
    for r in results:
        g = gen.get(r.id)
        if g is None:
            continue
        for t, (a, b) in enumerate(zip(r.turns, g.turns)):
            if a == b:
                continue
            i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            out.append({"id": r.id, "turn": t, "position": i, "ours": a[i] if i < len(a) else None,
                        "generate": b[i] if i < len(b) else None, "margin": None})
            break
    return out


def spec_settings(spec: RunSpec, models: Models) -> dict:
    if spec.kind == "engine":
        d = asdict(spec)
        if spec.drafter == "model":
            d["draft_model"] = models.draft_note
        return d
    s = hf_settings(spec.kind, spec.decode_config(1), spec.k)
    if spec.kind == "hf_assisted":
        s["draft_model"] = models.draft_note
    return s


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
