"""Decode the bundled prompts with every configuration and the baselines (table, JSON, plots).

``scripts/decode.py`` / ``hsd-train decode``: every configuration and the baselines in one process; print a
table, write JSON, EAGLE-style answer files and PNG plots.

    python scripts/decode.py --target smollm2-135m --head runs/eagle3/smollm2-135m/final \
        --exit-head runs/early_exit/smollm2-135m/final --exit-layer 4 --draft-model layers:8 \
        --temperature 0 1 --k 3 5 --method tokenwise hsd --json decode.json

JSON: ``{"meta": {...}, "runs": [entry, ...], "exit_agreement": {...}, "planner": {...}}``; one entry per
configuration with at least ``name, temperature, k, method, tau, tokens_per_s, speedup_vs_generate,
exact_match (T = 0), per_position_acceptance, verify_cost_ratio`` (see ``hsd.decode.evaluate.report_run``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

from hsd.config import program_name

from .tree_spec import TreeSpec

REPO_ROOT = Path(__file__).resolve().parents[2]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=program_name(), description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m", help="short name, model folder or Hub id")
    ap.add_argument("--head", help="EAGLE-3 head folder (save_pretrained) or Hub id")
    ap.add_argument("--exit-head", nargs="+", help="early-exit head folder(s), or training output folder(s) with "
                                                   "layer_<l>/ heads (several: their layers are merged)")
    ap.add_argument("--exit-layer", type=int, nargs="+", help="exit layers to decode with (default: every head "
                                                              "found; all found heads get the agreement report)")
    ap.add_argument("--drafter", nargs="+", default=[], metavar="exit:L[:K]",
                    help="early-exit drafting: exit:L drafts with target layers 1..L + the exit head of layer L "
                         "(no extra model), alone and under every deeper --exit-layer stage (HiSpec's three levels); "
                         "exit:L:K drafts K tokens per round instead of each --k")
    ap.add_argument("--no-exit-stage", action="store_true",
                    help="no exit-stage configurations (the exit heads still draft with --drafter exit:L)")
    ap.add_argument("--exit-window", type=int, default=1, help="window tokens before the full target pass")
    ap.add_argument("--draft-model", help="HF draft model (folder / Hub id) or layers:N (a layer-truncated copy "
                                          "of the target, for targets without a smaller sibling)")
    ap.add_argument("--prompts", nargs="+", help="JSONL prompt files (default: the bundled held-out prompts "
                                                 "and multi-turn prompts)")
    ap.add_argument("--num-prompts", type=int, default=0, help="use N prompts, spread over the sources (0 = all)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--k", type=int, nargs="+", default=[3, 5], help="draft lengths")
    ap.add_argument("--baseline-k", type=int, nargs="+",
                    help="draft lengths of the HF prompt-lookup / assisted baselines (default: --k)")
    ap.add_argument("--method", nargs="+", default=["tokenwise", "hsd"],
                    help="verifiers at T > 0 (tokenwise, blockwise, hsd); T = 0 uses greedy_verify")
    ap.add_argument("--backend", nargs="+", default=["torch"], help="torch and/or triton")
    ap.add_argument("--tree", nargs="+", default=[], metavar="TOPK:DEPTH:TOTAL",
                    help="EAGLE-2-style dynamic draft trees from the head, e.g. 4:4:16 (next to the chains of --k; "
                         "per method: tokenwise -> recursive rejection sampling, hsd -> weighted tree verifier)")
    ap.add_argument("--no-chain", action="store_true",
                    help="no chain configurations of this engine (with --tree: trees next to the baselines only)")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baselines")
    ap.add_argument("--no-ar", action="store_true",
                    help="skip this engine's plain decoding (tau-only studies: no speed-up against it)")
    ap.add_argument("--no-lookup", action="store_true", help="skip this engine's prompt-lookup drafter")
    ap.add_argument("--no-model-drafter", action="store_true",
                    help="with --draft-model: run it only as the HF assisted baseline, not in this engine")
    ap.add_argument("--repeats", type=int, default=1, help="runs of every configuration (tok/s mean +- std)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--dtype", default="auto", help="auto (default: the measured decision of hsd.precision: bf16 "
                                                    "where it is faster on this device), float32, bfloat16, float16; "
                                                    "HF generate runs in the same precision")
    ap.add_argument("--row-tile", default="auto",
                    help="rows every decoding pass is padded to, so that greedy speculative output equals this engine's "
                         "plain greedy output bit for bit (hsd.decode.rowtile): auto (off in float32, else the grid's "
                         "largest pass rounded up to 8), off, or a number")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-cpu-kernels", action="store_true", help="keep the target's weight layout (hsd.decode.cpu)")
    ap.add_argument("--json", help="JSON output path (default: <out-dir>/decode.json)")
    ap.add_argument("--out-dir", help="output folder (default: runs/decode/<time>)")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted run in --out-dir: configurations it finished are loaded, not rerun "
                         "(the other arguments must be the same)")
    ap.add_argument("--no-plots", action="store_true")
    return ap


def select_prompts(prompts: list, n: int) -> list:
    """n prompts taken round-robin over the sources, in file order (never just the first rows)."""
    if not n or n >= len(prompts):
        return prompts
    groups: dict[str, list] = {}
    for p in prompts:
        groups.setdefault(p.group, []).append(p)
    out, i = [], 0
    while len(out) < n:
        for g in groups.values():
            if i < len(g) and len(out) < n:
                out.append(g[i])
        i += 1
    return out


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name)


def write_answers(path: Path, results, spec) -> None:
    """EAGLE / Spec-Bench style answer file (question_id, category, choices[0] turns/new_tokens/...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for r in results:
            fh.write(json.dumps({
                "question_id": r.id, "category": r.group, "model_id": spec.name,
                "choices": [{"index": 0, "turns": r.texts, "new_tokens": [s.new_tokens for s in r.stats],
                             "wall_time": [s.wall for s in r.stats],
                             "decoding_steps": [s.target_calls for s in r.stats],
                             "accept_lengths": [[x.emitted for x in s.rounds] for s in r.stats]}],
                "tstamp": time.time()}) + "\n")


def exit_lines(rows: list[dict]) -> list[str]:
    """One line per exit configuration (planner ``exit`` rows): the run it must beat, predicted and measured
    speed-up against it, achieved vs break-even agreement."""
    out = []
    for r in rows:
        need = r.get("breakeven_agreement")
        ms, ps = r.get("measured_speedup_vs_baseline"), r.get("predicted_speedup_vs_baseline")
        out.append(f"exit {r['name']} ({r['kind']}): vs {r['baseline']}: measured x{ms or float('nan'):.2f}, predicted "
                   f"x{ps or float('nan'):.2f}; agreement {r['achieved_agreement']:.3f}, break-even "
                   + (f"{need:.3f}" if need is not None else "> 0.9999 (cannot win at these costs)"))
    return out


def exit_agreement(models, prompts, outputs) -> dict[str, Any]:
    """Per exit layer: top-1 agreement of the exit head with the target and alpha = sum min(p_f, p_l) at
    T = 1, on the target's own greedy outputs (the positions that predicted each generated token)."""
    import torch

    from .drafters import head_logits_to_target
    from .prompts import render
    from .target import TargetRunner

    if not models.exit_heads or not outputs:
        return {}
    runner = TargetRunner(models.target)
    layers = sorted(models.exit_heads)
    acc = {l_: [0, 0, 0.0] for l_ in layers}
    by_id = {r.id: r for r in outputs}
    for p in prompts:
        r = by_id.get(p.id)
        if r is None:
            continue
        for t, new in enumerate(r.turns):
            if not new:
                continue
            ids = render(models.tokenizer, p, r.texts[:t])
            x = torch.tensor([ids + new], dtype=torch.long)
            state = runner.new_state(1, x.shape[1] + 1)
            rows = slice(len(ids) - 1, x.shape[1] - 1)
            with torch.no_grad():
                out = runner.run(state, tokens=x, logit_rows=rows, capture=tuple(layers))
                pf = torch.softmax(out.logits, -1)
                top = out.logits.argmax(-1)
                for layer in layers:
                    head = models.exit_heads[layer]
                    lg = head_logits_to_target(head, head.step(hidden_states=out.captured[layer][:, rows]).logits).float()
                    acc[layer][0] += int((lg.argmax(-1) == top).sum())
                    acc[layer][1] += top.numel()
                    acc[layer][2] += float(torch.minimum(pf, torch.softmax(lg, -1)).sum(-1).sum())
    return {str(k): {"top1_agreement": v[0] / v[1] if v[1] else None, "alpha_T1": v[2] / v[1] if v[1] else None,
                     "positions": v[1]} for k, v in acc.items()}


# Resumable runs: every finished configuration is pickled under <out-dir>/partial/ with the arguments that
# produced it; --resume reloads those (a full grid takes hours on a 2-core CPU).
_RESUME_IGNORED = ("resume", "json", "out_dir", "no_plots")


def _run_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in sorted(vars(args).items()) if k not in _RESUME_IGNORED}


def save_partial_args(out_dir: Path, args: argparse.Namespace) -> None:
    """Record this run's arguments; a fresh (not --resume) run drops an earlier run's saved configurations,
    so a later --resume never mixes two runs."""
    part = out_dir / "partial"
    part.mkdir(exist_ok=True)
    if not args.resume:
        for f in part.glob("*.pkl"):
            f.unlink()
    (part / "args.json").write_text(json.dumps(_run_args(args), indent=1))


def save_partial(out_dir: Path, name: str, runs: list, tps: list[float]) -> None:
    import pickle

    path = out_dir / "partial" / f"{_safe(name)}.pkl"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps({"name": name, "runs": runs, "tokens_per_s": tps}))
    os.replace(tmp, path)  # atomic: an interrupted write leaves the configuration to rerun


def load_partial(out_dir: Path, args: argparse.Namespace) -> dict[str, tuple[list, list[float]]]:
    """Finished configurations of an interrupted run in ``out_dir`` (name -> (runs, tokens/s per repeat))."""
    import pickle

    path = out_dir / "partial" / "args.json"
    if not path.exists():
        raise ValueError(f"--resume: {path} not found (no interrupted run in {out_dir})")
    saved, now = json.loads(path.read_text()), json.loads(json.dumps(_run_args(args)))
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        raise ValueError(f"--resume: arguments differ from the interrupted run in {out_dir}: " + ", ".join(
            f"{k} (was {saved.get(k)!r}, now {now.get(k)!r})" for k in diff))
    out = {}
    for f in sorted((out_dir / "partial").glob("*.pkl")):
        rec = pickle.loads(f.read_bytes())
        out[rec["name"]] = (rec["runs"], rec["tokens_per_s"])
    return out


def specs_rows(args: argparse.Namespace, models) -> int:
    """The most rows one target pass of the grid carries: chains k + 1 (exit drafters ``exit:L:K`` at their own
    K), plus the exit window where exit stages run; trees nodes + 1."""
    from .evaluate import parse_exit_drafter

    ks = [*args.k, *(p[1] for p in map(parse_exit_drafter, args.drafter) if p and p[1])]
    window = args.exit_window if models.exit_heads or args.exit_layer else 0
    rows = [k + 1 + window for k in ks] or [1]
    rows += [TreeSpec.parse(t).total_tokens + 1 for t in args.tree]
    return max(rows)


def decode_precision(models, args: argparse.Namespace, rows: int) -> dict[str, Any]:
    """What precision decodes and why, the row tile, whether greedy trees are exact with it (where the gap probe
    says no they run untiled, flagged), and the head's training feature precision; ValueError (one line) for a
    tile that cannot hold the grid."""
    import torch

    from hsd.precision import precision_probe

    from .loading import head_feature_dtype
    from .rowtile import resolve_row_tile, tree_exact_for

    dtype = next(models.target.parameters()).dtype
    name = str(dtype).removeprefix("torch.")
    if args.dtype == "auto":
        probe = precision_probe(args.device)
        decision = {"setting": "auto", **probe.as_dict()}
    else:
        decision = {"setting": args.dtype, "reason": f"set by --dtype {args.dtype}"}
    tile = resolve_row_tile(args.row_tile, dtype, rows)
    tree_exact = None
    if tile is not None and args.tree:
        # the gap probe: can the tile make a tree row equal the same row decoded as a chain on this backend?
        tree_exact = tree_exact_for(models.target, tile)
    head = head_feature_dtype(args.head)
    hf_model = models.stock_target if models.stock_target is not None else models.target
    return {"decode": name, "hf_generate": str(next(hf_model.parameters()).dtype).removeprefix("torch."),
            "decision": decision, "greedy_trees_untiled": tree_exact is False and 0.0 in args.temperature, "row_tile": tile, "batch_invariant": tile is not None,
            "pass_rows": rows, "tree_exact": tree_exact, "head_features": head,
            "head_features_differ": head not in ("unknown", name), "float32_note": None if dtype != torch.float32 else
            "float32 passes are untiled unless --row-tile: rows of a multi-row pass can differ from 1-row steps in the "
            "last bits (MKL picks kernels by row count), see docs/decoding_speed.md"}


def precision_lines(p: dict[str, Any]) -> list[str]:
    """The precision facts, one line each (and a one-line warning when the head's features differ)."""
    d = p["decision"]
    lines = [f"precision: decode {p['decode']} ({d.get('reason')}), HF generate {p['hf_generate']}; row tile "
             + (f"{p['row_tile']} (every pass padded to {p['row_tile']} rows: greedy speculative = plain greedy bit "
                "for bit" + ("" if p["tree_exact"] is not False else ", chains only") + ")" if p["row_tile"]
                else "off (untiled)")
             + f"; head trained on {p['head_features']} features"]
    if p.get("greedy_trees_untiled"):
        lines.append(f"warning: this backend's attention rounds a tree row differently from the same row decoded as a "
                     f"chain (the gap probe, hsd.decode.rowtile) at row tile {p['row_tile']}: greedy trees run untiled, "
                     "without the bit-for-bit claim (their exact_match is measured, not guaranteed)")
    if p["head_features_differ"]:
        lines.append(f"warning: the head was trained on {p['head_features']} target features but decoding runs in "
                     f"{p['decode']}: acceptance can be lower than in training")
    return lines


def divergence_margins(models, prompts, results: dict[str, list], entries: list[dict]) -> dict[tuple, dict]:
    """For every first divergence from HF generate of a T = 0 run: the target's top-2 logits after the common
    prefix (the stock model's forward, the decode precision). Identical positions are measured once."""
    import torch

    from .evaluate import first_divergences
    from .prompts import render

    gen = results["T0/hf_generate"]
    model = models.stock_target if models.stock_target is not None else models.target
    by_id = {p.id: p for p in prompts}
    out: dict[tuple, dict] = {}
    for name, res in results.items():
        if not name.startswith("T0/") or name == "T0/hf_generate":
            continue
        by_res = {r.id: r for r in res}
        for d in first_divergences(res, gen):
            key = (d["id"], d["turn"], d["position"])
            if key in out:
                continue
            r = by_res[d["id"]]
            ids = render(models.tokenizer, by_id[d["id"]], r.texts[: d["turn"]]) + r.turns[d["turn"]][: d["position"]]
            x = torch.tensor([ids], device=next(model.parameters()).device)
            with torch.no_grad():
                logits = model(x).logits[0, -1].float()
            top = torch.topk(logits, 2)
            out[key] = {"margin": float(top.values[0] - top.values[1]), "top2": top.indices.tolist()}
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .evaluate import Evaluator, build_grid, parse_exit_drafter, report_run, spec_settings, timestamp
    from .loading import load_models
    from .planner import plan
    from .prompts import DEFAULT_PROMPT_FILES, load_prompts
    from .report import plot_all, print_table
    from .target import TargetRunner

    console = Console(width=None if sys.stdout.isatty() else 200)
    if args.threads:
        torch.set_num_threads(args.threads)
    for b in args.backend:
        if b not in ("torch", "triton"):
            print(f"error: --backend: unknown backend {b!r} (torch, triton)", file=sys.stderr)
            return 2
    for tree in args.tree:
        try:
            TreeSpec.parse(tree)
        except ValueError as err:
            print(f"error: --tree: {err}", file=sys.stderr)
            return 2
    bad = [m for m in args.method if m not in ("tokenwise", "blockwise", "hsd", "greedy")]
    if bad:
        print(f"error: --method: unknown {bad} (tokenwise, blockwise, hsd)", file=sys.stderr)
        return 2
    try:
        prompts = select_prompts(load_prompts(args.prompts or list(DEFAULT_PROMPT_FILES), REPO_ROOT), args.num_prompts)
        models = load_models(args.target, args.head, args.exit_head, None, args.draft_model,
                             dtype=args.dtype, device=args.device, stock_copy=not args.no_hf)
        for layer in args.exit_layer or []:
            if layer not in models.exit_heads:
                raise ValueError(f"--exit-layer {layer}: no exit head for it in {args.exit_head} "
                                 f"(found layers {sorted(models.exit_heads)})")
        exit_drafters = []
        for name in args.drafter:
            parsed = parse_exit_drafter(name)
            layer = None if parsed is None else parsed[0]
            if layer is None:
                raise ValueError(f"--drafter {name!r}: expected exit:L (the EAGLE-3 head, a draft model and prompt "
                                 "lookup have their own flags: --head, --draft-model)")
            if layer not in models.exit_heads:
                raise ValueError(f"--drafter {name}: no exit head for layer {layer} in {args.exit_head or '(no --exit-head)'}"
                                 f" (found layers {sorted(models.exit_heads)})")
            exit_drafters.append(parsed)
        # the runner = the target's own forward, checked once (hsd.decode.target_check), before any baseline
        # or configuration runs: a target the engine would decode wrongly is refused here, in one line
        check = TargetRunner(models.target, cpu_kernels=not args.no_cpu_kernels).check
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    console.print(check.line())
    try:
        precision = decode_precision(models, args, specs_rows(args, models))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.resume and not args.out_dir:
        print("error: --resume needs the --out-dir of the run to continue", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir or Path("runs/decode") / time.strftime("%Y%m%d-%H%M%S"))
    try:
        done = load_partial(out_dir, args) if args.resume else {}
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    save_partial_args(out_dir, args)
    json_path = Path(args.json) if args.json else out_dir / "decode.json"
    specs = build_grid(args.temperature, args.k, args.method, args.backend, head=models.head is not None,
                       exit_layers=[] if args.no_exit_stage else (args.exit_layer or sorted(models.exit_heads)),
                       exit_drafters=exit_drafters,
                       draft_model=models.draft_model is not None, lookup=not args.no_lookup, hf=not args.no_hf,
                       ar=not args.no_ar,
                       exit_window=args.exit_window, top_k=args.top_k, top_p=args.top_p, baseline_ks=args.baseline_k,
                       model_drafter=not args.no_model_drafter, trees=args.tree,
                       chains=not args.no_chain)
    clock = time.process_time if args.device == "cpu" else time.perf_counter
    ev = Evaluator(models, args.max_new_tokens, args.seed, cpu_kernels=not args.no_cpu_kernels, stage_clock=clock,
                   row_tile=precision["row_tile"], untiled_greedy_trees=precision["greedy_trees_untiled"])
    from hsd.machine import machine_info, machine_line

    machine = machine_info(args.device, next(models.target.parameters()).dtype)
    meta = {"started": timestamp(), "argv": sys.argv if argv is None else argv, "target": args.target,
            "head": args.head, "exit_head": args.exit_head, "draft_model": models.draft_note or None,
            "prompts": {g: sum(1 for p in prompts if p.group == g) for g in dict.fromkeys(p.group for p in prompts)},
            "max_new_tokens": args.max_new_tokens, "seed": args.seed, "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_kernels": not args.no_cpu_kernels, "batch_size": 1, "draft_shape": "chain",
            "stage_clock": "process CPU time" if args.device == "cpu" else "wall",
            "note": "T = 0 runs use greedy_verify (every hsd.verify method agrees at T = 0, tested)",
            "git_commit": _git_commit(), "load_average_start": _loadavg(), "target_check": check.as_dict(), "precision": precision,
            "machine": machine}
    if done:
        meta["resumed_configurations"] = sorted(done)  # measured by the interrupted run(s), not rerun
    results: dict[str, list] = {}
    entries: list[dict] = []
    report: dict[str, Any] = {"meta": meta, "runs": entries}

    def entry_of(spec):
        res = results[spec.name]
        tn = f"T{spec.temperature:g}"
        ar, gen = f"{tn}/ar", f"{tn}/hf_generate"
        ref = results.get(gen) or results.get(ar)
        t1 = None
        if ar in results:
            from .evaluate import merge_turns
            from .stats import summarize
            t1 = summarize([merge_turns(r) for r in results[ar]])["target_pass_ms"].get(1)
        base = {k: next((e for e in entries if e["name"] == n), None) for k, n in (("generate", gen), ("ar", ar))}
        # T = 0: exact_match against this engine's plain greedy decoding (same row tile: the bit-for-bit claim),
        # and separately against HF generate (other kernels), with the first divergences
        plain = results.get(ar) if spec.kind == "engine" and spec.name != ar else None
        e = report_run(spec, res, reference=(plain or ref) if spec.temperature == 0 else None, t1_ms=t1,
                       baselines=base, settings=spec_settings(spec, models), generate=results.get(gen))
        for d in e.get("generate_divergences") or []:
            d["margin"] = margins.get((d["id"], d["turn"], d["position"]))
        if spec.kind == "engine":
            e["row_tile"] = ev.tile_of(spec)
        if spec.name in rep_tps:
            import statistics
            e["tokens_per_s_repeats"] = rep_tps[spec.name]
            if len(rep_tps[spec.name]) > 1:
                e["tokens_per_s_std"] = statistics.stdev(rep_tps[spec.name])
        return e

    rep_tps: dict[str, list[float]] = {}
    margins: dict[tuple, dict] = {}  # (prompt id, turn, position) -> top-2 logit margin of the target there
    total = len(specs) * len(prompts) * args.repeats
    console.print(f"[bold]{len(specs)} configurations x {len(prompts)} prompts x {args.repeats} repeat(s)[/bold] "
                  f"-> {out_dir}")
    console.print(f"machine: {machine_line(machine)}")
    for line in precision_lines(precision):
        console.print(line)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as prog:
        task = prog.add_task("all", total=total)
        for spec in specs:
            sub = prog.add_task(spec.name, total=len(prompts) * args.repeats)
            runs = []
            if spec.name in done:  # --resume: measured by the interrupted run
                runs, rep_tps[spec.name] = done[spec.name]
                prog.advance(task, len(prompts) * args.repeats)
            for _ in range(args.repeats - len(runs)):
                res = ev.run(spec, prompts, on_prompt=lambda s=sub: (prog.advance(s), prog.advance(task)))
                runs.append(res)
                from .evaluate import merge_turns
                from .stats import summarize
                rep_tps.setdefault(spec.name, []).append(summarize([merge_turns(r) for r in res])["tokens_per_s_macro"])
            results[spec.name] = [r for res in runs for r in res]
            prog.remove_task(sub)
            if spec.name not in done:
                save_partial(out_dir, spec.name, runs, rep_tps[spec.name])
            write_answers(out_dir / "answers" / f"{_safe(spec.name)}.jsonl", runs[0], spec)
            entries[:] = [entry_of(s) for s in specs if s.name in results]
            e = entries[-1]
            prog.console.print(f"{spec.name}: tau {e['tau']:.2f}, {e['tokens_per_s_macro']:.1f} tok/s, "
                               f"{e['tokens_per_cpu_s'] or 0:.1f} tok/CPU-s"
                               + (f", x{e['speedup_vs_generate']:.2f} vs generate (x{e['speedup_vs_generate_cpu']:.2f} "
                                  "CPU time)" if e.get("speedup_vs_generate") and e.get("speedup_vs_generate_cpu") else ""))
            json_path.write_text(json.dumps(report, indent=1, default=str))
    if "T0/hf_generate" in results:  # the top-2 logit margin of the target at every first divergence
        margins.update(divergence_margins(models, prompts, results, entries))
        entries[:] = [entry_of(s) for s in specs if s.name in results]
    greedy_ref = results.get("T0/hf_generate") or results.get("T0/ar")
    if models.exit_heads and greedy_ref:
        report["exit_agreement"] = exit_agreement(models, prompts, greedy_ref)
    report["planner"] = plan(entries, precision["decode"])
    report["meta"]["finished"] = timestamp()
    report["meta"]["load_average_end"] = _loadavg()
    json_path.write_text(json.dumps(report, indent=1, default=str))
    print_table(entries, console)
    console.print(f"machine: {machine_line(machine)}")
    for line in precision_lines(precision):
        console.print(line)
    if report.get("exit_agreement"):
        console.print("exit heads on the target's greedy outputs: " + ", ".join(
            f"layer {k}: top-1 {v['top1_agreement']:.3f}, alpha(T=1) {v['alpha_T1']:.3f}"
            for k, v in report["exit_agreement"].items()))
    for t, b in report["planner"]["best"].items():
        console.print(f"planner {t} ({precision['decode']} costs): best predicted {b['name']}: "
                      f"{b['predicted_tokens_per_s']:.1f} tok/s (x{b['predicted_speedup_vs_ar']:.2f} vs our AR)")
        cvt = report["planner"]["chain_vs_tree"].get(t) or {}
        if cvt.get("chain") and cvt.get("tree"):
            console.print(f"  chain vs tree: {cvt['chain']['name']} {1e3 / cvt['chain']['predicted_tpot_ms']:.1f} tok/s, "
                          f"{cvt['tree']['name']} {1e3 / cvt['tree']['predicted_tpot_ms']:.1f} tok/s -> {cvt['choice']}")
    for row in report["planner"]["predicted_vs_measured"]:
        m = row["measured_tpot_ms"]
        console.print(f"  {row['name']}: predicted {1e3 / row['predicted_tpot_ms']:.1f} tok/s, measured "
                      f"{(1e3 / m) if m else float('nan'):.1f} tok/s (decode only)")
    for line in exit_lines(report["planner"].get("exit", [])):
        console.print(line)
    if not args.no_plots:
        for p in plot_all(entries, out_dir):
            console.print(f"wrote {p}")
    console.print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
