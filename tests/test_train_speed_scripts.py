"""scripts/bench_train.py (fp32 vs bf16, padded vs packed, machine record) and scripts/regenerate_data.py's
automatic batch size, on tiny shapes."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_train_records_machine_and_compares_packing(tmp_path, capsys):
    bench = _script("bench_train")
    out = tmp_path / "bench.json"
    res = bench.main(["--preset", "tiny", "--dtypes", "float32", "--batch", "2", "--seq-len", "16", "--steps", "2",
                      "--conversations", "4", "--max-length", "512", "--packed-batch", "1", "--iters", "1", "--warmup", "0",
                      "--repeats", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert "flags:" in text and "bf16 here: matmul" in text and "packing:" in text
    saved = json.loads(out.read_text())
    assert saved["machine"]["torch"] == torch.__version__ and saved["probe"]["dtype"] in ("float32", "bfloat16")
    run = saved["runs"]["float32"]
    padded, packed = run["padded"], run["packed"]
    assert padded["useful_tokens"] == packed["useful_tokens"] > 0  # the same conversations either way
    assert packed["fill"] == 1.0 > padded["fill"]  # one packed row per batch: no padding at all
    assert run["packed_over_padded"] == pytest.approx(packed["useful_tok_s"] / padded["useful_tok_s"])
    assert res["runs"]["float32"]["online_step_s"] > 0
    with pytest.raises(SystemExit, match="--dtypes"):
        bench.main(["--preset", "tiny", "--dtypes", "float8"])


def test_regenerate_auto_batch_size():
    from transformers import LlamaConfig

    regen = _script("regenerate_data")
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128)
    per_row = 2 * 4 * 2 * 16 * 4 * 100 + 4 * 1000  # K and V, 4 layers, 2 heads of 16, fp32, 100 tokens + logits
    cpu = torch.device("cpu")
    assert regen.auto_batch_size(cfg, torch.float32, 100, cpu, free_bytes=4 * per_row * 10) == 10
    assert regen.auto_batch_size(cfg, torch.float32, 100, cpu, free_bytes=1) == 1
    assert regen.auto_batch_size(cfg, torch.float32, 100, cpu, free_bytes=1 << 40) == regen.MAX_AUTO_BATCH["cpu"]
    assert regen.auto_batch_size(cfg, torch.bfloat16, 100, cpu, free_bytes=4 * per_row * 10) > 10  # half the KV bytes
    assert regen.free_memory_bytes(cpu) > 0
