"""Evaluation prompts: JSON Lines conversations rendered with the target's own chat template.

Row format (as ``data/prompts_eval.jsonl``): ``{"id", "messages": [{"role", "content"}, ...], "source"}``.
Assistant turns in the file are ignored: for a conversation with several user turns the target writes
every assistant turn itself, one after another (MT-bench protocol), so turn 2's prompt contains the
target's own turn-1 reply.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The bundled held-out set (20 GSM8K, 20 chat, 10 code) and a few two-user-turn chats.
DEFAULT_PROMPT_FILES = ("data/prompts_eval.jsonl", "data/prompts_eval_multiturn.jsonl")


@dataclass
class Prompt:
    """id, group (for per-source reports: gsm8k | chat | code | multiturn | the file's own source),
    user turns, and an optional system message."""

    id: str
    group: str
    user_turns: list[str]
    system: str | None = None


def group_of(source: str, n_turns: int) -> str:
    if n_turns > 1:
        return "multiturn"
    s = source.lower()
    if s.startswith("gsm8k"):
        return "gsm8k"
    if s.startswith("humaneval") or s.startswith("code"):
        return "code"
    if s.startswith("chatterbot") or s.startswith("chat"):
        return "chat"
    return s or "other"


def load_prompts(paths: list[str | Path], repo_root: Path | None = None) -> list[Prompt]:
    """Read prompt files (relative paths are also tried against ``repo_root``); ValueError naming the file
    and row for a missing file, bad JSON or a row without user turns."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file() and repo_root is not None and (repo_root / path).is_file():
            path = repo_root / path
        if not path.is_file():
            raise ValueError(f"prompt file not found: {p}")
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: row {i + 1} is not JSON ({err})") from None
            msgs = row.get("messages") or []
            users = [m["content"] for m in msgs if m.get("role") == "user"]
            system = next((m["content"] for m in msgs if m.get("role") == "system"), None)
            if not users:
                raise ValueError(f"{path}: row {i + 1} has no user turn")
            source = str(row.get("source", ""))
            out.append(Prompt(str(row.get("id", f"{path.stem}-{i}")), group_of(source, len(users)), users, system))
    if not out:
        raise ValueError(f"no prompts in {[str(p) for p in paths]}")
    return out


def render(tokenizer, prompt: Prompt, replies: list[str]) -> list[int]:
    """Token ids of the conversation so far, ending with the generation prompt of the next assistant
    turn: system?, user_1, reply_1, ..., user_{len(replies)+1}."""
    msgs = [{"role": "system", "content": prompt.system}] if prompt.system else []
    for i, reply in enumerate(replies):
        msgs += [{"role": "user", "content": prompt.user_turns[i]}, {"role": "assistant", "content": reply}]
    msgs.append({"role": "user", "content": prompt.user_turns[len(replies)]})
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    text = "\n".join(m["content"] for m in msgs) + "\n"
    return tokenizer(text)["input_ids"]
