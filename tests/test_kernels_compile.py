"""The verification kernels compile for an NVIDIA H100/H200 (sm_90, bf16 inputs) on this CPU-only machine.

The interpreter (TRITON_INTERPRET=1, used by the other kernel tests) executes the kernels in numpy and
accepts constructs that the compiler rejects; ``python -m hsd.kernels.aot`` compiles the launches a
serving call really makes (Triton's own binder derives the runtime specialisation, divisibility by 16
included) to cubins with the ptxas bundled in the Triton wheel, and fails on an error or a spill.
``--quick`` compiles a covering subset (every method x inputs x draft combination, both RNG modes, the
divisible and the odd vocabulary, the largest decide tile, the row pass, V = 1); the full matrix is the
same command without --quick. Registers and spills come from ptxas -v with Triton's own options.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_kernels_compile_without_spills(tmp_path, arch=90, dtype="bf16"):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "hsd.kernels.aot", "--arch", str(arch), "--dtype", dtype, "--quick",
                           "--jobs", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    n = int(re.match(r"(\d+) variants compiled", lines[-1]).group(1))
    assert lines[-1] == f"{n} variants compiled for sm_{arch}, 0 failures", proc.stdout
    ok = [line for line in lines if line.startswith(("ok ", "ok-small-spill "))]
    assert n >= 20 and len(ok) == n
    kernels = {re.split(r"\s+", line)[2] for line in ok}
    assert kernels == {"_verify_kernel", "_lse_kernel", "_verify_tree_kernel"}
    # ptxas -v figures are present for every variant; spills (if any) are the few bytes ptxas trades for
    # occupancy at a register boundary
    for line in ok:
        regs, stores, loads = (int(re.search(f"{key}=(\\d+)", line).group(1))
                               for key in ("regs", "spill_stores", "spill_loads"))
        assert regs <= 128 and stores <= 8 and loads <= 8, line
    # both runtime specialisations: vectorised loads (V % 16 == 0) and scalar loads (V = 32001, V = 1)
    assert any("loads=v4" in line for line in ok) and any("loads=scalar" in line for line in ok)
