"""The shared training loop on a toy task (one process, CPU): learning, checkpoints, exact resume, refusals."""
from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from hsd.machine import machine_info
from tests.toy_task import ToyConfig, ToyTask
from train import checkpoint as ckpt
from train.config import load_config
from train.distributed import shard_indices
from train.loop import lr_multiplier, main, train
from train.tracking import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(out, *overrides, expect=None):
    """Train the toy task in-process; returns (result, train records {step: record}, eval records)."""
    cfg = load_config(ToyConfig, None, [f"output_dir={out}", *overrides])
    if expect is not None:
        with pytest.raises(expect[0], match=expect[1]):
            train(ToyTask(cfg))
        return None
    return train(ToyTask(cfg))


def curves(out) -> tuple[dict[int, float], dict[int, float]]:
    recs = read_jsonl(pathlib.Path(out) / "metrics.jsonl")
    tr = [(r["step"], r["train/loss"]) for r in recs if "train/loss" in r]
    ev = [(r["step"], r["eval/loss"]) for r in recs if "eval/loss" in r]
    assert len({s for s, _ in tr}) == len(tr), f"duplicate train steps in metrics.jsonl: {tr}"
    return dict(tr), dict(ev)


def weights(ckpt_dir) -> dict[str, torch.Tensor]:
    return torch.load(pathlib.Path(ckpt_dir) / "trainable.pt", weights_only=True)


def assert_same_weights(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), k


def no_tmp_left(out):
    return not [p for p in pathlib.Path(out).rglob("*") if ".tmp-" in p.name or ".trash-" in p.name]


# ---------------------------------------------------------------------------------------------------------


def test_lr_schedule():
    total, warm = 100, 10
    lrs = [lr_multiplier(s, total, warm, 0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up to the peak
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine decay afterwards
    assert lr_multiplier(total, total, warm, 0.1) == pytest.approx(0.1)  # ends at min_lr_ratio
    assert lr_multiplier(55, total, warm, 0.0) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_multiplier(0, 10, 0, 0.0) == 1.0


def test_shard_indices_disjoint_and_deterministic():
    n, world = 23, 3
    shards = [shard_indices(n, r, world, seed=5, epoch=1) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == n - n % world and all(len(s) == n // world for s in shards)
    assert shards[0] == shard_indices(n, 0, world, seed=5, epoch=1)
    assert shards[0] != shard_indices(n, 0, world, seed=5, epoch=2)  # reshuffled per epoch
    full = [shard_indices(n, r, world, seed=None, drop_tail=False) for r in range(world)]
    assert sorted(i for s in full for i in s) == list(range(n))  # eval: every row exactly once


def test_trains_and_writes_layout(tmp_path):
    out = tmp_path / "run"
    res = run(out, "max_steps=40", "save_every=10", "eval_every=10", "keep_last=2")
    tr, ev = curves(out)
    assert sorted(tr) == list(range(1, 41))
    first, last = sum(tr[s] for s in range(1, 6)) / 5, sum(tr[s] for s in range(36, 41)) / 5
    assert last < 0.5 * first, (first, last)
    assert ev[40] < ev[10]
    # layout: rotation kept the 2 newest checkpoints; best/final/config/metrics; nothing temporary left
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [30, 40]
    for f in ("config.yaml", "metrics.jsonl", "run_info.json", "final/model.pt", "final/config.yaml",
              "final/on_save.txt", "best/model.pt", "best/on_save.txt", "checkpoints/step_40/model/model.pt",
              "checkpoints/step_40/config.yaml", "checkpoints/step_40/optimizer.pt",
              "checkpoints/step_40/rng_0.pt", "checkpoints/step_40/on_save.txt"):
        assert (out / f).is_file(), f
    assert no_tmp_left(out)
    state = json.loads((out / "checkpoints/step_40/state.json").read_text())
    assert state["step"] == 40 and state["epoch"] == 40 // 16 and state["batches_in_epoch"] == 40 % 16
    assert state["tokens"] == 40 * 4 * 3  # attention_mask tokens: 3 per row
    assert res["step"] == 40 and res["eval/loss"] == pytest.approx(ev[40])
    # frozen weights: not trained, not in the optimizer, not saved
    w = weights(out / "checkpoints/step_40")
    assert not any(k.startswith("frozen.") for k in w) and "net.0.weight" in w
    opt = torch.load(out / "checkpoints/step_40/optimizer.pt", weights_only=False)
    n_opt = sum(len(g["params"]) for g in opt["param_groups"])
    assert n_opt == 4  # net.0.{weight,bias}, net.3.{weight,bias}
    assert [g["weight_decay"] for g in opt["param_groups"]] == [0.0, 0.0]
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["frozen_params_in_model"] == 8 * 8 + 8
    assert info["machine"] == machine_info("cpu", torch.float32)  # where it was trained (conftest: auto = fp32)


def test_grad_accum_matches_bigger_batch(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    run(a, "max_steps=3", "dropout=0", "batch_size=4", "grad_accum=1")
    run(b, "max_steps=3", "dropout=0", "batch_size=2", "grad_accum=2")
    assert_same_weights(weights(a / "checkpoints/step_3"), weights(b / "checkpoints/step_3"), tol=1e-5)
    ta, _ = curves(a)
    tb, _ = curves(b)
    for s in ta:
        assert ta[s] == pytest.approx(tb[s], abs=1e-5)


def test_resume_continues_exactly(tmp_path):
    """24 steps straight == crash at step ~14 (last checkpoint 12) + resume, over epoch boundaries with
    dropout and grad accumulation: same weights and the same loss curve."""
    common = ["max_steps=24", "save_every=4", "eval_every=6", "grad_accum=2", "n_train=40", "dropout=0.2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(straight, *common)
    run(split, *common, "raise_after_batches=28", expect=(RuntimeError, "simulated crash"))
    assert [s for s, _ in ckpt.list_checkpoints(split / "checkpoints")] == [8, 12]
    tr_crash, _ = curves(split)
    assert max(tr_crash) == 14  # steps 13-14 were logged, then lost
    run(split, *common, "--resume=true")
    info = json.loads((split / "run_info.json").read_text())
    assert info["start_step"] == 12
    assert_same_weights(weights(straight / "checkpoints/step_24"), weights(split / "checkpoints/step_24"))
    ta, ea = curves(straight)
    tb, eb = curves(split)
    assert sorted(tb) == list(range(1, 25)) and sorted(eb) == sorted(ea) == [6, 12, 18, 24]
    for s in ta:
        assert tb[s] == pytest.approx(ta[s], abs=1e-6), s
    for s in ea:
        assert eb[s] == pytest.approx(ea[s], abs=1e-6), s


def test_kill_and_resume_subprocess(tmp_path):
    """SIGKILL a real training process after a checkpoint, resume it: steps continue, curve continues."""
    common = ["max_steps=30", "save_every=5", "dropout=0.1"]
    straight = tmp_path / "straight"
    run(straight, *common)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.toy_train_entry", f"output_dir={out}",
                             *common, "sleep_per_step=0.15"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while ckpt.latest_checkpoint(out / "checkpoints") is None or \
                ckpt.list_checkpoints(out / "checkpoints")[-1][0] < 10:
            assert proc.poll() is None, "training finished or died before it could be killed"
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = ckpt.list_checkpoints(out / "checkpoints")[-1][0]
    assert 10 <= killed_at < 30
    # resume through the CLI entry point (in-process: same code path as `python -m`)
    res = main(ToyTask, ToyConfig, [f"output_dir={out}", *common, "--resume"])
    assert res["step"] == 30
    assert json.loads((out / "run_info.json").read_text())["start_step"] == killed_at
    ta, _ = curves(straight)
    tb, _ = curves(out)
    assert sorted(tb) == list(range(1, 31))
    for s in ta:
        assert tb[s] == pytest.approx(ta[s], abs=1e-6), s
    assert no_tmp_left(out)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    common = ["max_steps=12", "save_every=4"]
    run(out, *common, "crash_on_save_step=8", expect=(RuntimeError, "simulated crash while saving"))
    ckpts = ckpt.list_checkpoints(out / "checkpoints")
    assert [s for s, _ in ckpts] == [4]
    assert not (out / "checkpoints/step_8").exists()
    assert list((out / "checkpoints").glob("step_8.tmp-*"))  # the half-written one stayed invisible
    assert json.loads((ckpts[0][1] / "state.json").read_text())["step"] == 4
    weights(ckpts[0][1])  # still loadable
    run(out, *common, "resume=true")
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [8, 12]
    assert json.loads((out / "run_info.json").read_text())["start_step"] == 4
    assert no_tmp_left(out)


def test_refusals_and_overwrite(tmp_path):
    out = tmp_path / "run"
    run(out, "max_steps=4", "save_every=2")
    run(out, "max_steps=4", expect=(ValueError, "already holds a run.*--resume.*overwrite=true"))
    run(out, "max_steps=6", "lr=0.5", "dropout=0.3", "resume=true",
        expect=(ValueError, r"differs in \['dropout', 'lr'\]"))
    # allowed changes: max_steps, log_every, report_to, save_every
    run(out, "max_steps=6", "log_every=2", "save_every=3", "report_to=none", "resume=true")
    tr, _ = curves(out)
    assert sorted(tr) == [1, 2, 3, 4, 6]  # log_every=2 after the resume
    # overwrite: starts over
    run(out, "max_steps=3", "overwrite=true")
    tr, _ = curves(out)
    assert sorted(tr) == [1, 2, 3]
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [3]
    # a checkpoint written by another number of processes is refused (shards would not line up)
    state_file = out / "checkpoints/step_3/state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2}))
    run(out, "max_steps=3", "resume=true", expect=(ValueError, "written by 2 process"))
    # a finished run whose checkpoints were deleted is not silently replaced
    ckpt.remove(out / "checkpoints")
    run(out, "max_steps=3", "resume=true", expect=(ValueError, "finished run"))
    # resume with nothing to resume: fresh start
    fresh = tmp_path / "fresh"
    run(fresh, "max_steps=2", "resume=true")
    assert json.loads((fresh / "run_info.json").read_text())["start_step"] == 0


def test_too_small_dataset_and_bad_best_metric(tmp_path):
    run(tmp_path / "a", "n_train=3", expect=(ValueError, "too few"))

    class BadBest(ToyTask):
        best_metric = "eval/accept_len"

    cfg = load_config(ToyConfig, None, [f"output_dir={tmp_path / 'b'}", "max_steps=2"])
    with pytest.raises(ValueError, match="best_metric 'eval/accept_len'.*eval/loss"):
        train(BadBest(cfg))


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_checkpoint(tmp_path, mode):
    class Task(ToyTask):
        best_metric = "eval/neg_loss" if mode == "max" else "eval/loss"
        best_mode = mode

    out = tmp_path / mode
    cfg = load_config(ToyConfig, None, [f"output_dir={out}", "max_steps=16", "eval_every=2", "lr=0.05"])
    res = train(Task(cfg))
    _, ev = curves(out)
    assert len(ev) == 8
    want = min(ev, key=ev.get)  # min loss == max neg_loss
    best = json.loads((out / "best/metrics.json").read_text())
    assert best["step"] == want and res["best_step"] == want
    assert best[Task.best_metric] == pytest.approx(-ev[want] if mode == "max" else ev[want])
    assert (out / "best/model.pt").is_file()


def test_best_mode_direction(tmp_path):
    """best_mode=max on eval/loss picks the worst-loss eval (proves the mode is honoured)."""
    class Task(ToyTask):
        best_mode = "max"

    out = tmp_path / "run"
    train(Task(load_config(ToyConfig, None, [f"output_dir={out}", "max_steps=12", "eval_every=2"])))
    _, ev = curves(out)
    assert json.loads((out / "best/metrics.json").read_text())["step"] == max(ev, key=ev.get)


def test_main_cli_and_trackers(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"output_dir: {tmp_path / 'tb'}\nmax_steps: 3\nreport_to: tensorboard\n")
    res = main(ToyTask, ToyConfig, ["--config", str(cfg_file), "lr=0.01"])
    assert res["step"] == 3
    assert list((tmp_path / "tb/tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="'lrate'.*did you mean lr"):
        main(ToyTask, ToyConfig, ["--config", str(cfg_file), "lrate=0.01"])
    with pytest.raises(FileNotFoundError):
        main(ToyTask, ToyConfig, ["--config", str(tmp_path / "missing.yaml")])
    env_mode = os.environ.get("WANDB_MODE")
    res = main(ToyTask, ToyConfig, [f"output_dir={tmp_path / 'wb'}", "max_steps=2", "report_to=wandb"])
    assert os.environ.get("WANDB_MODE") == (env_mode or "offline")
    assert list((tmp_path / "wb/wandb").glob("offline-run-*")) and (tmp_path / "wb/wandb_run_id").is_file()
    assert math.isfinite(res["train/loss"])
