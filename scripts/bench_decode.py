"""Decode-step costs, as ratios against baselines measured in the same run (CPU or GPU).

Per weight layout (on the CPU: the stock nn.Linear layout and this engine's, see hsd.decode.cpu) it
prints, medians of interleaved repetitions:

* the target pass over n = 1..8 new tokens at a fixed context, as a ratio to the 1-token step
  (``verify_cost_ratio`` for n = K + 1), and the LM head alone;
* an EAGLE-3 draft step (a head of the target's shape) as a ratio to the 1-token step;
* the engine's verifier (``hsd.decode.verifier.verify``: the serving ``VerifyPlan``) per method and backend
  for K = 3 and 5 over the full vocabulary, and its share of one
  speculative round (draft K steps + one K+1 pass + verify; the goal on a GPU is < 1 %);
* draft trees of N = 4..32 nodes (a binary tree shape): the target pass over root + N nodes with the tree
  mask as a ratio to the 1-token step, and the engine's tree verifier (``verify_tree_draft``: greedy, rrs,
  weighted) in ms and in ms per tree node;
* plain decoding: this engine without a drafter vs Hugging Face ``generate`` (time per token);
* the row tile (``hsd.decode.rowtile``, batch-invariant passes): tiled passes of 1, K + 1 and tree-sized rows
  against the untiled 1-token step, in the precision of the run;
* row invariance (``invariance``): one 6-row pass against six 1-row steps at the same positions, untiled and
  with the row tile: rows bitwise equal, the largest logit difference, and the first hidden-state index where
  each row differs (where a kernel's row-count dependence enters the model);
* the draft tree's head steps: one ``propose_tree`` per shape of ``--draft-trees``, the time of each head step
  by depth (the root's feed, then one batched step per level) and the rest (ranking, masks).

The JSON records ``machine`` (``hsd.machine.machine_info``); the machine line is printed with the figures.

    python scripts/bench_decode.py --target smollm2-135m                # the real model, here
    python scripts/bench_decode.py --random-config path/config.json    # random weights of that shape

Costs do not depend on weight values, so a random model of the target's shape (``--random-config``)
measures the same ratios where the checkpoint cannot travel (e.g. a GPU machine). ``--json`` saves it all.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


CLOCK = {"clock": time.perf_counter, "stat": "min"}
SECTIONS = ("layouts", "invariance", "tree_draft", "configs", "plain")


def interleaved(fns: dict, reps: int, dev: torch.device) -> dict:
    """Median seconds of each callable, measured round-robin so that load changes hit all alike (CPU time
    of this process on the CPU, which other processes' load does not inflate; wall time on a GPU)."""
    clock = CLOCK["clock"]
    for f in fns.values():  # warm-up
        f()
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            sync(dev)
            t0 = clock()
            f()
            sync(dev)
            ts[k].append(clock() - t0)
    # the minimum is the least-disturbed sample (other processes only ever add time); the median is kept in
    # the JSON as well (``--stat median`` prints it)
    pick = min if CLOCK["stat"] == "min" else statistics.median
    return {k: pick(v) for k, v in ts.items()}


def load(args):
    from hsd.models.resolve import load_target, parse_dtype

    dev = torch.device(args.device)
    dtype = parse_dtype(args.dtype, dev)
    if args.random_config:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(args.random_config)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).to(dev, dtype).eval().requires_grad_(False)
        name = f"random weights, shape of {args.random_config}"
    else:
        model, _ = load_target(args.target, dtype=dtype, device=dev)
        name = args.target
    return model, name, dev, dtype


def make_head(target, dev, dtype, path: str | None):
    from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel, load_draft

    if path:
        return load_draft(path, target).to(dev, dtype).eval()
    torch.manual_seed(1)
    head = Eagle3DraftModel(Eagle3Config.from_target(target.config, min(4096, int(target.config.vocab_size))))
    head = head.to(dev, dtype)
    return head.attach_target(target).eval()


def bench_layout(model, head, dev, args, cpu_kernels: bool) -> dict:
    """Pass costs, draft step and verify share with one weight layout."""
    from hsd.decode import DecodeConfig, Eagle3Drafter, SpeculativeDecoder
    from hsd.decode.sampling import SamplingParams, process_logits
    from hsd.decode.verifier import (
        verify,  # the engine's serving path (a cached VerifyPlan)
        verify_tree_draft,
    )

    # untiled: the raw pass costs (the row tile's are measured below, against these)
    dec = SpeculativeDecoder(model, Eagle3Drafter(head, cpu_kernels=cpu_kernels), cpu_kernels=cpu_kernels,
                             row_tile=args.engine_row_tile)
    runner = dec.runner
    ctx = args.context
    v = runner.vocab_size
    g = torch.Generator().manual_seed(0)
    extra = max([16, *(n + 1 for n in args.trees)])
    ids = torch.randint(0, v, (1, ctx + extra), generator=g).to(dev)
    state = runner.new_state(1, ctx + extra + 16)
    runner.run(state, tokens=ids[:, :ctx], logit_rows=slice(-1, None))
    ns = list(range(1, max(args.max_tokens, 6) + 1))  # K + 1 for K = 3 and 5 at least

    def pass_of(n):
        def f():
            runner.run(state, tokens=ids[:, ctx:ctx + n], logit_rows=slice(None), capture=dec.drafter.feature_layers)
            state.crop(ctx)
        return f

    h = torch.randn(1, 8, runner.hidden_size, device=dev, dtype=runner.dtype)

    def head_of(n):
        return lambda: runner.logits(h[:, :n])

    fns = {("pass", n): pass_of(n) for n in ns}
    fns.update({("lm_head", n): head_of(n) for n in (1, 4, 6)})
    # one EAGLE-3 draft step (chained row) at the same context
    drafter = dec.drafter
    feats = torch.randn(1, ctx, 3 * runner.hidden_size, device=dev, dtype=runner.dtype)
    drafter.commit(ids[:, : ctx + 1], feats, 0)
    drafter.propose(1, DecodeConfig().sampling)  # feeds the feature rows once
    base = drafter.cache.length
    hh = torch.randn(1, 1, head.config.hidden_size, device=dev, dtype=runner.dtype)

    def draft_step():
        out = head.forward_step(input_ids=ids[:, :1], hidden=hh, cache=drafter.cache,
                                position_ids=torch.tensor([[base]], device=dev))
        drafter.cache = out.cache
        drafter.cache.crop(base)
        process_logits(out.logits[:, -1], 1.0)

    fns[("draft", 1)] = draft_step
    # verification over the full vocabulary
    for k in (3, 5):
        tok = torch.randint(0, v, (1, k), generator=g).to(dev)
        q = torch.softmax(torch.randn(1, k, v, generator=g), -1).to(dev)
        p = torch.softmax(torch.randn(1, k + 1, v, generator=g), -1).to(dev)
        for method in args.methods:
            for backend in args.backends:
                fns[("verify", k, method, backend)] = (
                    lambda tok=tok, q=q, p=p, m=method, b=backend: verify(tok, q, p, method=m, backend=b,
                                                                         generator=g))
    # draft trees: binary shape (node i hangs below (i - 2) // 2), the pass with the tree mask and verify_tree
    for n in args.trees:
        par = torch.tensor([[(i - 2) // 2 if i >= 2 else -1 for i in range(n)]], device=dev)
        x_par = torch.cat([par.new_full((1, 1), -1), par + 1], dim=1)
        tok = torch.randint(0, v, (1, n), generator=g).to(dev)
        q = torch.softmax(torch.randn(1, n, v, generator=g), -1).to(dev)
        logits = torch.randn(1, n + 1, v, generator=g).to(dev)

        def tree_pass(n=n, x_par=x_par):
            runner.run(state, tokens=ids[:, ctx:ctx + n + 1], parents=x_par, logit_rows=slice(None),
                       capture=dec.drafter.feature_layers)
            state.crop(ctx)

        fns[("tree_pass", n)] = tree_pass
        for method in ("greedy", "rrs", "weighted"):
            temp = 0.0 if method == "greedy" else 1.0
            for backend in args.backends:
                fns[("tree_verify", n, method, backend)] = (
                    lambda tok=tok, par=par, q=q, lg=logits, m=method, b=backend, t=temp:
                    verify_tree_draft(tok, par, q, lg, SamplingParams(t), m, b, g))
    # the row tile (batch-invariant passes): the same passes padded to ``tile`` rows over the whole cache
    from hsd.decode.rowtile import TiledRunner

    tiled = TiledRunner(model, args.row_tile, cpu_kernels=cpu_kernels)
    tstate = tiled.new_state(1, ctx + extra + 16)
    tiled.run(tstate, tokens=ids[:, :ctx])

    def tiled_of(n):
        def f():
            tiled.run(tstate, tokens=ids[:, ctx:ctx + n], logit_rows=slice(None))
            tstate.crop(ctx)
        return f

    tile_rows = sorted({1, 4, 6, *(min(n + 1, args.row_tile) for n in args.trees)})
    fns.update({("tiled", n): tiled_of(n) for n in tile_rows})
    t = interleaved(fns, args.reps, dev)
    t1 = t[("pass", 1)]
    out = {"t1_ms": 1e3 * t1, "pass_ms": {n: 1e3 * t[("pass", n)] for n in ns},
           "pass_ratio": {n: t[("pass", n)] / t1 for n in ns},
           "lm_head_ms": {n: 1e3 * t[("lm_head", n)] for n in (1, 4, 6)},
           "draft_step_ms": 1e3 * t[("draft", 1)], "draft_ratio": t[("draft", 1)] / t1, "verify": {}}
    for key, sec in t.items():
        if key[0] == "verify":
            _, k, method, backend = key
            rnd = k * t[("draft", 1)] + t[("pass", k + 1)] + sec
            out["verify"][f"k{k}/{method}/{backend}"] = {"ms": 1e3 * sec, "share_of_round": sec / rnd}
    out["row_tile"] = {"rows": args.row_tile, "pass_ratio": {n: t[("tiled", n)] / t1 for n in tile_rows}}
    out["tree_pass_ratio"] = {n: t[("tree_pass", n)] / t1 for n in args.trees}
    out["tree_verify"] = {f"n{key[1]}/{key[2]}/{key[3]}": {"ms": 1e3 * sec, "ms_per_node": 1e3 * sec / key[1]}
                          for key, sec in t.items() if key[0] == "tree_verify"}
    return out


def bench_tree_draft(model, head, dev, args) -> dict:
    """Per draft-tree shape: ms of one ``propose_tree`` (median of reps), of each head step by depth (0 = the
    root's feed of the committed features, d >= 1 = the batched step over level d's expanded nodes) and of the
    rest (ranking, masks, rows), after a ``--context`` prompt; greedy (T = 0)."""
    from hsd.decode import DecodeConfig, Eagle3Drafter
    from hsd.decode.tree_spec import TreeSpec

    clock = CLOCK["clock"]
    v = int(model.config.vocab_size)
    ids = torch.randint(0, v, (1, args.context + 1), generator=torch.Generator().manual_seed(4)).to(dev)
    feats = torch.randn(1, args.context, 3 * int(model.config.hidden_size), generator=torch.Generator().manual_seed(5))
    feats = feats.to(dev, next(model.parameters()).dtype)
    out = {}
    for shape in args.draft_trees:
        spec = TreeSpec.parse(shape)
        drafter = Eagle3Drafter(head, cpu_kernels=dev.type == "cpu")
        steps: list[float] = []
        real = head.forward_step

        def timed(*a, real=real, steps=steps, **k):
            sync(dev)
            t0 = clock()
            r = real(*a, **k)
            sync(dev)
            steps.append(clock() - t0)
            return r

        head.forward_step = timed
        totals, per_step = [], []
        try:
            for _ in range(max(3, args.reps // 3)):
                drafter.commit(ids, feats, 0)
                steps.clear()
                sync(dev)
                t0 = clock()
                drafter.propose_tree(spec, DecodeConfig().sampling)
                sync(dev)
                totals.append(clock() - t0)
                per_step.append(list(steps))
        finally:
            head.forward_step = real
        depth = max(len(s) for s in per_step)
        by_depth = [1e3 * statistics.median(s[d] for s in per_step if len(s) > d) for d in range(depth)]
        total = 1e3 * statistics.median(totals)
        out[shape] = {"ms": total, "head_step_ms_by_depth": by_depth, "other_ms": max(0.0, total - sum(by_depth))}
    return out


def bench_invariance(model, dev, args, rows: int = 6) -> dict:
    """Untiled and tiled: a ``rows``-row pass vs ``rows`` 1-row steps over the same positions after a
    ``--context`` prompt (random ids): per row, logits bitwise equal?, max |logit difference| and the first
    hidden-state index (0 = embeddings) where the row differs."""
    from hsd.decode.rowtile import TiledRunner
    from hsd.decode.target import TargetRunner

    v = int(model.config.vocab_size)
    ids = torch.randint(0, v, (1, args.context + rows), generator=torch.Generator().manual_seed(6)).to(dev)
    out = {}
    for label, runner in (("untiled", TargetRunner(model, cpu_kernels=dev.type == "cpu")),
                          (f"tile {args.row_tile}", TiledRunner(model, args.row_tile, cpu_kernels=dev.type == "cpu"))):
        caps = tuple(range(runner.num_layers + 1))
        st = runner.new_state(1, args.context + rows + 8)
        runner.run(st, tokens=ids[:, :args.context])
        many = runner.run(st, tokens=ids[:, args.context:], logit_rows=slice(None), capture=caps)
        st = runner.new_state(1, args.context + rows + 8)
        runner.run(st, tokens=ids[:, :args.context])
        equal, diff, first = [], 0.0, []
        for j in range(rows):
            one = runner.run(st, tokens=ids[:, args.context + j:args.context + j + 1], logit_rows=slice(None),
                             capture=caps)
            equal.append(bool(torch.equal(many.logits[0, j], one.logits[0, 0])))
            diff = max(diff, float((many.logits[0, j] - one.logits[0, 0]).abs().max()))
            first.append(next((i for i in caps if not torch.equal(many.captured[i][0, j], one.captured[i][0, 0])), None))
        out[label] = {"rows_equal": equal, "max_logit_diff": diff, "first_differing_hidden_index": first}
    return out


def bench_plain(model, stock, dev, args) -> dict:
    """Time per token of plain decoding: this engine (no drafter) on ``model`` vs HF generate on ``stock``
    (an untouched copy, as users run generate), same prompt, interleaved."""
    from hsd.decode import DecodeConfig, SpeculativeDecoder

    v = int(model.config.vocab_size)
    ids = torch.randint(0, v, (1, args.context), generator=torch.Generator().manual_seed(2)).to(dev)
    n = args.plain_tokens
    dec = SpeculativeDecoder(model, cpu_kernels=args.cpu_kernels_for_plain, row_tile=args.engine_row_tile)
    cfg = DecodeConfig(max_new_tokens=n, eos_token_id=[])

    def ours():
        dec.generate(ids, config=cfg)

    def hf():
        stock.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                       min_new_tokens=n, pad_token_id=0)

    t = interleaved({"ours": ours, "hf": hf}, max(2, args.reps // 4), dev)
    return {"ours_ms_per_token": 1e3 * t["ours"] / n, "hf_generate_ms_per_token": 1e3 * t["hf"] / n,
            "ours_vs_hf_speed": t["hf"] / t["ours"]}


def bench_configs(model, head, dev, args) -> dict:
    """Time per token of whole decoding runs per configuration (AR, and the head at K = 3, 5 with each
    verifier), and the verifier's share of the decode time, from the engine's own timers."""
    from hsd.decode import DecodeConfig, Eagle3Drafter, NoDrafter, SpeculativeDecoder, summarize

    v = int(model.config.vocab_size)
    ids = torch.randint(0, v, (1, args.context), generator=torch.Generator().manual_seed(3)).to(dev)
    ck = dev.type == "cpu"
    clock = CLOCK["clock"]
    tile = args.engine_row_tile
    decs = {"none": SpeculativeDecoder(model, NoDrafter(), cpu_kernels=ck, stage_clock=clock, row_tile=tile),
            "eagle3": SpeculativeDecoder(model, Eagle3Drafter(head, cpu_kernels=ck), cpu_kernels=ck, stage_clock=clock,
                                         row_tile=tile)}
    out = {}
    for temp in (0.0, 1.0):
        confs = [("ar", "none", 0, "auto")]
        methods = ["greedy"] if temp == 0 else args.methods
        confs += [(f"eagle3-k{k}-{m}", "eagle3", k, m) for k in (3, 5) for m in methods]
        for name, d, k, m in confs:
            cfg = DecodeConfig(temperature=temp, k=k, method=m, max_new_tokens=args.plain_tokens, eos_token_id=[])
            decs[d].generate(ids, config=cfg, seed=0)  # warm-up
            recs = [decs[d].generate(ids, config=cfg, seed=s).stats for s in range(max(1, args.reps // 5))]
            sm = summarize(recs)
            tb = sm["time_breakdown_s"]
            if CLOCK["clock"] is time.process_time:  # whole decode (bookkeeping included), prefill excluded
                dec_s = sum(r.cpu for r in recs) - tb.get("prefill", 0.0)
            else:
                dec_s = sum(r.wall - r.ttft for r in recs)
            ntok = sum(max(0, r.new_tokens - 1) for r in recs)
            out[f"T{temp:g}/{name}"] = {"ms_per_token": 1e3 * dec_s / ntok if ntok else None, "tau": sm["tau"],
                                        "verify_share": tb.get("verify", 0.0) / dec_s if dec_s else None}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--random-config", help="config.json: random weights of that shape (costs only)")
    ap.add_argument("--head", help="EAGLE-3 head folder (default: random head of the target's shape)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--plain-tokens", type=int, default=32)
    ap.add_argument("--trees", type=int, nargs="+", default=[4, 8, 16, 32], help="tree sizes N (nodes)")
    ap.add_argument("--draft-trees", nargs="+", default=["4:4:16"], help="draft tree shapes TOPK:DEPTH:TOTAL whose "
                                                                          "head steps are timed by depth")
    ap.add_argument("--row-tile", type=int, default=0, help="rows of the tiled passes measured (default: the "
                                                            "largest --trees size + 1, rounded up to 8)")
    ap.add_argument("--engine-row-tile", default="off", help="row tile of the engine in the other sections (default "
                                                             "off: the raw costs; a number: that tile, for configs "
                                                             "and plain decoding in the exact mode)")
    ap.add_argument("--methods", nargs="+", default=["tokenwise", "blockwise", "hsd"])
    ap.add_argument("--backends", nargs="+", default=None, help="default: torch (+ triton on a GPU)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--stat", choices=["min", "median"], default="min",
                    help="statistic of the interleaved repetitions (default min: the least disturbed sample)")
    ap.add_argument("--wall", action="store_true", help="time with the wall clock on the CPU too (default: "
                                                        "process CPU time there, robust to a shared machine)")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                    help="what to measure (default: everything)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backends is None:
        args.backends = ["torch", "triton"] if args.device.startswith("cuda") else ["torch"]
    model, name, dev, dtype = load(args)
    from hsd.decode.rowtile import tile_for
    from hsd.machine import machine_info, machine_line

    args.row_tile = args.row_tile or tile_for(max(args.trees, default=0) + 1)
    machine = machine_info(dev, dtype)
    print(f"machine: {machine_line(machine)}")
    CLOCK["clock"] = time.perf_counter if (dev.type != "cpu" or args.wall) else time.process_time
    CLOCK["stat"] = args.stat
    stock, _, _, _ = load(args)  # untouched copy: the stock layout and HF generate run on it
    head = make_head(model, dev, dtype, args.head)
    report = {"model": name, "device": str(dev), "dtype": str(dtype), "threads": torch.get_num_threads(),
              "clock": "wall" if CLOCK["clock"] is time.perf_counter else "process CPU time", "stat": args.stat,
              "context": args.context, "torch": torch.__version__, "machine": machine, "layouts": {}}
    try:
        import os

        report["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    layouts = ([False, True] if dev.type == "cpu" else [False]) if "layouts" in args.sections else []
    for ck in layouts:
        label = "engine (transposed linears + packed LM head)" if ck else "stock nn.Linear layout"
        r = bench_layout(model if ck else stock, make_head(model if ck else stock, dev, dtype, args.head) if not ck
                         else head, dev, args, ck)
        report["layouts"][label] = r
        print(f"\n== {label}: 1-token step {r['t1_ms']:.2f} ms, draft step {r['draft_ratio']:.3f} x")
        print("   pass over n tokens / 1-token step: " + "  ".join(f"n={n}: {x:.2f}" for n, x in r["pass_ratio"].items()))
        print("   LM head ms: " + "  ".join(f"rows={n}: {x:.2f}" for n, x in r["lm_head_ms"].items()))
        for key, v in r["verify"].items():
            print(f"   verify {key}: {v['ms']:.3f} ms = {100 * v['share_of_round']:.2f} % of a round")
        print("   tree pass over root + N nodes / 1-token step: "
              + "  ".join(f"N={n}: {x:.2f}" for n, x in r["tree_pass_ratio"].items()))
        for key, v in r["tree_verify"].items():
            print(f"   tree verify {key}: {v['ms']:.3f} ms, {1e3 * v['ms_per_node']:.1f} us per node")
        rt = r["row_tile"]
        print(f"   row tile {rt['rows']} (batch-invariant passes) / untiled 1-token step: "
              + "  ".join(f"n={n}: {x:.2f}" for n, x in rt["pass_ratio"].items()))
    if "invariance" in args.sections:
        report["invariance"] = bench_invariance(model, dev, args)
        for label, r in report["invariance"].items():
            print(f"\n== row invariance, {label}: 6-row pass vs 1-row steps: rows equal {r['rows_equal']}, max logit "
                  f"difference {r['max_logit_diff']:.3g}, first differing hidden-state index {r['first_differing_hidden_index']}")
    report["tree_draft"] = bench_tree_draft(model, head, dev, args) if "tree_draft" in args.sections else {}
    for shape, r in report["tree_draft"].items():
        print(f"\n== draft tree {shape}: {r['ms']:.2f} ms; head step by depth "
              + " ".join(f"{x:.2f}" for x in r["head_step_ms_by_depth"]) + f" ms; other {r['other_ms']:.2f} ms")
    report["configs"] = bench_configs(model, head, dev, args) if "configs" in args.sections else {}
    print("\n== decoding, per configuration (time per output token after the first; verify share of decode time):")
    for name, r in report["configs"].items():
        print(f"   {name}: {r['ms_per_token']:.2f} ms/token, tau {r['tau']:.2f}, verify {100 * (r['verify_share'] or 0):.2f} %")
    args.cpu_kernels_for_plain = dev.type == "cpu"
    if "plain" in args.sections:
        report["plain"] = p = bench_plain(model, stock, dev, args)
        print(f"\n== plain decoding: ours {p['ours_ms_per_token']:.2f} ms/token, HF generate "
              f"{p['hf_generate_ms_per_token']:.2f} ms/token -> ours x{p['ours_vs_hf_speed']:.2f}")
    print(f"machine: {machine_line(machine)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
