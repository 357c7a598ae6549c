"""A toy TrainTask for the shared loop's tests: a tiny MLP regressing a synthetic target.

The model holds a frozen feature map (requires_grad=False) so tests can check that frozen weights are neither
optimised nor checkpointed; dropout makes exact resume depend on the restored RNG state.
"""
from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import ClassVar

import torch
from torch import nn

from train.config import BaseTrainConfig
from train.loop import TrainTask


@dataclasses.dataclass
class ToyConfig(BaseTrainConfig):
    output_dir: str = "runs/toy"
    data: list[str] = dataclasses.field(default_factory=lambda: ["synthetic"])
    report_to: str = "none"
    batch_size: int = 4
    lr: float = 0.02
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    log_every: int = 1
    dim: int = 8
    hidden: int = 16
    dropout: float = 0.1
    n_train: int = 64
    n_eval: int = 12
    sleep_per_step: float = 0.0  # seconds per training micro-batch (kill tests)
    crash_on_save_step: int = -1  # raise inside save_model of checkpoint step_<n> (atomicity test)
    record_ids: bool = False  # each rank appends the sample ids it trains on to <output_dir>/seen_rank<r>.txt
    raise_after_batches: int = -1  # simulated crash: raise after this many training micro-batches

    resume_mutable: ClassVar[frozenset[str]] = BaseTrainConfig.resume_mutable | {
        "sleep_per_step", "crash_on_save_step", "record_ids", "raise_after_batches"}


class ToyModel(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.frozen = nn.Linear(dim, dim)  # stands in for frozen target weights inside the module
        self.frozen.requires_grad_(False)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, dim] -> [B]
        return self.net(self.frozen(x)).squeeze(-1)


def make_rows(n: int, dim: int, seed: int, offset: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=torch.Generator().manual_seed(777))
    x = torch.randn(n, dim, generator=g)
    y = torch.tanh(x @ w / dim ** 0.5) + 0.05 * torch.randn(n, generator=g)
    return [{"id": offset + i, "x": x[i], "y": y[i]} for i in range(n)]


class ToyTask(TrainTask):
    best_metric = "eval/loss"
    best_mode = "min"

    def setup(self, accelerator) -> None:
        cfg = self.config
        self.rank = accelerator.process_index
        self._train = make_rows(cfg.n_train, cfg.dim, seed=1)
        self._eval = make_rows(cfg.n_eval, cfg.dim, seed=2, offset=10_000) if cfg.n_eval > 0 else None
        self._model = ToyModel(cfg.dim, cfg.hidden, cfg.dropout)

    def model(self) -> nn.Module:
        return self._model

    def train_dataset(self):
        return self._train

    def eval_dataset(self):
        return self._eval

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return {"id": torch.tensor([r["id"] for r in rows]), "x": torch.stack([r["x"] for r in rows]),
                "y": torch.stack([r["y"] for r in rows]),
                "attention_mask": torch.ones(len(rows), 3, dtype=torch.long)}  # 3 "tokens" per row

    def loss(self, model, batch):
        cfg = self.config
        if model.training:
            self._batches = getattr(self, "_batches", 0) + 1
            if 0 <= cfg.raise_after_batches < self._batches:
                raise RuntimeError("simulated crash during training")
            if cfg.sleep_per_step:
                time.sleep(cfg.sleep_per_step)
            if cfg.record_ids:
                path = pathlib.Path(cfg.output_dir) / f"seen_rank{self.rank}.txt"
                with path.open("a") as f:
                    f.write(" ".join(str(int(i)) for i in batch["id"]) + "\n")
        err = (model(batch["x"]) - batch["y"]) ** 2  # [B]
        n = torch.tensor(float(err.numel()))
        return err.mean(), {"loss": (err.sum(), n), "abs_err": (err.sqrt().sum(), n)}

    def derived_metrics(self, means):
        return {"neg_loss": -means["loss"]} if "loss" in means else {}

    def save_model(self, model, directory: pathlib.Path) -> None:
        cfg = self.config
        if cfg.crash_on_save_step >= 0 and f"step_{cfg.crash_on_save_step}." in str(directory):
            raise RuntimeError(f"simulated crash while saving step {cfg.crash_on_save_step}")
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("frozen.")},
                   directory / "model.pt")

    def on_save(self, directory: pathlib.Path, metrics: dict) -> None:
        (directory / "on_save.txt").write_text(str(metrics.get("step", "")))
