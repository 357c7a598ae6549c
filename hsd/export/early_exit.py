"""Early-exit heads (``layer_<l>/`` folders) -> Hub-ready folder, and its validator.

Layout written::

    README.md                 card: measured α per exit layer, how to load
    target_reference.json     the target these heads belong to (Hub id, revision, sizes, licence)
    exit_metrics.json         held-out α / top-1 / KL per layer, trained vs the logit lens (from the run)
    training_summary.json     path-free record of the export (the card's input)
    layer_<l>/config.json     EarlyExitConfig with the Hub id + revision of the target and the serving dtype
    layer_<l>/model.safetensors   the head's own weights, floating ones in the serving dtype (d2t int64)

The heads borrow the target's final norm and LM head, so nothing of the target is shipped. Loading is
``hsd.models.early_exit.load_head(folder / "layer_<l>", target)``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from hsd.export import layout
from hsd.export.source import EARLY_EXIT_MODEL_TYPE, ExportError, HeadSource, read_head_folder, staged_folder
from hsd.export.target import TargetInfo, describe_target


def _head_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def expected_state(config: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """key -> (shape, is_floating) of a head with this config (built on the meta device, nothing allocated)."""
    from hsd.models.early_exit import EarlyExitConfig, EarlyExitHead

    cfg = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype",
                                                        "transformers_version")}
    with torch.device("meta"):
        head = EarlyExitHead(EarlyExitConfig(**cfg))
    return {k: (tuple(v.shape), v.is_floating_point()) for k, v in head.state_dict().items()}


def _zero_init_keys(config: dict[str, Any]) -> list[str]:
    """Keys zero at init (the residual branch's output side): all still zero = the head equals the lens."""
    t = config.get("head_type")
    return {"affine": ["body.proj.weight", "body.proj.bias"], "lowrank": ["body.lora_B.weight", "body.bias"],
            "mlp": ["body.down_proj.weight"], "attn": ["body.o_proj.weight"]}.get(t, [])


def untrained_layer_problems(config: dict[str, Any], state: dict[str, torch.Tensor]) -> list[str]:
    keys = [k for k in _zero_init_keys(config) if k in state]
    if keys and all(bool((state[k] == 0).all()) for k in keys):
        return [f"layer {config.get('exit_layer')}: {keys} are all zero, their initial value: this head equals the "
                "untrained logit lens (step 0)"]
    return []


def export_early_exit(head: str | os.PathLike | HeadSource, out_dir: str | os.PathLike | None, *,
                      dtype: str | None = None, target: str | TargetInfo | None = None,
                      target_hub_id: str | None = None, target_revision: str | None = None,
                      repo_id: str | None = None, overwrite: bool = False):
    """Export the early-exit heads of a saved folder (all its ``layer_<l>/``) and validate the result."""
    from hsd.export import card as cards
    from hsd.export.eagle3 import ExportResult
    from hsd.export.validate import validate

    src = head if isinstance(head, HeadSource) else read_head_folder(head)
    if src.kind != "early_exit":
        raise ExportError(f"{src.folder} holds an {src.kind} head, not early-exit heads")
    out = Path(out_dir).expanduser() if out_dir is not None else None
    if out is not None and out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output folder {str(out)!r} exists and is not empty (pass overwrite=True / --overwrite)")
    tgt = target if isinstance(target, TargetInfo) else describe_target(
        target or src.target_name or _no_target(src), hub_id=target_hub_id,
        revision=target_revision or src.target_revision)
    dt = layout.dtype_name(dtype) if dtype else tgt.serve_dtype
    configs: dict[int, dict[str, Any]] = {}
    states: dict[int, dict[str, torch.Tensor]] = {}
    problems: list[str] = []
    for layer, sub in src.layers.items():
        cfg = json.loads((sub / "config.json").read_text())
        state = _head_state(sub)
        if int(cfg.get("hidden_size", -1)) != tgt.hidden_size or int(cfg.get("vocab_size", -1)) != tgt.vocab_size:
            problems.append(f"layer {layer}: hidden/vocab {cfg.get('hidden_size')}/{cfg.get('vocab_size')} differ from "
                            f"target {tgt.name!r} ({tgt.hidden_size}/{tgt.vocab_size})")
        if int(cfg.get("num_target_layers") or tgt.num_layers) != tgt.num_layers:
            problems.append(f"layer {layer}: trained for a target of {cfg.get('num_target_layers')} layers, "
                            f"{tgt.name!r} has {tgt.num_layers}")
        problems.extend(untrained_layer_problems(cfg, state))
        cfg.update(base_model_name_or_path=tgt.hub_id or tgt.reference()["name"], base_model_revision=tgt.revision,
                   torch_dtype=dt, dtype=dt)
        configs[layer], states[layer] = cfg, state
    if problems:
        raise ExportError(f"{src.folder}: " + "; ".join(problems))
    head_types = sorted({c.get("head_type") for c in configs.values()})
    temps = sorted({c.get("training_temperature") for c in configs.values()})
    per_layer = (src.exit_metrics.get("per_layer") or {})
    per_layer = {str(layer): per_layer.get(str(layer), {}) for layer in configs}
    summary = cards.early_exit_summary(src, tgt, dtype=dt, layers=list(configs), per_layer=per_layer,
                                       head_type="/".join(map(str, head_types)),
                                       temperature=temps[0] if len(temps) == 1 else None)
    ref = repo_id or (f"./{out.name}" if out is not None else "./exported-heads")
    card = cards.early_exit_card(summary, ref)

    with staged_folder(out) as (tmp, files):
        from safetensors.torch import save_file

        cast = layout.SERVE_DTYPES[dt]
        for layer, cfg in configs.items():
            d = tmp / f"layer_{layer}"
            d.mkdir()
            (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            state = {k: (v.to(cast) if v.is_floating_point() else v.to(torch.int64)).contiguous()
                     for k, v in states[layer].items()}
            save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "target_reference.json").write_text(json.dumps(tgt.reference(), indent=2) + "\n")
        (tmp / "exit_metrics.json").write_text(json.dumps(cards.path_free(
            {**src.exit_metrics, "target": tgt.hub_id or tgt.reference()["name"], "per_layer": per_layer}),
            indent=2) + "\n")
        (tmp / layout.SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / layout.CARD_FILE).write_text(card)
        report = validate(tmp, target=tgt)
    return ExportResult(folder=out, files=files, report=report, card=card, summary=summary)


def _no_target(src: HeadSource) -> str:
    raise ExportError(f"no target recorded for {src.folder}: pass --target NAME_OR_DIR")


def validate_early_exit(folder: str | os.PathLike, target: Any = None):
    """Validate an exported early-exit folder: layer folders, configs, key sets, shapes, dtypes, measured α,
    target reference, not untrained. ValidationError listing every problem."""
    from hsd.export.validate import ValidationError, ValidationReport, _target_facts
    from hsd.models.early_exit import check_exit_layer

    folder = Path(folder)
    problems: list[str] = []
    facts, source = _target_facts(target, folder)
    ref_path = folder / "target_reference.json"
    ref = json.loads(ref_path.read_text()) if ref_path.is_file() else None
    if ref is None:
        problems.append("files: target_reference.json is missing (which target do these heads belong to?)")
    if facts is None and ref is not None:
        facts, source = ref, "target_reference.json"
    metrics_path = folder / "exit_metrics.json"
    per_layer = json.loads(metrics_path.read_text()).get("per_layer", {}) if metrics_path.is_file() else None
    if per_layer is None:
        problems.append("files: exit_metrics.json is missing (measured α per layer)")
    layers = sorted(int(p.parent.name[6:]) for p in folder.glob("layer_*/config.json") if p.parent.name[6:].isdigit())
    for layer in layers:
        sub = folder / f"layer_{layer}"
        cfg = json.loads((sub / "config.json").read_text())
        where = f"layer_{layer}"
        if cfg.get("model_type") != EARLY_EXIT_MODEL_TYPE:
            problems.append(f"{where}/config.json: model_type is {cfg.get('model_type')!r}, must be "
                            f"{EARLY_EXIT_MODEL_TYPE!r}")
            continue
        if int(cfg.get("exit_layer", -1)) != layer:
            problems.append(f"{where}/config.json: exit_layer is {cfg.get('exit_layer')}, the folder says {layer}")
        dt = cfg.get("torch_dtype")
        if dt not in layout.SERVE_DTYPES or cfg.get("dtype") != dt:
            problems.append(f"{where}/config.json: torch_dtype/dtype are {dt!r}/{cfg.get('dtype')!r}, must be equal "
                            f"and one of {sorted(layout.SERVE_DTYPES)}")
        if facts:
            try:
                check_exit_layer(layer, int(facts["num_hidden_layers"]))
            except ValueError as err:
                problems.append(f"{where}: {err}")
            for key in ("hidden_size", "vocab_size"):
                if int(cfg.get(key, -1)) != int(facts[key]):
                    problems.append(f"{where}/config.json: {key} {cfg.get(key)} != {facts[key]} of {source}")
        if not (sub / "model.safetensors").is_file():
            problems.append(f"{where}: model.safetensors is missing")
            continue
        state = _head_state(sub)
        try:
            want = expected_state(cfg)
        except (ValueError, TypeError) as err:
            problems.append(f"{where}/config.json: not a valid early-exit config ({err})")
            continue
        missing = [k for k in want if k not in state]
        extra = [k for k in state if k not in want]
        if missing:
            problems.append(f"{where}: missing keys {missing}")
        if extra:
            problems.append(f"{where}: unexpected keys {extra}")
        for k, (shape, floating) in want.items():
            if k not in state:
                continue
            if tuple(state[k].shape) != shape:
                problems.append(f"{where}: {k} has shape {list(state[k].shape)}, config.json implies {list(shape)}")
            need = layout.SERVE_DTYPES.get(dt) if floating else torch.int64
            if need is not None and state[k].dtype != need:
                problems.append(f"{where}: {k} is {str(state[k].dtype).removeprefix('torch.')}, must be "
                                f"{str(need).removeprefix('torch.')}")
        problems.extend(untrained_layer_problems(cfg, state))
        if per_layer is not None and not (per_layer.get(str(layer)) or {}).get("trained", {}).get("alpha"):
            problems.append(f"exit_metrics.json: no measured α for layer {layer}")
    if not layers:
        problems.append("files: no layer_<l>/config.json")
    if problems:
        raise ValidationError(folder, problems)
    return ValidationReport(folder=str(folder), kind="early_exit", fmt="early_exit",
                            checks=[f"layers {layers}: configs, key sets, shapes and dtypes",
                                    f"target: hidden/vocab and exit layers fit {source}",
                                    "measured α recorded for every layer; heads trained (not the lens)"])
