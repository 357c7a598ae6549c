"""Ahead-of-time compile check of the verification kernels for an NVIDIA GPU, without a GPU.

The Triton wheel ships the CUDA backend and ptxas, so every kernel variant can be compiled to a cubin on
a CPU-only machine. That catches what the interpreter (TRITON_INTERPRET=1) does not: types that only
the compiler checks, unsupported constructs, register spills.

    python -m hsd.kernels.aot [--arch 90] [--dtype bf16] [--quick] [--jobs N]

Each variant is the launch a real call makes: the serving plan (``hsd.verify.VerifyPlan``) builds its
``Launch`` records on CPU tensors of the production shapes, and Triton's own binder derives the runtime
specialisation from them, exactly as at launch time: the divisibility-by-16 attributes of V, the row
strides and the pointers (V = 128,256 and 151,936 are multiples of 16, V = 32,001 is not, and the
loads vectorise only in the first case), and the constexpr flags (method, draft rows / none / draft
vocabulary, probabilities / logits, Philox / explicit uniforms, block and tile sizes).

Prints one line per distinct variant (registers, stack frame, spill stores/loads from ptxas -v with
Triton's own ptxas options, whether the loads are vectorised) and exits 1 on an error or a spill of more
than SPILL_TOLERANCE bytes (smaller ones, which ptxas makes to stay at 32 or 64 registers, are tagged
``ok-small-spill``). Must run with TRITON_INTERPRET
unset (under the interpreter @triton.jit builds no compilable kernel). --quick compiles a covering
subset (every flag combination once, both divisibility cases, the largest tile) for CI.
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (label, B, K, V): production shapes. B = 8, V = 128,256: 4096-blocks, 8 warps. B = 1, V = 151,936:
# 1024-blocks, NB = 149 -> the largest decide tile [K_POW2 = 16, NB_POW2 = 256] at 4 warps. V = 32,001:
# not a multiple of 16 (scalar loads). V = 1: Triton turns an integer argument equal to 1 into a constant.
SHAPES = [("llama3", 8, 8, 128256), ("qwen2-b1", 1, 8, 151936), ("odd-vocab", 8, 8, 32001), ("tiny", 3, 2, 1)]
FLAGS = [dict(method=m, inputs=i, draft=d, rng=r)
         for m, i, d, r in itertools.product(("tokenwise", "hsd"), ("probs", "logits"), ("probs", "none", "vocab"),
                                             ("philox", "explicit"))]


def call_args(shape, flags, dtype, tokens_dtype=torch.int32):
    """(plan, args, kwargs) of a serving call with CPU tensors of the given shape and flags; the block
    size is the one a CUDA device would get."""
    from hsd.kernels.launch import choose_block_v
    from hsd.verify.serving import VerifyPlan

    _, b, k, v = shape
    logits = flags["inputs"] == "logits"
    pdtype = dtype if logits or dtype != torch.float16 else torch.bfloat16  # fp16 probabilities are refused
    d2t = None
    vq = v
    if flags["draft"] == "vocab" and v > 1:
        vq = max(1, v // 12)  # SmolLM2-like ratio: the draft vocabulary 12x smaller
        d2t = torch.arange(vq) * (v // vq) - torch.arange(vq)
    block_v = choose_block_v(b * (k + 1), v, torch.device("cuda"))
    plan = VerifyPlan(max_batch=b, max_draft=k, vocab=v, method=flags["method"], inputs=flags["inputs"],
                      draft_vocab=d2t, backend="triton", device="cpu", block_v=block_v)
    tokens = torch.zeros(b, k, dtype=tokens_dtype)
    target = torch.empty(b, k + 1, v, dtype=pdtype)
    draft = None if flags["draft"] == "none" else torch.empty(b, k, vq, dtype=pdtype)
    kw = dict(temperature=torch.ones(b))
    if flags["rng"] == "philox":
        kw.update(seeds=torch.zeros(b, dtype=torch.int64), steps=torch.zeros(b, dtype=torch.int64))
    else:
        kw.update(uniforms=(torch.zeros(b, k), torch.zeros(b)))
    if logits and flags.get("lse", True):
        kw.update(target_lse=torch.zeros(b, k + 1), draft_lse=torch.zeros(b, k))
    return plan, (tokens, target, draft), kw


def configurations(quick: bool) -> list[tuple[tuple, dict, torch.dtype]]:
    """(shape, flags, token dtype) of every call to compile. Full: every flag combination on every
    production shape, the row pass (logits without a producer LSE), a tiny shape and the one-shot
    entry points (int64 ids). Quick: each (method, inputs, draft) combination once, alternating the
    divisible and the odd vocabulary and the two RNG modes, plus the largest tile, the row pass and V = 1."""
    conf = []
    if quick:
        for i, flags in enumerate(f for f in FLAGS if f["rng"] == "philox"):
            shape = SHAPES[0] if i % 2 == 0 else SHAPES[2]
            conf.append((shape, {**flags, "rng": "philox" if i % 4 < 2 else "explicit"}, torch.int32))
        big = dict(method="hsd", inputs="logits", draft="probs", rng="philox")
        conf += [(SHAPES[1], big, torch.int32), (SHAPES[1], {**big, "draft": "vocab"}, torch.int32),
                 (SHAPES[0], {**big, "lse": False}, torch.int32), (SHAPES[2], {**big, "lse": False}, torch.int32),
                 (SHAPES[3], big, torch.int32), (SHAPES[3], {**big, "method": "tokenwise", "inputs": "probs"},
                                                 torch.int32)]
        return conf
    for shape in SHAPES[:3]:
        conf += [(shape, flags, torch.int32) for flags in FLAGS]
        conf.append((shape, dict(method="hsd", inputs="logits", draft="probs", rng="philox", lse=False), torch.int32))
    conf += [(SHAPES[3], flags, torch.int32) for flags in FLAGS if flags["rng"] == "philox"]
    conf += [(SHAPES[0], flags, torch.int64) for flags in FLAGS  # hsd.verify.verify(backend="triton")
             if flags["rng"] == "explicit" and flags["draft"] != "vocab"]
    return conf


# Tree verification (hsd.kernels.tree_kernels): (label, B, N nodes, V); 32 nodes is the largest EAGLE-2 tree
# the decode engine drafts by default, 63 the register-resident maximum of a 64-lane program.
TREE_SHAPES = [("tree-llama3", 2, 32, 128256), ("tree-qwen2", 2, 63, 151936), ("tree-odd-vocab", 2, 16, 32001)]
TREE_FLAGS = [dict(method=m, draft=d, rng=r) for m, d, r in itertools.product(("rrs", "weighted"), ("probs", "none"),
                                                                            ("philox", "explicit"))]
TREE_FLAGS.append(dict(method="greedy", draft="none", rng="none"))


def tree_launch_records(quick: bool, dtype) -> list:
    """(label, flags, Launch) of the tree kernel: every method x draft rows x RNG mode (quick: on one shape,
    alternating the divisible and the odd vocabulary)."""
    from hsd.kernels.tree_launch import TreeWorkspace, tree_launch

    pdtype = torch.bfloat16 if dtype == torch.float16 else dtype  # fp16 probabilities are refused
    records = []
    shapes = TREE_SHAPES if not quick else TREE_SHAPES[:1]
    for (label, b, n, v), flags in itertools.product(shapes, TREE_FLAGS):
        if quick and flags["rng"] == "explicit" and flags["draft"] == "none":
            continue
        ws = TreeWorkspace.create(b, n, v, "cpu")
        tokens = torch.zeros(b, n, dtype=torch.int64)
        target = torch.empty(b, n + 1, v, dtype=pdtype)
        draft = torch.empty(b, n, v, dtype=pdtype) if flags["draft"] == "probs" else None
        rng = {}
        if flags["rng"] == "philox":
            rng = dict(seeds=torch.zeros(b, dtype=torch.int64), steps=torch.zeros(b, dtype=torch.int64))
        elif flags["rng"] == "explicit":
            rng = dict(uniforms=(torch.zeros(b, n), torch.zeros(b)))
        records.append((label, flags, tree_launch(ws, tokens, tokens.clone(), draft, target, method=flags["method"],
                                                  **rng)))
    return records


def launch_variants(quick: bool, dtype) -> list:
    """(label, flags, Launch) of every configuration (deduplicated later by their specialisation)."""
    records = []
    for shape, flags, tokens_dtype in configurations(quick):
        plan, args, kw = call_args(shape, flags, dtype, tokens_dtype)
        label = shape[0] + ("/int64-ids" if tokens_dtype == torch.int64 else "")
        records += [(label, flags, ln) for ln in plan.launches(*args, **kw)]
    return records + tree_launch_records(quick, dtype)


def resource_usage(compiled, arch: int) -> dict[str, int]:
    """Registers, stack frame and spill bytes of a compiled kernel: ptxas -v on its PTX with the options
    Triton uses (-lineinfo, --regAllocOptLevel=2), so the numbers are those of the cubin it builds.
    Empty if the bundled ptxas is missing."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    try:
        ptxas = get_ptxas(arch).path
    except Exception:  # no bundled ptxas
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        fmad = [] if os.environ.get("TRITON_DEFAULT_FP_FUSION", "1") == "1" else ["--fmad=false"]
        log = subprocess.run([ptxas, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True).stderr
    usage = {}
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        usage.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
    m = re.search(r"Used (\d+) registers", log)
    if m:
        usage["regs"] = int(m.group(1))
    return usage


# ptxas sometimes trades a few bytes of spill for occupancy right at a register boundary (32, 64 registers):
# reported, not failed. Anything more is register pressure and fails the check.
SPILL_TOLERANCE = 8


def specialise(ln, arch: int):
    """(key, ASTSource, options) of a Launch as the runtime would compile it for sm_<arch>."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = ln.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*ln.args, **ln.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(ln.kwargs), bound, spec, opts)
    key = (kernel.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())),
           tuple(sorted((k, str(v)) for k, v in attrs.items())), ln.kwargs.get("num_warps"))
    return key, ASTSource(kernel, signature, constexprs, attrs), options, target


_ITEMS: list = []  # the variants, shared with forked workers (launch records hold tensors and kernels)


def _compile(index: int):
    """Worker: compile variant ``index``; returns its report line and whether it failed."""
    label, desc, ln, arch = _ITEMS[index]
    import triton

    t0 = time.perf_counter()
    try:
        _, src, options, target = specialise(ln, arch)
        compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as err:  # report every failing variant, then fail
        return f"FAIL {label} {desc}: {type(err).__name__}: {str(err)[:400]}", True
    usage = resource_usage(compiled, arch)
    ptx = compiled.asm.get("ptx", "")
    spilled = usage.get("spill_stores", 0) + usage.get("spill_loads", 0)
    spill = usage.get("spill_stores", 0) > SPILL_TOLERANCE or usage.get("spill_loads", 0) > SPILL_TOLERANCE
    vec = "v4" if re.search(r"ld\.global(\.\w+)*\.v[24]\.", ptx) else "scalar"
    tag = "SPILL" if spill else ("ok-small-spill" if spilled else "ok")
    line = (f"{tag} {label} {desc} warps={ln.kwargs.get('num_warps')} regs={usage.get('regs', '?')} "
            f"stack={usage.get('stack', '?')} spill_stores={usage.get('spill_stores', '?')} "
            f"spill_loads={usage.get('spill_loads', '?')} loads={vec} ({time.perf_counter() - t0:.1f}s)")
    return line, spill


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 (A100) or 90 (H100/H200)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype of p, q / logits")
    ap.add_argument("--quick", action="store_true", help="a covering subset (CI)")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compilations")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter builds no compilable kernel", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    seen, items = set(), []
    for label, flags, ln in launch_variants(args.quick, DTYPES[args.dtype]):
        key = specialise(ln, args.arch)[0]
        if key in seen:
            continue
        seen.add(key)
        const = {k: v for k, v in ln.kwargs.items() if k != "num_warps"}
        desc = f"{ln.kernel.__name__} {' '.join(f'{k}={v}' for k, v in flags.items())} {const}"
        items.append((label, desc, ln, args.arch))
    failures = 0
    _ITEMS[:] = items
    if args.jobs > 1:
        pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("fork"))
        results = pool.map(_compile, range(len(items)))
    else:
        pool, results = None, map(_compile, range(len(items)))
    for line, failed in results:
        print(line, flush=True)
        failures += failed
    if pool is not None:
        pool.shutdown()
    print(f"{len(items)} variants compiled for sm_{args.arch}, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
