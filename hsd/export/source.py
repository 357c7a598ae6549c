"""Read a saved head folder and the provenance around it (pure I/O, no model is built).

A head folder is anything a trainer saved with ``save_pretrained``: ``final/``, ``best/`` or a
checkpoint's ``checkpoints/step_N/model/``. Provenance is read from the folder itself and, for the files it
lacks, from its nearest ancestors (at most three levels up: ``step_N/`` and the run folder):
``config.yaml`` (the run config), ``metrics.json`` (metrics at that step), ``draft_vocab.json`` (EAGLE-3:
target, aux ids, vocabulary coverage, data stats), ``exit_metrics.json`` (early exit: lens vs trained per
layer), ``run_info.json`` (planned steps, world size) and ``state.json`` (a checkpoint's step).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EAGLE3_TRAINING_MODEL_TYPE = "eagle3_draft"
EARLY_EXIT_MODEL_TYPE = "hsd_early_exit"
PROVENANCE_FILES = ("config.yaml", "metrics.json", "draft_vocab.json", "exit_metrics.json", "run_info.json",
                    "state.json", "precision.json")


class ExportError(ValueError):
    """Bad input to an export (missing file, wrong folder kind, mismatched target): message names it."""


@dataclass
class HeadSource:
    """A saved head folder and what is known about how it was trained.

    kind: "eagle3" or "early_exit". layers: early-exit layer folders by exit layer (empty for EAGLE-3).
    run_config: the run's config.yaml as a dict ({} when absent). metrics: metrics.json of the folder.
    found: provenance file name -> the path it was read from.
    """

    folder: Path
    kind: str
    config: dict[str, Any]
    layers: dict[int, Path] = field(default_factory=dict)
    run_dir: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    vocab_info: dict[str, Any] = field(default_factory=dict)
    exit_metrics: dict[str, Any] = field(default_factory=dict)
    run_info: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    precision: dict[str, Any] = field(default_factory=dict)  # precision.json: feature_dtype, mixed_precision, ...
    found: dict[str, Path] = field(default_factory=dict)

    @property
    def step(self) -> int | None:
        """Optimizer step the weights are from (metrics.json, else a checkpoint's state.json)."""
        for src in (self.metrics, self.state):
            if src.get("step") is not None:
                return int(src["step"])
        return None

    @property
    def target_name(self) -> str | None:
        """The target as the trainer was given it (an alias such as ``smollm2-135m``, a folder or a Hub id)."""
        for value in (self.run_config.get("target"), self.vocab_info.get("target"),
                      self.config.get("base_model_name_or_path")):
            if value:
                return str(value)
        return None

    @property
    def target_revision(self) -> str | None:
        for value in (self.run_config.get("target_revision"), self.vocab_info.get("target_revision"),
                      self.config.get("base_model_revision")):
            if value:
                return str(value)
        return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: cannot read JSON ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ExportError(f"{path}: cannot read YAML ({type(err).__name__}: {err})") from err
    return data if isinstance(data, dict) else {}


def _layer_folders(folder: Path) -> dict[int, Path]:
    out = {}
    for sub in folder.glob("layer_*"):
        if sub.is_dir() and sub.name[6:].isdigit() and (sub / "config.json").is_file():
            out[int(sub.name[6:])] = sub
    return dict(sorted(out.items()))


def read_head_folder(path: str | Path) -> HeadSource:
    """A head folder -> :class:`HeadSource` (ExportError naming what is missing or unknown)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ExportError(f"head folder {str(folder)!r} does not exist (expected a saved head such as "
                          "runs/<task>/<name>/final)")
    layers: dict[int, Path] = {}
    config: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        config = _read_json(folder / "config.json")
        mtype = config.get("model_type")
        archs = config.get("architectures") or []
        if mtype == EAGLE3_TRAINING_MODEL_TYPE or any(str(a).startswith(("Eagle3", "LlamaForCausalLMEagle3"))
                                                       for a in archs):
            kind = "eagle3"
        elif mtype == EARLY_EXIT_MODEL_TYPE:  # one early-exit layer folder given directly
            kind = "early_exit"
            layers = {int(config["exit_layer"]): folder}
        else:
            raise ExportError(f"{folder}/config.json has model_type {mtype!r} and architectures {archs}: not an "
                              "hsd-train head (expected an EAGLE-3 head or early-exit heads)")
        if kind == "eagle3" and not (folder / "model.safetensors").is_file():
            raise ExportError(f"head folder {str(folder)!r} has no model.safetensors")
    else:
        layers = _layer_folders(folder)
        if not layers:
            raise ExportError(f"{str(folder)!r} is not a head folder: it has neither config.json (EAGLE-3 head) "
                              "nor layer_<l>/config.json (early-exit heads)")
        kind = "early_exit"
        for layer, sub in layers.items():
            cfg = _read_json(sub / "config.json")
            if cfg.get("model_type") != EARLY_EXIT_MODEL_TYPE:
                raise ExportError(f"{sub}/config.json has model_type {cfg.get('model_type')!r}, expected "
                                  f"{EARLY_EXIT_MODEL_TYPE!r}")
            if not (sub / "model.safetensors").is_file():
                raise ExportError(f"early-exit head {str(sub)!r} has no model.safetensors")
            config.setdefault("layers", {})[layer] = cfg
    src = HeadSource(folder=folder.resolve(), kind=kind, config=config, layers=layers)
    _read_provenance(src)
    return src


def _read_provenance(src: HeadSource) -> None:
    """Nearest copy of each provenance file, walking up from the folder (at most 3 levels)."""
    chain = [src.folder, *list(src.folder.parents)[:3]]
    for name in PROVENANCE_FILES:
        for d in chain:
            if (d / name).is_file():
                src.found[name] = d / name
                break
    for d in chain:
        if (d / "metrics.jsonl").is_file() or (d / "run_info.json").is_file():
            src.run_dir = d
            break
    f = src.found
    if "config.yaml" in f:
        src.run_config = _read_yaml(f["config.yaml"])
    # metrics/state only from the folder itself or its checkpoint folder, never a sibling run's
    near = {src.folder, src.folder.parent}
    if "metrics.json" in f and f["metrics.json"].parent in near:
        src.metrics = _read_json(f["metrics.json"])
    if "state.json" in f and f["state.json"].parent in near:
        src.state = _read_json(f["state.json"])
    if "precision.json" in f and f["precision.json"].parent in near:
        src.precision = _read_json(f["precision.json"])
    if "draft_vocab.json" in f:
        src.vocab_info = _read_json(f["draft_vocab.json"])
    if "exit_metrics.json" in f:
        src.exit_metrics = _read_json(f["exit_metrics.json"])
    if "run_info.json" in f:
        src.run_info = _read_json(f["run_info.json"])


@contextmanager
def staged_folder(out: Path | None) -> Iterator[tuple[Path, dict[str, int]]]:
    """A temporary folder beside ``out`` to write and validate an export in; yields ``(tmp, files)``.

    When the block ends without an error, ``files`` is filled with the relative path and size of every file
    written, and the folder replaces ``out`` (when given). On any error nothing is left behind.
    """
    parent = out.parent if out is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hsd-export-", dir=parent))
    files: dict[str, int] = {}
    try:
        yield tmp, files
        files.update({p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*"))
                      if p.is_file()})
        if out is not None:
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
