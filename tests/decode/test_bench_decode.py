"""scripts/bench_decode.py runs end to end on a tiny random target (so the benchmark cannot rot) and
reports every figure it promises: pass-cost ratios, the draft-step ratio, the engine verifier's share of a
round, per-configuration time per token with its verify share, and plain decoding against HF generate."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_decode_tiny_random_target(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256).save_pretrained(tmp_path / "cfg")
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "scripts" / "bench_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--random-config", str(tmp_path / "cfg"), "--device", "cpu", "--dtype", "float32",
                       "--context", "16", "--max-tokens", "6", "--reps", "5", "--plain-tokens", "6",
                       "--methods", "tokenwise", "hsd", "--trees", "4", "8", "16", "--draft-trees", "2:3:5",
                       "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert len(rep["layouts"]) == 2  # the stock layout and the engine's (CPU)
    for r in rep["layouts"].values():
        assert r["t1_ms"] > 0 and r["draft_ratio"] > 0 and set(r["pass_ratio"]) == {str(n) for n in range(1, 7)}
        assert set(r["verify"]) == {f"k{k}/{m}/torch" for k in (3, 5) for m in ("tokenwise", "hsd")}
        assert all(0 < v["share_of_round"] < 1 for v in r["verify"].values())
        assert set(r["tree_pass_ratio"]) == {"4", "8", "16"} and all(x > 0 for x in r["tree_pass_ratio"].values())
        assert set(r["tree_verify"]) == {f"n{n}/{m}/torch" for n in (4, 8, 16) for m in ("greedy", "rrs", "weighted")}
        assert all(v["ms_per_node"] > 0 for v in r["tree_verify"].values())
    assert {"T0/ar", "T0/eagle3-k3-greedy", "T1/eagle3-k5-hsd", "T1/eagle3-k3-tokenwise"} <= set(rep["configs"])
    assert all(c["ms_per_token"] > 0 for c in rep["configs"].values())
    assert rep["plain"]["ours_vs_hf_speed"] > 0
    for r in rep["layouts"].values():  # the row tile's cost: 1-row, K + 1 and tree-sized passes, tile 24
        assert r["row_tile"]["rows"] == 24 and set(r["row_tile"]["pass_ratio"]) == {"1", "4", "5", "6", "9", "17"}
    d = rep["tree_draft"]["2:3:5"]  # the root's feed + up to two batched level steps
    assert 1 <= len(d["head_step_ms_by_depth"]) <= 3 and d["ms"] >= sum(d["head_step_ms_by_depth"])
    assert rep["machine"]["cpu"] and rep["machine"]["precision"] == "float32"
    assert rep["invariance"]["tile 24"]["rows_equal"] == [True] * 6  # the tile: every row as its 1-row step
    assert len(rep["invariance"]["untiled"]["first_differing_hidden_index"]) == 6
    printed = capsys.readouterr().out
    assert "plain decoding: ours" in printed and printed.count("machine: ") == 2
