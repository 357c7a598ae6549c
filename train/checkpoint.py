"""Checkpoints and model folders of a run: what they hold, how they are written atomically, when a run
resumes from one.

Run folder (`output_dir`): `config.yaml`, `metrics.jsonl`, `run_info.json`, `checkpoints/step_<n>/`,
`best/` and `final/` (model folders: `task.save_model` output + `config.yaml` + `metrics.json` + whatever
`task.on_save` adds; `best/` holds the best eval so far).

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

Start-up (`resume_plan`): an `output_dir` that already holds a run needs `resume=true` (continue from
the latest checkpoint; its saved config must equal this run's in every key outside `resume_mutable`,
and it must come from the same number of processes) or `overwrite=true` (`wipe_run`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
import yaml

from hsd.config import config_diff, config_to_dict, save_config
from train import distributed as dist_utils

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


# ---------------------------------------------------------------------------------------------------------
# The run: start-up decision, model folders, checkpoints (every rank calls these; the main process writes)


@dataclasses.dataclass
class TrainState:
    """Loop position saved in every checkpoint (state.json)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed (per rank)
    world_size: int = 1
    best_value: float | None = None
    best_step: int | None = None
    tokens: int = 0  # tokens trained on, all ranks


def resume_plan(cfg: Any, out: pathlib.Path, world: int) -> pathlib.Path | None:
    """Which checkpoint to resume from (None: fresh start); ValueError for the refused cases.

    Read-only, so every rank reaches the same decision (and raises the same error)."""
    latest = latest_checkpoint(out / "checkpoints")
    if latest is None:
        if (out / "final").is_dir() and not cfg.overwrite:
            raise ValueError(f"output_dir {str(out)!r} holds a finished run (final/) but no checkpoint to resume "
                             "from; pass overwrite=true to replace it, or use another output_dir")
        return None
    if not cfg.resume:
        if cfg.overwrite:
            return None
        raise ValueError(
            f"output_dir {str(out)!r} already holds a run (latest checkpoint {latest.name}). Pass --resume "
            "(resume=true) to continue it, overwrite=true to delete it and start over, or another output_dir.")
    saved_path = latest / "config.yaml"
    if not saved_path.is_file():
        raise ValueError(f"checkpoint {str(latest)!r} has no config.yaml; cannot check it matches this run")
    saved = yaml.safe_load(saved_path.read_text()) or {}
    diff = config_diff(saved, config_to_dict(cfg), ignore=type(cfg).resume_mutable)
    if diff:
        lines = "; ".join(f"{k}: saved {a!r} != now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"cannot resume from {str(latest)!r}: its config differs in {sorted(diff)} ({lines}). Only "
            f"{sorted(type(cfg).resume_mutable)} may change on resume; use another output_dir for a new run.")
    saved_world = read_json(latest / "state.json").get("world_size", 1)
    if saved_world != world:
        raise ValueError(
            f"checkpoint {str(latest)!r} was written by {saved_world} process(es) but this run has {world}: the "
            "data shards (and ZeRO partitions) would not line up; resume with the same number of processes")
    return latest


def wipe_run(out: pathlib.Path) -> None:
    """overwrite=true: remove the previous run's artefacts (checkpoints, best, final, metrics)."""
    for name in ("checkpoints", "best", "final"):
        remove(out / name)
    for name in ("metrics.jsonl", "config.yaml", "run_info.json", "wandb_run_id"):
        (out / name).unlink(missing_ok=True)


def _fresh_tmp(accelerator, final: pathlib.Path) -> pathlib.Path:
    """An empty `<final>.tmp-<token>` (created by the main process) that every rank agrees on."""
    tmp = tmp_dir_for(final, dist_utils.shared_token(accelerator))
    if accelerator.is_main_process:
        if tmp.exists():
            remove(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    return tmp


def write_model_dir(accelerator, model: torch.nn.Module, directory: pathlib.Path, task: Any, cfg: Any,
                    metrics: dict) -> None:
    """A model folder (`final/`, `best/`): `task.save_model` + config.yaml + metrics.json + `task.on_save`,
    published atomically (collective under ZeRO-3: every rank must call)."""
    tmp = _fresh_tmp(accelerator, directory)
    unwrapped = accelerator.unwrap_model(model)
    with dist_utils.gathered_parameters(accelerator, unwrapped):
        if accelerator.is_main_process:
            task.save_model(unwrapped, tmp)
            save_config(cfg, tmp / "config.yaml")
            write_json(tmp / "metrics.json", metrics)
            task.on_save(tmp, metrics)
            publish(tmp, directory)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator, root: pathlib.Path, state: TrainState, model, optimizer, scheduler, task: Any,
                    cfg: Any, metrics: dict) -> pathlib.Path:
    """Write `root/step_<state.step>` (layout in the module docstring), then keep the newest `cfg.keep_last`."""
    main, ds = accelerator.is_main_process, dist_utils.deepspeed_plugin(accelerator) is not None
    final = root / f"step_{state.step}"
    tmp = _fresh_tmp(accelerator, final)
    unwrapped = accelerator.unwrap_model(model)
    if ds:  # every rank writes its ZeRO partition of the optimizer (and model) state
        model.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False, exclude_frozen_parameters=True)
    save_rng(tmp, accelerator.process_index)
    with dist_utils.gathered_parameters(accelerator, unwrapped):
        if main:
            task.save_model(unwrapped, tmp / "model")
    if main:
        if not ds:
            torch.save(trainable_state_dict(unwrapped), tmp / "trainable.pt")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        save_config(cfg, tmp / "config.yaml")
        task.on_save(tmp, metrics)
        write_json(tmp / "state.json", dataclasses.asdict(state))  # last: marks completeness
    accelerator.wait_for_everyone()
    if main:
        publish(tmp, final)
        rotate(root, cfg.keep_last)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, directory: pathlib.Path, model, optimizer, scheduler) -> TrainState:
    """Restore weights, optimizer and scheduler from `directory`; returns its TrainState (the RNG states are
    restored separately, with `load_rng`, right before training continues)."""
    state = TrainState(**read_json(directory / "state.json"))
    if dist_utils.deepspeed_plugin(accelerator) is not None:
        path, _ = model.load_checkpoint(str(directory / "deepspeed"), tag="state", load_module_strict=False,
                                        load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(f"DeepSpeed could not load {str(directory / 'deepspeed')!r}")
    else:
        load_trainable_state_dict(accelerator.unwrap_model(model),
                                  torch.load(directory / "trainable.pt", weights_only=True))
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False))
    state.world_size = accelerator.num_processes
    return state
