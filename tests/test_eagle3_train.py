"""EAGLE-3 trainer end to end on a tiny random target + tiny chat tokenizer saved to a folder: the CLI run
(checkpoints, best chosen on held-out simulated acceptance length, loadable head), learning in process,
bad input at set-up, resume refusal. (Its 2-process DeepSpeed ZeRO-2 launch is in test_distributed.py.)"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hsd.export.layout import EAGLE3_KEYS as EXPORT_KEYS
from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel
from tests.conftest import tiny_causal_lm, write_tiny_chat_run
from tests.tiny_tokenizers import tiny_chat_tokenizer
from train.config import load_config
from train.eagle3 import Eagle3Task, Eagle3TrainConfig
from train.loop import main, train

REPO = pathlib.Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny 8-layer Llama target (peaked outputs) + ChatML tokenizer in a folder; 48 short conversations."""
    return write_tiny_chat_run(tmp_path_factory.mktemp("e3"))


def base_overrides(env, out) -> list[str]:
    return [f"output_dir={out}", f"target={env / 'target'}", f"data=[{env / 'chat.jsonl'}]", "report_to=none",
            "eval_fraction=0.25", "max_length=96", "batch_size=4", "lr=1e-2", "warmup_ratio=0", "ttt_steps=3",
            "draft_vocab_size=48", "log_every=2", "max_grad_norm=1.0"]


def make_cfg(env, out, *overrides) -> Eagle3TrainConfig:
    return load_config(Eagle3TrainConfig, None, base_overrides(env, out) + list(overrides))


def read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def test_cli_end_to_end(env, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train.eagle3", *base_overrides(env, out), "max_steps=8", "eval_every=4",
           "save_every=4"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "draft vocab: 48 of 96 tokens" in proc.stdout and "head init: lm_head" in proc.stdout
    ck = out / "checkpoints" / "step_8"
    assert (ck / "model" / "model.safetensors").is_file() and (ck / "state.json").is_file()
    assert set(load_file(str(out / "final" / "model.safetensors"))) == set(EXPORT_KEYS)
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval/sim_accept_len" in r]
    assert [r["step"] for r in evals] == [4, 8]
    for k in range(3):
        assert {f"eval/acc_{k}", f"eval/alpha_{k}", f"eval/loss_{k}"} <= set(evals[0])
    assert {"eval/cond_acc_0", "eval/sim_accept_len_cond", "eval/sim_accept_len_alpha"} <= set(evals[0])
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["best_metric"] == "eval/sim_accept_len"
    top = max(evals, key=lambda r: r["eval/sim_accept_len"])  # first maximum wins ties
    assert best["step"] == top["step"] and best["eval/sim_accept_len"] == top["eval/sim_accept_len"]
    vocab = json.loads((out / "draft_vocab.json").read_text())
    assert vocab["draft_vocab_size"] == 48 and 0.9 < vocab["coverage"] <= 1.0
    assert vocab["aux_layer_ids"] == [2, 4, 5]
    head = Eagle3DraftModel.from_pretrained(out / "best")
    assert head.config.eagle_config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert int(head.t2d.sum()) == 48 and head.embed_tokens is None

    # resuming with a changed head setting is refused by the loop before any work
    with pytest.raises(ValueError, match="ttt_steps"):
        main(Eagle3Task, Eagle3TrainConfig, ["--resume", *base_overrides(env, out), "ttt_steps=2"])


def test_training_improves_heldout_acceptance(env, tmp_path):
    """In process: more steps on the same data raise held-out acc_0 and the simulated acceptance length."""
    task = Eagle3Task(make_cfg(env, tmp_path / "learn", "max_steps=60", "eval_every=60", "ttt_steps=2"))
    result = train(task)
    evals = [r for r in read_jsonl(tmp_path / "learn" / "metrics.jsonl") if "eval/acc_0" in r]
    assert evals and result["best_step"] == 60
    # the untrained head (lm_head/norm from the target) as the reference point
    untrained = Eagle3Task(make_cfg(env, tmp_path / "zero", "max_steps=1", "ttt_steps=2", "lr=1e-9"))
    train(untrained)
    before = [r for r in read_jsonl(tmp_path / "zero" / "metrics.jsonl") if "eval/acc_0" in r][-1]
    after = evals[-1]
    assert after["eval/acc_0"] > before["eval/acc_0"] + 0.15, (before["eval/acc_0"], after["eval/acc_0"])
    assert after["eval/sim_accept_len"] > before["eval/sim_accept_len"]
    assert after["eval/loss_0"] < before["eval/loss_0"]


def test_target_cache_is_exact(env, tmp_path):
    """cache_target=true: epochs after the first read the target outputs from memory, with the same numbers."""
    runs = {}
    for cache in (False, True):
        out = tmp_path / f"cache_{cache}"
        task = Eagle3Task(make_cfg(env, out, "num_epochs=2", "eval_every=9", "batch_size=6", f"cache_target={cache}"))
        train(task)
        runs[cache] = (read_jsonl(out / "metrics.jsonl"), task)
    (plain, _), (cached, task) = runs[False], runs[True]
    assert len(task.cache) == 48  # every train and eval conversation
    assert [r["step"] for r in plain] == [r["step"] for r in cached] and len(plain) >= 6
    for a, b in zip(plain, cached):
        for k, v in a.items():
            if k.startswith(("train/", "eval/")):
                assert b[k] == pytest.approx(v, rel=1e-6, abs=1e-7), (a["step"], k)


def _write_feature_cache(env, out: pathlib.Path, *extra: str) -> pathlib.Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("cache_hidden_states", REPO / "scripts" / "cache_hidden_states.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main([str(env / "chat.jsonl"), "--out", str(out), "--model", str(env / "target"), "--max-length", "96",
              "--shard-size", "20", "--store-dtype", "float32", *extra])
    return out


def test_offline_features_equal_online(env, tmp_path):
    """features=offline (scripts/cache_hidden_states.py output) gives the online features, embeddings and
    teacher on the same conversations, and trains end to end; a cache for other layers is refused."""
    cache = _write_feature_cache(env, tmp_path / "fc")
    online = _setup(make_cfg(env, tmp_path / "on", "eval_fraction=0"))
    offline = _setup(make_cfg(env, tmp_path / "off", "eval_fraction=0", "features=offline",
                              f"feature_cache_dir={cache}"))
    assert offline.aux_ids == online.aux_ids == [2, 4, 5] and torch.equal(offline.vocab.d2t, online.vocab.d2t)
    by_id = {r["row_id"]: r for r in offline._train}
    rows = [online._train[i] for i in (0, 5, 23, 47)]
    assert all(by_id[r["row_id"]]["input_ids"] == r["input_ids"] for r in rows)  # same order as the data
    batch = online.collate(rows)
    on = online.target_pass(batch)
    off = offline.target_pass(offline.collate([by_id[r["row_id"]] for r in rows]))
    real = batch["attention_mask"].bool()  # padding positions differ (the target computes junk there)
    assert (~real).any()
    for a, b in zip(on[:2], off[:2]):
        torch.testing.assert_close(b[real], a[real], rtol=1e-5, atol=1e-5)
    for name in ("teacher", "p_draft", "top1", "in_vocab", "position", "rows"):
        torch.testing.assert_close(getattr(off[2], name), getattr(on[2], name), rtol=1e-5, atol=1e-6)

    result = train(Eagle3Task(make_cfg(env, tmp_path / "train_off", "features=offline", f"feature_cache_dir={cache}",
                                       "max_steps=4", "eval_every=4")))
    assert result["step"] == 4 and "eval/sim_accept_len" in result
    assert (tmp_path / "train_off" / "best" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="differ from the layers"):
        _setup(make_cfg(env, tmp_path / "bad", "features=offline", f"feature_cache_dir={cache}",
                        "aux_layer_ids=[2,3,5]"))


def _setup(cfg):
    from accelerate import Accelerator

    task = Eagle3Task(cfg)
    task.setup(Accelerator(cpu=True))
    return task


def test_setup_reports_overflow_and_builds_vocab(env, tmp_path):
    task = _setup(make_cfg(env, tmp_path / "o", "max_length=80", "overflow=drop"))
    assert task.data_stats["dropped_too_long"] > 0 and task.data_stats["kept"] < 48
    task = _setup(make_cfg(env, tmp_path / "t", "max_length=80", "overflow=truncate"))
    assert task.data_stats["truncated"] > 0 and task.data_stats["kept"] == 48
    assert torch.equal(torch.nonzero(task.vocab.t2d).flatten(), task.vocab.target_ids)
    draft = task.model().draft
    assert torch.equal(draft.d2t, task.vocab.d2t)
    target_rows = task.target.get_output_embeddings().weight[task.vocab.target_ids]
    torch.testing.assert_close(draft.lm_head.weight, target_rows)  # init_from_target (default on)
    torch.testing.assert_close(draft.norm.weight, task.target.model.norm.weight)


@pytest.fixture(scope="module")
def bad_env(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    small = tiny_causal_lm("llama", vocab_size=64)  # smaller than the tokenizer's 80 tokens
    small.save_pretrained(root / "small_target")
    tiny_chat_tokenizer("chatml").save_pretrained(root / "small_target")
    _write_jsonl(root / "no_assistant.jsonl",
                 [{"messages": [{"role": "user", "content": "hello"}]} for _ in range(4)])
    _write_jsonl(root / "no_conversations.jsonl", [{"text": "hello"} for _ in range(4)])
    other = Eagle3DraftModel(Eagle3Config.from_target(tiny_causal_lm("llama", vocab_size=128).config, 48))
    other.save_pretrained(root / "other_head")
    return root


@pytest.mark.parametrize("override, message", [
    ("aux_layer_ids=[2,4,99]", r"aux_layer_ids \[99\] do not exist"),
    ("aux_layer_ids=[2,4,8]", r"not portable: every id must be <= N - 1 = 7"),
    ("draft_vocab_size=200", "larger than the target vocabulary"),
    ("target={bad}/small_target", "tokenizer/vocab mismatch"),
    ("data=[{bad}/no_assistant.jsonl]", "assistant"),
    ("data=[{bad}/no_conversations.jsonl]", "conversations"),
    ("init_from={bad}/other_head", "vocabulary of 128"),
    ("max_length=8", "no conversation left|assistant"),
    ("features=offline feature_cache_dir={bad}", "not a feature cache"),
])
def test_bad_input_at_setup(env, bad_env, tmp_path, override, message):
    cfg = make_cfg(env, tmp_path / "bad", *override.format(bad=bad_env).split())
    with pytest.raises(ValueError, match=message):
        _setup(cfg)


def test_config_validation(env, tmp_path):
    for override, message in (("ttt_steps=0", "ttt_steps"), ("attention=flash", "attention"),
                              ("aux_layer_ids=[1,2]", "exactly 3"), ("aux_layer_ids=[1,4,5]", "not portable"),
                              ("aux_layer_ids=[4,2,5]", "strictly ascending"), ("step_weight=0", "step_weight"),
                              ("features=offline", "feature_cache_dir"), ("features=disk", "features")):
        with pytest.raises(ValueError, match=message):
            make_cfg(env, tmp_path, override)
    with pytest.raises(ValueError, match="unknown config key"):
        make_cfg(env, tmp_path, "ttt_stepz=3")
    shipped = sorted((REPO / "configs" / "eagle3").glob("*.yaml"))
    assert {p.stem for p in shipped} >= {"cpu_smoke", "smollm2-135m", "gpu1_llama3_8b", "multi_gpu_zero2", "zero3"}
    for path in shipped:
        cfg = load_config(Eagle3TrainConfig, path)
        assert cfg.ttt_steps >= 1 and cfg.draft_vocab_size >= 1, path
