"""Atomic checkpoint directories and the training state inside them.

Layout of one checkpoint (`<output_dir>/checkpoints/step_<n>/`)::

    model/              task.save_model(...) (save_pretrained of the trainable head(s))
    config.yaml         the run config
    state.json          step, epoch, batches consumed in the epoch, world size, best metric so far
    trainable.pt        trainable parameters + buffers (no frozen weights)   } without DeepSpeed
    optimizer.pt        optimizer state_dict                                  }
    deepspeed/          DeepSpeed engine checkpoint (ZeRO-partitioned optimizer, per rank)  } with DeepSpeed
    scheduler.pt        LR scheduler state_dict
    rng_<rank>.pt       python / numpy / torch (/ cuda) RNG states of each rank

Atomicity: everything is written into `step_<n>.tmp-<pid>` and renamed to `step_<n>` at the end
(rename within one directory is atomic on POSIX), so a visible `step_<n>` is always complete. Deletion
renames to `.trash-<pid>` first. Leftover `.tmp-`/`.trash-` directories from a crash are ignored by
`list_checkpoints` and removed by `clean_stale`. All ranks must see the same filesystem.
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
from typing import Any

import numpy as np
import torch

_STEP_RE = re.compile(r"^step_(\d+)$")


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, pathlib.Path]]:
    """Complete checkpoints under `root` as (step, path), oldest first (temporary/trash dirs excluded)."""
    root = pathlib.Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: str | os.PathLike) -> pathlib.Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def clean_stale(root: str | os.PathLike) -> list[pathlib.Path]:
    """Remove `*.tmp-*` / `*.trash-*` leftovers of interrupted saves under `root`; returns what was removed."""
    root = pathlib.Path(root)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if ".tmp-" in p.name or ".trash-" in p.name:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def tmp_dir_for(final: str | os.PathLike, token: int | None = None) -> pathlib.Path:
    """The temporary sibling `<final>.tmp-<token>` (token: the main process pid by default)."""
    final = pathlib.Path(final)
    return final.with_name(f"{final.name}.tmp-{os.getpid() if token is None else token}")


def _fsync_dir(path: pathlib.Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> pathlib.Path:
    """Atomically make the finished directory `tmp` visible as `final` (replacing an existing `final`)."""
    tmp, final = pathlib.Path(tmp), pathlib.Path(final)
    if not tmp.is_dir():
        raise ValueError(f"tmp must be an existing directory, got {str(tmp)!r}")
    trash = None
    if final.exists():
        # rename(2) cannot replace a non-empty directory: move the old one aside first. Between the two
        # renames `final` is briefly absent, never half-written.
        trash = final.with_name(f"{final.name}.trash-{os.getpid()}")
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def remove(path: str | os.PathLike) -> None:
    """Delete a checkpoint directory so that it never appears half-deleted (rename, then rmtree)."""
    path = pathlib.Path(path)
    if not path.exists():
        return
    trash = path.with_name(f"{path.name}.trash-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def rotate(root: str | os.PathLike, keep_last: int) -> list[pathlib.Path]:
    """Delete all but the newest `keep_last` checkpoints under `root`; returns the deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    ckpts = list_checkpoints(root)
    doomed = [p for _, p in ckpts[:-keep_last]]
    for p in doomed:
        remove(p)
    return doomed


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(pathlib.Path(path).read_text())


# ---------------------------------------------------------------------------------------------------------
# RNG state


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA, when present) RNG states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(directory: str | os.PathLike, rank: int) -> None:
    torch.save(capture_rng(), pathlib.Path(directory) / f"rng_{rank}.pt")


def load_rng(directory: str | os.PathLike, rank: int) -> None:
    path = pathlib.Path(directory) / f"rng_{rank}.pt"
    if not path.is_file():
        raise ValueError(f"checkpoint {str(directory)!r} has no RNG state for rank {rank} ({path.name})")
    restore_rng(torch.load(path, weights_only=False))  # our own file: numpy/python states are pickled


# ---------------------------------------------------------------------------------------------------------
# Trainable weights (no frozen parameters: the frozen target is never written)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters with requires_grad plus buffers, as CPU tensors keyed like `model.state_dict()`."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keep}


def load_trainable_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what `trainable_state_dict` saved; a trainable parameter missing from `state` -> ValueError."""
    need = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(need - set(state))
    if missing:
        raise ValueError(f"checkpoint lacks trainable parameters {missing[:5]}{'…' if len(missing) > 5 else ''}")
    unexpected = sorted(set(state) - set(model.state_dict()))
    if unexpected:
        raise ValueError(f"checkpoint has parameters the model does not: {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
