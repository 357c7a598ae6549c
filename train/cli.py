"""``hsd-train``: one command line for every entry point of the project.

    hsd-train train eagle3 --config configs/eagle3/smollm2-135m.yaml [--resume] [key=value ...]
    hsd-train train early-exit --config configs/early_exit/smollm2-135m.yaml [key=value ...]
    hsd-train decode --head runs/eagle3/smollm2-135m/final [--temperature 0 1 --k 3 5 ...]
    hsd-train export runs/eagle3/smollm2-135m/final --out exports/smollm2-135m-eagle3
    hsd-train quickstart --output-dir runs/quickstart/smollm2-135m    # the main job: train, export, decode, report
    hsd-train --help                      # the commands; `hsd-train train` lists the trainers

A command is a module with ``main(argv)``: the rest of the command line goes to it unchanged, so
``hsd-train train eagle3 ...`` is ``python -m train.eagle3 ...``. Adding a command is one line in
``COMMANDS``. Bad input (unknown or ill-typed config key, missing or unreadable file, data or model that
does not fit) ends with one line on stderr and exit status 2 (``hsd.config.run_main``; set
``HSD_TRACEBACK=1`` for the traceback). Several processes: ``accelerate launch ... -m train.eagle3 ...``.

This is the top layer: it imports ``train`` and ``hsd``; nothing in ``hsd`` imports it.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from hsd.config import run_main

# command words -> module with main(argv)
COMMANDS: dict[str, str] = {
    "train eagle3": "train.eagle3",
    "train early-exit": "train.early_exit",
    "decode": "hsd.decode.cli",
    "export": "hsd.export.cli",
    "quickstart": "train.quickstart",
}


def _summary(module: str) -> str:
    """First line of a module's docstring, read without importing it (imports are slow: torch)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ""
    with open(spec.origin, encoding="utf-8") as fh:
        doc = ast.get_docstring(ast.parse(fh.read())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _usage(prefix: Sequence[str]) -> str:
    names = [n for n in COMMANDS if n.split()[:len(prefix)] == list(prefix)]
    width = max(len(n) for n in names)
    lines = [f"usage: hsd-train {' '.join(prefix) + ' ' if prefix else ''}<command> [arguments]", "", "commands:"]
    lines += [f"  {n:<{width}}  {_summary(COMMANDS[n])}" for n in names]
    lines += ["", "`hsd-train <command> --help` shows a command's own arguments."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv`` (default: the process's arguments) to the longest matching command."""
    args = list(sys.argv[1:] if argv is None else argv)
    for name in sorted(COMMANDS, key=lambda n: -len(n.split())):
        words = name.split()
        if args[:len(words)] == words:
            module = importlib.import_module(COMMANDS[name])
            return run_main(module.main, args[len(words):], prog=f"hsd-train {name}")
    # no full command: help for the words given so far (`hsd-train`, `hsd-train train --help`), if they start one
    words = [a for a in args if not a.startswith("-")]
    if any(n.split()[:len(words)] == words for n in COMMANDS) and set(args) - set(words) <= {"-h", "--help"}:
        print(_usage(words))
        return 0
    print(f"hsd-train: error: unknown command {' '.join(args)!r} (see `hsd-train --help`)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
