"""Training configs: dataclasses loaded from YAML, overridden by `key=value` arguments, validated.

A run config is a dataclass (a subclass of `BaseTrainConfig` per trainer). Values come, in order, from the
dataclass defaults, a YAML file, then command-line overrides::

    cfg = load_config(MyConfig, "configs/x.yaml", ["lr=3e-4", "data=[a.jsonl,b.jsonl]", "opt.beta=0.9"])

* Nested dataclass fields are reached with dots (`opt.beta=0.9`) or nested YAML mappings.
* Values are coerced to the field's annotated type (int, float, str, bool, list[T], tuple[T, ...],
  T | None, Literal[...], dict, nested dataclass); `None`/`null` is accepted only for optional fields.
* Unknown keys (in the file or on the command line) raise ValueError naming the key and close matches.
* `cfg.validate()` checks values (choices, ranges); `load_config` calls it.

`save_config` writes YAML atomically; `config_to_dict` / `config_from_dict` round-trip exactly.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar, Union

import yaml

C = TypeVar("C")

_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f"}


@dataclass
class BaseTrainConfig:
    """Fields every trainer shares (the shared loop in `train/loop.py` reads these).

    Resume rule: a resumed run must match the checkpoint's saved config in every key except those in
    `resume_mutable` (extend it in a subclass with `resume_mutable: ClassVar[frozenset[str]] = ...`).
    """

    output_dir: str = "runs/default"
    target: str = "smollm2-135m"
    target_dtype: str = "auto"  # auto: fp32 on CPU, bf16 on GPU | float32 | bfloat16 | float16
    data: list[str] = field(default_factory=lambda: ["data/smollm2_chat.jsonl"])
    eval_fraction: float = 0.05
    max_length: int = 512
    overflow: str = "truncate"  # or "drop"
    batch_size: int = 1  # per process (micro-batch)
    grad_accum: int = 1
    num_epochs: int = 1
    max_steps: int = -1  # > 0 overrides num_epochs (optimizer steps)
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    warmup_ratio: float = 0.015
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 0.5  # <= 0 disables clipping
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    save_every: int = 0  # 0: checkpoint only at the end
    keep_last: int = 2  # newest checkpoints kept under <output_dir>/checkpoints
    report_to: str = "wandb"  # wandb (WANDB_MODE=offline unless set) | tensorboard | none
    run_name: str = ""
    resume: bool = False
    # Added by the loop owner:
    overwrite: bool = False  # start over in an output_dir that already holds a run (deletes its checkpoints)
    wandb_project: str = "hsd-train"
    shard_target: bool = True  # under DeepSpeed ZeRO-3, shard the frozen target too (else replicate it)

    resume_mutable: ClassVar[frozenset[str]] = frozenset({
        "output_dir", "max_steps", "num_epochs", "log_every", "eval_every", "save_every", "keep_last",
        "report_to", "run_name", "resume", "overwrite", "wandb_project",
    })

    def validate(self) -> None:
        """Raise ValueError naming the first bad field. Subclasses extend this (call super().validate())."""
        _choice(self, "report_to", ("wandb", "tensorboard", "none"))
        _choice(self, "mixed_precision", ("no", "bf16", "fp16"))
        _choice(self, "overflow", ("truncate", "drop"))
        _choice(self, "target_dtype", ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"))
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("batch_size", "grad_accum", "num_epochs", "max_length", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = only at the end), got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be -1 (use num_epochs) or > 0, got {self.max_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.output_dir:
            raise ValueError("output_dir must not be empty")
        if not self.data:
            raise ValueError("data must name at least one file or dataset")


def _choice(cfg: Any, name: str, choices: Sequence[str]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


# ---------------------------------------------------------------------------------------------------------
# Type coercion


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, known: Sequence[str], where: str) -> ValueError:
    close = difflib.get_close_matches(key.split(".")[-1], list(known), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown config key {key!r} ({where}){hint} Known keys: {', '.join(sorted(known))}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type `tp`; ValueError naming `key` when it cannot."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"config key {key!r} must not be null")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ValueError as e:  # try the next member of the union
                errors.append(str(e))
        raise ValueError(f"config key {key!r}: {value!r} fits none of {tp}: {'; '.join(errors)}")
    if value is None:
        raise ValueError(f"config key {key!r} must not be null (type {getattr(tp, '__name__', tp)})")
    if origin is Literal:
        for choice in args:
            try:
                if _coerce(value, type(choice), key) == choice:
                    return choice
            except ValueError:
                continue
        raise ValueError(f"config key {key!r} must be one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"config key {key!r} must be a mapping, got {value!r}")
        return _build(tp, value, prefix=key + ".", where="file")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = _parse_cli_value(value) if value.strip().startswith("[") else [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} must be a list, got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ValueError(f"config key {key!r} must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping) or tp is dict:
        if isinstance(value, str):
            value = _parse_cli_value(value)
        if not isinstance(value, Mapping):
            raise ValueError(f"config key {key!r} must be a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"config key {key!r} must be a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"config key {key!r} must be an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                try:  # "1e3" style
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ValueError(f"config key {key!r} must be an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"config key {key!r} must be a float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ValueError(f"config key {key!r} must be a float, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"config key {key!r} must be a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError(f"config key {key!r}: cannot convert {value!r} to {tp}")


def _parse_cli_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"cannot parse value {text!r}: {e}") from e


def _build(cls: type[C], values: Mapping[str, Any], prefix: str = "", where: str = "file") -> C:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            raise _unknown_key(prefix + str(k), names, where)
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# Public API


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists, not tuples) of a config dataclass; YAML-safe."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def config_from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
    """Build `cls` from a (nested) dict, coercing types; unknown keys -> ValueError."""
    return _build(cls, values or {}, where="dict")


def apply_overrides(cfg: C, overrides: Sequence[str]) -> C:
    """Return a copy of `cfg` with `key=value` overrides applied (dots reach nested dataclasses)."""
    values = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key.startswith("--"):  # tolerate `--lr=3e-4`
            key = key[2:].replace("-", "_")
        parts = key.split(".")
        cls: Any = type(cfg)
        node = values
        for i, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(cls) if f.init]
            if part not in names:
                raise _unknown_key(key, names, "command line")
            tp = _hints(cls)[part]
            if i < len(parts) - 1:
                if not dataclasses.is_dataclass(tp):
                    raise ValueError(f"config key {'.'.join(parts[:i + 1])!r} is not a section; cannot set {key!r}")
                cls = tp
                node = node[part]
                continue
            node[part] = _coerce(_cli_value(raw, tp), tp, key)
    return _build(type(cfg), values, where="command line")


def _cli_value(raw: str, tp: Any) -> Any:
    """CLI text -> Python value: strings stay verbatim (so "007" or "1e-4" are not reinterpreted)."""
    if tp is str:
        return raw
    if raw.strip().lower() in ("null", "none", "~"):
        return None
    return _parse_cli_value(raw) if raw.strip() else raw


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> C:
    """Defaults <- YAML file `path` <- `key=value` overrides; validated. Missing file -> FileNotFoundError."""
    if not dataclasses.is_dataclass(cls):
        raise ValueError(f"cls must be a dataclass type, got {cls!r}")
    values: dict[str, Any] = {}
    if path is not None:
        p = pathlib.Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {str(p)!r}")
        loaded = yaml.safe_load(p.read_text())
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ValueError(f"config file {str(p)!r} must hold a YAML mapping, got {type(loaded).__name__}")
        values = dict(loaded)
        try:
            cfg = _build(cls, values, where=f"file {p}")
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from e
    else:
        cfg = cls()
    cfg = apply_overrides(cfg, list(overrides))
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML to `path` atomically (temporary file, then rename)."""
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, p)


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any],
                ignore: frozenset[str] | set[str] = frozenset()) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved, current)} for every key whose value differs, except top-level keys in `ignore`."""
    out: dict[str, tuple[Any, Any]] = {}

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in sorted(set(a) | set(b), key=str):
                if not prefix and k in ignore:
                    continue
                walk(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{prefix}{k}.")
        elif _norm(a) != _norm(b):
            out[prefix[:-1]] = (a, b)

    walk(saved, current, "")
    return out


def _norm(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_norm(x) for x in v]
    if isinstance(v, list):
        return [_norm(x) for x in v]
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return float(v)
    return v
