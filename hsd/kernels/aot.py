"""Ahead-of-time compile check of the verification kernels for an NVIDIA GPU, without a GPU.

The Triton wheel ships the CUDA backend and ptxas, so every kernel variant can be compiled to a
cubin on a CPU-only machine. That catches what the interpreter (TRITON_INTERPRET=1) does not:
types that only the compiler checks, unsupported constructs, register spills.

    python -m hsd.kernels.aot [--arch 90] [--dtype bf16]

Must run with TRITON_INTERPRET unset (under the interpreter @triton.jit builds no compilable kernel).
Prints one line per kernel variant (registers, local memory) and exits 1 on a spill or an error.
Variants: every constexpr combination at production sizes, plus the K = NB = V = 1 specialisations.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import verify_kernels as kern

# Pointer arguments that are not float32 buffers; INPUT is the dtype of p, q (or the logits).
POINTERS = {"tok_ptr": "*i64", "n_ptr": "*i64", "out_ptr": "*i64",
            "p_ptr": "INPUT", "q_ptr": "INPUT", "x_ptr": "INPUT"}


def signature(fn, constexprs: dict, input_type: str) -> dict[str, str]:
    """Triton signature of a kernel as launch.py calls it."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            t = POINTERS.get(name, "*fp32")
            sig[name] = input_type if t == "INPUT" else t
        elif name == "temperature":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def variants(block_v: int = 4096, k_pow2: int = 16, nb_pow2: int = 64):
    """(kernel, constexprs, num_warps) for every variant that launch.py can launch."""
    yield kern._row_stats_kernel, {"BLOCK_V": block_v}, 8
    for has_q, logits in itertools.product((True, False), repeat=2):
        flags = {"HAS_Q": has_q, "LOGITS": logits}
        yield kern._partials_kernel, {**flags, "BLOCK_V": block_v}, 8
        for method in (0, 1):
            c = {"METHOD": method, **flags, "K_POW2": k_pow2, "NB_POW2": nb_pow2}
            yield kern._scalars_kernel, c, 4
            yield kern._decide_kernel, {**c, "BLOCK_V": block_v}, 4


# Triton turns integer arguments equal to 1 into constants at launch (K = 1, a single vocabulary
# block NB = 1, V = 1): those specialisations type-check differently, so they are compiled too.
ONES = {"K": 1, "NB": 1, "V": 1}


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / LOCAL of a cubin, from the cuobjdump bundled with Triton ({} if it is absent)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 (A100) or 90 (H100)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype of p, q / logits")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter builds no compilable kernel", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    seen = set()
    small = [(fn, {**c, **{k: v for k, v in ONES.items() if k in fn.arg_names}}, w)
             for fn, c, w in variants(block_v=16, k_pow2=2, nb_pow2=2)]
    for fn, constexprs, warps in [*variants(), *small]:
        key = (fn.__name__, tuple(sorted(constexprs.items())))
        if key in seen:
            continue
        seen.add(key)
        src = ASTSource(fn=fn, signature=signature(fn, constexprs, "*" + args.dtype), constexprs=constexprs)
        t0 = time.perf_counter()
        try:
            compiled = triton.compile(src, target=target, options={"num_warps": warps})
        except Exception as err:  # report every failing variant, then fail
            print(f"FAIL {fn.__name__} {constexprs}: {type(err).__name__}: {err}")
            failures += 1
            continue
        usage = resource_usage(compiled.asm["cubin"])
        spill = usage.get("LOCAL", 0) > 0
        failures += spill
        print(f"{'SPILL' if spill else 'ok'} {fn.__name__} {constexprs} warps={warps} "
              f"regs={usage.get('REG', '?')} local={usage.get('LOCAL', '?')} ({time.perf_counter() - t0:.1f}s)",
              flush=True)
    print(f"{len(seen)} variants compiled for sm_{args.arch}, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
