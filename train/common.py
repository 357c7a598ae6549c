"""Set-up and saving steps both trainers share: the frozen target, the conversations (packed or not), the
precision record, quiet saving."""
from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hsd.models import resolve
from train import chat_data
from train import distributed as dist_utils

PRECISION_FILE = "precision.json"


def target_dtype(cfg: Any) -> torch.dtype:
    """`cfg.target_dtype` as a torch dtype ("auto": the measured decision of `hsd.precision` for this device:
    bfloat16 where bf16 matmuls are faster than fp32, float32 elsewhere)."""
    return resolve.parse_dtype(cfg.target_dtype, "cuda" if torch.cuda.is_available() else "cpu")


def dtype_name(dtype: torch.dtype | str) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def target_pass_context(device: torch.device | str):
    """Context for the frozen target's forward inside the loop's autocast: autocast off, so that the target
    computes in its own weights' dtype (``target_dtype``) and the features are exactly what
    ``precision.json`` records (bf16 features come from a bf16 target, not from fp32 weights cast per call)."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(dev.type, enabled=False)


def precision_record(cfg: Any, accelerator, feature_dtype: torch.dtype | str) -> dict[str, Any]:
    """What a saved head's training precision was (written as ``precision.json`` next to every saved head):
    ``feature_dtype`` (dtype of the target features it learned from), ``mixed_precision`` (the head's
    autocast as run: "no"/"bf16"/"fp16"), ``master_weights`` (always float32), the config's own settings,
    ``probe`` (this device's measured precision decision, ``PrecisionProbe.as_dict()``), ``bf16_speedup``
    (measured fp32 time / bf16 time at the batch shape) and ``machine`` (``hsd.machine.machine_info``)."""
    from hsd.machine import machine_info
    from hsd.precision import bf16_speedup, precision_probe

    device = accelerator.device
    return {"feature_dtype": dtype_name(feature_dtype), "mixed_precision": str(accelerator.mixed_precision),
            "master_weights": "float32", "target_dtype_config": cfg.target_dtype,
            "mixed_precision_config": cfg.mixed_precision, "probe": precision_probe(device).as_dict(),
            "bf16_speedup": bf16_speedup(device), "machine": machine_info(device, feature_dtype)}


def precision_line(record: dict[str, Any]) -> str:
    """One line for the log: what runs in which precision here, and why."""
    probe, ratio = record["probe"], record.get("bf16_speedup")
    why = probe["reason"]
    if probe.get("batch_speedup") is None and ratio is not None:  # an override: still say what bf16 costs here
        why = f"{why}; bf16 measured {ratio:.2f}x fp32 speed"
    return (f"precision: target features {record['feature_dtype']} (target_dtype={record['target_dtype_config']}), "
            f"head autocast {record['mixed_precision']} (mixed_precision={record['mixed_precision_config']}), "
            f"fp32 master weights, teacher and loss in fp32; auto = {probe['dtype']} on {probe['hardware']} ({why})")


def compute_dtype(record: dict[str, Any]) -> torch.dtype:
    """The dtype most training compute runs in, for the MFU's measured peak: bf16 when the target features or
    the head's autocast are bf16, else float32."""
    low = "bfloat16" in (record["feature_dtype"], {"bf16": "bfloat16"}.get(record["mixed_precision"]))
    return torch.bfloat16 if low else torch.float32


def linear_params(module: nn.Module) -> int:
    """Weights of a module's matrices (2-D parameters): a forward costs ~2 FLOPs per weight per token."""
    return sum(p.numel() for p in module.parameters() if p.ndim == 2)


def write_precision(directory: str | pathlib.Path, record: dict[str, Any]) -> None:
    """``directory/precision.json`` (a saved head folder)."""
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / PRECISION_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_precision(directory: str | pathlib.Path) -> dict[str, Any] | None:
    """``precision.json`` of a saved head folder (or of its parent: an early-exit ``layer_<l>/``), else None."""
    for d in (pathlib.Path(directory), pathlib.Path(directory).parent):
        if (d / PRECISION_FILE).is_file():
            return json.loads((d / PRECISION_FILE).read_text())
    return None


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

    The rows are `conversations` (default: `cfg.data`, loaded by :func:`load_conversations`; its first
    `max_conversations` when > 0) rendered with the target's chat template (`train.chat_data`; `max_length` /
    `overflow` applied and counted), or `rows`/`stats` when given (an offline feature cache). Token ids
    must lie in the target vocabulary; rows without an assistant token at t >= 1 (nothing to predict) are
    dropped and counted; the split is seeded (`eval_fraction`, `seed`); one summary line goes to `say`.
    """
    limit = int(getattr(cfg, "max_conversations", 0) or 0)
    if rows is None:
        if conversations is None:
            conversations = load_conversations(cfg)
        if limit:
            conversations = conversations.select(range(min(limit, len(conversations))))
        tds, stats = chat_data.tokenize_dataset(tok, conversations, max_length=cfg.max_length, overflow=cfg.overflow)
        rows = [{"input_ids": list(r["input_ids"]), "loss_mask": list(r["loss_mask"])} for r in tds]
    elif limit:
        rows = rows[:limit]
    stats = dict(stats or {})
    if limit:
        stats["rows"] = len(rows)
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
    first = f" (the first {limit} of {', '.join(map(str, cfg.data))})" if limit else ""
    say(f"data: {stats['rows']} conversations{first}, kept {len(kept)} (truncated {stats['truncated']}, dropped "
        f"{stats['dropped_too_long']} longer than max_length={cfg.max_length}, "
        f"{stats['dropped_no_assistant'] + stats['dropped_no_teacher_row']} without assistant tokens); "
        f"{len(train)} train / {len(held_out)} eval")
    return train, held_out, stats


def pack_splits(cfg: Any, train: list[dict], held_out: list[dict], say: Callable[[str], None] = print
                ) -> tuple[list[dict], list[dict], dict]:
    """``cfg.packing``: the train and eval conversations packed into rows of <= ``cfg.max_length`` tokens
    (train.packing; one line with how full the batches are either way); else unchanged. Returns (train,
    eval, stats)."""
    if not cfg.packing:
        return train, held_out, {}
    from train import packing

    p_train, p_eval = packing.pack_rows(train, cfg.max_length), packing.pack_rows(held_out, cfg.max_length)
    stats = packing.fill_stats(train, p_train, cfg.batch_size)
    say(f"packing: {stats['conversations']} train conversations ({stats['tokens']} tokens) -> {len(p_train)} rows "
        f"of <= {cfg.max_length} tokens, batches {stats['fill_packed']:.0%} real tokens (padded batches of "
        f"{cfg.batch_size} conversations: {stats['fill_padded']:.0%}); {len(held_out)} eval -> {len(p_eval)} rows")
    return p_train, p_eval, stats


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
