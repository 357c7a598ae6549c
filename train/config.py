"""The run config every trainer shares: `BaseTrainConfig` (the shared loop in `train/loop.py` reads it).

A trainer's config is a subclass adding its own fields; it is loaded, overridden and saved with the
generic machinery of `hsd.config` (YAML + `key=value`, typed, unknown keys refused), re-exported here::

    cfg = load_config(Eagle3TrainConfig, "configs/eagle3/smollm2-135m.yaml", ["lr=3e-4", "max_steps=200"])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from hsd.config import (
    apply_overrides,
    config_diff,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

__all__ = ["BaseTrainConfig", "apply_overrides", "config_diff", "config_from_dict", "config_to_dict", "load_config",
           "save_config"]


@dataclass
class BaseTrainConfig:
    """Fields every trainer shares (the shared loop in `train/loop.py` reads these).

    Resume rule: a resumed run must match the checkpoint's saved config in every key except those in
    `resume_mutable` (extend it in a subclass with `resume_mutable: ClassVar[frozenset[str]] = ...`).
    """

    output_dir: str = "runs/default"
    target: str = "smollm2-135m"
    # the frozen target's weights, hence the dtype of the features the heads learn from (recorded in every saved
    # head's precision.json); auto: bfloat16 where bf16 matmuls are measured faster on this device (GPUs, CPUs
    # with AMX-BF16), float32 elsewhere (hsd.precision)
    target_dtype: Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = "auto"
    data: list[str] = field(default_factory=lambda: ["data/smollm2_chat.jsonl"])
    max_conversations: int = 0  # > 0: only the first N conversations of `data` (before the eval split); 0 = all
    eval_fraction: float = 0.05
    max_length: int = 512
    overflow: Literal["truncate", "drop"] = "truncate"  # longer conversations: cut at max_length, or skip
    # concatenate conversations into rows of <= max_length tokens, attention block-diagonal per conversation
    # (train/packing.py); batch_size then counts packed rows
    packing: bool = False
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
    # autocast of the trainable head(s) (fp32 master weights and optimizer state; teacher and loss in fp32);
    # auto: bf16 where hsd.precision measures bf16 faster than fp32 on this device, else no
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    save_every: int = 0  # 0: checkpoint only at the end
    keep_last: int = 2  # newest checkpoints kept under <output_dir>/checkpoints
    report_to: Literal["wandb", "tensorboard", "none"] = "wandb"  # wandb: WANDB_MODE=offline unless set
    run_name: str = ""
    resume: bool = False
    overwrite: bool = False  # start over in an output_dir that already holds a run (deletes its checkpoints)
    wandb_project: str = "hsd-train"
    shard_target: bool = True  # under DeepSpeed ZeRO-3, shard the frozen target too (else replicate it)

    resume_mutable: ClassVar[frozenset[str]] = frozenset({
        "output_dir", "max_steps", "num_epochs", "log_every", "eval_every", "save_every", "keep_last",
        "report_to", "run_name", "resume", "overwrite", "wandb_project",
    })

    def validate(self) -> None:
        """Raise ValueError naming the first bad field. Subclasses extend this (call super().validate())."""
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("batch_size", "grad_accum", "num_epochs", "max_length", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "max_conversations"):
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
