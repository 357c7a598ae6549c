"""Exact metric means over batches and ranks.

A task's ``loss`` returns metrics as ``{name: (sum, count)}`` tensors; ``MetricSums`` adds them up in
float64 on each rank and ``reduce`` sums the pairs over ranks before dividing, so a mean is exact however
the rows were split into batches and processes (a mean of per-batch means would not be).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

Metrics = dict[str, tuple[torch.Tensor, torch.Tensor]]


class MetricSums:
    """Local float64 (sum, count) accumulators keyed by metric name."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}

    def add(self, name: str, s: Any, c: Any) -> None:
        acc = self.sums.setdefault(name, [0.0, 0.0])
        acc[0] += float(torch.as_tensor(s).detach().double().sum())
        acc[1] += float(torch.as_tensor(c).detach().double().sum())

    def add_metrics(self, metrics: Metrics | None) -> None:
        if metrics is None:
            return
        if not isinstance(metrics, Mapping):
            raise ValueError(f"task.loss must return (loss, {{name: (sum, count)}}), got metrics {type(metrics)}")
        for name, pair in metrics.items():
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ValueError(f"metric {name!r} must be a (sum, count) pair, got {type(pair).__name__}")
            self.add(name, *pair)

    def add_batch(self, loss: torch.Tensor, metrics: Metrics | None) -> None:
        """One batch of ``task.loss``: its metrics, and its scalar loss once per batch unless the task
        reports its own exact ``loss`` pair."""
        self.add_metrics(metrics)
        if not metrics or "loss" not in metrics:
            self.add("loss", loss.detach().float(), 1.0)

    def reduce(self, accelerator) -> dict[str, float]:
        """Means over all ranks (every rank must call; key sets are unioned across ranks)."""
        names = sorted(self.sums)
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            names = sorted(set().union(*gather_object([names])))
        vals = torch.tensor([self.sums.get(n, [0.0, 0.0]) for n in names] or [[0.0, 0.0]],
                            dtype=torch.float64, device=accelerator.device)
        if accelerator.num_processes > 1:
            vals = accelerator.reduce(vals, reduction="sum")
        return {n: float(vals[i, 0] / vals[i, 1]) for i, n in enumerate(names) if float(vals[i, 1]) > 0}


def count_tokens(batch: Mapping[str, Any], mask: str = "attention_mask") -> int:
    """Real tokens of a batch: its attention mask's sum (else the number of input ids); with
    ``mask="loss_mask"`` the tokens trained on (assistant tokens; 0 for a batch without a loss mask)."""
    if mask != "attention_mask":
        return int(batch[mask].sum()) if torch.is_tensor(batch.get(mask)) else 0
    if "attention_mask" in batch and torch.is_tensor(batch["attention_mask"]):
        return int(batch["attention_mask"].sum())
    if "input_ids" in batch and torch.is_tensor(batch["input_ids"]):
        return int(batch["input_ids"].numel())
    return 0
