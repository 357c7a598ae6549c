"""`hsd-train` (train/cli.py): command dispatch, help, the console script, and bad input as one line on
stderr with exit status 2 (unknown key, bad value, missing file, unreadable or corrupt data file)."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import write_tiny_chat_run
from train import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return write_tiny_chat_run(tmp_path_factory.mktemp("cli"))


def one_error_line(capsys, command: str) -> str:
    """The error is one line on stderr (progress bars of the work done before it may precede it)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"hsd-train {command}: error: "), err
    return lines[0]


def test_commands_help_and_console_script(capsys):
    assert set(cli.COMMANDS) >= {"train eagle3", "train early-exit"}
    for module in cli.COMMANDS.values():
        assert callable(importlib.import_module(module).main)
    assert cli.main([]) == 0 and cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train eagle3" in out and "train early-exit" in out and "EAGLE-3 draft head" in out
    assert cli.main(["train"]) == 0 and "train early-exit" in capsys.readouterr().out
    assert cli.main(["train", "eagle4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'train eagle4'" in err
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("hsd-train") == "train.cli:main"


@pytest.mark.parametrize("command", ["train eagle3", "train early-exit"])
def test_bad_config_input_is_one_line_and_status_2(command, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HSD_TRACEBACK", raising=False)
    words = command.split()
    assert cli.main([*words, "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in one_error_line(capsys, command)
    assert cli.main([*words, "lrr=1e-3"]) == 2
    assert "unknown config key 'lrr'" in one_error_line(capsys, command)
    assert cli.main([*words, "batch_size=four"]) == 2
    assert "'batch_size' must be an int" in one_error_line(capsys, command)
    assert cli.main([*words, "overflow=wrap"]) == 2
    assert "'overflow' must be one of ['truncate', 'drop']" in one_error_line(capsys, command)


@pytest.mark.parametrize("command", ["train eagle3", "train early-exit"])
def test_bad_data_file_is_one_line_naming_file_and_line(command, env, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HSD_TRACEBACK", raising=False)
    good = (env / "chat.jsonl").read_text().splitlines()
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text("\n".join(good[:3] + ['{"messages": [{"role": "user", "content": "cut here'] + good[3:]) + "\n")
    base = [*command.split(), f"target={env / 'target'}", f"output_dir={tmp_path / 'out'}", "report_to=none",
            "draft_vocab_size=48"]
    assert cli.main([*base, f"data=[{corrupt}]"]) == 2
    line = one_error_line(capsys, command)
    assert f"{corrupt}, line 4: not valid JSON" in line
    assert cli.main([*base, f"data=[{tmp_path / 'nope.jsonl'}]"]) == 2
    assert "nope.jsonl" in one_error_line(capsys, command)
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.jsonl"
        locked.write_text("\n".join(good) + "\n")
        locked.chmod(0)
        assert cli.main([*base, f"data=[{locked}]"]) == 2
        assert "locked.jsonl" in one_error_line(capsys, command)


def test_module_entry_points_exit_2_without_traceback(tmp_path):
    """The same contract through real processes: the console script's module and `python -m train.eagle3`."""
    env = {k: v for k, v in os.environ.items() if k != "HSD_TRACEBACK"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    runs = {
        "hsd-train train early-exit: error: unknown config key 'ttt_steps'":
            [sys.executable, "-m", "train.cli", "train", "early-exit", "ttt_steps=3"],
        "train.eagle3: error: config file not found":
            [sys.executable, "-m", "train.eagle3", "--config", str(tmp_path / "none.yaml")],
    }
    for start, cmd in runs.items():
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(start), proc.stderr[-2000:]


def test_decode_and_export_commands_are_wired(capsys, tmp_path):
    assert {"decode", "export"} <= set(cli.COMMANDS)
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "decode " in out and "export " in out
    # a missing head folder is a clear message and a failing exit status, not a traceback
    assert cli.main(["export", str(tmp_path / "no_such_head"), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no_such_head" in err


@pytest.mark.parametrize("command", ["train eagle3", "train early-exit"])
def test_bad_data_is_reported_before_the_target_loads(command, env, tmp_path, capsys, monkeypatch):
    """A missing, unparsable or wrongly shaped data file is one line before any model is loaded."""
    monkeypatch.delenv("HSD_TRACEBACK", raising=False)
    from hsd.models import resolve

    def no_load(*args, **kwargs):
        raise AssertionError("the target was loaded before the data was checked")

    monkeypatch.setattr(resolve, "load_target", no_load)
    shapeless = tmp_path / "shapeless.jsonl"
    shapeless.write_text('{"prompt": "hi", "answer": "hello"}\n')
    base = [*command.split(), f"target={env / 'target'}", f"output_dir={tmp_path / 'out'}", "report_to=none"]
    for data, expect in ((tmp_path / "nope.jsonl", "nope.jsonl"), (shapeless, "no conversations")):
        assert cli.main([*base, f"data=[{data}]"]) == 2
        assert expect in one_error_line(capsys, command)
    with pytest.raises(AssertionError, match="target was loaded"):  # the guard itself works: good data goes on
        cli.main([*base, f"data=[{env / 'chat.jsonl'}]"])


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_names_the_full_command(command, capsys):
    """`hsd-train train eagle3 --help` shows `hsd-train train eagle3` as the program."""
    with pytest.raises(SystemExit) as done:
        cli.main([*command.split(), "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: hsd-train {command} ")
