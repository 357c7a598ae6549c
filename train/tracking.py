"""Metric sinks used by the loop on the main process: metrics.jsonl always, plus wandb | tensorboard | none.

wandb runs offline unless WANDB_MODE is set (no network, no API key needed); its files go to
`<output_dir>/wandb`. The run id is kept in `<output_dir>/wandb_run_id` so a resumed job continues the
same wandb run. TensorBoard event files go to `<output_dir>/tensorboard`.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import secrets
from collections.abc import Iterable, Mapping
from typing import Any


class JsonlLog:
    """Append-only `metrics.jsonl`: one JSON object per line, each with a `step`."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)

    def append(self, record: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
            f.flush()

    def truncate_after(self, step: int) -> int:
        """Drop records with step > `step` (steps lost by a crash, redone after resume); returns kept count."""
        kept = [r for r in read_jsonl(self.path) if int(r.get("step", 0)) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        return len(kept)

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (a torn last line from a kill is skipped)."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _jsonable(record: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in record.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        out[k] = v
    return out


class Tracker:
    """No-op tracker (report_to=none)."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, output_dir: pathlib.Path, project: str, run_name: str, config: Mapping[str, Any]):
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        id_file = output_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self._run = wandb.init(project=project, name=run_name or None, id=run_id, resume="allow",
                               dir=str(output_dir), config=dict(config))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._run.log({k: v for k, v in metrics.items() if _is_number(v)}, step=step)

    def finish(self) -> None:
        self._run.finish()


class TensorBoardTracker(Tracker):
    def __init__(self, output_dir: pathlib.Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            if _is_number(v):
                self._writer.add_scalar(k, v, global_step=step)
        self._writer.flush()

    def finish(self) -> None:
        self._writer.close()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def make_tracker(report_to: str, output_dir: str | os.PathLike, *, project: str = "hsd-train",
                 run_name: str = "", config: Mapping[str, Any] | None = None) -> Tracker:
    """wandb | tensorboard | none -> a Tracker (main process only)."""
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if report_to == "wandb":
        return WandbTracker(out, project, run_name, config or {})
    if report_to == "tensorboard":
        return TensorBoardTracker(out)
    if report_to == "none":
        return Tracker()
    raise ValueError(f"report_to must be one of ['wandb', 'tensorboard', 'none'], got {report_to!r}")


def format_line(step: int, total: int, metrics: Mapping[str, Any], keys: Iterable[str]) -> str:
    """`step 10/100 | train/loss 1.234 | ...` for the console."""
    parts = [f"step {step}/{total}"]
    for k in keys:
        if k in metrics and _is_number(metrics[k]):
            v = metrics[k]
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " | ".join(parts)
