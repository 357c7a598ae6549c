"""Exit-head study: which early-exit head, at which layer, is worth a decoding stage on this machine?

    python scripts/study_exit_heads.py --out runs/study/exit_heads            # every phase, resumable
    python scripts/study_exit_heads.py --out runs/study/exit_heads --phase report

Phases (each skips what an earlier, interrupted run already finished; rerun the same command to resume):

1. ``data``: tokenize the bundled conversations (``--data``, all rows) with the target's chat template;
   the draft vocabulary (``--draft-vocab`` most frequent assistant tokens of *all* rows, ``train.draft_vocab``)
   and the training subsample: the first ``--train-rows`` rows (the file is ordered so that every prefix
   is a training set with the same mix), at most ``--max-length`` tokens each.
2. ``features``: one frozen-target forward per batch captures h_l of every study layer and the final
   (post-norm) hidden state, stored in float16 shards (``features/shard_*.safetensors``): the target runs
   once, not once per head.
3. ``train``: every head type at every layer trains from the shards in one loop (one AdamW per head, soft
   cross-entropy to the target at T = 1 restricted to the draft vocabulary, as ``train/early_exit.py``);
   heads are saved at each of ``--lengths`` optimizer steps (``heads/step_<n>/<type>/layer_<l>``).
4. ``eval``: top-1 agreement with the target (T = 0) and α = Σ min(p_f, p_l) at T = 1 (the true full-vocabulary
   p_f) on the held-out prompts' greedy text (``--eval``: ``scripts/regenerate_data.py`` output for
   ``data/prompts_eval*.jsonl``), per source, for the lens and every trained head at every length.
5. ``cost``: the cost per window token on this machine, in the precision the engine runs, through the
   engine's own target runner (CPU kernels on): layers 1..l over one token, each head body + its LM head,
   layers l+1..L over n buffered rows, in units of one 1-token target step (t1).
6. ``report``: ``study.json`` and ``study.md``: per layer and head type, the agreement reached against the
   agreement each use needs to break even (exit drafter vs plain decoding, planner arithmetic of
   :mod:`hsd.decode.planner`), with the machine line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TRAINABLE = ("affine", "lowrank", "mlp", "attn", "layers")
LR = {"affine": 1e-3, "lowrank": 2e-3, "mlp": 2e-3, "attn": 1e-3, "layers": 5e-4}  # layers: pretrained init


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/study/exit_heads")
    ap.add_argument("--phase", nargs="+", default=["all"],
                    choices=["all", "data", "features", "train", "eval", "cost", "report"])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--data", default="data/smollm2_chat_all.jsonl")
    ap.add_argument("--train-rows", type=int, default=400, help="first N conversations train the heads")
    ap.add_argument("--max-length", type=int, default=320)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 11, 15])
    ap.add_argument("--types", nargs="+", default=["lens", *TRAINABLE])
    ap.add_argument("--head-layers", type=int, default=1, help="k of the layers head")
    ap.add_argument("--draft-vocab", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lengths", type=int, nargs="+", default=[100, 400], help="optimizer steps to save at")
    ap.add_argument("--eval", default="runs/study/eval_greedy.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto", help="target precision (auto: hsd.precision's measured choice, "
                                                    "what the engine runs)")
    ap.add_argument("--cost-reps", type=int, default=15)
    ap.add_argument("--two-level", help="decode.json of a run with T0/ar and T0/eagle3-k<K>-greedy (scripts/decode.py): "
                                        "the EAGLE-3 chain an exit stage must beat, for the verifier columns")
    return ap


# --------------------------------------------------------------------------------------------------- data
def phase_data(args, out: Path, tok) -> dict:
    path = out / "data.json"
    if path.is_file():
        return json.loads(path.read_text())
    from train import chat_data, draft_vocab

    conv = chat_data.load_conversations([args.data])
    tds, stats = chat_data.tokenize_dataset(tok, conv, max_length=None)
    rows = [{"input_ids": list(r["input_ids"]), "loss_mask": list(r["loss_mask"])} for r in tds]
    vocab, cov = draft_vocab.build_draft_vocab(rows, len(tok), args.draft_vocab)
    sub = [{"input_ids": r["input_ids"][: args.max_length], "loss_mask": r["loss_mask"][: args.max_length]}
           for r in rows[: args.train_rows]]
    sub = [r for r in sub if sum(r["loss_mask"][1:]) > 0]
    info = {"rows_all": len(rows), "tokens_all": stats["tokens"], "assistant_tokens_all": stats["assistant_tokens"],
            "train_rows": len(sub), "train_tokens": sum(len(r["input_ids"]) for r in sub),
            "train_assistant_tokens": sum(sum(r["loss_mask"]) for r in sub), "max_length": args.max_length,
            "draft_vocab": args.draft_vocab, "draft_vocab_coverage_all": cov,
            "draft_ids": vocab.target_ids.tolist(), "rows": sub}
    path.write_text(json.dumps(info))
    print(f"data: {len(rows)} conversations ({stats['tokens']} tokens), train subsample {len(sub)} rows "
          f"({info['train_tokens']} tokens), draft vocab {args.draft_vocab} covers {cov:.4f} of assistant tokens")
    return info


# ----------------------------------------------------------------------------------------------- features
def shards_of(info: dict, batch: int) -> list[list[int]]:
    order = sorted(range(len(info["rows"])), key=lambda i: len(info["rows"][i]["input_ids"]))
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def phase_features(args, out: Path, info: dict, target, pad_id: int) -> None:
    from safetensors.torch import save_file

    from hsd.models import capture as cap
    from train import chat_data

    fdir = out / "features"
    fdir.mkdir(exist_ok=True)
    shards = shards_of(info, args.batch_size)
    todo = [i for i in range(len(shards)) if not (fdir / f"shard_{i:05d}.safetensors").is_file()]
    t0 = time.time()
    for n, i in enumerate(todo):
        batch = chat_data.collate([info["rows"][j] for j in shards[i]], pad_id)
        c = cap.capture(target, batch["input_ids"], batch["attention_mask"], layers=args.layers, logits=False,
                        final_hidden=True)
        h = torch.stack([c.hidden_states[layer] for layer in args.layers], dim=2)  # [B, S, nL, H]
        tmp = fdir / f"shard_{i:05d}.tmp"
        save_file({"h": h.half().contiguous(), "final": c.final_hidden.half().contiguous(),
                   **{k: v.contiguous() for k, v in batch.items()}}, str(tmp))
        os.replace(tmp, fdir / f"shard_{i:05d}.safetensors")
        if n % 10 == 0 or n == len(todo) - 1:
            print(f"features: shard {n + 1}/{len(todo)} ({time.time() - t0:.0f} s)", flush=True)


# -------------------------------------------------------------------------------------------------- heads
def make_head(target, layer: int, head_type: str, args, draft_ids: torch.Tensor):
    from hsd.models.early_exit import EarlyExitConfig, EarlyExitHead

    cfg = EarlyExitConfig.from_target(target, layer, head_type, rank=64 if head_type == "lowrank" else 0,
                                      intermediate_size=576 if head_type == "mlp" else 0,
                                      draft_vocab_size=len(draft_ids), base_model_name_or_path=args.target,
                                      num_head_layers=args.head_layers)
    head = EarlyExitHead(cfg)
    head.set_draft_vocab(draft_ids - torch.arange(len(draft_ids)))
    head.attach_target(target)
    return head.init_from_target(target) if head_type == "layers" else head


def head_dir(out: Path, step: int, head_type: str, layer: int) -> Path:
    return out / "heads" / f"step_{step}" / head_type / f"layer_{layer}"


def lr_at(step: int, total: int, base: float, warmup: float = 0.05, floor: float = 0.1) -> float:
    w = max(1, int(total * warmup))
    if step < w:
        return base * (step + 1) / w
    p = (step - w) / max(1, total - w)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def phase_train(args, out: Path, info: dict, target) -> None:
    from safetensors.torch import load_file

    from train.early_exit import next_token_positions

    types = [t for t in args.types if t in TRAINABLE]
    total = max(args.lengths)
    if all(head_dir(out, total, t, layer).is_dir() for t in types for layer in args.layers):
        return
    draft_ids = torch.tensor(info["draft_ids"])
    heads = {(t, layer): make_head(target, layer, t, args, draft_ids).train() for t in types for layer in args.layers}
    opts = {key: torch.optim.AdamW([p for p in h.parameters() if p.requires_grad], lr=LR[key[0]], weight_decay=0.0)
            for key, h in heads.items()}
    start = 0
    for n in sorted(args.lengths, reverse=True):  # resume from the longest finished length
        state = out / "heads" / f"step_{n}" / "train_state.pt"
        if n < total and state.is_file():
            st = torch.load(state, weights_only=False)
            for key, h in heads.items():
                h.load_state_dict(st["heads"][f"{key[0]}/{key[1]}"])
                opts[key].load_state_dict(st["opts"][f"{key[0]}/{key[1]}"])
            start = n
            print(f"train: resumed at step {n}")
            break
    fdir = out / "features"
    nshards = len(shards_of(info, args.batch_size))
    rng = random.Random(args.seed)
    order: list[int] = []
    epochs = 0
    while len(order) < total:
        perm = list(range(nshards))
        rng.shuffle(perm)
        order += perm
        epochs += 1
    li = {layer: i for i, layer in enumerate(args.layers)}
    head_w = target.get_output_embeddings().weight[draft_ids].detach()
    log = (out / "train_log.jsonl").open("a")
    t0 = time.time()
    sums: dict[str, float] = {}
    for step in range(start, total):
        sh = load_file(str(fdir / f"shard_{order[step]:05d}.safetensors"))
        sel = next_token_positions(sh["attention_mask"], sh["loss_mask"])
        with torch.no_grad():
            teacher = torch.softmax(torch.nn.functional.linear(sh["final"][sel].float(), head_w), -1)
        for (t, layer), head in heads.items():
            h = sh["h"][:, :, li[layer]].float()
            for g in opts[(t, layer)].param_groups:
                g["lr"] = lr_at(step, total, LR[t])
            logits = head(h, select=sel).logits
            loss = -(teacher * torch.log_softmax(logits.float(), -1)).sum(-1).mean()
            opts[(t, layer)].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opts[(t, layer)].step()
            sums[f"{t}/{layer}"] = sums.get(f"{t}/{layer}", 0.0) + float(loss.detach())
        if (step + 1) % 10 == 0:
            log.write(json.dumps({"step": step + 1, "time_s": time.time() - t0,
                                  "loss": {k: v / 10 for k, v in sums.items()}}) + "\n")
            log.flush()
            sums = {}
            print(f"train: step {step + 1}/{total} ({time.time() - t0:.0f} s)", flush=True)
        if step + 1 in args.lengths:
            for (t, layer), head in heads.items():
                d = head_dir(out, step + 1, t, layer)
                d.mkdir(parents=True, exist_ok=True)
                head.save_pretrained(d)
            if step + 1 < total:
                torch.save({"heads": {f"{k[0]}/{k[1]}": h.state_dict() for k, h in heads.items()},
                            "opts": {f"{k[0]}/{k[1]}": o.state_dict() for k, o in opts.items()}},
                           out / "heads" / f"step_{step + 1}" / "train_state.pt")
    log.close()
    (out / "train_info.json").write_text(json.dumps({"steps": total, "epochs_over_subsample": total / nshards,
                                                     "shards": nshards, "batch_size": args.batch_size,
                                                     "lr": LR, "seconds": time.time() - t0}))


# --------------------------------------------------------------------------------------------------- eval
def phase_eval(args, out: Path, info: dict, target, tok) -> dict:
    path = out / "eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    from hsd.decode.drafters import head_logits_to_target
    from hsd.decode.prompts import group_of
    from hsd.models import capture as cap
    from hsd.models.early_exit import EarlyExitHead
    from train import chat_data
    from train.early_exit import next_token_positions

    draft_ids = torch.tensor(info["draft_ids"])
    heads = {("lens", 0, layer): make_head(target, layer, "lens", args, draft_ids).eval() for layer in args.layers}
    for n in args.lengths:
        for t in args.types:
            for layer in args.layers:
                d = head_dir(out, n, t, layer)
                if t != "lens" and d.is_dir():
                    heads[(t, n, layer)] = EarlyExitHead.from_pretrained(str(d)).eval().attach_target(target)
    rows = [json.loads(x) for x in Path(args.eval).read_text().splitlines() if x.strip()]
    acc: dict[tuple, list[float]] = {}
    in_vocab = torch.zeros(len(tok) if len(tok) > target.config.vocab_size else target.config.vocab_size,
                           dtype=torch.bool)
    in_vocab[draft_ids] = True
    cover = {}
    for r in rows:
        ex = chat_data.tokenize_conversation(tok, r["messages"])
        ids = torch.tensor([ex["input_ids"]])
        sel = next_token_positions(torch.ones_like(ids), torch.tensor([ex["loss_mask"]]))
        group = group_of(r.get("source", ""), sum(m["role"] == "user" for m in r["messages"]))
        c = cap.capture(target, ids, layers=args.layers, logits=False, final_hidden=True)
        with torch.no_grad():
            pf_logits = target.get_output_embeddings()(c.final_hidden[sel]).float()
            pf = torch.softmax(pf_logits, -1)
            top = pf_logits.argmax(-1)
            cv = cover.setdefault(group, [0, 0])
            cv[0] += int(in_vocab[top].sum())
            cv[1] += int(top.numel())
            for (t, n, layer), head in heads.items():
                lg = head(c.hidden_states[layer], select=sel).logits
                lg = head_logits_to_target(head, lg).float()
                a = acc.setdefault((t, n, layer, group), [0.0, 0.0, 0.0])
                a[0] += float((lg.argmax(-1) == top).sum())
                a[1] += float(torch.minimum(pf, torch.softmax(lg, -1)).sum())
                a[2] += float(top.numel())
    res: dict = {"per_source": {}, "pooled": {}, "argmax_in_draft_vocab": {}}
    pooled: dict[tuple, list[float]] = {}
    for (t, n, layer, group), (top1, alpha, m) in acc.items():
        res["per_source"].setdefault(group, {})[f"{t}/{n}/{layer}"] = {"top1": top1 / m, "alpha_T1": alpha / m,
                                                                       "positions": int(m)}
        p = pooled.setdefault((t, n, layer), [0.0, 0.0, 0.0])
        p[0] += top1
        p[1] += alpha
        p[2] += m
    for (t, n, layer), (top1, alpha, m) in pooled.items():
        res["pooled"][f"{t}/{n}/{layer}"] = {"top1": top1 / m, "alpha_T1": alpha / m, "positions": int(m)}
    res["argmax_in_draft_vocab"] = {g: v[0] / v[1] for g, v in cover.items()}
    res["conversations"] = len(rows)
    path.write_text(json.dumps(res, indent=1))
    return res


# --------------------------------------------------------------------------------------------------- cost
def _median_cost(fns: dict[str, callable], reps: int) -> dict[str, float]:
    """Interleaved repetitions (the machine is shared: drift hits every function alike), process CPU time
    medians in ms."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(2):
        for f in fns.values():
            f()
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.process_time()
            f()
            times[k].append(1e3 * (time.process_time() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def phase_cost(args, out: Path, info: dict, target) -> dict:
    path = out / "cost.json"
    if path.is_file():
        return json.loads(path.read_text())
    from hsd.decode.cpu import relayout_linears
    from hsd.decode.drafters import head_logits_to_target
    from hsd.decode.sampling import SamplingParams, process
    from hsd.decode.target import TargetRunner
    from hsd.models.early_exit import EarlyExitHead

    runner = TargetRunner(target, cpu_kernels=True)
    ctx = 200
    state = runner.new_state(1, ctx + 64)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, runner.vocab_size, (1, ctx), generator=g)
    o = runner.run(state, tokens=prefix, capture=tuple(args.layers))
    h_ctx = o.captured
    tok1 = prefix[:, -1:]
    L = runner.num_layers
    fns = {}

    def full(n):
        def f():
            runner.run(state, tokens=prefix[:, :n], logit_rows=slice(None))
            state.crop(ctx)
        return f

    for n in range(1, 7):
        fns[f"pass{n}"] = full(n)

    def lower(layer):
        def f():
            runner.run(state, tokens=tok1, end=layer)
            state.crop(ctx, range(layer))
        return f

    def upper(layer, n):
        h = h_ctx[layer][:, :n]

        def f():
            runner.run(state, hidden=h, start=layer, logit_rows=slice(None))
            state.crop(ctx, range(layer, L))
        return f

    params = SamplingParams(0.0)
    draft_ids = torch.tensor(info["draft_ids"])
    for layer in args.layers:
        fns[f"lower{layer}"] = lower(layer)
        for n in range(2, 7):
            fns[f"upper{layer}_{n}"] = upper(layer, n)
        for t in args.types:
            d = head_dir(out, max(args.lengths), t, layer)
            head = (EarlyExitHead.from_pretrained(str(d)).eval().attach_target(target) if t != "lens" and d.is_dir()
                    else make_head(target, layer, t, args, draft_ids).eval())
            relayout_linears(head)
            cache = None
            if head.stateful:
                cache = head.step(h_ctx[layer][:, :ctx]).cache
            h1 = h_ctx[layer][:, -1:]

            def hstep(head=head, cache=cache, h1=h1):
                out_ = head.step(h1, cache=cache)
                process(head_logits_to_target(head, out_.logits), params)
                if cache is not None:
                    cache.crop(ctx)
            fns[f"head_{t}_{layer}"] = hstep
    ms = _median_cost(fns, args.cost_reps)
    t1 = ms["pass1"]
    res = {"t1_ms": t1, "ms": ms, "t1_units": {k: v / t1 for k, v in ms.items()}, "context": ctx,
           "dtype": str(runner.dtype).removeprefix("torch."), "cpu_kernels": runner.cpu_kernels}
    path.write_text(json.dumps(res, indent=1))
    return res


# ------------------------------------------------------------------------------------------------- report
def drafter_prediction(cost_units: dict[str, float], layer: int, head_type: str, a: float) -> tuple[float, int]:
    """Best K's cost per token (t1 units) of the exit drafter with agreement a."""
    from hsd.decode.planner import exit_drafter

    c_step = cost_units[f"lower{layer}"] + cost_units[f"head_{head_type}_{layer}"]
    best = (float("inf"), 0)
    for k in range(1, 6):
        c_final = cost_units[f"lower{layer}"] + cost_units[f"upper{layer}_{k + 1}"]
        tok, c = exit_drafter(k, a, c_step, c_final)
        best = min(best, (c / tok, k))
    return best


def _f3(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def two_level_reference(path: str) -> dict | None:
    """From a decode.json: the best T = 0 EAGLE-3 chain (no exit stage) in t1 units of that run: its cost per
    token, draft step and per-position acceptance (the stand-in for the drafter/exit agreement beta)."""
    from hsd.decode.planner import _decode_ms_per_token, per_position

    runs = json.loads(Path(path).read_text())["runs"]
    ar = next((e for e in runs if e["name"] == "T0/ar"), None)
    chains = [e for e in runs if e["temperature"] == 0 and e["drafter"] == "eagle3" and e["exit_layer"] is None
              and not e.get("tree")]
    if ar is None or not chains:
        return None
    t1 = ar["target_pass_ms"].get("1") or ar["target_pass_ms"].get(1)
    best = min(chains, key=_decode_ms_per_token)
    # the stage must beat the chain it is inserted into, and plain decoding (when the chain is slower than it)
    to_beat = min(_decode_ms_per_token(best), _decode_ms_per_token(ar))
    return {"name": best["name"], "k": best["k"], "tpot_t1": to_beat / t1,
            "chain_tpot_t1": _decode_ms_per_token(best) / t1,
            "ar_tpot_t1": _decode_ms_per_token(ar) / t1, "draft_step_t1": (best.get("draft_step_ms") or 0.0) / t1,
            "beta": per_position(best), "source": path}


def stage_prediction(units: dict[str, float], layer: int, head_type: str, a: float, ref: dict) -> float:
    """Best (K, window) cost per token (t1 units, this study's costs) of EAGLE-3 -> exit stage -> target,
    beta = the EAGLE-3 chain's per-position acceptance. Layers 1..l over n rows = full pass - layers l+1..L."""
    from hsd.decode.planner import three_level

    best = float("inf")
    for k in range(1, 6):
        c_s = units[f"pass{k + 1}"] - units[f"upper{layer}_{k + 1}"] + units[f"head_{head_type}_{layer}"]
        for n in range(1, 5):
            w = min(n + k, 5)  # the window's size before the final pass (bounded by the measured passes)
            c_f = units[f"lower{layer}"] + units[f"upper{layer}_{w + 1}"] + (ref["ar_tpot_t1"] - 1.0)
            tok, cost = three_level(k, n, ref["beta"], a, k * ref["draft_step_t1"] + c_s, c_f)
            best = min(best, cost / tok)
    return best


def flat_units(units: dict[str, float], layer: int) -> dict[str, float]:
    """The measured costs with every multi-token pass priced as a one-token pass (what a memory-bound
    accelerator, or a CPU with fast small-batch GEMMs, would give): a model, not a measurement."""
    out = dict(units)
    for n in range(2, 7):
        out[f"upper{layer}_{n}"] = max(0.0, 1.0 - units[f"lower{layer}"])
    return out


def phase_report(args, out: Path, info: dict, ev: dict, cost: dict) -> None:
    from hsd.decode.planner import breakeven_agreement
    from hsd.machine import machine_info, machine_line

    units = cost["t1_units"]
    mi = machine_info("cpu", cost.get("dtype", "float32"))
    ref = two_level_reference(args.two_level) if args.two_level else None
    rows = []
    for layer in args.layers:
        for t in args.types:
            for n in ([0] if t == "lens" else args.lengths):
                m = ev["pooled"].get(f"{t}/{n}/{layer}")
                if m is None:
                    continue
                step_cost = units[f"lower{layer}"] + units[f"head_{t}_{layer}"]
                need = breakeven_agreement(lambda a, layer=layer, t=t: drafter_prediction(units, layer, t, a)[0], 1.0)
                flat = flat_units(units, layer)  # model: an n-token pass costs one step (memory-bound device)
                need_flat = breakeven_agreement(lambda a, layer=layer, t=t, f=flat: drafter_prediction(f, layer, t, a)[0],
                                                1.0)
                pred0, k0 = drafter_prediction(units, layer, t, m["top1"])
                pred1, k1 = drafter_prediction(units, layer, t, m["alpha_T1"])
                rows.append({"layer": layer, "head_type": t, "steps": n, "top1_T0": m["top1"], "alpha_T1": m["alpha_T1"],
                             "head_cost_t1": units[f"head_{t}_{layer}"], "draft_step_cost_t1": step_cost,
                             "drafter_breakeven_agreement": need, "drafter_breakeven_if_flat_passes": need_flat,
                             "drafter_predicted_speedup_T0": 1.0 / pred0, "drafter_best_k_T0": k0,
                             "drafter_predicted_speedup_T1": 1.0 / pred1, "drafter_best_k_T1": k1,
                             "per_source": {g: v.get(f"{t}/{n}/{layer}") for g, v in ev["per_source"].items()}})
                if ref is not None:
                    rows[-1]["stage_breakeven_agreement"] = breakeven_agreement(
                        lambda a, layer=layer, t=t: stage_prediction(units, layer, t, a, ref), ref["tpot_t1"])
                    rows[-1]["stage_predicted_speedup_T0"] = ref["tpot_t1"] / stage_prediction(units, layer, t,
                                                                                                m["top1"], ref)
    res = {"machine": mi, "machine_line": machine_line(mi), "data": {k: v for k, v in info.items()
                                                                        if k not in ("rows", "draft_ids")},
           "train": json.loads((out / "train_info.json").read_text()) if (out / "train_info.json").is_file() else None,
           "argmax_in_draft_vocab": ev["argmax_in_draft_vocab"], "eval_conversations": ev.get("conversations"),
           "cost": cost, "two_level_reference": ref, "rows": rows, "argv": sys.argv}
    (out / "study.json").write_text(json.dumps(res, indent=1))
    lines = [f"Machine: {res['machine_line']}", "",
             f"Training subsample: {info['train_rows']} of {info['rows_all']} conversations "
             f"({info['train_tokens']} tokens, max {info['max_length']}), draft vocabulary {info['draft_vocab']} "
             f"(covers {info['draft_vocab_coverage_all']:.4f} of the assistant tokens of all rows); t1 = "
             f"{cost['t1_ms']:.1f} ms.", "",
             "| layer | head | steps | top-1 (T=0) | α (T=1) | draft step (t1) | break-even a (drafter vs AR) | "
             "predicted × AR T=0 (K) | predicted × AR T=1 (K) | break-even a, flat passes (model) |"
             + (" break-even a (stage vs EAGLE-3) | predicted × EAGLE-3 T=0 |" if ref else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if ref else "")]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['head_type']} | {r['steps']} | {r['top1_T0']:.3f} | {r['alpha_T1']:.3f} | "
                     f"{r['draft_step_cost_t1']:.3f} | {_f3(r['drafter_breakeven_agreement'])} | "
                     f"{r['drafter_predicted_speedup_T0']:.2f} ({r['drafter_best_k_T0']}) | "
                     f"{r['drafter_predicted_speedup_T1']:.2f} ({r['drafter_best_k_T1']}) | "
                     f"{_f3(r['drafter_breakeven_if_flat_passes'])} |"
                     + (f" {_f3(r['stage_breakeven_agreement'])} | {r['stage_predicted_speedup_T0']:.2f} |" if ref else ""))
    if ref:
        lines += ["", f"Exit stage columns: EAGLE-3 -> exit head -> target (model, these costs, K and window optimised, "
                      f"the EAGLE-3 chain's acceptance beta = {ref['beta']:.3f} as the drafter/exit agreement) against the "
                      f"faster of {ref['name']} ({ref['chain_tpot_t1']:.3f} t1 per token) and plain decoding "
                      f"({ref['ar_tpot_t1']:.3f}) in {ref['source']}."]
    (out / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bad = [t for t in args.types if t not in ("lens", *TRAINABLE)]
    if bad:
        print(f"error: --types: unknown head types {bad}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phases = {"data", "features", "train", "eval", "cost", "report"} if "all" in args.phase else set(args.phase)
    from hsd.models.resolve import load_target, pad_id_of

    target, tok = load_target(args.target, dtype=args.dtype)
    target.requires_grad_(False).eval()
    info = phase_data(args, out, tok)
    if "features" in phases:
        phase_features(args, out, info, target, pad_id_of(tok))
    if "train" in phases:
        phase_train(args, out, info, target)
    ev = phase_eval(args, out, info, target, tok) if phases & {"eval", "report"} else None
    cost = phase_cost(args, out, info, target) if phases & {"cost", "report"} else None
    if "report" in phases:
        phase_report(args, out, info, ev, cost)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
