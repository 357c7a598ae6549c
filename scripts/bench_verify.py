"""Benchmark single-chain verification against a same-run memory roofline.

For every (B, K, V) it times each method ("tokenwise", "blockwise", "hsd") on each backend:
  torch          hsd.verify.verify(..., backend="torch") on probabilities (validate=False)
  triton         hsd.kernels.verify_triton on probabilities            (GPU; or TRITON_INTERPRET=1)
  triton-logits  hsd.kernels.verify_triton_logits on raw logits, T = 0.8 (GPU; or TRITON_INTERPRET=1)
and divides the median time by the roofline: the median time of one read of the same tensors
(p.sum() and q.sum(), i.e. a reduction over B(K+1)V + BKV elements; p only for point-mass drafts).
Goal on a GPU (issue 2): HSD Triton <= 2x the roofline at B >= 8.

  python scripts/bench_verify.py --quick --threads 1     # CPU: torch backend, a couple of minutes
  python scripts/bench_verify.py --dtype bfloat16        # GPU: torch + compiled Triton, full grid
  python scripts/bench_verify.py --cuda-graph            # GPU: also Triton/roofline replayed from CUDA graphs

GPU timings use CUDA events after warm-up (the first calls compile the kernels); CPU timings use
time.perf_counter. All numbers are medians over --repeats calls.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsd.verify import verify  # noqa: E402

METHODS = ("tokenwise", "blockwise", "hsd")
FULL = dict(B=(1, 8, 32, 64), K=(4, 8), V=(32000, 152064))
QUICK = dict(B=(1, 8, 32), K=(4, 8), V=(32000, 152064))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEMPERATURE = 0.8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"subset {QUICK} (CPU: a couple of minutes)")
    ap.add_argument("--backends", default="auto",
                    help="comma list of torch,triton,triton-logits (auto: torch on CPU; all three with CUDA)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of methods")
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                    help="dtype of p, q and logits (auto: bfloat16 with CUDA, float32 on CPU)")
    ap.add_argument("--B", type=int, nargs="+", help="override the batch sizes")
    ap.add_argument("--K", type=int, nargs="+", help="override the draft lengths")
    ap.add_argument("--V", type=int, nargs="+", help="override the vocabulary sizes")
    ap.add_argument("--point-mass", action="store_true", help="also time point-mass drafts (draft probs None)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per entry (default 20 GPU, 5 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5 GPU, 1 CPU)")
    ap.add_argument("--block-v", type=int, default=None, help="Triton BLOCK_V (default: hsd.kernels default)")
    ap.add_argument("--cuda-graph", action="store_true", help="GPU: also time Triton and roofline as CUDA graphs")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU: torch intra-op threads (use 1 on a machine shared with other jobs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    bad = set(args.methods.split(",")) - set(METHODS)
    if bad:
        ap.error(f"--methods: unknown {sorted(bad)}")
    return args


class Timer:
    """Median wall time of fn() in seconds: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, repeats: int, warmup: int):
        self.cuda = device.type == "cuda"
        self.repeats, self.warmup = repeats, warmup

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        if self.cuda:
            torch.cuda.synchronize()
            for _ in range(self.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
        else:
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def graph(self, fn: Callable[[], object]) -> float:
        """Median time of replaying fn captured in a CUDA graph (no Python launch overhead)."""
        fn()  # compile / allocate outside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return self(graph.replay)


def make_inputs(b: int, k: int, v: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator,
                keep_logits: bool):
    """Random target/draft logits (draft close to the target), their softmax rows at TEMPERATURE in
    ``dtype``, draft tokens sampled from q, and uniforms; the logits are kept only if asked."""
    target_logits = torch.randn(b, k + 1, v, device=device, generator=gen).mul_(2.0)
    draft_logits = target_logits[:, :k] + 0.7 * torch.randn(b, k, v, device=device, generator=gen)
    p = torch.softmax(target_logits / TEMPERATURE, -1)
    q = torch.softmax(draft_logits / TEMPERATURE, -1)
    tokens = torch.multinomial(q.reshape(-1, v), 1, generator=gen).view(b, k)
    coins = torch.rand(b, k, device=device, generator=gen)
    u = torch.rand(b, device=device, generator=gen)
    x = dict(tokens=tokens, p=p.to(dtype), q=q.to(dtype), coins=coins, u=u)
    if keep_logits:
        x.update(target_logits=target_logits.to(dtype), draft_logits=draft_logits.to(dtype))
    return x


def backend_fns(backends: list[str], x: dict, method: str, point_mass: bool, block_v: int | None):
    """name -> zero-argument callable for each requested backend."""
    q = None if point_mass else x["q"]
    ql = None if point_mass else x.get("draft_logits")
    kw = {} if block_v is None else {"block_v": block_v}
    fns = {}
    if "torch" in backends:
        fns["torch"] = lambda: verify(x["tokens"], q, x["p"], method=method, backend="torch",
                                      uniforms=(x["coins"], x["u"]), validate=False)
    if "triton" in backends or "triton-logits" in backends:
        from hsd.kernels import verify_triton, verify_triton_logits

        if "triton" in backends:
            fns["triton"] = lambda: verify_triton(x["tokens"], q, x["p"], method, x["coins"], x["u"], **kw)
        if "triton-logits" in backends:
            fns["triton-logits"] = lambda: verify_triton_logits(x["tokens"], ql, x["target_logits"], TEMPERATURE,
                                                                method, x["coins"], x["u"], **kw)
    return fns


def resolve(args: argparse.Namespace):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if args.backends == "auto":
        backends = ["torch", "triton", "triton-logits"] if cuda else ["torch"]
    else:
        backends = args.backends.split(",")
        bad = set(backends) - {"torch", "triton", "triton-logits"}
        if bad:
            raise SystemExit(f"--backends: unknown {sorted(bad)}")
        if not cuda and any(b.startswith("triton") for b in backends) and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--backends triton on CPU needs TRITON_INTERPRET=1 (interpreted: timings "
                             "are meaningless, only useful as a smoke test)")
    dtype = DTYPES["bfloat16" if cuda else "float32"] if args.dtype == "auto" else DTYPES[args.dtype]
    grid = dict(QUICK if args.quick else FULL)
    for key in ("B", "K", "V"):
        if getattr(args, key):
            grid[key] = tuple(getattr(args, key))
    repeats = args.repeats or (20 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    return device, backends, dtype, grid, Timer(device, repeats, warmup)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, backends, dtype, grid, timer = resolve(args)
    methods = args.methods.split(",")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; dtype: {str(dtype).replace('torch.', '')}; backends: {','.join(backends)}; "
          f"repeats: {timer.repeats} (median), warm-up: {timer.warmup}")
    header = (f"{'B':>3} {'K':>2} {'V':>6} {'draft':>5} {'method':>9} {'backend':>13} "
              f"{'time_ms':>9} {'roof_ms':>8} {'ratio':>6} {'roof_GB/s':>9}")
    if device.type != "cuda":
        print("# no CUDA device: the compiled Triton kernels are not timed (torch backend only)"
              if not any(b.startswith("triton") for b in backends) else
              "# Triton runs INTERPRETED on the CPU: its timings are meaningless (smoke test only)")
    print(header)
    print("-" * len(header))
    rows = []
    drafts = (False, True) if args.point_mass else (False,)
    for v in grid["V"]:
        for k in grid["K"]:
            for b in grid["B"]:
                x = make_inputs(b, k, v, dtype, device, gen, keep_logits="triton-logits" in backends)
                for point_mass in drafts:
                    tensors = [x["p"]] if point_mass else [x["p"], x["q"]]
                    nbytes = sum(t.numel() * t.element_size() for t in tensors)

                    def read_once(tensors=tensors):
                        return [t.sum() for t in tensors]

                    roof = timer(read_once)
                    roof_graph = None
                    if args.cuda_graph and device.type == "cuda":
                        roof_graph = timer.graph(read_once)
                    for method in methods:
                        for backend, fn in backend_fns(backends, x, method, point_mass, args.block_v).items():
                            entries = [(backend, timer(fn), roof)]
                            if roof_graph is not None and backend.startswith("triton"):
                                try:
                                    entries.append((backend + "+graph", timer.graph(fn), roof_graph))
                                except RuntimeError as err:  # report and go on
                                    print(f"# CUDA graph capture failed for {backend}: {err}")
                            for label, t, r in entries:
                                row = dict(B=b, K=k, V=v, draft="none" if point_mass else "probs", method=method,
                                           backend=label, time_ms=t * 1e3, roof_ms=r * 1e3, ratio=t / r,
                                           roof_gbs=nbytes / r / 1e9)
                                rows.append(row)
                                print(f"{b:>3} {k:>2} {v:>6} {row['draft']:>5} {method:>9} {label:>13} "
                                      f"{row['time_ms']:>9.3f} {row['roof_ms']:>8.3f} {row['ratio']:>6.2f} "
                                      f"{row['roof_gbs']:>9.1f}", flush=True)
                del x
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    goal = [r for r in rows if r["method"] == "hsd" and r["backend"].startswith("triton") and r["B"] >= 8]
    if goal:
        worst = max(goal, key=lambda r: r["ratio"])
        print(f"HSD Triton at B >= 8: worst ratio to the roofline {worst['ratio']:.2f} "
              f"({worst['backend']}, B={worst['B']} K={worst['K']} V={worst['V']}); goal <= 2")
    return rows


if __name__ == "__main__":
    main()
