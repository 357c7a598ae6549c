"""The main job (train/quickstart.py) end to end, shortened, on a tiny chat target: report with a row per
decode configuration, a validated export, a second invocation that reuses every finished step, and bad
config keys as one clear error."""
from __future__ import annotations

import json
import pathlib
import re

import pytest
import torch
import yaml

from hsd.machine import machine_info, machine_line
from tests.conftest import write_tiny_chat_run
from train import cli, quickstart

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_config(root) -> str:
    """A quickstart YAML for the tiny target: a few steps per stage, two prompts, few tokens."""
    common = [f"target={root / 'target'}", f"data=[{root / 'chat.jsonl'}]", "report_to=none", "max_length=96"]
    prompts = root / "prompts.jsonl"
    rows = [{"id": "g0", "source": "gsm8k", "messages": [{"role": "user", "content": "what is one plus two?"}]},
            {"id": "c0", "source": "chat", "messages": [{"role": "user", "content": "what is two plus three?"}]}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"eagle3_overrides": [*common, "draft_vocab_size=48", "ttt_steps=2", "max_steps=3", "batch_size=4",
                                "eval_every=0", "save_every=0", "cache_target=false"],
           "early_exit_overrides": [*common, "exit_layers=[2]", "max_steps=2", "eval_every=0", "save_every=0",
                                    "draft_vocab_size=48"],
           "prompts": [str(prompts)], "num_prompts": 2, "max_new_tokens": 6, "k": [2], "trees": ["2:2:3"],
           "exit_drafters": [2]}
    path = root / "quickstart.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_main_job_end_to_end_and_reuse(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HSD_TRACEBACK", raising=False)
    root = write_tiny_chat_run(tmp_path)
    config, out = _tiny_config(root), tmp_path / "job"
    assert cli.main(["quickstart", "--config", config, "--output-dir", str(out)]) == 0
    first = capsys.readouterr().out
    assert "estimated" in first and "trained:" in first
    report = (out / "report.md").read_text()
    runs = json.loads((out / "decode" / "decode.json").read_text())["runs"]
    names = {e["name"] for e in runs}
    for need in ("T0/hf_generate", "T0/ar", "T0/lookup-k2-greedy", "T0/eagle3-k2-greedy", "T0/eagle3-k2-greedy+exit2",
                 "T1/eagle3-k2-tokenwise", "T1/eagle3-k2-hsd", "T1/eagle3-k2-hsd+exit2", "T1/hf_lookup-k2",
                 "T0/eagle3-tree2x2n3-greedy", "T1/eagle3-tree2x2n3-rrs", "T1/eagle3-tree2x2n3-weighted",
                 "T0/exit2-k2-greedy", "T1/exit2-k2-hsd"):
        assert need in names
    assert "## Early exit" in report and "| T0/exit2-k2-greedy | exit drafter | T0/ar |" in report
    assert "  early exit: " in first
    rows = [ln for ln in report.splitlines() if ln.startswith("| `")]
    assert sorted(re.match(r"\| `([^`]+)`", r).group(1) for r in rows) == sorted(names)
    for name, verifier in (("T0/eagle3-tree2x2n3-greedy", "greedy"), ("T1/eagle3-tree2x2n3-rrs", "rrs"),
                           ("T1/eagle3-tree2x2n3-weighted", "weighted")):  # the verify_tree method, not the option
        assert any(r.startswith(f"| `{name}` |") and f"| 2:2:3 | {verifier} |" in r for r in rows)
    assert "hsd-train train eagle3 --config" in report and "hsd-train decode --target" in report
    assert (out / "export" / "eagle3" / "config.json").is_file()
    checks = json.loads((out / "export" / "validation.json").read_text())["checks"]
    assert checks and "ok " in report
    assert (out / "eagle3" / "final").is_dir() and (out / "early_exit" / "final" / "layer_2").is_dir()
    assert f"report: {out / 'report.md'}" in first and "--push-to-hub REPO_ID" in first
    stamp = (out / "eagle3" / "final" / "config.yaml").stat().st_mtime_ns
    _check_readme_block(out, first, rows, tmp_path / "README.md")

    assert cli.main(["quickstart", "--config", config, "--output-dir", str(out)]) == 0
    second = capsys.readouterr().out
    assert second.count("reused finished run") == 2 and "trained:" not in second
    assert "reused: head unchanged" in second
    assert (out / "eagle3" / "final" / "config.yaml").stat().st_mtime_ns == stamp  # not retrained
    meta = json.loads((out / "decode" / "decode.json").read_text())["meta"]
    assert sorted(meta["resumed_configurations"]) == sorted(names)  # decode continued, nothing rerun
    assert "## Training" in (out / "report.md").read_text()

    # a finished head of another recipe in the same folder is refused, never retrained over or reused
    changed = yaml.safe_load(open(config))
    changed["eagle3_overrides"].append("ttt_steps=3")
    other = root / "changed.yaml"
    other.write_text(yaml.safe_dump(changed))
    assert cli.main(["quickstart", "--config", str(other), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run of another config (ttt_steps: saved 2 != now 3)" in err and err.count("\n") == 1

    # other decode sizes: the heads are reused, the decode grid runs afresh (not a refused --resume)
    assert cli.main(["quickstart", "--config", config, "--output-dir", str(out), "max_new_tokens=4"]) == 0
    assert capsys.readouterr().out.count("reused finished run") == 2
    rep = json.loads((out / "decode" / "decode.json").read_text())
    assert rep["meta"]["max_new_tokens"] == 4 and "resumed_configurations" not in rep["meta"]


def _check_readme_block(out, printed, rows, readme):
    """scripts/readme_results.py: the README block is the job's printed lines and its report's table."""
    log = (out / "main_job.log").read_text()
    ours, shown = log.splitlines(), iter(printed.splitlines())
    assert all(any(ln == p for p in shown) for ln in ours)  # the job's own lines, in the order printed
    assert ours[0].startswith("main job -> ") and ours[-1].startswith("  early exit: ") and len(ours) == 20
    assert ours[1] == f"machine: {machine_line(machine_info('cpu', torch.float32))}"  # conftest pins auto = fp32
    assert f"Machine: {ours[1].removeprefix('machine: ')}" in (out / "report.md").read_text().splitlines()
    assert any(ln.strip().startswith("Precision: decode float32") for ln in ours)  # which precision decoded, and why
    assert ours[2].startswith("precision: EAGLE-3 trains on float32 target features") and "measured" in ours[2]
    assert ours[3].startswith("data: EAGLE-3 trains on")
    assert ours[4] == "speed: costs and data size as configured (no reference_gflops)"  # the tiny config has none
    readme.write_text("# x\n\nbefore\n<!-- main-job:begin old -->\nstale\n<!-- main-job:end -->\nafter\n")
    assert quickstart.readme_main([str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("<!-- main-job:end -->\nafter\n")
    assert all(r in text for r in rows) and log.splitlines()[0] in text and "--push-to-hub REPO_ID" in text
    assert f"\nMachine: {ours[1].removeprefix('machine: ')}\n" in text  # the README's figures say where
    quickstart.update_readme(out, readme)
    assert readme.read_text() == text  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="main-job:begin"):
        quickstart.update_readme(out, readme)
    with pytest.raises(FileNotFoundError, match="main_job.log"):
        quickstart.update_readme(out / "nowhere", readme)


def test_bad_config_key_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HSD_TRACEBACK", raising=False)
    assert cli.main(["quickstart", "--output-dir", str(tmp_path), "num_promts=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hsd-train quickstart: error: " in err and "num_promts" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("eagle3_overrides: [lrr=1e-3]\n")
    assert cli.main(["quickstart", "--config", str(bad), "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown config key 'lrr'" in err
    assert not (tmp_path / "eagle3").exists()  # nothing ran


def test_estimate_from_configured_steps(capsys):
    """The default plan: the printed estimate fits the 25-minute budget and counts the real training steps."""
    assert quickstart.main(["--estimate-only", "--output-dir", "/nonexistent/quickstart"]) == 0
    line = capsys.readouterr().out
    minutes = float(re.search(r"estimated ([0-9.]+) min", line).group(1))
    assert 10 < minutes <= 25, line


def test_machine_speed_scales_the_plan_and_is_pinned(tmp_path, monkeypatch):
    """reference_gflops: the job measures this machine's fp32 matmul peak, scales the EAGLE-3 data size and the
    costs by the ratio (clipped to 0.5x..2x), and pins the measurement so that a rerun sizes (and reuses) alike."""
    import hsd.precision
    from hsd.config import load_config

    qc = load_config(quickstart.QuickstartConfig, "configs/quickstart/smollm2-135m.yaml", [])
    assert qc.reference_gflops > 0 and qc.eagle3_conversations > 0
    peak = {"flops": 1.5 * qc.reference_gflops * 1e9}
    monkeypatch.setattr(hsd.precision, "matmul_peak_flops", lambda *a, **k: peak["flops"])
    speed = quickstart.machine_speed(qc, tmp_path)
    assert speed.ratio == pytest.approx(1.5) and not speed.pinned and "1.50x" in speed.line()
    n = qc.eagle3_conversations
    assert quickstart.eagle3_size_overrides(qc, False, speed.ratio) == [f"max_conversations={round(1.5 * n)}"]
    assert quickstart.eagle3_size_overrides(qc, False) == [f"max_conversations={n}"]
    out = tmp_path / "job"
    quickstart.pin_speed(speed, out)
    peak["flops"] = 0.1 * qc.reference_gflops * 1e9  # the machine is slower at the rerun: the pinned figure holds
    again = quickstart.machine_speed(qc, out)
    assert again.pinned and again.ratio == pytest.approx(1.5) and "pinned" in again.line()
    fresh = quickstart.machine_speed(qc, tmp_path / "other")
    assert fresh.ratio == quickstart.SPEED_RANGE[0]  # 0.1x, clipped
    assert quickstart.speed_ratio(10 * qc.reference_gflops, qc.reference_gflops) == quickstart.SPEED_RANGE[1]
    none = quickstart.machine_speed(load_config(quickstart.QuickstartConfig, None, ["reference_gflops=0"]), tmp_path)
    assert none.gflops is None and none.ratio == 1.0


def test_estimate_scales_with_the_measured_speed():
    from hsd.config import load_config

    qc = load_config(quickstart.QuickstartConfig, "configs/quickstart/smollm2-135m.yaml", [])
    stages = quickstart.training_stages(qc, pathlib.Path("/nonexistent/q"))
    cfgs = [s.load() for s in stages]
    slow = quickstart.estimate_seconds(qc, stages, cfgs, [False, False], speed=1.0)
    fast = quickstart.estimate_seconds(qc, stages, cfgs, [False, False], speed=2.0)
    for name in ("eagle3", "early_exit"):  # setup time stays, step costs halve
        assert fast[name] - qc.setup_seconds == pytest.approx((slow[name] - qc.setup_seconds) / 2)
    assert fast["decode"] - 30 == pytest.approx((slow["decode"] - 30) / 2)


def test_budget_caps_the_data_on_a_slow_machine(capsys, monkeypatch):
    """On a slow or busy machine the fixed stages (decoding, early exit) take more of the budget: the EAGLE-3 data
    is capped below its speed-scaled size so that the whole estimate still fits, and the job says so."""
    import hsd.precision
    from hsd.config import load_config

    qc = load_config(quickstart.QuickstartConfig, "configs/quickstart/smollm2-135m.yaml", [])
    assert qc.budget_minutes > 0
    monkeypatch.setattr(hsd.precision, "matmul_peak_flops", lambda *a, **k: 0.55 * qc.reference_gflops * 1e9)
    assert quickstart.main(["--estimate-only", "--output-dir", "/nonexistent/quickstart-slow"]) == 0
    out = capsys.readouterr().out
    minutes = float(re.search(r"estimated ([0-9.]+) min", out).group(1))
    n = int(re.search(r"the first (\d+) conversations", out).group(1))
    assert minutes <= qc.budget_minutes + 0.5, out  # steps grow with packed rows, not exactly with conversations
    assert n < round(0.55 * qc.eagle3_conversations) and f"capped at {n} conversations" in out
    q0 = load_config(quickstart.QuickstartConfig, "configs/quickstart/smollm2-135m.yaml", ["budget_minutes=0"])
    assert quickstart.budget_conversations(q0, 200, 140, {"eagle3": 900.0, "decode": 300.0}, False, 1.0) is None
