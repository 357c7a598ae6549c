"""Early-exit trainer end to end on a tiny random target and the tiny chat tokenizer: alpha improves over
the lens, outputs (per-layer heads, metrics, plot), resume, the residual-stream rule, bad input, CLI."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from hsd.models.early_exit import EarlyExitHead, ResidualStreamError
from tests.conftest import write_tiny_chat_run
from train.config import load_config
from train.early_exit import EarlyExitTask, EarlyExitTrainConfig
from train.loop import train

REPO = pathlib.Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny 8-layer Llama target + tokenizer in a folder, and a chat jsonl of 48 short conversations."""
    return write_tiny_chat_run(tmp_path_factory.mktemp("ee"))


def make_cfg(env, out, *overrides):
    base = [f"output_dir={out}", f"target={env / 'target'}", f"data=[{env / 'chat.jsonl'}]", "report_to=none",
            "eval_fraction=0.25", "max_length=96", "batch_size=4", "lr=1e-2", "warmup_ratio=0",
            "max_grad_norm=1.0", "log_every=5", "head_type=affine", "exit_layers=[2,4]"]
    return load_config(EarlyExitTrainConfig, None, base + list(overrides))


def read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_training_beats_the_lens_and_writes_heads(env, tmp_path):
    out = tmp_path / "run"
    res = train(EarlyExitTask(make_cfg(env, out, "max_steps=30", "save_every=15")))
    for layer in (2, 4):
        lens, trained = res[f"eval/lens_alpha_L{layer}"], res[f"eval/alpha_L{layer}"]
        assert trained > lens + 0.03, (layer, lens, trained)
        assert res[f"eval/kl_L{layer}"] < res[f"eval/lens_kl_L{layer}"]
    assert res["eval/alpha_mean"] == pytest.approx((res["eval/alpha_L2"] + res["eval/alpha_L4"]) / 2)
    assert res["eval/alpha_gain"] > 0.03
    # The setup-time lens baseline (before training) equals the lens numbers of every eval.
    base = json.loads((out / "lens_baseline.json").read_text())
    assert base["metrics"]["lens_alpha_L4"] == pytest.approx(res["eval/lens_alpha_L4"], abs=1e-6)
    # final/: one from_pretrained-able head per layer, the summary and the plot.
    final = out / "final"
    summary = json.loads((final / "exit_metrics.json").read_text())
    assert summary["exit_layers"] == [2, 4] and summary["metrics_from"] == "eval"
    assert summary["per_layer"]["4"]["trained"]["alpha"] == pytest.approx(res["eval/alpha_L4"])
    assert summary["per_layer"]["4"]["lens"]["alpha"] == pytest.approx(res["eval/lens_alpha_L4"])
    for d in (final, out / "best", out / "checkpoints" / "step_15", out / "checkpoints" / "step_30"):
        assert (d / "exit_quality.png").read_bytes()[:4] == b"\x89PNG"  # on_save runs for every folder
        assert json.loads((d / "exit_metrics.json").read_text())["exit_layers"] == [2, 4]
    best = json.loads((out / "best" / "metrics.json").read_text())
    best_summary = json.loads((out / "best" / "exit_metrics.json").read_text())
    assert best_summary["step"] == best["step"] and best_summary["metrics_from"] == "eval"
    assert best_summary["alpha_mean"] == pytest.approx(best["eval/alpha_mean"])
    assert (out / "best" / "layer_4" / "config.json").is_file()
    head = EarlyExitHead.from_pretrained(final / "layer_4")
    assert (head.config.exit_layer, head.config.head_type, head.config.num_target_layers) == (4, "affine", 8)
    assert head.config.base_model_name_or_path == str(env / "target")
    assert head.body.proj.weight.abs().sum() > 0  # trained, not the zero init


def test_resume_continues_steps(env, tmp_path):
    out = tmp_path / "run"
    train(EarlyExitTask(make_cfg(env, out, "max_steps=4", "save_every=2", "log_every=1", "head_type=mlp",
                                 "intermediate_size=16")))
    res = train(EarlyExitTask(make_cfg(env, out, "max_steps=8", "save_every=2", "log_every=1", "head_type=mlp",
                                       "intermediate_size=16", "resume=true")))
    info = json.loads((out / "run_info.json").read_text())
    assert info["start_step"] == 4 and info["resumed_from"].endswith("step_4")
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 9))
    assert res["step"] == 8 and (out / "checkpoints" / "step_8" / "model" / "layer_2").is_dir()
    # A changed head setting is refused on resume (config mismatch), through the loop.
    with pytest.raises(ValueError, match="head_type"):
        train(EarlyExitTask(make_cfg(env, out, "max_steps=10", "head_type=affine", "resume=true")))


class _UnfreezeTask(EarlyExitTask):
    """Planted violation: makes a target layer below the exit trainable after two steps."""

    calls = 0

    def loss(self, model, batch):
        type(self).calls += 1
        if type(self).calls == 3:
            self.target.model.layers[1].self_attn.q_proj.weight.requires_grad_(True)
        return super().loss(model, batch)


class _EditTargetTask(EarlyExitTask):
    """Planted violation: changes a target weight in place (without requires_grad) during training."""

    def loss(self, model, batch):
        with torch.no_grad():
            self.target.model.layers[0].mlp.up_proj.weight.mul_(1.01)
        return super().loss(model, batch)


def test_residual_stream_rule_enforced_in_training(env, tmp_path):
    with pytest.raises(ResidualStreamError, match="require grad.*layers <= 4"):
        train(_UnfreezeTask(make_cfg(env, tmp_path / "a", "max_steps=6", "eval_fraction=0")))
    with pytest.raises(ResidualStreamError, match="checksum"):
        train(_EditTargetTask(make_cfg(env, tmp_path / "b", "max_steps=2", "eval_fraction=0", "head_type=attn")))


@pytest.mark.parametrize("override, message", [
    ("exit_layers=[2,8]", r"exit_layer: 8 is out of range; the target has 8 decoder layers"),
    ("best_layer=5", r"best_layer 5 is not one of the exit layers \[1, 2, 3, 4\]"),
    ("draft_vocab_size=500", "draft_vocab_size 500 exceeds the target vocab 96"),
])
def test_bad_input_at_setup(env, tmp_path, override, message):
    extra = ["exit_layers=[]"] if override.startswith("best_layer") else []
    with pytest.raises(ValueError, match=message):
        train(EarlyExitTask(make_cfg(env, tmp_path / "run", "max_steps=2", *extra, override)))


def test_cli_end_to_end(env, tmp_path):
    """`python -m train.early_exit --config x.yaml key=value`: default layers, draft vocab, lowrank."""
    out = tmp_path / "cli"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"output_dir: {out}\ntarget: {env / 'target'}\ndata: [{env / 'chat.jsonl'}]\n"
                   "report_to: none\neval_fraction: 0.25\nmax_length: 96\nbatch_size: 4\nlr: 1.0e-2\n"
                   "head_type: lowrank\nrank: 4\ndraft_vocab_size: 40\nlog_every: 2\n")
    env_vars = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "train.early_exit", "--config", str(cfg), "max_steps=4"],
                          cwd=tmp_path, env=env_vars, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "lens baseline (before training" in proc.stdout
    final = out / "final"
    layers = sorted(int(p.name.split("_")[1]) for p in final.glob("layer_*"))
    assert layers == [1, 2, 3, 4]  # L/8, L/4, 3L/8, L/2 of 8 layers
    head = EarlyExitHead.from_pretrained(final / "layer_3")
    assert head.config.draft_vocab_size == 40 and head.config.rank == 4
    ids = head.d2t + torch.arange(40)
    assert (ids[1:] > ids[:-1]).all() and ids.max() < 96
    summary = json.loads((final / "exit_metrics.json").read_text())
    assert set(summary["per_layer"]) == {"1", "2", "3", "4"} and summary["draft_vocab_size"] == 40
    assert (final / "exit_quality.png").is_file() and (out / "lens_baseline.json").is_file()
    assert any("eval/alpha_mean" in r for r in read_jsonl(out / "metrics.jsonl"))
