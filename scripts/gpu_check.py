"""``make gpu-check``: everything that needs a GPU, in one run (about 5-8 minutes on one H100), one table, JSON.

Checks, in order (each one's failure is recorded and the others still run; the exit status is 1 when any
check FAILs, 0 otherwise; nothing is skipped silently: a check that cannot run says why in the table):

1. ``kernels``: the compiled Triton verifiers against the torch backend on the device: the serving chain kernel
   at production sizes (``scripts/bench_verify.py``'s smoke: every disagreement within 1e-5 of a decision
   boundary) and the fused tree kernel (greedy, rrs, weighted) with the same explicit uniforms;
2. ``verify_graph``: a ``VerifyPlan`` captured in a CUDA graph and replayed on new data equals the eager call;
3. ``decode_float32`` / ``decode_bfloat16``: the decode engine on the target (``--target``, the real model by
   default), greedy: speculative output (prompt lookup and, with a head, EAGLE-3 chains and trees) must equal
   this engine's plain greedy output bit for bit (bf16: every pass padded to one row tile,
   ``hsd.decode.rowtile``; trees only where the runner's gap probe passes, else the line says so); agreement with HF
   ``generate`` in the same precision and the top-2 logit margin at each first divergence are reported;
4. ``bench_verify``: ``scripts/bench_verify.py --quick`` against the memory roofline (the goal line);
5. ``bench_decode``: ``scripts/bench_decode.py`` (pass costs, row-tile cost, tree verify, draft steps);
6. ``train_bf16``: a short EAGLE-3 training run (20 steps) with bf16 target features and bf16 autocast: finite
   losses.

    python scripts/gpu_check.py                               # CUDA, the real target (make gpu-check)
    python scripts/gpu_check.py --head runs/quickstart/smollm2-135m/export/eagle3
    python scripts/gpu_check.py --device cpu --quick          # the plumbing on a CPU (CI runs this, tiny)

On a CPU (``--device cpu``, a dry run of the plumbing) the CUDA-only checks 1-2 are reported as ``CPU`` (not
run: they need CUDA), the others run at the sizes given. The JSON (``--json``) holds every figure and
``machine`` (``hsd.machine.machine_info``); the machine line is printed with the table.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PASS, FAIL, INFO, CPU = "PASS", "FAIL", "INFO", "CPU"  # CPU: a CUDA-only check, not run in a CPU dry run


@dataclass
class Result:
    """One check: status, a one-line summary, its figures, seconds."""

    name: str
    status: str
    summary: str
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------ checks


def check_kernels(args) -> Result:
    if args.device.type != "cuda":
        return Result("kernels", CPU, "compiled Triton kernels need CUDA (the interpreter runs them in the test suite)")
    from hsd.verify import verify_tree

    bv = _script("bench_verify")
    gen = torch.Generator(device=args.device).manual_seed(0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        chain_ok = bv.smoke(args.device, torch.bfloat16, gen)
    g = torch.Generator(device=args.device).manual_seed(1)
    b, n, v = 16, 12, 32000
    parents = torch.tensor([-1, -1, 0, 0, 1, 2, 2, 4, 5, 5, 7, 9], device=args.device).expand(b, n).contiguous()
    logits = 2 * torch.randn(b, n + 1, v, device=args.device, generator=g)
    p = torch.softmax(logits, -1)
    q = torch.softmax(logits[:, 1:] + 0.5 * torch.randn(b, n, v, device=args.device, generator=g), -1)
    tokens = torch.multinomial(q.reshape(-1, v), 1, generator=g).view(b, n)
    uni = (torch.rand(b, n, device=args.device, generator=g), torch.rand(b, device=args.device, generator=g))
    tree = {}
    for method in ("greedy", "rrs", "weighted"):
        kw = dict(method=method, uniforms=uni)
        a = verify_tree(tokens, parents, None if method == "greedy" else q, logits if method == "greedy" else p,
                        backend="triton", **kw)
        r = verify_tree(tokens, parents, None if method == "greedy" else q, logits if method == "greedy" else p,
                        backend="torch", **kw)
        tree[method] = int(((a.num_accepted != r.num_accepted) | (a.next_token != r.next_token)).sum())
    ok = chain_ok and not any(tree.values())
    return Result("kernels", PASS if ok else FAIL,
                  f"chain smoke {'PASS' if chain_ok else 'FAIL'}; tree kernel vs torch, trees differing of {b}: {tree}",
                  {"chain_smoke": chain_ok, "tree_mismatches": tree, "smoke_log": out.getvalue()})


def check_verify_graph(args) -> Result:
    if args.device.type != "cuda":
        return Result("verify_graph", CPU, "CUDA graphs need CUDA")
    from hsd.verify import VerifyPlan

    dev = args.device
    b, k, v = 8, 6, 49152
    plan = VerifyPlan(max_batch=b, max_draft=k, vocab=v, device=dev, method="hsd", inputs="probs", backend="triton")
    g = torch.Generator(device=dev).manual_seed(2)

    def fresh():
        p = torch.softmax(2 * torch.randn(b, k + 1, v, device=dev, generator=g), -1)
        q = torch.softmax(2 * torch.randn(b, k, v, device=dev, generator=g), -1)
        return (torch.multinomial(q.reshape(-1, v), 1, generator=g).view(b, k), p, q,
                torch.randint(0, 2**62, (b,), device=dev, generator=g))

    tok, p, q, seeds = fresh()
    temp, steps = torch.ones(b, device=dev), torch.zeros(b, dtype=torch.int64, device=dev)
    graph = plan.capture(tok, p, q, temperature=temp, seeds=seeds, steps=steps)
    bad = 0
    for _ in range(4):  # new data into the captured (static) inputs, then replay
        for dst, src in zip((tok, p, q, seeds), fresh()):
            dst.copy_(src)
        got = graph.replay()
        got = [t.clone() for t in (got.num_accepted, got.next_token)]
        ref = plan(tok, p, q, temperature=temp, seeds=seeds, steps=steps)
        bad += int(((got[0] != ref.num_accepted) | (got[1] != ref.next_token)).sum())
    return Result("verify_graph", PASS if bad == 0 else FAIL, f"4 replays on new data x {b} requests: {bad} differ "
                  "from the eager call", {"mismatches": bad})


def _prompts(tok, n: int, vocab: int, seed: int) -> list[list[int]]:
    """n held-out prompts rendered with the chat template (spread over the sources), or random ids."""
    if tok is None:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, vocab, (24,), generator=g).tolist() for _ in range(n)]
    from hsd.decode.cli import select_prompts
    from hsd.decode.prompts import DEFAULT_PROMPT_FILES, load_prompts, render

    prompts = select_prompts(load_prompts(list(DEFAULT_PROMPT_FILES), ROOT), n)
    return [render(tok, p, []) for p in prompts]


def _load(args, dtype: torch.dtype):
    """(target, tokenizer or None, what it is)."""
    if args.random_config:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.random_config))
        model = model.to(args.device, dtype).eval().requires_grad_(False)
        return model, None, f"random weights of {args.random_config}"
    from hsd.models.resolve import load_target

    model, tok = load_target(args.target, dtype=dtype, device=args.device)
    return model, tok, args.target


def check_decode(args, dtype: torch.dtype) -> Result:
    from hsd.decode import DecodeConfig, Eagle3Drafter, NoDrafter, PromptLookupDrafter, SpeculativeDecoder
    from hsd.decode.loading import load_eagle3
    from hsd.decode.rowtile import resolve_row_tile, tree_exact_for
    from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel

    name = f"decode_{str(dtype).removeprefix('torch.')}"
    model, tok, what = _load(args, dtype)
    if args.head:
        head, head_note = load_eagle3(args.head, model), args.head
    else:
        torch.manual_seed(1)
        vd = min(4096, int(model.config.vocab_size))
        head = Eagle3DraftModel(Eagle3Config.from_target(model.config, vd)).to(args.device, dtype)
        head, head_note = head.attach_target(model).eval(), "random head (no --head): few drafts accepted"
    tree = args.tree
    rows = max(args.k + 1, int(tree.split(":")[2]) + 1)
    tile = resolve_row_tile(args.row_tile, dtype, rows)
    tree_ok = tile is None or tree_exact_for(model, tile)
    base = dict(max_new_tokens=args.max_new_tokens, eos_token_id=[])
    configs = [("lookup", PromptLookupDrafter(), DecodeConfig(k=args.k, **base)),
               ("eagle3-chain", Eagle3Drafter(head, cpu_kernels=args.device.type == "cpu"), DecodeConfig(k=args.k, **base))]
    if tile is None or tree_ok:
        configs.append(("eagle3-tree", Eagle3Drafter(head, cpu_kernels=args.device.type == "cpu"),
                        DecodeConfig(tree=tree, **base)))
    ck = args.device.type == "cpu"
    plain = SpeculativeDecoder(model, NoDrafter(), cpu_kernels=ck, row_tile=tile or "off")
    decs = {n: SpeculativeDecoder(model, d, cpu_kernels=ck, row_tile=tile or "off") for n, d, _ in configs}
    stock = None
    if ck:  # the engine re-lays out CPU weights in place: HF generate runs on an untouched copy
        stock, _, _ = _load(args, dtype)
    ref_model = stock if stock is not None else model
    prompts = _prompts(tok, args.prompts, int(model.config.vocab_size), 0)
    same = {n: 0 for n, _, _ in configs}
    hf_same, divergences, secs = 0, [], {n: 0.0 for n in ["plain", "hf_generate", *same]}
    new_tokens = {n: 0 for n in secs}
    sync = torch.cuda.synchronize if args.device.type == "cuda" else (lambda: None)
    for i, ids in enumerate(prompts):
        x = torch.tensor([ids], device=args.device)
        t0 = time.perf_counter()
        ref = plain.generate(x, config=DecodeConfig(k=0, **base)).new_tokens[0].tolist()
        sync()
        secs["plain"] += time.perf_counter() - t0
        new_tokens["plain"] += len(ref)
        for n, _, cfg in configs:
            t0 = time.perf_counter()
            out = decs[n].generate(x, config=cfg).new_tokens[0].tolist()
            sync()
            secs[n] += time.perf_counter() - t0
            new_tokens[n] += len(out)
            same[n] += out == ref
        t0 = time.perf_counter()
        hf = ref_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=args.max_new_tokens,
                                min_new_tokens=args.max_new_tokens, pad_token_id=0)[0, x.shape[1]:].tolist()
        sync()
        secs["hf_generate"] += time.perf_counter() - t0
        new_tokens["hf_generate"] += len(hf)
        hf_same += hf == ref
        if hf != ref:
            j = next(j for j, (a, c) in enumerate(zip(ref, hf)) if a != c)
            with torch.no_grad():
                lg = ref_model(torch.tensor([ids + ref[:j]], device=args.device)).logits[0, -1].float()
            top = torch.topk(lg, 2)
            divergences.append({"prompt": i, "position": j, "margin": float(top.values[0] - top.values[1])})
    tps = {n: new_tokens[n] / secs[n] for n in secs if secs[n]}
    n_p = len(prompts)
    exact = all(v == n_p for v in same.values())
    summary = (f"{what}, {n_p} prompts x {args.max_new_tokens} tokens, row tile {tile or 'off'}: speculative = plain "
               + ", ".join(f"{n} {v}/{n_p}" for n, v in same.items())
               + ("" if tree_ok else f"; trees not run: the gap probe says this attention rounds tree rows "
                  f"differently at tile {tile} (greedy trees are refused with a tile)")
               + f"; plain = HF generate {hf_same}/{n_p}"
               + (f" (first-divergence top-2 margins {[round(d['margin'], 4) for d in divergences]})" if divergences else "")
               + "; x HF generate: " + ", ".join(f"{n} {tps[n] / tps['hf_generate']:.2f}" for n in tps if n != "hf_generate"))
    return Result(name, PASS if exact else FAIL, summary,
                  {"target": what, "head": head_note, "row_tile": tile, "tree_exact": tree_ok, "prompts": n_p,
                   "speculative_equals_plain": same, "plain_equals_hf_generate": hf_same, "divergences": divergences,
                   "tokens_per_s": tps})


def check_bench_verify(args) -> Result:
    bv = _script("bench_verify")
    argv = ["--quick", "--no-smoke", "--device", str(args.device)]
    if args.device.type == "cpu":
        argv += ["--B", "1", "--K", "4", "--V", "4096", "--repeats", "3"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rows = bv.main(argv)
    goal = [ln for ln in out.getvalue().splitlines() if ln.startswith("goal ")]
    ratio = max((r.get("ratio") or 0.0 for r in rows if r.get("method") == "hsd"), default=None)
    return Result("bench_verify", INFO, (goal[0] if goal else f"{len(rows)} entries (CPU: the torch backend; GPU "
                                         f"figures need CUDA); worst hsd ratio to the roofline {ratio:.2f}"),
                  {"rows": rows, "log": out.getvalue()})


def check_bench_decode(args) -> Result:
    bd = _script("bench_decode")
    path = Path(tempfile.mkdtemp()) / "bench_decode.json"
    argv = ["--device", str(args.device), "--dtype", "bfloat16" if args.device.type == "cuda" else "float32",
            "--json", str(path)]
    argv += ["--random-config", args.random_config] if args.random_config else ["--target", args.target]
    if args.quick:
        argv += ["--context", "16", "--max-tokens", "6", "--reps", "3", "--plain-tokens", "4", "--trees", "4", "8",
                 "--draft-trees", "2:2:3", "--methods", "hsd"]
    else:
        argv += ["--reps", "10", "--plain-tokens", "32"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = bd.main(argv)
    rep = json.loads(path.read_text())
    lay = list(rep["layouts"].values())[-1]
    plain = rep["plain"]
    return Result("bench_decode", PASS if rc == 0 else FAIL,
                  f"{rep['dtype']}: 1-token step {lay['t1_ms']:.2f} ms; pass n=4 {lay['pass_ratio']['4']:.2f}x; row tile "
                  f"{lay['row_tile']['rows']}: " + " ".join(f"n={n} {x:.2f}x" for n, x in lay["row_tile"]["pass_ratio"].items())
                  + f"; plain decoding x{plain['ours_vs_hf_speed']:.2f} HF generate", {"report": rep})


def check_train(args) -> Result:
    from train import eagle3

    out_dir = Path(tempfile.mkdtemp()) / "train"
    low = args.device.type == "cuda"
    overrides = [f"max_steps={args.train_steps}", f"output_dir={out_dir}", "report_to=none", "eval_every=0",
                 "save_every=0", "log_every=1", f"target_dtype={'bfloat16' if low else args.train_dtype}",
                 f"mixed_precision={'bf16' if low else 'no'}", *args.train_override]
    if args.random_config:
        return Result("train_bf16", FAIL, "a training run needs a target with a tokenizer (--target), not --random-config")
    if args.target != "smollm2-135m" and not any(o.startswith("target=") for o in overrides):
        overrides.append(f"target={args.target}")
    eagle3.main(["--config", args.train_config, *overrides])
    rows = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    ok = bool(losses) and all(math.isfinite(x) for x in losses) and rows[-1].get("step") == args.train_steps
    return Result("train_bf16", PASS if ok else FAIL,
                  f"{args.train_steps} steps ({'bf16 features + bf16 autocast' if low else 'CPU dry run: ' + args.train_dtype}): "
                  f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no losses logged",
                  {"losses": losses, "steps": rows[-1].get("step") if rows else None})


CHECKS: list[tuple[str, Callable]] = [
    ("kernels", check_kernels), ("verify_graph", check_verify_graph),
    ("decode_float32", lambda a: check_decode(a, torch.float32)),
    ("decode_bfloat16", lambda a: check_decode(a, torch.bfloat16)),
    ("bench_verify", check_bench_verify), ("bench_decode", check_bench_decode), ("train_bf16", check_train)]


def run_checks(args, checks=None) -> list[Result]:
    out = []
    for name, fn in checks or CHECKS:
        if args.only and name not in args.only:
            out.append(Result(name, INFO, "not selected (--only)"))
            continue
        t0 = time.perf_counter()
        try:
            res = fn(args)
        except Exception as err:  # a check that breaks is a failed check, with its error
            res = Result(name, FAIL, f"{type(err).__name__}: {err}".splitlines()[0][:300],
                         {"traceback": traceback.format_exc()})
        res.name, res.seconds = name, time.perf_counter() - t0
        print(f"[{res.status}] {name} ({res.seconds:.0f} s): {res.summary}", flush=True)
        out.append(res)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--target", default="smollm2-135m", help="the target (short name, folder, Hub id)")
    ap.add_argument("--random-config", help="config.json: random weights of that shape instead of --target "
                                            "(speed and exactness only; no training check)")
    ap.add_argument("--head", help="EAGLE-3 head folder (default: a random head of the target's shape)")
    ap.add_argument("--prompts", type=int, default=6, help="held-out prompts decoded per precision")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--tree", default="4:4:16")
    ap.add_argument("--row-tile", default="auto", help="row tile of the decode checks (hsd.decode.rowtile)")
    ap.add_argument("--train-config", default="configs/eagle3/smollm2-135m.yaml")
    ap.add_argument("--train-override", nargs="*", default=[], help="key=value overrides of the training run")
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--train-dtype", default="float32", help="target dtype of the CPU dry run's training")
    ap.add_argument("--quick", action="store_true", help="small sizes everywhere (the CPU dry run)")
    ap.add_argument("--only", nargs="*", help="run only these checks (the others are listed as not selected)")
    ap.add_argument("--json", default="runs/gpu_check/gpu_check.json")
    args = ap.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if args.quick:
        args.prompts, args.max_new_tokens = min(args.prompts, 2), min(args.max_new_tokens, 8)
    from hsd.machine import machine_info, machine_line

    machine = machine_info(args.device)
    print(f"gpu-check on {machine_line(machine)}", flush=True)
    t0 = time.perf_counter()
    results = run_checks(args)
    width = max(len(r.name) for r in results)
    print("\n" + "=" * 100)
    for r in results:
        print(f"{r.name:<{width}}  {r.status:<4}  {r.seconds:6.0f} s  {r.summary}")
    failed = [r.name for r in results if r.status == FAIL]
    print(f"machine: {machine_line(machine)}; {time.perf_counter() - t0:.0f} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else "all checks passed"))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine, "argv": sys.argv if argv is None else argv,
                                "seconds": time.perf_counter() - t0, "failed": failed,
                                "checks": [r.__dict__ for r in results]}, indent=1, default=str))
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
