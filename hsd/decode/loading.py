"""Load what the decode script needs and check that the pieces fit the target, before anything runs.

Every mismatch is one clear ``ValueError`` naming the file and the problem: a head trained for another
target (vocabulary, hidden size, captured layers outside the target), an exit layer outside the target,
a draft model with another tokenizer, a missing folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from hsd.models.resolve import load_target

from .drafters import truncated_copy
from .evaluate import Models


def _local(path: str) -> Path | None:
    p = Path(path).expanduser()
    if p.exists():
        return p
    if path.startswith(("/", ".", "~")) or path.count("/") > 1:
        raise ValueError(f"{path}: no such file or folder")
    return None  # a Hub id


def check_head(head: nn.Module, target: nn.Module, where: str) -> None:
    """An EAGLE-3 head must read the target's hidden size, vocabulary and existing layers."""
    tc = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    hc = head.config
    n = int(tc.num_hidden_layers)
    if int(hc.vocab_size) != int(tc.vocab_size):
        raise ValueError(f"head {where}: trained for a vocabulary of {hc.vocab_size} tokens, the target has "
                         f"{tc.vocab_size} (a head for another target?)")
    th = int(getattr(hc, "target_hidden_size", None) or hc.hidden_size)
    if th != int(tc.hidden_size):
        raise ValueError(f"head {where}: reads target hidden states of size {th}, the target's hidden size is "
                         f"{tc.hidden_size} (a head for another target?)")
    bad = [i for i in hc.aux_layer_ids if not 0 <= int(i) <= n]
    if bad:
        raise ValueError(f"head {where}: captures hidden-state indices {bad}, but the target has {n} layers "
                         f"(valid 0..{n}; a head for another target?)")


def head_feature_dtype(path: str | None) -> str:
    """The dtype of the target features a head was trained on: ``feature_dtype`` of its ``precision.json``
    (a saved head folder) or of its ``training_summary.json`` (an export); "unknown" when neither records it
    (a Hub id, or a head saved before these records existed)."""
    if not path:
        return "unknown"
    root = Path(path).expanduser()
    for name in ("precision.json", "training_summary.json"):
        f = root / name
        if f.is_file():
            try:
                value = json.loads(f.read_text()).get("feature_dtype")
            except (OSError, ValueError):
                continue
            if value:
                return str(value).removeprefix("torch.")
    return "unknown"


def load_eagle3(path: str, target: nn.Module) -> nn.Module:
    from hsd.models.eagle3 import Eagle3DraftModel

    local = _local(path)
    if local is not None and not (local / "config.json").is_file():
        raise ValueError(f"head {path}: no config.json (not a saved head folder)")
    try:
        # the target's dtype: an exported head is stored in bf16, decoding on the CPU runs in float32
        head = Eagle3DraftModel.from_pretrained(str(local or path), dtype=next(target.parameters()).dtype)
    except OSError as err:
        raise ValueError(f"head {path}: cannot load ({err})") from err
    check_head(head, target, path)
    head.attach_target(target)
    return head.eval()


def exit_head_folders(path: str) -> dict[int, Path]:
    """A saved early-exit head folder, or a training output folder with ``layer_<l>/`` heads ->
    {exit layer: folder}."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"exit head {path}: no such folder")
    if (root / "config.json").is_file():
        layer = int(json.loads((root / "config.json").read_text()).get("exit_layer", 0))
        return {layer: root}
    found = {}
    for sub in sorted(root.glob("layer_*")):
        if (sub / "config.json").is_file() and sub.name[6:].isdigit():
            found[int(sub.name[6:])] = sub
    if not found:
        raise ValueError(f"exit head {path}: neither a head folder (config.json) nor a folder of layer_<l>/ heads")
    return found


def load_exit_heads(path: str | list[str], target: nn.Module, layers: list[int] | None = None) -> dict[int, nn.Module]:
    """Exit heads of one folder or several (``path`` a list: their layers are merged; a layer found in two
    folders is an error) -> {exit layer: head attached to ``target``}, only ``layers`` when given."""
    from hsd.models.early_exit import EarlyExitHead, check_exit_layer

    n = int(target.config.num_hidden_layers)
    folders: dict[int, Path] = {}
    for one in [path] if isinstance(path, (str, os.PathLike)) else list(path):
        for layer, folder in exit_head_folders(str(one)).items():
            if layer in folders:
                raise ValueError(f"exit head: layer {layer} is in both {folders[layer]} and {folder}; give one "
                                 "head per layer")
            folders[layer] = folder
    path = ", ".join(map(str, [path] if isinstance(path, (str, os.PathLike)) else path))
    for layer in layers or []:
        check_exit_layer(layer, n)
        if layer not in folders:
            raise ValueError(f"exit head {path}: no head for layer {layer} (found layers {sorted(folders)})")
    out = {}
    for layer, folder in folders.items():
        if layers and layer not in layers:
            continue
        check_exit_layer(layer, n)
        head = EarlyExitHead.from_pretrained(str(folder))
        out[layer] = head.to(next(target.parameters()).device).eval().attach_target(target)
    return out


def load_draft_model(spec: str, target: nn.Module, tokenizer) -> tuple[nn.Module, str]:
    """``layers:N`` (a layer-truncated copy of the target) or a folder / Hub id of a causal LM with the
    target's tokenizer -> (model, a note saying what it is)."""
    if spec.startswith("layers:"):
        n = int(spec.split(":", 1)[1])
        total = int(target.config.num_hidden_layers)
        return truncated_copy(target, n), (f"layer-truncated copy of the target: its first {n} of {total} layers "
                                           "+ final norm + LM head, shared weights, no training")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = _local(spec)
    src = str(local or spec)
    try:
        tok = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=next(target.parameters()).dtype)
    except OSError as err:
        raise ValueError(f"draft model {spec}: cannot load ({err})") from err
    if tok.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"draft model {spec}: its tokenizer differs from the target's (a draft model must share "
                         "the target's vocabulary)")
    model.to(next(target.parameters()).device).eval().requires_grad_(False)
    return model, f"Hugging Face causal LM {spec}"


def load_models(target: str, head: str | None = None, exit_head: str | list[str] | None = None,
                exit_layers: list[int] | None = None, draft_model: str | None = None, *, dtype: str = "auto",
                device: str = "cpu", stock_copy: bool = True) -> Models:
    """Everything checked before anything runs (nothing half-run on bad input)."""
    model, tok = load_target(target, dtype=dtype, device=device)
    models = Models(target=model, tokenizer=tok)
    if head:
        models.head = load_eagle3(head, model)
    if exit_head:
        models.exit_heads = load_exit_heads(exit_head, model, exit_layers)
    elif exit_layers:
        raise ValueError("--exit-layer needs --exit-head")
    if draft_model:
        models.draft_model, models.draft_note = load_draft_model(draft_model, model, tok)
    if stock_copy and torch.device(device).type == "cpu":
        # the engine re-lays out the target's linear weights in place (hsd.decode.cpu); HF baselines run
        # on an untouched copy, as a user would run generate
        stock, _ = load_target(target, dtype=dtype, device=device)
        models.stock_target = stock
        if draft_model and draft_model.startswith("layers:"):
            models.stock_draft = truncated_copy(stock, int(draft_model.split(":", 1)[1]))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return models
