"""Benchmark of the serving verifier (hsd.verify.VerifyPlan, one fused Triton launch) against an honest
memory roofline. One run on a GPU prints every figure:

1. the device: spec HBM bandwidth (table, or --spec-tbs) and the bandwidth of a measured large copy
   (2 x 1 GiB moved) and a large read;
2. a correctness smoke of the COMPILED kernel against the torch backend at production sizes (bf16
   probabilities, logits with thresholds, greedy rows and ragged drafts, a draft vocabulary, Philox):
   every disagreement must lie within 1e-5 of a decision boundary (float32 summation order), and
   there must be few;
3. per (inputs, dtype, V, K, B, method): the bytes one verification must read (p once, q once: the
   roofline), the roofline time at the measured-copy and at the spec bandwidth, the CUDA-graph replay
   time on inputs cold in HBM (an L2-sized read of another buffer before each replay; the headline),
   its ratio to the measured roofline, the eager GPU time, and the host microseconds per call;
4. the goal check: HSD <= 1.5x roofline at B >= 8, V >= 128k, bf16.

    python scripts/bench_verify.py                    # GPU, the full grid (a few minutes)
    python scripts/bench_verify.py --quick            # GPU, B in {8, 32}, K = 8
    python scripts/bench_verify.py --device cpu       # CPU: what a CPU can measure (see below)
    python scripts/bench_verify.py --target-step-ms 5.5   # also: the verifier as a fraction of a target step
    python scripts/bench_verify.py --quick --json bench_verify.json   # also save every figure + the machine

The first line printed is the machine (``hsd.machine.machine_line``: CPU and its bf16-relevant flags, GPU,
torch/transformers versions, threads, precision); ``--json`` records it (``machine_info``) with the rows.

On a CPU there is no kernel to time: it reports the memory bandwidth of this machine, the torch backend
(``verify``, the plan's torch path) against that roofline, and the host cost of a triton call up to
the driver launch (argument checks, launch records and Triton's binder), and says that the GPU figures
are pending.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsd.machine import machine_info, machine_line  # noqa: E402
from hsd.verify import VerifyPlan, logit_thresholds, philox_uniforms, row_lse, verify  # noqa: E402
from hsd.verify.serving import serve_torch  # noqa: E402

FULL = dict(B=(1, 8, 32, 64), K=(4, 8), V=(32000, 128256, 151936))
QUICK = dict(B=(8, 32), K=(8,), V=(128256, 151936))
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Spec HBM bandwidth in TB/s by device-name fragment (first match wins).
SPEC_TBS = [("H200", 4.8), ("GH200", 4.0), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35), ("H800", 3.35),
            ("B200", 8.0), ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935), ("A100", 1.555), ("L40S", 0.864),
            ("L40", 0.864), ("A10", 0.6), ("L4", 0.3), ("RTX 4090", 1.008)]
GOAL = 1.5


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"grid {QUICK}")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--dtypes", default=None, help="comma list of bfloat16,float32 (default: bfloat16 on a GPU, "
                    "float32 on a CPU, where bfloat16 is emulated)")
    ap.add_argument("--methods", default="hsd,tokenwise")
    ap.add_argument("--B", type=int, nargs="+")
    ap.add_argument("--K", type=int, nargs="+")
    ap.add_argument("--V", type=int, nargs="+")
    ap.add_argument("--repeats", type=int, default=50, help="timed replays per entry (median)")
    ap.add_argument("--spec-tbs", type=float, default=None, help="spec HBM bandwidth in TB/s (default: table)")
    ap.add_argument("--target-step-ms", type=float, default=None,
                    help="time of one target forward step: prints the verifier's fraction of it")
    ap.add_argument("--no-smoke", action="store_true", help="skip the correctness smoke")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the machine, the bandwidths and every row to this JSON file")
    return ap.parse_args(argv)


# ---------------------------------------------------------------- inputs


def make_inputs(b, k, v, dtype, device, gen, logits=False, ragged=False, greedy=False, vd=None):
    """A verification call of b requests: target/draft rows (probabilities in ``dtype``, or raw logits
    with top-k thresholds and their log-sum-exp), draft tokens sampled from the draft rows, temperatures,
    Philox seeds/steps. vd: draft-vocabulary size (d2t = every (v // vd)-th id)."""
    target = 2.0 * torch.randn(b, k + 1, v, device=device, generator=gen)
    draft = target[:, :k] + 0.7 * torch.randn(b, k, v, device=device, generator=gen)
    temp = torch.full((b,), 0.8, device=device)
    if greedy:
        temp[::4] = 0.0
    d2t = None
    if vd is not None:
        ids = torch.arange(vd, device=device) * (v // vd)
        d2t = (ids - torch.arange(vd, device=device)).cpu()
        draft = draft[..., ids]
    t = temp.clamp_min(0.05).view(-1, 1, 1)
    x = dict(temp=temp, d2t=d2t, seeds=torch.randint(0, 2**62, (b,), device=device, generator=gen),
             steps=torch.randint(0, 2**40, (b,), device=device, generator=gen))
    if logits:
        thr_p = logit_thresholds(target, t.squeeze(-1).expand(b, k + 1), top_k=50)
        thr_q = logit_thresholds(draft, t.squeeze(-1).expand(b, k), top_k=50)
        q = torch.softmax(draft.masked_fill(draft < thr_q.unsqueeze(-1), float("-inf")) / t, -1)
        x.update(target=target.to(dtype), draft=draft.to(dtype), target_threshold=thr_p, draft_threshold=thr_q,
                 target_lse=row_lse(target.to(dtype), t.squeeze(-1).expand(b, k + 1), thr_p),
                 draft_lse=row_lse(draft.to(dtype), t.squeeze(-1).expand(b, k), thr_q))
    else:
        p = torch.softmax(target / t, -1)
        q = torch.softmax(draft / t, -1)
        x.update(target=p.to(dtype), draft=q.to(dtype))
    tokens = torch.multinomial(q.reshape(-1, q.shape[-1]).float(), 1, generator=gen).view(b, k)
    if vd is not None:
        tokens = tokens * (v // vd)
    if ragged:
        lengths = torch.randint(0, k + 1, (b,), device=device, generator=gen)
        tokens = torch.where(torch.arange(k, device=device) < lengths.unsqueeze(1), tokens, -1)
    x["tokens"] = tokens.to(torch.int32)
    return x


def call_kwargs(x, with_lse=True):
    kw = dict(temperature=x["temp"], seeds=x["seeds"], steps=x["steps"])
    for name in ("target_threshold", "draft_threshold") + (("target_lse", "draft_lse") if with_lse else ()):
        if name in x:
            kw[name] = x[name]
    return kw


def read_bytes(x, draft=True):
    """Bytes one verification must read: every target row once, every draft row once."""
    n = x["target"].numel() * x["target"].element_size()
    if draft:
        n += x["draft"].numel() * x["draft"].element_size()
    return n


# ---------------------------------------------------------------- device figures


def spec_tbs(name: str, override):
    if override:
        return override
    for frag, tbs in SPEC_TBS:
        if frag in name:
            return tbs
    return None


def measured_bandwidth(device, nbytes=1 << 30):
    """(copy GB/s counting read + write, read GB/s) of large tensors, medians."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    if device.type == "cuda":
        def timed(fn, n=10):
            fn()
            torch.cuda.synchronize()
            ts = []
            for _ in range(n):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            return statistics.median(ts)
    else:
        def timed(fn, n=3):
            fn()
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts)
    copy = 2 * nbytes / timed(lambda: dst.copy_(src)) / 1e9
    read = nbytes / timed(lambda: src.sum()) / 1e9
    return copy, read


# ---------------------------------------------------------------- timing


class GpuTimer:
    def __init__(self, device, repeats):
        self.device, self.repeats = device, repeats
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20)
        self.flush_buf = torch.ones(2 * l2 // 4, dtype=torch.float32, device=device)  # read 2x L2: clean lines

    def replay(self, graph):
        """Median time of graph.replay() with the inputs cold: a 2x-L2 read of another buffer first."""
        ts = []
        for i in range(self.repeats + 3):
            self.flush_buf.sum()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            b.synchronize()
            if i >= 3:
                ts.append(a.elapsed_time(b) / 1e3)
        return statistics.median(ts)

    def eager(self, fn):
        """(median GPU time of an eager call, cold inputs, mean host time per call without a sync)."""
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(self.repeats):
            self.flush_buf.sum()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        torch.cuda.synchronize()
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t0) / n
        torch.cuda.synchronize()
        return statistics.median(ts), host


def cpu_time(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ---------------------------------------------------------------- correctness smoke


def boundary_margin(x, res_ref, coins, u, method, row):
    """Distance (float64) of request ``row``'s uniforms to the nearest decision boundary of the torch
    reference: min over its levels of |coin - h| and |u - CDF breakpoint| of the chosen row."""
    from hsd.verify import api
    from hsd.verify.serving import _processed, _rows

    tok = x["tokens"][row:row + 1].long()
    kb = int((tok >= 0).sum())
    logits = "target_lse" in x
    t = x["temp"][row:row + 1]
    p = _processed(_rows(x["target"], None, row + 1, tok.shape[1] + 1)[row:], logits, t,
                   x.get("target_threshold", None)[row:row + 1] if logits else None,
                   x.get("target_lse", None)[row:row + 1] if logits else None).double()
    q = _processed(_rows(x["draft"], None, row + 1, tok.shape[1])[row:], logits, t,
                   x.get("draft_threshold", None)[row:row + 1] if logits else None,
                   x.get("draft_lse", None)[row:row + 1] if logits else None).double()
    if x["d2t"] is not None:
        ids = torch.arange(x["d2t"].numel(), device=q.device) + x["d2t"].to(q.device)
        q = torch.zeros(1, q.shape[1], p.shape[-1], dtype=q.dtype, device=q.device).index_copy_(2, ids, q)
    if float(t) == 0:  # greedy: only exact ties of the argmax can differ
        top = x["target"][row, : kb + 1].double().topk(2, -1).values
        return float((top[:, 0] - top[:, 1]).min())
    if kb == 0:
        cdf = p[0, 0].cumsum(0) / p[0, 0].sum()
        return float((cdf - u[row].double()).abs().min())
    lv = api.levels_fn(method)(tok[:, :kb], q[:, :kb], p[:, :kb + 1])
    m = float((coins[row, :kb].double() - lv.h[0]).abs().min())
    n = int(res_ref.num_accepted[row])
    r, fb = api.residual_at(lv, tok[:, :kb], q[:, :kb], p[:, :kb + 1], torch.tensor([n], device=p.device))
    r = r if float(r.sum()) > 1e-12 else fb
    cdf = r[0].cumsum(0) / r[0].sum()
    return min(m, float((cdf - u[row].double()).abs().min()))


def smoke(device, dtype, gen, shape=(8, 8, 128256), vd=32000):
    """Compiled kernel vs torch backend at production sizes; returns True if every check passes."""
    cases = [("probs hsd", dict(logits=False), "hsd"), ("probs tokenwise", dict(logits=False), "tokenwise"),
             ("logits+thr+lse hsd, greedy rows, ragged", dict(logits=True, ragged=True, greedy=True), "hsd"),
             (f"probs hsd, draft vocab {vd}", dict(logits=False, vd=vd), "hsd")]
    ok = True
    b, k, v = shape
    for name, opts, method in cases:
        x = make_inputs(b, k, v, dtype, device, gen, **opts)
        inputs = "logits" if opts.get("logits") else "probs"
        plan = VerifyPlan(max_batch=b, max_draft=k, vocab=v, device=device, method=method, inputs=inputs,
                          draft_vocab=x["d2t"], backend="triton")
        kw = call_kwargs(x)
        got = plan(x["tokens"], x["target"], x["draft"], **kw)
        ref = serve_torch(x["tokens"], x["target"], x["draft"], method=method, inputs=inputs,
                          draft_ids=plan.draft_ids, **{k2: v2 for k2, v2 in kw.items()})
        coins, u = philox_uniforms(x["seeds"], x["steps"], k)
        bad = ((got.num_accepted != ref.num_accepted) | (got.next_token != ref.next_token)).nonzero().flatten()
        margins = [boundary_margin(x, ref, coins, u, method, int(i)) for i in bad.tolist()]
        explained = all(mg < 1e-5 for mg in margins)
        passed = explained and len(margins) <= max(1, b // 8)
        ok &= passed
        print(f"  {'PASS' if passed else 'FAIL'} {name}: B={b} K={k} V={v} {str(dtype).replace('torch.', '')}: "
              f"{len(margins)} of {b} requests differ" + (f" (boundary margins {[f'{m:.1e}' for m in margins]})"
                                                          if margins else "") + f", flags {got.flags.tolist()}")
    return ok


def time_entry(timer, device, x, has_q, mode, method, roof):
    """Timings of one (inputs, shape, method) entry; see the module docstring."""
    b, k = x["tokens"].shape
    v = x["target"].shape[-1]
    q = x["draft"] if has_q else None
    kw = call_kwargs(x, with_lse=mode != "logits-nolse")
    inputs = "logits" if mode.startswith("logits") else "probs"
    cuda = device.type == "cuda"
    plan = VerifyPlan(max_batch=b, max_draft=k, vocab=v, device=device, method=method, inputs=inputs,
                      backend="triton" if cuda else "torch")

    def call():
        return plan(x["tokens"], x["target"], q, **kw)

    if cuda:
        graph = plan.capture(x["tokens"], x["target"], q, **kw)
        t_graph = timer.replay(graph)
        t_eager, host = timer.eager(call)
        return dict(graph_us=t_graph * 1e6, ratio=t_graph / roof, eager_us=t_eager * 1e6, host_us=host * 1e6)
    coins, u = philox_uniforms(x["seeds"], x["steps"], k)
    t_torch = cpu_time(lambda: verify(x["tokens"].long(), q, x["target"], method=method, uniforms=(coins, u),
                                      validate=False), 3)
    t_plan = cpu_time(call, 3)
    host = host_cost(b, k, v, method, x, q, kw)
    return dict(torch_us=t_torch * 1e6, ratio=t_torch / roof, plan_us=t_plan * 1e6, host_us=host * 1e6)


def format_row(r, cuda):
    head = (f"{r['inputs']:>8} {r['dtype']:>8} {r['V']:>6} {r['K']:>2} {r['B']:>3} {r['method']:>9} {r['MB']:>7.1f} "
            f"{r['roof_us']:>8.1f} ")
    if cuda:
        return head + (f"{r['spec_us']:>8.1f} {r['graph_us']:>9.1f} {r['ratio']:>6.2f} {r['eager_us']:>9.1f} "
                       f"{r['host_us']:>8.1f}")
    return head + f"{r['torch_us']:>9.0f} {r['ratio']:>6.1f} {r['plan_us']:>13.0f} {r['host_us']:>8.1f}"


# ---------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(args.seed)
    grid = dict(QUICK if args.quick else FULL)
    for key in ("B", "K", "V"):
        if getattr(args, key):
            grid[key] = tuple(getattr(args, key))
    dtypes = [DTYPES[d] for d in (args.dtypes or ("bfloat16" if cuda else "float32")).split(",")]
    methods = args.methods.split(",")

    machine = machine_info(device, dtypes[0] if len(dtypes) == 1 else None)
    print(f"machine: {machine_line(machine)}")
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    spec = spec_tbs(name, args.spec_tbs) if cuda else args.spec_tbs
    copy_gbs, read_gbs = measured_bandwidth(device, (1 << 30) if cuda else (1 << 28))
    print(f"device: {name}")
    print(f"bandwidth: spec {f'{spec:.2f} TB/s' if spec else 'unknown (pass --spec-tbs)'}; measured copy "
          f"{copy_gbs:.0f} GB/s (read + write of {'1 GiB' if cuda else '256 MiB'}), read {read_gbs:.0f} GB/s")
    if cuda:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        print(f"L2: {l2 / 2**20:.0f} MiB; inputs are made cold by reading a {2 * l2 / 2**20:.0f} MiB buffer "
              "before every timed call")
    else:
        print("# no CUDA device: the fused kernel is not timed; the GPU figures are pending (run this script on a GPU)")

    smoke_ok = None
    if cuda and not args.no_smoke:
        print("\ncorrectness smoke, compiled kernel vs torch backend (Philox uniforms, decisions equal except "
              "within 1e-5 of a boundary):")
        smoke_ok = smoke(device, DTYPES["bfloat16"], gen)

    print("\nGPU times are medians over --repeats; host_us: Python + launch time per call (no sync)." if cuda else
          "\nCPU times: medians; host_us: VerifyPlan(backend='triton') per call up to the driver launch "
          "(checks, launch records, Triton's binder; the launch itself needs a GPU).")
    hdr = (f"{'inputs':>8} {'dtype':>8} {'V':>6} {'K':>2} {'B':>3} {'method':>9} {'MB':>7} {'roof_us':>8} "
           f"{'spec_us':>8} {'graph_us':>9} {'ratio':>6} {'eager_us':>9} {'host_us':>8}")
    if not cuda:
        hdr = (f"{'inputs':>8} {'dtype':>8} {'V':>6} {'K':>2} {'B':>3} {'method':>9} {'MB':>7} {'roof_us':>8} "
               f"{'torch_us':>9} {'ratio':>6} {'plan_torch_us':>13} {'host_us':>8}")
    print(hdr)
    print("-" * len(hdr))
    timer = GpuTimer(device, args.repeats) if cuda else None
    rows = []
    modes = [("probs", True), ("logits", True), ("logits-nolse", True), ("probs", False)] if cuda else [("probs", True)]
    for v in grid["V"]:
        for k in grid["K"]:
            for b in grid["B"]:
                for dtype in dtypes:
                    for mode, has_q in modes:
                        if not has_q and mode != "probs":
                            continue
                        logits = mode.startswith("logits")
                        x = make_inputs(b, k, v, dtype, device, gen, logits=logits)
                        nbytes = read_bytes(x, has_q)
                        roof = nbytes / (copy_gbs * 1e9)
                        spec_t = nbytes / (spec * 1e12) if spec else float("nan")
                        label = mode if has_q else "probs-pm"
                        for method in methods:
                            row = dict(inputs=label, dtype=str(dtype).replace("torch.", ""), V=v, K=k, B=b,
                                       method=method, MB=nbytes / 1e6, roof_us=roof * 1e6, spec_us=spec_t * 1e6)
                            row.update(time_entry(timer, device, x, has_q, mode, method, roof))
                            rows.append(row)
                            print(format_row(row, cuda), flush=True)
                        del x
                        if cuda:
                            torch.cuda.empty_cache()
    print()
    if cuda:
        goal = [r for r in rows if r["method"] == "hsd" and r["B"] >= 8 and r["V"] >= 128000
                and r["dtype"] == "bfloat16" and r["inputs"] in ("probs", "logits")]
        if goal:
            worst = max(goal, key=lambda r: r["ratio"])
            verdict = "MET" if worst["ratio"] <= GOAL else "NOT MET"
            print(f"goal HSD <= {GOAL}x roofline at B >= 8, V >= 128k, bf16 (graph replay, cold inputs): worst "
                  f"{worst['ratio']:.2f}x ({worst['inputs']}, B={worst['B']} K={worst['K']} V={worst['V']}): {verdict}")
        if args.target_step_ms:
            for r in goal:
                print(f"  verifier / target step ({args.target_step_ms} ms): {r['graph_us'] / 1e3 / args.target_step_ms:.2%} "
                      f"at {r['inputs']} B={r['B']} K={r['K']} V={r['V']}")
        if smoke_ok is not None:
            print(f"correctness smoke: {'PASS' if smoke_ok else 'FAIL'}")
    else:
        print("GPU figures (graph replay on cold inputs, ratio to the roofline, eager time, the correctness smoke "
              "of the compiled kernel): pending, no GPU here.")
    if args.json:
        report = {"machine": machine, "device": name, "args": vars(args), "spec_tbs": spec, "copy_gbs": copy_gbs,
                  "read_gbs": read_gbs, "smoke_ok": smoke_ok, "goal_ratio": GOAL, "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return rows


def host_cost(b, k, v, method, x, q, kw, n=50):
    """Seconds per call of VerifyPlan(backend='triton') up to the driver launch, measured on the CPU: the
    argument checks, the launch records (cached across calls with the same buffers) and Triton's binder
    for a CUDA target (its specialisation of the arguments); the kernels themselves are not launched."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        from hsd.kernels import launch
    except ImportError:
        return math.nan
    if not hasattr(launch.kern._verify_kernel, "signature"):  # TRITON_INTERPRET=1: no binder to measure
        return math.nan
    backend = make_backend(GPUTarget("cuda", 90, 32))

    class BinderOnly:  # kernel[grid](*args) runs the binder a launch runs, then stops
        def __init__(self, kernel):
            self.binder = create_function_from_signature(kernel.signature, kernel.params, backend)

        def __getitem__(self, grid):
            return self.binder

    real = launch.kern._verify_kernel, launch.kern._lse_kernel
    launch.kern._verify_kernel, launch.kern._lse_kernel = BinderOnly(real[0]), BinderOnly(real[1])
    try:
        plan = VerifyPlan(max_batch=b, max_draft=k, vocab=v, device="cpu", method=method, backend="triton")
        plan(x["tokens"], x["target"], q, **kw)
        t0 = time.perf_counter()
        for _ in range(n):
            plan(x["tokens"], x["target"], q, **kw)
        return (time.perf_counter() - t0) / n
    finally:
        launch.kern._verify_kernel, launch.kern._lse_kernel = real


if __name__ == "__main__":
    main()
