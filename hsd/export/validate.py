"""``validate(folder, target=None)``: does an exported folder load, unchanged, as the head it claims to be?

Runs at the end of every export and before every upload. Every problem is collected and reported in one
:class:`ValidationError`, each line naming the key, shape or field:

* files: ``config.json`` and exactly one ``model.safetensors`` (no other weight file);
* config: the fixed serving fields of :mod:`hsd.export.layout`, the required ones, ``torch_dtype`` ==
  ``dtype``, aux ids nested == top level == the run's record, portable aux ids, a ``draft_vocab_size`` that
  fits, no ``target_hidden_size: null``, one RoPE in both spellings;
* clean process: a Python process that never imports ``hsd`` loads ``config.json`` with ``AutoConfig``
  as ``LlamaConfig`` with every EAGLE field intact (what a server does);
* weights: the exact key set (missing, extra and ``embed_tokens`` named), shapes derived from
  ``config.json``, floating dtype == the config's, ``d2t`` int64 / ``t2d`` bool and consistent;
* not step 0: decoder-layer norms not all still 1.0, no projection bit-equal to a fresh seeded init;
* target: vocabulary and hidden size equal the target's (``target`` given, else the target recorded in
  ``training_summary.json``).

Early-exit folders (``layer_<l>/``) are checked by :func:`hsd.export.early_exit.validate_early_exit`.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hsd.export import layout
from hsd.export.source import ExportError


class ValidationError(ExportError):
    """An exported folder failed validation; ``problems`` lists every finding (one line each)."""

    def __init__(self, folder: str | os.PathLike, problems: list[str]):
        self.folder = str(folder)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.folder} failed validation ({len(self.problems)} problem(s)):\n{lines}")


@dataclass
class ValidationReport:
    """What was checked on a folder that passed. kind: "eagle3" | "early_exit"; fmt: "native" |
    "speculators" | "early_exit"; checks: one line per passed group; notes: things worth knowing."""

    folder: str
    kind: str
    fmt: str
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# -- target facts ------------------------------------------------------------------------------------------
def _target_facts(target: Any, folder: Path) -> tuple[dict[str, Any] | None, str]:
    """(facts {num_hidden_layers, vocab_size, hidden_size, name} or None, where they come from)."""
    if target is None:
        summary = folder / layout.SUMMARY_FILE
        if summary.is_file():
            rec = json.loads(summary.read_text()).get("target") or {}
            if all(k in rec for k in ("num_hidden_layers", "vocab_size", "hidden_size")):
                return rec, f"the target recorded in {layout.SUMMARY_FILE}"
        return None, "no target"
    from hsd.export.target import TargetInfo, describe_target

    if isinstance(target, (str, os.PathLike)):
        target = describe_target(os.fspath(target), hash_weights=False)
    if isinstance(target, TargetInfo):
        return {"num_hidden_layers": target.num_layers, "vocab_size": target.vocab_size,
                "hidden_size": target.hidden_size, "name": target.name}, f"target {target.name!r}"
    cfg = getattr(target, "config", target)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return {"num_hidden_layers": int(cfg.num_hidden_layers), "vocab_size": int(cfg.vocab_size),
            "hidden_size": int(cfg.hidden_size), "name": type(target).__name__}, "the given target model"


# -- clean-process AutoConfig ----------------------------------------------------------------------------------
_CLEAN_LOAD = r"""
import json, sys
from transformers import AutoConfig, AutoConfig as _A
cfg = json.load(open(sys.argv[1] + "/config.json"))
if "speculators_model_type" in cfg:
    c = _A.for_model(**cfg["transformer_layer_config"])
else:
    c = AutoConfig.from_pretrained(sys.argv[1])
hsd = sorted(m for m in sys.modules if m == "hsd" or m.startswith("hsd."))
print("@@" + json.dumps({"class": type(c).__name__, "hsd_modules": hsd, "config": c.to_dict()}, default=str))
"""


def clean_process_config(folder: str | os.PathLike, timeout: float = 300) -> dict[str, Any]:
    """Load ``config.json`` the way a server does, in a fresh interpreter that never imports ``hsd``.

    Returns {"class": config class name, "hsd_modules": [...], "config": to_dict()}; ExportError with the
    child's error (e.g. "model type ... not recognized") when it does not load.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-I", "-c", _CLEAN_LOAD, str(Path(folder).resolve())],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(Path(folder).resolve()))
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@")]
    if proc.returncode != 0 or not marker:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
        tail = (errors or lines)[-1]
        raise ExportError(f"config.json does not load with AutoConfig in a clean process: {tail[:400]}")
    return json.loads(marker[-1][2:])


# -- the checks ------------------------------------------------------------------------------------------------
def _check_aux(ids_nested, ids_top, n_layers, problems: list[str], where: str) -> list[int] | None:
    if ids_nested is None and ids_top is None:
        problems.append(f"config: {where} names no {layout.AUX_IDS_KEY} (engines would guess the layers)")
        return None
    if ids_nested is not None and ids_top is not None and list(ids_nested) != list(ids_top):
        problems.append(f"config: aux ids disagree: eagle_config.{layout.AUX_IDS_KEY} = {ids_nested} but top-level "
                        f"{layout.AUX_IDS_KEY} = {ids_top}")
    ids = list(ids_nested if ids_nested is not None else ids_top)
    try:
        layout.check_aux_ids(ids, n_layers)
    except ValueError as err:
        problems.append(f"config: {err}")
    return ids


def _check_native_config(cfg: dict[str, Any], problems: list[str]) -> None:
    for key, want in layout.NATIVE_FIXED.items():
        if key not in cfg:
            problems.append(f"config: field {key!r} is missing (must be {want!r})")
        elif cfg[key] != want:
            problems.append(f"config: field {key!r} is {cfg[key]!r}, must be {want!r}")
    for key in layout.NATIVE_REQUIRED:
        if key not in cfg:
            problems.append(f"config: required field {key!r} is missing")
    ec = cfg.get("eagle_config")
    if isinstance(ec, dict) and ec.get("use_aux_hidden_state") is not True:
        problems.append("config: eagle_config.use_aux_hidden_state must be true (the head has an fc layer)")
    if "target_hidden_size" in cfg and cfg["target_hidden_size"] is None:
        problems.append("config: target_hidden_size is null (vLLM reads it with hasattr: drop it or give a size)")


def _check_common_config(cfg: dict[str, Any], problems: list[str]) -> None:
    td, d = cfg.get("torch_dtype"), cfg.get("dtype")
    if td not in layout.SERVE_DTYPES:
        problems.append(f"config: torch_dtype is {td!r}, must be one of {sorted(layout.SERVE_DTYPES)}")
    if d != td:
        problems.append(f"config: dtype ({d!r}) and torch_dtype ({td!r}) disagree (transformers 5 and 4 spellings)")
    try:
        v, vd = int(cfg["vocab_size"]), int(cfg["draft_vocab_size"])
        if not 1 <= vd <= v:
            problems.append(f"config: draft_vocab_size {vd} must be in [1, vocab_size={v}]")
    except (KeyError, TypeError, ValueError):
        problems.append("config: vocab_size and draft_vocab_size must be integers")
    if all(k in cfg for k in ("rope_theta", "rope_parameters")):
        want = layout.rope_fields({"rope_parameters": cfg.get("rope_parameters")})
        if not isinstance(cfg.get("rope_parameters"), dict) or \
                float(cfg["rope_theta"]) != float(cfg["rope_parameters"].get("rope_theta", cfg["rope_theta"])):
            problems.append(f"config: rope_theta {cfg.get('rope_theta')} disagrees with rope_parameters "
                            f"{cfg.get('rope_parameters')}")
        elif cfg.get("rope_scaling") != want["rope_scaling"]:
            problems.append(f"config: rope_scaling {cfg.get('rope_scaling')} disagrees with rope_parameters "
                            f"{cfg.get('rope_parameters')} (the two RoPE spellings must describe one RoPE)")
    hd = cfg.get("head_dim")
    if isinstance(hd, int) and hd % 2:
        problems.append(f"config: head_dim {hd} must be even (RoPE)")


def _check_clean_load(folder: Path, cfg: dict[str, Any], fmt: str, problems: list[str]) -> None:
    try:
        loaded = clean_process_config(folder)
    except ExportError as err:
        problems.append(f"clean process: {err}")
        return
    if loaded["hsd_modules"]:
        problems.append(f"clean process: hsd modules were imported while loading ({loaded['hsd_modules'][:3]})")
    if loaded["class"] != "LlamaConfig":
        problems.append(f"clean process: AutoConfig gave {loaded['class']}, expected LlamaConfig")
    got = loaded["config"]
    want = cfg if fmt == "native" else cfg["transformer_layer_config"]
    fields = (["draft_vocab_size", "eagle_config", layout.AUX_IDS_KEY, "norm_before_residual"] if fmt == "native"
              else [])
    fields += ["num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "vocab_size", "tie_word_embeddings", "rms_norm_eps"]
    for key in fields:
        if key in want and got.get(key) != want[key]:
            problems.append(f"clean process: field {key!r} loads as {got.get(key)!r}, config.json says {want[key]!r}")
    theta = (got.get("rope_parameters") or {}).get("rope_theta", got.get("rope_theta"))
    if theta is None or float(theta) != float(want.get("rope_theta", theta)):
        problems.append(f"clean process: RoPE theta loads as {theta}, config.json says {want.get('rope_theta')}")
    got_dtype = str(got.get("dtype") or got.get("torch_dtype")).removeprefix("torch.")
    if got_dtype != want.get("torch_dtype"):
        problems.append(f"clean process: dtype loads as {got_dtype!r}, config.json says {want.get('torch_dtype')!r}")


def _check_weights(folder: Path, cfg_flat: dict[str, Any], fmt: str, problems: list[str],
                   seed: int | None) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    from hsd.export.eagle3 import untrained_problems

    path = folder / "model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        problems.append(f"weights: cannot read model.safetensors ({type(err).__name__}: {err})")
        return None
    keys = layout.EAGLE3_KEYS if fmt == "native" else layout.SPECULATORS_KEYS
    for k in state:
        if "embed_tokens" in k:
            problems.append(f"weights: {k} is present: both engines must use the target's embedding "
                            "(a saved copy replaces it in vLLM)")
    extra = sorted(k for k in state if k not in keys and "embed_tokens" not in k)
    if extra:
        problems.append(f"weights: unexpected keys {extra} (engines skip or reject them)")
    missing = [k for k in keys if k not in state]
    if missing:
        problems.append(f"weights: missing keys {missing} (engines keep a random init for them)")
    native = {layout.native_key(k): v for k, v in state.items() if k in keys}
    try:
        shapes = layout.eagle3_shapes(cfg_flat)
    except (KeyError, TypeError, ValueError) as err:
        problems.append(f"weights: cannot derive shapes from config.json ({type(err).__name__}: {err})")
        return None
    want_float = layout.SERVE_DTYPES.get(cfg_flat.get("torch_dtype"))
    for k, v in native.items():
        shown = layout.speculators_key(k) if fmt == "speculators" else k
        if tuple(v.shape) != shapes[k]:
            problems.append(f"weights: {shown} has shape {list(v.shape)}, config.json implies {list(shapes[k])}")
        want = layout.INDEX_DTYPES.get(k, want_float)
        if want is not None and v.dtype != want:
            problems.append(f"weights: {shown} is {str(v.dtype).removeprefix('torch.')}, must be "
                            f"{str(want).removeprefix('torch.')}")
    if "d2t" in native and "t2d" in native:
        problems.extend(_vocab_problems(native["d2t"], native["t2d"], int(cfg_flat.get("vocab_size", 0))))
    if not missing:
        problems.extend(f"weights: {p}" for p in untrained_problems(native, cfg_flat, seed))
    return native


def _vocab_problems(d2t: torch.Tensor, t2d: torch.Tensor, vocab: int) -> list[str]:
    out = []
    if d2t.dtype != torch.int64 or t2d.dtype != torch.bool:
        d2t = d2t.to(torch.int64)
        t2d = t2d.to(torch.bool)
    ids = torch.arange(d2t.numel()) + d2t
    if d2t.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        out.append(f"d2t: maps draft ids outside the target vocabulary [0, {vocab})")
        return out
    if d2t.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        out.append("d2t: target ids arange(Vd) + d2t are not strictly ascending")
    if t2d.numel() == vocab:
        derived = torch.zeros(vocab, dtype=torch.bool)
        derived[ids] = True
        if not torch.equal(derived, t2d):
            out.append(f"d2t/t2d: disagree (t2d marks {int(t2d.sum())} ids, d2t maps {d2t.numel()}; "
                       "nonzero(t2d) must equal arange(Vd) + d2t)")
    return out


def _check_record(folder: Path, ids: list[int] | None, cfg_flat: dict[str, Any], problems: list[str]) -> None:
    """Aux ids and vocab size agree with the run's record carried in the folder."""
    for name, key in (("draft_vocab.json", "aux_layer_ids"), (layout.SUMMARY_FILE, "aux_layer_ids")):
        path = folder / name
        if not path.is_file() or ids is None:
            continue
        rec = json.loads(path.read_text())
        if rec.get(key) is not None and [int(i) for i in rec[key]] != list(ids):
            problems.append(f"record: {name} says the head was trained on aux ids {rec[key]}, config.json says {ids}")
        vd = rec.get("draft_vocab_size") if name == "draft_vocab.json" else None
        if vd is not None and int(vd) != int(cfg_flat.get("draft_vocab_size", -1)):
            problems.append(f"record: draft_vocab.json says draft_vocab_size {vd}, config.json says "
                            f"{cfg_flat.get('draft_vocab_size')}")


def _check_target(cfg_flat: dict[str, Any], facts: dict[str, Any], source: str, problems: list[str]) -> None:
    if int(cfg_flat.get("vocab_size", -1)) != int(facts["vocab_size"]):
        problems.append(f"target: vocab_size {cfg_flat.get('vocab_size')} != {facts['vocab_size']} of {source} "
                        "(tokenizer/vocab mismatch: wrong target?)")
    width = int(cfg_flat.get("target_hidden_size") or cfg_flat.get("hidden_size") or -1)
    if width != int(facts["hidden_size"]):
        problems.append(f"target: the head reads states of width {width} but {source} has hidden_size "
                        f"{facts['hidden_size']} (wrong target?)")


def validate(folder: str | os.PathLike, target: Any = None, *, clean_process: bool = True) -> ValidationReport:
    """Validate an exported folder (see the module docstring); ValidationError listing every problem.

    ``target``: None (use the folder's recorded target facts), a name or folder, a ``TargetInfo`` or a
    loaded Hugging Face model.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{str(folder)!r} is not a folder")
    if not (folder / "config.json").is_file() and any(folder.glob("layer_*/config.json")):
        from hsd.export.early_exit import validate_early_exit

        return validate_early_exit(folder, target)
    problems: list[str] = []
    notes: list[str] = []
    if not (folder / "config.json").is_file():
        raise ValidationError(folder, ["files: config.json is missing"])
    if not (folder / "model.safetensors").is_file():
        problems.append("files: model.safetensors is missing")
    others = sorted(p.name for p in folder.iterdir()
                    if p.suffix in (".bin", ".pt", ".pth", ".safetensors", ".gguf") and p.name != "model.safetensors")
    if others:
        problems.append(f"files: weight files other than model.safetensors: {others} (one file, one truth)")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ValidationError(folder, [f"config: config.json is not valid JSON ({err})"]) from err
    fmt = "speculators" if "speculators_model_type" in cfg else "native"
    facts, source = _target_facts(target, folder)
    n_layers = facts["num_hidden_layers"] if facts else None
    if n_layers is None:
        notes.append("no target and no recorded target: aux ids checked without the upper bound N-1")

    if fmt == "native":
        _check_native_config(cfg, problems)
        flat = cfg
        ids = _check_aux(((cfg.get("eagle_config") or {}).get(layout.AUX_IDS_KEY)), cfg.get(layout.AUX_IDS_KEY),
                         n_layers, problems, "config.json")
    else:
        flat = _check_speculators_config(cfg, problems)
        ids = _check_aux(None, cfg.get(layout.AUX_IDS_KEY), n_layers, problems, "config.json")
        if flat:
            for key in ("torch_dtype", "dtype"):
                if flat.get(key) != cfg.get(key):
                    problems.append(f"config: transformer_layer_config.{key} ({flat.get(key)!r}) differs from the "
                                    f"top-level {key} ({cfg.get(key)!r})")
                flat[key] = cfg.get(key)
    _check_common_config(flat or cfg, problems)
    if clean_process:
        _check_clean_load(folder, cfg, fmt, problems)
    else:
        notes.append("clean-process AutoConfig load skipped")
    seed = None
    summary = folder / layout.SUMMARY_FILE
    if summary.is_file():
        seed = (json.loads(summary.read_text()).get("training") or {}).get("seed")
    seed = 0 if seed is None else int(seed)
    if (folder / "model.safetensors").is_file() and flat:
        _check_weights(folder, flat, fmt, problems, seed)
    if flat:  # (a speculators config without transformer_layer_config was already reported)
        _check_record(folder, ids, flat, problems)
        if facts:
            _check_target(flat, facts, source, problems)
    if problems:
        raise ValidationError(folder, problems)
    checks = ["files: config.json + one model.safetensors",
              f"config: {fmt} serving fields, dtype {cfg.get('torch_dtype')}, aux ids {ids} portable"
              + (f" for N={n_layers}" if n_layers else ""),
              "weights: exact key set, shapes from config.json, dtypes, d2t/t2d consistent, trained (not step 0)"]
    if clean_process:
        checks.append("clean process: AutoConfig -> LlamaConfig with every EAGLE field intact")
    if facts:
        checks.append(f"target: vocab {facts['vocab_size']} and hidden {facts['hidden_size']} match {source}")
    return ValidationReport(folder=str(folder), kind="eagle3", fmt=fmt, checks=checks, notes=notes)


def _check_speculators_config(cfg: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """Speculators fields vLLM validates; returns the flattened (native-like) field set, {} if unusable."""
    from hsd.export.eagle3 import _flatten_speculators

    if cfg.get("speculators_model_type") != layout.SPECULATORS_MODEL_TYPE:
        problems.append(f"config: speculators_model_type is {cfg.get('speculators_model_type')!r}, must be "
                        f"{layout.SPECULATORS_MODEL_TYPE!r}")
    if cfg.get("architectures") != [layout.SPECULATORS_ARCHITECTURE]:
        problems.append(f"config: architectures is {cfg.get('architectures')!r}, must be "
                        f"{[layout.SPECULATORS_ARCHITECTURE]!r}")
    if "norm_before_residual" not in cfg or cfg["norm_before_residual"] is not False:
        problems.append("config: norm_before_residual must be written as false (vLLM's speculators path "
                        "defaults it to true)")
    for key in ("norm_before_fc", "fc_norm", "norm_output"):
        if cfg.get(key):
            problems.append(f"config: {key} must be false")
    sc = cfg.get("speculators_config")
    try:
        k = int(sc["proposal_methods"][0]["speculative_tokens"])
        if k < 1:
            problems.append(f"config: speculators_config.proposal_methods[0].speculative_tokens is {k}, must be >= 1")
    except (KeyError, IndexError, TypeError, ValueError):
        problems.append("config: speculators_config.proposal_methods[0].speculative_tokens is missing")
    if not isinstance(sc, dict) or not (sc.get("verifier") or {}).get("name_or_path"):
        problems.append("config: speculators_config.verifier.name_or_path is missing")
    tlc = cfg.get("transformer_layer_config")
    if not isinstance(tlc, dict):
        problems.append("config: transformer_layer_config is missing")
        return {}
    for key, want in (("model_type", "llama"), ("num_hidden_layers", 1), ("tie_word_embeddings", False),
                      ("attention_bias", False), ("mlp_bias", False)):
        if tlc.get(key) != want:
            problems.append(f"config: transformer_layer_config.{key} is {tlc.get(key)!r}, must be {want!r}")
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rms_norm_eps", "vocab_size", "max_position_embeddings", "rope_theta"):
        if key not in tlc:
            problems.append(f"config: transformer_layer_config.{key} is missing")
    if "draft_vocab_size" not in cfg:
        problems.append("config: draft_vocab_size is missing")
    return _flatten_speculators(cfg)
