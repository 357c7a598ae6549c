"""scripts/gpu_check.py (make gpu-check) in its CPU dry run on a tiny chat target: every check runs or says
why not (the CUDA-only ones), the decode checks pass (speculative = plain greedy bit for bit in fp32 and in bf16
with the row tile), one table and a JSON with the machine; a check that breaks makes the exit status non-zero."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import write_tiny_chat_run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_cpu_dry_run(tmp_path, capsys, monkeypatch):
    root = write_tiny_chat_run(tmp_path)
    gc = load_script()
    train = [f"target={root / 'target'}", f"data=[{root / 'chat.jsonl'}]", "max_length=96", "draft_vocab_size=48",
             "ttt_steps=2", "batch_size=4", "cache_target=false"]
    argv = ["--device", "cpu", "--quick", "--target", str(root / "target"), "--train-steps", "2",
            "--json", str(tmp_path / "gc.json"), "--train-override", *train]
    assert gc.main(argv) == 0
    printed = capsys.readouterr().out
    rep = json.loads((tmp_path / "gc.json").read_text())
    status = {c["name"]: c["status"] for c in rep["checks"]}
    assert status == {"kernels": "CPU", "verify_graph": "CPU", "decode_float32": "PASS", "decode_bfloat16": "PASS",
                      "bench_verify": "INFO", "bench_decode": "PASS", "train_bf16": "PASS"}
    bf16 = next(c for c in rep["checks"] if c["name"] == "decode_bfloat16")["figures"]
    # trees run tiled only where the gap probe passes (else the summary says they did not)
    assert bf16["row_tile"] == 24 and set(bf16["speculative_equals_plain"]) == {"lookup", "eagle3-chain"} | (
        {"eagle3-tree"} if bf16["tree_exact"] else set())
    assert bf16["tree_exact"] or "trees not run" in printed
    assert rep["machine"]["cpu"] and not rep["failed"] and "all checks passed" in printed
    assert all(name in printed.split("=" * 100)[-1] for name in status)  # one table, every check in it

    def broken(args):
        raise RuntimeError("planted")

    monkeypatch.setattr(gc, "CHECKS", [("decode_float32", broken), ("bench_verify", gc.check_bench_verify)])
    assert gc.main(["--device", "cpu", "--quick", "--json", str(tmp_path / "bad.json")]) == 1
    bad = json.loads((tmp_path / "bad.json").read_text())
    assert bad["failed"] == ["decode_float32"] and "RuntimeError: planted" in capsys.readouterr().out
