"""Configs as typed data: dataclasses loaded from YAML, overridden by `key=value` arguments, validated.

Every entry point (trainers, decoding, export) describes its options as a dataclass. Values come, in
order, from the dataclass defaults, a YAML file, then command-line overrides::

    cfg = load_config(MyConfig, "configs/x.yaml", ["lr=3e-4", "data=[a.jsonl,b.jsonl]", "opt.beta=0.9"])

* Nested dataclass fields are reached with dots (`opt.beta=0.9`) or nested YAML mappings.
* Values are coerced to the field's annotated type (int, float, str, bool, list[T], tuple[T, ...],
  T | None, Literal[...], dict, nested dataclass); `None`/`null` is accepted only for optional fields.
  Choice fields are typed `Literal[...]`: a value outside the choices is refused naming the key and them.
* Unknown keys (in the file or on the command line) raise ValueError naming the key and close matches.
* `cfg.validate()` (when the class has one) checks ranges and combinations; `load_config` calls it.

`save_config` writes YAML atomically; `config_to_dict` / `config_from_dict` round-trip exactly;
`config_diff` lists what differs between two saved configs. `run_main` runs an entry point's
`main(argv)` the way a command line should: bad input is one line on stderr and exit status 2.

This module imports no model code, so every layer of the project can use it.
"""
from __future__ import annotations

import contextvars
import dataclasses
import difflib
import os
import pathlib
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

import yaml

C = TypeVar("C")

_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f"}


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
    """CLI text -> Python value: strings stay verbatim (so "007", "1e-4" or a choice named "none" are not
    reinterpreted)."""
    if tp is str or (typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp))):
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
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"config file {str(p)!r} is not valid YAML: {' '.join(str(err).split())}") from None
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


# ---------------------------------------------------------------------------------------------------------
# Command-line edge


def run_main(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None,
             prog: str | None = None) -> int:
    """Call ``main(argv)`` and return an exit status: ``main``'s own when it returns an int, else 0; 2 for bad
    input.

    Bad input is what the project raises ValueError for (unknown or ill-typed config key, a value out of
    range, a data file that cannot be read, a model that does not fit) and OSError (a missing or unreadable
    file): it becomes one line ``<prog>: error: <message>`` on stderr instead of a traceback. Set
    ``HSD_TRACEBACK=1`` to get the traceback instead. ``prog`` (``hsd-train train eagle3``) is also what
    the command's ``--help`` shows: parsers take :func:`program_name` as their ``prog``.
    """
    token = _PROG.set(prog)
    try:
        status = main(argv)
    except (ValueError, OSError) as err:
        if os.environ.get("HSD_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"{prog or _prog()}: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return 2
    finally:
        _PROG.reset(token)
    return status if isinstance(status, int) else 0


# the command words run_main was given (`hsd-train decode`); None outside run_main or when it had none
_PROG: contextvars.ContextVar[str | None] = contextvars.ContextVar("hsd_prog", default=None)


def program_name(default: str | None = None) -> str:
    """The program an argument parser names in its usage line: the command ``run_main`` runs
    (``hsd-train train eagle3``), else ``default``, else how the process was started (``python -m
    train.eagle3``, or the script's file name)."""
    if _PROG.get():
        return _PROG.get()
    if default:
        return default
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec is not None else (os.path.basename(sys.argv[0]) or "hsd")


def _prog() -> str:
    """How the process was started: the module of `python -m module`, else the script's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None else (os.path.basename(sys.argv[0]) or "hsd")
