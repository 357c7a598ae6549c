"""Training precision: ``mixed_precision`` auto/bf16/fp16 on a CPU (decided by the one measured decision, bf16
obeyed with a one-line warning where it is slow), bf16 CPU autocast keeps fp32 master weights and optimizer
state and follows the fp32 run's losses, ``target_dtype: bfloat16`` captures bf16 features on a CPU, and what
ran is recorded (precision.json) and exported (training_summary.json's ``feature_dtype``)."""
from __future__ import annotations

import json
import logging
import types

import pytest
import torch

from hsd import precision
from tests.conftest import write_tiny_chat_run
from train import distributed as dist_utils
from train import loop
from train.config import load_config
from train.eagle3 import Eagle3Task, Eagle3TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return write_tiny_chat_run(tmp_path_factory.mktemp("prec"))


@pytest.fixture
def fresh(monkeypatch):
    precision._probe.cache_clear()
    yield monkeypatch
    precision._probe.cache_clear()


def cfg(env, out, *extra):
    return load_config(Eagle3TrainConfig, None, [
        f"output_dir={out}", f"target={env / 'target'}", f"data=[{env / 'chat.jsonl'}]", "report_to=none",
        "max_length=96", "batch_size=4", "lr=1e-2", "warmup_ratio=0", "ttt_steps=2", "draft_vocab_size=48",
        "log_every=1", "max_grad_norm=1.0", "eval_fraction=0.25", "max_steps=6", *extra])


def test_mixed_precision_resolution(fresh, caplog):
    mp = types.SimpleNamespace
    fresh.setenv(precision.ENV_OVERRIDE, "float32")
    assert dist_utils.resolve_mixed_precision(mp(mixed_precision="auto")) == "no"
    precision._probe.cache_clear()
    fresh.setenv(precision.ENV_OVERRIDE, "bfloat16")  # what a CPU with AMX-BF16 measures
    assert dist_utils.resolve_mixed_precision(mp(mixed_precision="auto")) == "bf16"
    assert dist_utils.resolve_mixed_precision(mp(mixed_precision="no")) == "no"
    with pytest.raises(ValueError, match="mixed_precision=fp16 needs a GPU"):
        dist_utils.resolve_mixed_precision(mp(mixed_precision="fp16"))
    fresh.setattr(precision, "bf16_speedup", lambda device="cpu": 0.04)  # an AVX2-only CPU: obeyed, with a warning
    with caplog.at_level(logging.WARNING):
        assert dist_utils.resolve_mixed_precision(mp(mixed_precision="bf16")) == "bf16"
    assert "measured 0.04x fp32 speed" in caplog.text
    caplog.clear()
    fresh.setattr(precision, "bf16_speedup", lambda device="cpu": 6.0)
    with caplog.at_level(logging.WARNING):
        assert dist_utils.resolve_mixed_precision(mp(mixed_precision="bf16")) == "bf16"
    assert "slower" not in caplog.text


def _run(task):
    trainer = loop._Trainer(task)
    trainer.setup()
    trainer.run()
    return trainer


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_bf16_autocast_keeps_fp32_master_weights_and_follows_fp32(env, tmp_path):
    runs = {mp: _run(Eagle3Task(cfg(env, tmp_path / mp, f"mixed_precision={mp}"))) for mp in ("no", "bf16")}
    fp32, bf16 = _losses(tmp_path / "no"), _losses(tmp_path / "bf16")
    assert len(fp32) == len(bf16) == 6 and fp32[-1] < fp32[0] and bf16[-1] < bf16[0]  # both learn
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=0.01), (fp32, bf16)  # bf16 rounding (~0.1% here), not another run
    assert fp32 != bf16  # the bf16 run did run in bf16
    tr = runs["bf16"]
    assert tr.acc.mixed_precision == "bf16"
    assert {p.dtype for p in tr.model.parameters()} == {torch.float32}
    states = [s for st in tr.optimizer.state.values() for s in st.values() if torch.is_tensor(s) and s.numel() > 1]
    assert states and {s.dtype for s in states} == {torch.float32}
    rec = json.loads((tmp_path / "bf16" / "final" / "precision.json").read_text())
    assert rec["mixed_precision"] == "bf16" and rec["feature_dtype"] == "float32" and rec["master_weights"] == "float32"
    assert rec["mixed_precision_config"] == "bf16"


def test_bf16_target_features_on_cpu_are_recorded_and_exported(env, tmp_path):
    from hsd.export import export_head

    out = tmp_path / "bf16_target"
    task = Eagle3Task(cfg(env, out, "target_dtype=bfloat16", "max_steps=2"))
    _run(task)
    assert next(task.target.parameters()).dtype == torch.bfloat16
    batch = task.collate(task._train[:2])
    features, embeds, targets = task.target_pass(batch)
    assert features.dtype == embeds.dtype == torch.bfloat16 and targets.teacher.dtype == torch.float32
    rec = json.loads((out / "final" / "precision.json").read_text())
    assert rec["feature_dtype"] == "bfloat16" and rec["target_dtype_config"] == "bfloat16"
    assert rec["machine"]["precision"] == "bfloat16" and "hardware" in rec["probe"]
    exported = export_head(out / "final", tmp_path / "export", dtype="bfloat16", target=str(env / "target")).folder
    summary = json.loads((exported / "training_summary.json").read_text())
    assert summary["feature_dtype"] == "bfloat16" and summary["training_precision"]["mixed_precision"] == "no"
    assert "target features bfloat16" in (exported / "README.md").read_text()
