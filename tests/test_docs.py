"""README.md and docs/*.md stay honest where it is cheap to check:

- every command in a shell block (```bash, ```sh, ```shell, ```console or unlabelled) whose program is
  `hsd-train`, `python scripts/...`, `python -m <hsd|train>...`, `accelerate launch ... -m ...` or `make`
  parses: the command's own argument parser accepts it (run in this process and stopped right after
  parsing, so nothing is loaded or trained), trainer and quickstart commands also load their config with
  the given `key=value` overrides (unknown keys are errors), config files and scripts they name exist, and
  `make -n TARGET` knows the target;
- every `from hsd... import` / `from train... import` line of a ```python block imports;
- every relative link resolves to a file, and an anchor on a link into a markdown file names a heading.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(\s*)```(\w*)[^\n]*\n(.*?)^\1```\s*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# config classes loaded (with the overrides) for the commands that take a YAML config
CONFIGS = {"train.eagle3": ("train.eagle3", "Eagle3TrainConfig"),
           "train.early_exit": ("train.early_exit", "EarlyExitTrainConfig"),
           "train.quickstart": ("train.quickstart", "QuickstartConfig")}


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line number of the opening fence) of every fenced block."""
    return [(m.group(2).lower(), m.group(3), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def shell_commands(body: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped, split at
    `&&`, `||`, `;` and `|`, leading `VAR=value` assignments and a `$ ` prompt removed."""
    out: list[list[str]] = []
    for line in body.replace("\\\n", " ").splitlines():
        line = line.strip().removeprefix("$ ")
        if not line or line.startswith("#"):
            continue
        words: list[str] = []
        for tok in [*shlex.split(line, comments=True), ";"]:
            if tok in ("&&", "||", ";", "|"):
                while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                    words.pop(0)
                if words:
                    out.append(words)
                words = []
            else:
                words.append(tok)
    return out


def doc_commands() -> list[tuple[str, list[str]]]:
    """("page:line", words) for every shell command of the pages whose program this test checks."""
    found = []
    for page in PAGES:
        for lang, body, line in fenced_blocks(page.read_text(encoding="utf-8")):
            if lang not in SHELL_LANGS:
                continue
            for words in shell_commands(body):
                if classify(words) is not None:
                    found.append((f"{page.relative_to(ROOT)}:{line}", words))
    return found


def classify(words: list[str]) -> str | None:
    """Which program a command runs, or None for programs this test does not check (vllm, pip, ...)."""
    prog = words[0]
    if prog in ("hsd-train", "make") or (prog == "accelerate" and words[1:2] == ["launch"]):
        return prog
    if prog in ("python", "python3") and len(words) > 1:
        if words[1].startswith("scripts/"):
            return "script"
        if words[1] == "-m" and len(words) > 2 and words[2].split(".")[0] in ("hsd", "train"):
            return "module"
    return None


class _Parsed(Exception):
    """Raised right after a command's argument parser accepted its arguments (nothing else runs)."""

    def __init__(self, namespace: argparse.Namespace):
        super().__init__("parsed")
        self.namespace = namespace


def parse_only(main, argv: list[str], monkeypatch) -> argparse.Namespace:
    """Call ``main(argv)`` with ``ArgumentParser.parse_args`` stopping the command once it has parsed."""
    real = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", stop)
        try:
            main(argv)
        except _Parsed as done:
            return done.namespace
        except SystemExit as err:
            raise AssertionError(f"argument parsing failed (exit {err.code})") from None
    raise AssertionError("the command never parsed its arguments")


@functools.cache
def script_main(rel: str):
    """The function a script's ``__main__`` block runs: ``main``, or the one it hands to ``run_main``."""
    path = ROOT / rel
    assert path.is_file(), f"{rel} does not exist"
    spec = importlib.util.spec_from_file_location(f"_doc_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    called = re.search(r"run_main\((\w+)", path.read_text().split('if __name__ == "__main__":')[-1])
    name = called.group(1) if called else "main"
    assert callable(getattr(module, name, None)), f"{rel}: no entry point {name}(argv)"
    return getattr(module, name)


def module_main(name: str):
    module = importlib.import_module(name)
    if not hasattr(module, "main") and importlib.util.find_spec(f"{name}.__main__") is not None:
        module = importlib.import_module(f"{name}.__main__")
    assert callable(getattr(module, "main", None)), f"{name} has no main(argv)"
    return module.main


def check_module_command(module: str, argv: list[str], monkeypatch) -> None:
    """``python -m module argv``: parses; a trainer's or the quickstart's config loads with the overrides."""
    ns = parse_only(module_main(module), argv, monkeypatch)
    if module in CONFIGS:
        from hsd.config import load_config

        mod, cls = CONFIGS[module]
        overrides = list(getattr(ns, "overrides", []))
        config = getattr(ns, "config", None) or getattr(importlib.import_module(mod), "DEFAULT_CONFIG", None)
        load_config(getattr(importlib.import_module(mod), cls), config, overrides)


def check_paths(words: list[str]) -> None:
    """Config files and scripts a command names exist (data and run folders are the user's own)."""
    for w in words:
        for part in w.split("="):
            if part.startswith(("configs/", "scripts/")):
                assert (ROOT / part).exists(), f"{part} does not exist"


def check_command(words: list[str], monkeypatch) -> None:
    kind = classify(words)
    check_paths(words)
    if kind == "hsd-train":
        from train import cli

        args = words[1:]
        name = next((n for n in sorted(cli.COMMANDS, key=lambda n: -len(n.split()))
                     if args[:len(n.split())] == n.split()), None)
        assert name is not None, f"unknown hsd-train command {' '.join(args[:2])!r}"
        check_module_command(cli.COMMANDS[name], args[len(name.split()):], monkeypatch)
    elif kind == "script":
        parse_only(script_main(words[1]), words[2:], monkeypatch)
    elif kind == "module":
        check_module_command(words[2], words[3:], monkeypatch)
    elif kind == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        ns = launch_command_parser().parse_args(words[2:])
        assert ns.module, "accelerate launch without -m: launch the project's modules (-m train.eagle3)"
        check_module_command(ns.training_script, list(ns.training_script_args), monkeypatch)
    elif kind == "make":
        targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        proc = subprocess.run(["make", "-n", *targets], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


COMMANDS = doc_commands()


def test_the_docs_show_commands():
    """The collector finds the commands (a broken fence regex would make the next test vacuous)."""
    kinds = {classify(w) for _, w in COMMANDS}
    assert {"hsd-train", "script", "module", "accelerate", "make"} <= kinds, kinds
    readme = [w for where, w in COMMANDS if where.startswith("README.md")]
    assert ["make", "run"] in readme and ["make", "test"] in readme


@pytest.mark.parametrize("where,words", COMMANDS, ids=[f"{w}:{' '.join(c[:3])}" for w, c in COMMANDS])
def test_doc_command_parses(where, words, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        check_command(words, monkeypatch)
    except (AssertionError, ValueError, OSError) as err:
        raise AssertionError(f"{where}: `{shlex.join(words)}`: {err}") from None


def test_the_checker_refuses_bad_commands(monkeypatch):
    """A planted wrong flag, unknown config key, missing config file and unknown make target all fail."""
    bad = [["hsd-train", "decode", "--heads", "x"],
           ["hsd-train", "train", "eagle3", "--config", "configs/eagle3/smollm2-135m.yaml", "ttt_stepz=3"],
           ["hsd-train", "train", "eagle3", "--config", "configs/eagle3/nope.yaml"],
           ["python", "scripts/export.py", "HEAD", "--out", "x", "--format", "gguf"],
           ["python", "-m", "hsd.verify", "--demo", "--nope"],
           ["accelerate", "launch", "--config_file", "configs/accelerate/gpu1.yaml", "-m", "train.eagle3", "lrr=1"],
           ["make", "no-such-target"]]
    for words in bad:
        with pytest.raises((AssertionError, ValueError, OSError)):
            check_command(words, monkeypatch)
    check_command(["hsd-train", "train", "eagle3", "--config", "configs/eagle3/smollm2-135m.yaml", "ttt_steps=3"],
                  monkeypatch)


def test_python_snippets_import():
    """The `from hsd... import` / `from train... import` lines of ```python blocks name what exists."""
    checked = 0
    for page in PAGES:
        for lang, body, line in fenced_blocks(page.read_text(encoding="utf-8")):
            if lang != "python":
                continue
            for stmt in re.findall(r"^from (?:hsd|train)[\w.]* import [^\n(]+$", body, re.M):
                try:
                    exec(stmt, {})
                except ImportError as err:
                    raise AssertionError(f"{page.relative_to(ROOT)}:{line}: `{stmt}`: {err}") from None
                checked += 1
    assert checked >= 3


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip())  # code and emphasis markers are not part of the text
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text).lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text))


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        s = slug(h)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def test_relative_links_resolve():
    broken, checked = [], 0
    for page in PAGES:
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            checked += 1
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading #{anchor} in {dest.name})")
    assert checked > 10
    assert not broken, "\n".join(broken)


def test_slug_matches_github():
    assert slug("Your own target on GPUs") == "your-own-target-on-gpus"
    assert slug("Serving path: `VerifyPlan` (one fused kernel launch per decode step)") == \
        "serving-path-verifyplan-one-fused-kernel-launch-per-decode-step"
    assert slug("1. API") == "1-api" and slug("τ on 56 prompts") == "τ-on-56-prompts"
    assert slug("**Hard rule** for `exit_layers`") == "hard-rule-for-exit_layers"
