"""Chat conversations -> token ids with an assistant-only loss mask, rendered by the target's own template.

Pipeline: ``load_conversations`` (files or a Hub dataset; ShareGPT ``conversations`` and OpenAI
``messages`` rows become ``messages: [{"role", "content"}]``) -> ``tokenize_dataset`` (one
``tokenize_conversation`` per row; overflow truncated or dropped and counted) -> ``collate``.

How the loss mask is found (never guessed from hard-coded separators):
1. Templates with ``{% generation %}`` tags: Hugging Face's ``return_assistant_tokens_mask``.
2. Otherwise render-and-diff: for assistant turn ``i`` render ``messages[:i]`` with the generation
   prompt and ``messages[:i+1]`` without it; the assistant's tokens are what the second rendering adds
   to the first. The full rendering must extend every such prefix (checked on the token ids; if the
   tokens merge across a boundary, the character spans are mapped through the offsets instead).
3. A template that cannot mark assistant spans (no template, no generation prompt, a rendering whose
   prefixes are not prefixes of the whole, a reply whose text is not in its span) is refused with a
   ``ValueError``: training on every token would silently train a different objective.

``loss_mask[t] = 1`` marks token ``t`` as produced by the assistant: the reply and its end-of-turn token,
but not the role header before it nor template whitespace after the end-of-turn token (the model never
generates those).
"""
from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_ROLE_ALIASES = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "model": "assistant", "bot": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json",
                  ".parquet": "parquet"}
# End-of-turn tokens of common templates; a reply's span ends at the last one it contains.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>",
                "<|end_of_text|>")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ---------------------------------------------------------------------------------------------- loading

def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suf in sorted(_FILE_BUILDERS, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return path.suffix.lower()


def _looks_like_path(src: str) -> bool:
    """A local path (missing file -> error) rather than a Hub dataset name such as ``owner/name``."""
    return (src.startswith(("/", ".", "~")) or src.count("/") > 1
            or _suffix(Path(src)) in _FILE_BUILDERS or "\\" in src)


def _load_raw(src: str, split: str):
    import datasets

    path = Path(src).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and _suffix(f) in _FILE_BUILDERS)
        if not files:
            raise ValueError(f"data source {src!r} is a folder without .json/.jsonl/.parquet files")
    elif path.is_file():
        files = [path]
    elif _looks_like_path(src):
        raise ValueError(f"data source {src!r}: file not found")
    else:
        try:
            return datasets.load_dataset(src, split=split)
        except Exception as err:  # noqa: BLE001 - re-raised with the reason attached
            raise ValueError(f"data source {src!r} is not a local file and could not be loaded from the "
                             f"Hugging Face Hub ({type(err).__name__}: {err}). Offline machines need a local "
                             f"file (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE are set there).") from err
    kinds = {_FILE_BUILDERS.get(_suffix(f)) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"data source {src!r}: expected .json, .jsonl(.gz) or .parquet files, got "
                         f"{sorted({_suffix(f) for f in files})}")
    builder = kinds.pop()
    if builder == "json":  # checked first: datasets reports a bad row without its file and line
        bad = next((w for w in map(_json_error, files) if w), None)
        if bad:
            raise ValueError(bad)
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as err:  # noqa: BLE001 - datasets raises its own types; re-raised as bad input
        raise ValueError(f"data source {src!r} could not be read ({type(err).__name__}: "
                         f"{err.__cause__ or err})") from err


def _json_error(path: Path) -> str | None:
    """"<file>, line <n>: ..." for the first JSON Lines row (or JSON document) of ``path`` that does not
    parse; None when it all parses."""
    with (gzip.open(path, "rt", encoding="utf-8") if path.name.lower().endswith(".gz")
          else open(path, encoding="utf-8")) as fh:
        text = fh.read()
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    try:
        json.loads(first)
        json_lines = True
    except json.JSONDecodeError:
        json_lines = _suffix(path).startswith(".jsonl")
    if not json_lines:  # one JSON document
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return f"{path}, line {err.lineno}: not valid JSON ({err.msg})"
        return None
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}, line {n}: not valid JSON ({err.msg}, column {err.colno})"
    return None


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        return "".join(p.get("text") or "" for p in content if isinstance(p, Mapping))
    raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def normalize_messages(turns: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """ShareGPT (``from``/``value``) or OpenAI (``role``/``content``) turns -> ``[{"role", "content"}]``."""
    out = []
    for turn in turns:
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role is None:
            raise ValueError(f"a turn has neither 'role' nor 'from': {dict(turn)!r:.200}")
        canon = _ROLE_ALIASES.get(str(role).lower())
        if canon is None:
            raise ValueError(f"unknown role {role!r}; known roles: {sorted(_ROLE_ALIASES)}")
        out.append({"role": canon, "content": _content_text(content)})
    return out


def load_conversations(sources: str | Sequence[str], *, split: str = "train",
                       require_assistant: bool = True):
    """Load conversations from files or Hub datasets into one ``datasets.Dataset``.

    Columns: ``messages`` (list of ``{"role", "content"}``; roles system/user/assistant/tool) and
    ``source`` (the row's own ``source`` field, else the source name). Rows without an assistant turn
    are dropped (and logged) when ``require_assistant``; prompt-only files need ``require_assistant=False``.
    Raises ``ValueError`` for a missing file, a dataset with neither a ``messages`` nor a
    ``conversations`` column, or (when required) no assistant turn anywhere.
    """
    import datasets

    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise ValueError("sources is empty: give at least one file or dataset name")
    features = datasets.Features({"messages": [{"role": datasets.Value("string"),
                                                "content": datasets.Value("string")}],
                                  "source": datasets.Value("string")})
    parts = []
    for src in sources:
        raw = _load_raw(str(src), split)
        cols = set(raw.column_names)
        if not cols & {"messages", "conversations"}:
            raise ValueError(f"data source {src!r} has no conversations: expected a 'messages' (OpenAI) or "
                             f"'conversations' (ShareGPT) column, found {sorted(cols)}")

        def convert(row, idx, _src=str(src)):
            turns = row.get("messages") if row.get("messages") is not None else row.get("conversations")
            try:
                msgs = normalize_messages(turns or [])
            except ValueError as err:
                raise ValueError(f"data source {_src!r}, row {idx}: {err}") from None
            return {"messages": msgs, "source": row.get("source") or _src}

        part = raw.map(convert, with_indices=True, remove_columns=raw.column_names, features=features,
                       desc=f"normalise {Path(str(src)).name}")
        n = len(part)
        if require_assistant:
            part = part.filter(lambda r: any(m["role"] == "assistant" for m in r["messages"]))
            if len(part) == 0:
                raise ValueError(f"data source {src!r}: none of its {n} conversations has an assistant turn "
                                 f"(nothing to train on)")
        else:
            part = part.filter(lambda r: len(r["messages"]) > 0)
        if len(part) < n:
            log.warning("data source %r: dropped %d of %d conversations (empty%s)", src, n - len(part), n,
                        " or without an assistant turn" if require_assistant else "")
        parts.append(part)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# ------------------------------------------------------------------------------------------ tokenizing

def _template_text(tok) -> str:
    tpl = getattr(tok, "chat_template", None)
    if isinstance(tpl, Mapping):
        tpl = tpl.get("default")
    if not tpl:
        raise ValueError(f"tokenizer {getattr(tok, 'name_or_path', '')!r} has no chat template, so the assistant "
                         f"tokens cannot be marked; set tokenizer.chat_template (refusing to train on all tokens)")
    return tpl


def has_generation_tags(tok) -> bool:
    """True when the chat template marks assistant text with ``{% generation %}`` tags."""
    return bool(_GENERATION_TAG.search(_template_text(tok)))


def end_of_turn_ids(tok) -> set[int]:
    """Token ids that end an assistant turn: eos plus the known end-of-turn specials in the vocabulary."""
    ids = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    specials = set(tok.all_special_tokens) | {str(t) for t in getattr(tok, "added_tokens_decoder", {}).values()}
    for t in _END_OF_TURN:
        if t in specials:  # (get_vocab() would copy the whole vocabulary on every call)
            tid = tok.convert_tokens_to_ids(t)
            if tid is not None and tid != tok.unk_token_id:
                ids.add(int(tid))
    return ids


def _render(tok, messages, add_generation_prompt: bool, kwargs: Mapping[str, Any]) -> str:
    return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
                                   **kwargs)


def _encode(tok, text: str) -> list[int]:
    # apply_chat_template(tokenize=True) also encodes without adding special tokens: the template has them.
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _mask_from_generation_tags(tok, messages, kwargs) -> tuple[list[int], list[int]]:
    out = tok.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True, **kwargs)
    ids = list(out["input_ids"])
    mask = [int(m) for m in out["assistant_masks"]]
    if not any(mask):
        raise ValueError("the chat template has {% generation %} tags but marked no assistant token")
    return ids, mask


def _refuse(i: int, why: str) -> ValueError:
    return ValueError(f"cannot mark the assistant tokens of turn {i} with this chat template: {why}. "
                      f"Refusing to train on all tokens; add {{% generation %}} tags to the template or fix it.")


def _mask_by_diff(tok, messages, kwargs) -> tuple[list[int], list[int]]:
    full = _render(tok, messages, False, kwargs)
    ids = _encode(tok, full)
    mask = [0] * len(ids)
    offsets = None
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        try:
            before = _render(tok, messages[:i], True, kwargs)
            without_prompt = _render(tok, messages[:i], False, kwargs)
        except Exception as err:  # noqa: BLE001 - e.g. a template that indexes messages[0]
            raise _refuse(i, f"rendering the turns before it failed ({type(err).__name__}: {err})") from err
        upto = _render(tok, messages[: i + 1], False, kwargs)
        if before == without_prompt:
            raise _refuse(i, "add_generation_prompt=True adds nothing, so the role header cannot be told "
                             "apart from the reply")
        if not upto.startswith(before) or not full.startswith(upto):
            raise _refuse(i, "rendering a prefix of the conversation does not give a prefix of the full "
                             "rendering (the template rewrites earlier turns)")
        reply = upto[len(before):]
        if msg["content"].strip() and msg["content"].strip() not in reply:
            raise _refuse(i, "the reply's text is not inside the span the template adds for it")
        ids_before, ids_upto = _encode(tok, before), _encode(tok, upto)
        if ids[: len(ids_upto)] == ids_upto and ids_upto[: len(ids_before)] == ids_before:
            lo, hi = len(ids_before), len(ids_upto)
            for t in range(lo, hi):
                mask[t] = 1
        else:  # tokens merge across a boundary: map the character span through the offsets
            if offsets is None:
                offsets = tok(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            for t, (s, e) in enumerate(offsets):
                if e > s and s >= len(before) and e <= len(upto):
                    mask[t] = 1
    return ids, mask


def _trim_after_end_of_turn(ids: list[int], mask: list[int], ends: set[int]) -> list[int]:
    """Unmark template tokens after a turn's end-of-turn token (e.g. ChatML's trailing newline)."""
    out = list(mask)
    t = 0
    while t < len(out):
        if not out[t]:
            t += 1
            continue
        u = t
        while u < len(out) and out[u]:
            u += 1
        last_end = max((k for k in range(t, u) if ids[k] in ends), default=None)
        if last_end is not None:
            for k in range(last_end + 1, u):
                out[k] = 0
        t = u
    return out


def tokenize_conversation(tok, messages: Sequence[Mapping[str, str]], max_length: int | None = None, *,
                          chat_template_kwargs: Mapping[str, Any] | None = None) -> dict[str, list[int]]:
    """Render ``messages`` with ``tok``'s own chat template -> ``{"input_ids", "loss_mask"}`` (equal lengths).

    ``loss_mask`` is 1 on assistant tokens (see the module doc). ``max_length`` truncates on the right
    (None: no limit). Raises ``ValueError`` when the conversation has no assistant turn or the template
    cannot mark assistant spans.
    """
    msgs = normalize_messages(messages)
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("messages has no assistant turn: nothing to train on")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2 or None, got {max_length}")
    kwargs = dict(chat_template_kwargs or {})
    if has_generation_tags(tok):
        ids, mask = _mask_from_generation_tags(tok, msgs, kwargs)
    else:
        ids, mask = _mask_by_diff(tok, msgs, kwargs)
    mask = _trim_after_end_of_turn(ids, mask, end_of_turn_ids(tok))
    if not any(mask):
        raise _refuse(0, "no token was marked")
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return {"input_ids": ids, "loss_mask": mask}


def tokenize_dataset(tok, ds: Iterable[Mapping[str, Any]], max_length: int | None = 512,
                     overflow: str = "truncate", *, chat_template_kwargs: Mapping[str, Any] | None = None,
                     progress: bool = False):
    """Tokenize every row's ``messages`` -> (``datasets.Dataset`` with ``input_ids``/``loss_mask``, stats).

    ``overflow``: "truncate" keeps the first ``max_length`` tokens, "drop" skips longer rows. Rows left
    without any assistant token (e.g. a prompt longer than ``max_length``) are dropped. ``stats`` counts
    rows, kept, truncated, dropped_too_long, dropped_no_assistant, tokens, assistant_tokens.
    """
    import datasets

    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2 or None, got {max_length}")
    stats = dict(rows=0, kept=0, truncated=0, dropped_too_long=0, dropped_no_assistant=0, tokens=0,
                 assistant_tokens=0, max_length=max_length, overflow=overflow)
    out_ids, out_mask = [], []
    rows = ds
    if progress:
        from tqdm.auto import tqdm
        rows = tqdm(ds, desc="tokenize", unit="conv")
    for row in rows:
        stats["rows"] += 1
        ex = tokenize_conversation(tok, row["messages"], None, chat_template_kwargs=chat_template_kwargs)
        ids, mask = ex["input_ids"], ex["loss_mask"]
        if max_length is not None and len(ids) > max_length:
            if overflow == "drop":
                stats["dropped_too_long"] += 1
                continue
            ids, mask = ids[:max_length], mask[:max_length]
            stats["truncated"] += 1
        if not any(mask):
            stats["dropped_no_assistant"] += 1
            continue
        out_ids.append(ids)
        out_mask.append(mask)
        stats["kept"] += 1
        stats["tokens"] += len(ids)
        stats["assistant_tokens"] += sum(mask)
    if stats["kept"] == 0:
        raise ValueError(f"no conversation left after tokenization (max_length={max_length}, "
                         f"overflow={overflow!r}): {stats}")
    log.info("tokenized %(rows)d conversations: kept %(kept)d, truncated %(truncated)d, dropped %(dropped_too_long)d "
             "too long and %(dropped_no_assistant)d without assistant tokens; %(tokens)d tokens, "
             "%(assistant_tokens)d assistant", stats)
    return datasets.Dataset.from_dict({"input_ids": out_ids, "loss_mask": out_mask}), stats


# ------------------------------------------------------------------------------------------- batching

def collate(rows: Sequence[Mapping[str, Any]], pad_id: int, *,
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad rows of ``input_ids``/``loss_mask`` -> ``input_ids``, ``attention_mask``, ``loss_mask`` [B, S] long.

    Padding positions have attention_mask = loss_mask = 0 and input id ``pad_id``. Packed rows
    (``train.packing``) also carry ``position_ids``: collated too, the padding tail of each row numbered
    0, 1, ... as a segment of its own (``hsd.models.packing``).
    """
    if not rows:
        raise ValueError("rows is empty")
    if pad_id is None or int(pad_id) < 0:
        raise ValueError(f"pad_id must be a non-negative token id, got {pad_id!r}")
    lengths = [len(r["input_ids"]) for r in rows]
    for i, r in enumerate(rows):
        if len(r["loss_mask"]) != lengths[i]:
            raise ValueError(f"row {i}: input_ids has {lengths[i]} tokens but loss_mask has {len(r['loss_mask'])}")
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    lm = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = lengths[i]
        ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        att[i, :n] = 1
        lm[i, :n] = torch.as_tensor(r["loss_mask"], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": att, "loss_mask": lm}
    packed = ["position_ids" in r for r in rows]
    if any(packed):
        if not all(packed):
            raise ValueError("rows mix packed (with position_ids) and unpacked rows")
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = lengths[i]
            if len(r["position_ids"]) != n:
                raise ValueError(f"row {i}: input_ids has {n} tokens but position_ids has {len(r['position_ids'])}")
            pos[i, :n] = torch.as_tensor(r["position_ids"], dtype=torch.long)
            pos[i, n:] = torch.arange(width - n)
        out["position_ids"] = pos
    return out


def split_rows(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded split into (train, eval); eval gets round(eval_fraction * n) rows (at least 1 if > 0).

    Both trainers hold out conversations this way, so the same seed gives the same held-out set.
    """
    n = len(rows)
    n_eval = 0 if eval_fraction <= 0 else max(1, round(eval_fraction * n))
    if n_eval >= n:
        raise ValueError(f"eval_fraction={eval_fraction} leaves no training rows out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]
