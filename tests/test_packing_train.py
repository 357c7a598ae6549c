"""Packing in both trainers: the task's own loss and gradients on a packed batch equal the unpacked batch of the
same conversations (EAGLE-3 TTT; early-exit ``attn`` and ``layers`` heads), and a packed run trains end to end (with the
target cache), logs useful tokens/s and MFU, and writes precision.json into every saved head folder."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

from tests.conftest import write_tiny_chat_run
from train import common
from train.config import load_config
from train.eagle3 import Eagle3Task, Eagle3TrainConfig
from train.early_exit import EarlyExitTask, EarlyExitTrainConfig
from train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return write_tiny_chat_run(tmp_path_factory.mktemp("pk"))


BASE = ["report_to=none", "max_length=256", "lr=1e-2", "warmup_ratio=0", "max_grad_norm=1.0", "log_every=2"]


def e3_cfg(env, out, *extra):
    return load_config(Eagle3TrainConfig, None, [f"output_dir={out}", f"target={env / 'target'}",
                                                 f"data=[{env / 'chat.jsonl'}]", *BASE, "ttt_steps=3",
                                                 "draft_vocab_size=48", "batch_size=4", *extra])


def ee_cfg(env, out, *extra):
    return load_config(EarlyExitTrainConfig, None, [f"output_dir={out}", f"target={env / 'target'}",
                                                    f"data=[{env / 'chat.jsonl'}]", *BASE, "head_type=attn",
                                                    "exit_layers=[2,4]", "batch_size=4", *extra])


def _setup(task):
    from accelerate import Accelerator

    task.setup(Accelerator(cpu=True))
    return task


def _loss_and_grads(task, batch_rows, seed=0):
    torch.manual_seed(seed)
    task._model = None
    model = task.model()
    model.train()
    loss, metrics = task.loss(model, task.collate(batch_rows))
    loss.backward()
    return (loss.detach(), {k: (float(s), float(n)) for k, (s, n) in metrics.items()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert a[1][k][1] == b[1][k][1], k
        assert a[1][k][0] == pytest.approx(b[1][k][0], rel=1e-5, abs=1e-5), k
    assert a[2].keys() == b[2].keys() and a[2]
    for n in a[2]:
        scale = max(1.0, a[2][n].abs().max().item())
        torch.testing.assert_close(a[2][n], b[2][n], rtol=1e-4, atol=2e-6 * scale, msg=n)


@pytest.mark.parametrize("trainer", ["eagle3", "early_exit", "early_exit_layers"])
def test_task_loss_packed_equals_unpacked(env, tmp_path, trainer):
    make, cls = (e3_cfg, Eagle3Task) if trainer == "eagle3" else (ee_cfg, EarlyExitTask)
    extra = ["head_type=layers", "head_layers=1"] if trainer == "early_exit_layers" else []  # target decoder layers
    plain = _setup(cls(make(env, tmp_path / "u", "eval_fraction=0", *extra)))
    packed = _setup(cls(make(env, tmp_path / "p", "eval_fraction=0", "packing=true", *extra)))
    assert sorted(r["row_id"] for r in plain._train) == sorted(i for p in packed._train for i in p["row_ids"])
    assert len(packed._train) * 2 < len(plain._train)  # ~85-token conversations, rows of up to 256
    if trainer == "eagle3":
        assert torch.equal(plain.vocab.d2t, packed.vocab.d2t)  # the vocabulary counts the same conversations
    _assert_same(_loss_and_grads(packed, packed._train), _loss_and_grads(plain, plain._train))


def _read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def test_packed_runs_end_to_end_with_records(env, tmp_path):
    out = tmp_path / "e3"
    task = Eagle3Task(e3_cfg(env, out, "packing=true", "cache_target=true", "batch_size=2", "max_steps=4",
                             "eval_every=2", "save_every=2", "eval_fraction=0.25"))
    res = train(task)
    assert res["step"] == 4 and res["eval/sim_accept_len"] >= 0
    assert len(task.cache) == 4 * 2 + len(task._eval)  # one entry per packed row seen (4 steps x 2 rows + eval)
    logs = [r for r in _read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert logs and all(r["useful_tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in logs)
    assert all(r["useful_tokens_per_s"] < r["tokens_per_s"] for r in logs)  # prompts are not counted
    info = json.loads((out / "run_info.json").read_text())
    assert info["peak_flops"] > 1e8 and info["peak_dtype"] == "float32"
    for folder in (out / "final", out / "best", out / "checkpoints" / "step_4" / "model"):
        rec = json.loads((folder / "precision.json").read_text())
        assert rec["feature_dtype"] == "float32" and rec["mixed_precision"] == "no"
        assert rec["probe"]["dtype"] == "float32" and rec["machine"]["torch"] == torch.__version__
    vocab = json.loads((out / "final" / "draft_vocab.json").read_text())
    assert vocab["packing"]["packed_rows"] == len(task._train)

    out = tmp_path / "ee"
    train(EarlyExitTask(ee_cfg(env, out, "packing=true", "max_steps=2", "eval_fraction=0.25")))
    for folder in (out / "final", out / "final" / "layer_2", out / "final" / "layer_4"):
        assert json.loads((folder / "precision.json").read_text())["feature_dtype"] == "float32"
    (out / "final" / "layer_2" / "precision.json").unlink()  # read_precision falls back to the parent folder
    assert common.read_precision(out / "final" / "layer_2")["feature_dtype"] == "float32"
    assert common.read_precision(tmp_path) is None


def test_offline_features_refuse_packing(env, tmp_path):
    with pytest.raises(ValueError, match="packing=true is for features=online"):
        e3_cfg(env, tmp_path, "packing=true", "features=offline", f"feature_cache_dir={tmp_path}")
