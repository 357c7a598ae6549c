"""2-process `accelerate launch -m <module>` with DeepSpeed ZeRO-2 on the CPU (gloo): one job, disjoint
shards, resume; and the EAGLE-3 trainer launched as a module (`-m train.eagle3`), as the README says.

Toy task: two launches, a run that crashes after step 10 (checkpoints at 4 and 8), then `--resume`. The
resumed run redoes steps 9-10, whose losses must equal the crashed run's (ZeRO-partitioned optimizer state,
scheduler, RNG and data position restored). No DeepSpeed op is JIT-compiled (train.distributed skips the
CPU shm op).
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hsd.export.layout import EAGLE3_KEYS as EXPORT_KEYS
from tests.conftest import write_tiny_chat_run
from train import checkpoint as ckpt
from train.tracking import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate_launch(module: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/cpu_ds_zero2_2proc.yaml -m <module> <args>`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_ds_zero2_2proc.yaml"), "--main_process_port", str(_free_port()),
           "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _launch(out: pathlib.Path, *overrides: str, timeout: int = 420) -> subprocess.CompletedProcess:
    return _accelerate_launch("tests.toy_train_entry", f"output_dir={out}", "max_steps=12", "save_every=4",
                              "eval_every=4", "record_ids=true", *overrides, timeout=timeout)


def _train_losses(out: pathlib.Path) -> dict[int, float]:
    recs = [(r["step"], r["train/loss"]) for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert len({s for s, _ in recs}) == len(recs), f"duplicate steps: {recs}"
    return dict(recs)


def test_two_process_deepspeed_zero2_cpu(tmp_path):
    out = tmp_path / "ds"
    first = _launch(out, "raise_after_batches=10")
    assert first.returncode != 0 and "simulated crash during training" in first.stderr, first.stderr[-3000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["zero_stage"] == 2 and "DEEPSPEED" in info["distributed_type"]
    assert info["steps_per_epoch"] == 8  # 64 rows / 2 ranks / batch 4: each rank trains on half the data
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [4, 8]
    module = torch.load(out / "checkpoints/step_8/deepspeed/state/mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    assert set(module) == {"net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias"}  # frozen not saved
    assert {p.name for p in (out / "checkpoints/step_8").glob("rng_*.pt")} == {"rng_0.pt", "rng_1.pt"}
    crashed = _train_losses(out)
    assert sorted(crashed) == list(range(1, 11))

    # each rank saw a disjoint shard; together one epoch covers the whole dataset exactly once
    seen = [[[int(t) for t in line.split()] for line in (out / f"seen_rank{r}.txt").read_text().splitlines()]
            for r in range(2)]
    epoch0 = [{i for line in lines[:8] for i in line} for lines in seen]
    assert len(epoch0[0]) == len(epoch0[1]) == 32
    assert not epoch0[0] & epoch0[1] and epoch0[0] | epoch0[1] == set(range(64))

    second = _launch(out, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["start_step"] == 8 and info["world_size"] == 2
    resumed = _train_losses(out)
    assert sorted(resumed) == list(range(1, 13))  # step numbers continue, lost steps 9-10 redone once
    for s in (9, 10):
        assert resumed[s] == pytest.approx(crashed[s], abs=1e-6), (s, resumed[s], crashed[s])
    assert sum(resumed[s] for s in (11, 12)) < 0.5 * sum(resumed[s] for s in (1, 2))
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [8, 12]
    assert (out / "final/model.pt").is_file() and (out / "best/model.pt").is_file()
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]


def test_eagle3_two_process_zero2_as_module(tmp_path):
    """`accelerate launch ... -m train.eagle3` with DeepSpeed ZeRO-2 on 2 CPU processes: one job (world
    size 2), checkpoints with the ZeRO state, a saved head with the export keys, held-out metrics."""
    env = write_tiny_chat_run(tmp_path / "env")
    out = tmp_path / "ds"
    proc = _accelerate_launch(
        "train.eagle3", f"output_dir={out}", f"target={env / 'target'}", f"data=[{env / 'chat.jsonl'}]",
        "report_to=none", "eval_fraction=0.25", "max_length=96", "batch_size=2", "lr=1e-2", "warmup_ratio=0",
        "ttt_steps=3", "draft_vocab_size=48", "log_every=2", "max_grad_norm=1.0", "max_steps=4", "save_every=2",
        "eval_every=4", timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["zero_stage"] == 2 and "DEEPSPEED" in info["distributed_type"]
    assert info["steps_per_epoch"] == 36 // 2 // 2  # 36 train rows split over 2 ranks, batch 2
    assert (out / "checkpoints/step_4/deepspeed").is_dir()
    assert set(load_file(str(out / "final" / "model.safetensors"))) == set(EXPORT_KEYS)
    assert any("eval/sim_accept_len" in r for r in read_jsonl(out / "metrics.jsonl"))
