"""scripts/bench_verify.py runs on a CPU (what it can measure, GPU figures marked pending), and its
GPU correctness smoke works (run here on the interpreted kernel at small sizes)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hsd.machine import machine_line

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_verify", ROOT / "scripts" / "bench_verify.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_run_reports_what_it_can(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the binder of the real JIT
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "scripts/bench_verify.py", "--device", "cpu", "--B", "2", "--K", "2",
                           "--V", "4000", "--threads", "1", "--json", str(tmp_path / "b.json")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "measured copy" in out and "pending, no GPU here" in out
    report = json.loads((tmp_path / "b.json").read_text())  # the machine goes with the figures
    assert report["machine"]["torch_threads"] == 1 and report["machine"]["precision"] == "float32"
    assert out.splitlines()[0] == f"machine: {machine_line(report['machine'])}" and "1 torch thread(s)" in out
    assert len(report["rows"]) == 2 and report["copy_gbs"] > 0
    rows = [line for line in out.splitlines() if line.strip().startswith("probs")]
    assert len(rows) == 2  # hsd and tokenwise
    for line in rows:
        fields = line.split()
        assert float(fields[7]) > 0 and float(fields[8]) > 0 and float(fields[-1]) > 0  # roofline, torch, host us


def test_smoke_passes_on_the_interpreted_kernel():
    bench = load_bench()
    gen = torch.Generator().manual_seed(0)
    assert bench.smoke(torch.device("cpu"), torch.float32, gen, shape=(4, 3, 300), vd=100)
