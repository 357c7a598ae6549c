"""Set-up and saving steps both trainers share: the frozen target, the conversations, quiet saving."""
from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hsd.models import resolve
from train import chat_data
from train import distributed as dist_utils


def target_dtype(cfg: Any) -> torch.dtype:
    """`cfg.target_dtype` as a torch dtype ("auto": bfloat16 with CUDA, float32 on a CPU)."""
    return resolve.parse_dtype(cfg.target_dtype, "cuda" if torch.cuda.is_available() else "cpu")


def vocab_size(target: nn.Module) -> int:
    """The target's vocabulary size V (of its text model, for multimodal configs)."""
    tc = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    return int(tc.vocab_size)


def load_target(cfg: Any, accelerator) -> tuple[nn.Module, Any]:
    """The frozen target and its tokenizer, on every rank.

    Resolved by name (`hsd.models.resolve`: short name, folder or Hub id), in `cfg.target_dtype`; under
    ZeRO-3 with `shard_target` loaded partitioned (`train.distributed.target_init_context`); frozen and
    placed by `train.distributed.prepare_frozen_target`. Returns the module to call (under ZeRO-3 sharding,
    the engine's module, whose hooks gather each layer) and the tokenizer. ValueError when the tokenizer
    has more tokens than the target's vocabulary.
    """
    with dist_utils.target_init_context(accelerator, cfg):
        target, tok = resolve.load_target(cfg.target, dtype=target_dtype(cfg), device="cpu")
    vocab = vocab_size(target)
    if len(tok) > vocab:
        raise ValueError(f"tokenizer of {cfg.target!r} has {len(tok)} tokens but the target's vocabulary is "
                         f"{vocab}: tokenizer/vocab mismatch")
    engine = dist_utils.prepare_frozen_target(accelerator, target, cfg)
    check_engine_support(getattr(engine, "module", engine), cfg, accelerator)
    return getattr(engine, "module", engine), tok


def load_conversations(cfg: Any):
    """`cfg.data` read and checked (`train.chat_data.load_conversations`): every file exists, parses and holds
    conversations with an assistant turn. Tasks call it before the target loads, so that bad data is one line
    in seconds rather than after minutes of loading a large target. ValueError/OSError name the file."""
    return chat_data.load_conversations(list(cfg.data))


def check_engine_support(target: nn.Module, cfg: Any, accelerator, say: Callable[[str], None] = print) -> None:
    """Run the decode engine's self-check on the frozen target (`hsd.decode.target_check`, main process,
    ~one forward over 64 tokens) and record it in `<output_dir>/target_check.json` for `export`. A target
    the engine would refuse gets one warning line; training goes on (vLLM / SGLang may serve the head).
    A ZeRO-3-partitioned target cannot be run layer by layer here: not checked (`decode` checks it)."""
    if not accelerator.is_main_process or dist_utils.shards_target(accelerator, cfg):
        return
    from hsd.decode import target_check

    res = target_check.check_target(target)
    target_check.write_record(cfg.output_dir, res, cfg.target)
    warning = target_check.engine_warning(res, "training goes on")
    if warning:
        say(warning)


def load_rows(cfg: Any, tok, vocab: int, say: Callable[[str], None] = print,
              rows: list[dict] | None = None, stats: dict | None = None,
              conversations=None) -> tuple[list[dict], list[dict], dict]:
    """Conversations -> (train rows, eval rows, stats), each row ``{"row_id", "input_ids", "loss_mask"}``.

    The rows are `conversations` (default: `cfg.data`, loaded by :func:`load_conversations`) rendered with
    the target's chat template (`train.chat_data`; `max_length` / `overflow` applied and counted), or
    `rows`/`stats` when given (an offline feature cache). Token ids
    must lie in the target vocabulary; rows without an assistant token at t >= 1 (nothing to predict) are
    dropped and counted; the split is seeded (`eval_fraction`, `seed`); one summary line goes to `say`.
    """
    if rows is None:
        if conversations is None:
            conversations = load_conversations(cfg)
        tds, stats = chat_data.tokenize_dataset(tok, conversations, max_length=cfg.max_length, overflow=cfg.overflow)
        rows = [{"input_ids": list(r["input_ids"]), "loss_mask": list(r["loss_mask"])} for r in tds]
    stats = dict(stats or {})
    top = max(max(r["input_ids"]) for r in rows)
    if top >= vocab:
        raise ValueError(f"data token id {top} is outside the target vocabulary of {vocab} "
                         "(tokenizer/vocab mismatch between data and target)")
    kept = [r for r in rows if sum(r["loss_mask"][1:]) > 0]
    for i, r in enumerate(kept):
        r.setdefault("row_id", i)
    stats["dropped_no_teacher_row"] = len(rows) - len(kept)
    if not kept:
        raise ValueError(f"data {cfg.data}: no conversation has an assistant token to predict ({stats})")
    train, held_out = chat_data.split_rows(kept, cfg.eval_fraction, cfg.seed)
    say(f"data: {stats['rows']} conversations, kept {len(kept)} (truncated {stats['truncated']}, dropped "
        f"{stats['dropped_too_long']} longer than max_length={cfg.max_length}, "
        f"{stats['dropped_no_assistant'] + stats['dropped_no_teacher_row']} without assistant tokens); "
        f"{len(train)} train / {len(held_out)} eval")
    return train, held_out, stats


def save_pretrained_quietly(model, directory: str | pathlib.Path) -> None:
    """``model.save_pretrained(directory)`` (safetensors) without transformers' per-save progress bars."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
