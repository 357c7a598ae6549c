"""The one training loop both trainers run on: a `TrainTask` (model + loss + data) over accelerate/DeepSpeed.

One CPU or GPU::

    python -m train.eagle3 --config configs/eagle3/smollm2-135m.yaml lr=3e-4 max_steps=200
    python -m train.eagle3 --config configs/eagle3/smollm2-135m.yaml --resume      # continue exactly

Many processes (accelerate picks the launcher; the run config stays the same)::

    accelerate launch --config_file configs/accelerate/gpu1.yaml            train/eagle3.py --config ...
    accelerate launch --config_file configs/accelerate/multi_gpu_zero2.yaml train/eagle3.py --config ...
    accelerate launch --config_file configs/accelerate/multi_gpu_zero3.yaml train/eagle3.py --config ...
    accelerate launch --config_file configs/accelerate/cpu_ds_zero2_2proc.yaml train/eagle3.py --config ...

Entry-point pattern (train/<x>.py). When run as a script, Python puts train/ (not the repo root) first on
sys.path, so the script swaps in the repo root before importing anything from the project::

    import os, sys
    if __package__ in (None, ""):  # `accelerate launch train/x.py` / `python train/x.py`
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from train.loop import TrainTask, main
    ...
    if __name__ == "__main__":
        main(MyTask, MyConfig)

What `train(task)` does, in order:
1. builds the Accelerator (gloo on CPU with DeepSpeed; asserts the world size matches the launcher);
2. decides fresh start / resume / refuse (output_dir holding a run needs resume=true or overwrite=true;
   a resume whose saved config differs in keys outside `resume_mutable` -> ValueError naming them);
3. `task.setup(accelerator)` (frozen target, tokenizer, data; every rank), `task.model()`;
4. AdamW over the trainable parameters only (weight decay on >= 2-D weights), cosine schedule with linear
   warm-up to `min_lr_ratio`, `accelerator.prepare(model, optimizer)`;
5. per epoch a seeded permutation (seed + epoch) cut into disjoint per-rank shards; full micro-batches;
   `grad_accum` micro-batches per optimizer step (an epoch's incomplete last group is dropped);
6. every `log_every` steps: loss/metrics reduced over ranks, tokens/s, metrics.jsonl + wandb/tensorboard;
   every `eval_every` steps and at the end: exact (sum, count) eval metrics, `task.derived_metrics`, best
   model to `<output_dir>/best/`; every `save_every` steps and at the end: atomic checkpoint, rotation;
   finally `<output_dir>/final/` (model + config + metrics).

Metric names: `task.loss` returns `{name: (sum, count)}`; logged as `train/<name>` and `eval/<name>` (means).
`eval/loss` is the mean of the batches' `loss` unless the task reports its own `loss` pair (do so for an
exactly token-weighted loss). `task.best_metric` names a logged key, e.g. "eval/loss" or "eval/accept_len".
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import yaml

from train import checkpoint as ckpt
from train import distributed as dist_utils
from train.config import BaseTrainConfig, config_diff, config_to_dict, load_config, save_config
from train.tracking import JsonlLog, format_line, make_tracker

Metrics = dict[str, tuple[torch.Tensor, torch.Tensor]]


class TrainTask:
    """What a trainer provides. Subclass it; the loop calls the methods below in this order."""

    best_metric: str = "eval/loss"
    best_mode: str = "min"  # "min" | "max"

    def __init__(self, config: BaseTrainConfig):
        self.config = config

    def setup(self, accelerator) -> None:
        """Load the frozen target, tokenizer and data (runs on every rank, after seeding)."""

    def model(self) -> torch.nn.Module:
        """The trainable module. A frozen module inside it must have requires_grad=False (it is then left
        out of the optimizer and of checkpoints); better keep the frozen target outside it."""
        raise NotImplementedError

    def train_dataset(self) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def eval_dataset(self) -> torch.utils.data.Dataset | None:
        return None

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        """Scalar loss to minimise and metrics as (sum, count) pairs (reduced exactly over ranks/batches).

        `model` is the prepared model (DDP/DeepSpeed wrapper: call it, do not reach into it);
        `model.training` is False during evaluation (which runs under torch.no_grad)."""
        raise NotImplementedError

    def derived_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """Extra metrics computed from the means (un-prefixed names in, un-prefixed names out)."""
        return {}

    def save_model(self, model: torch.nn.Module, directory: pathlib.Path) -> None:
        """Write the unwrapped trainable model to `directory` (save_pretrained). Main process only."""
        raise NotImplementedError

    def on_save(self, directory: pathlib.Path, metrics: dict) -> None:
        """Hook after a checkpoint/final model is written into `directory` (main process only; for a
        checkpoint `directory` is the temporary folder that is renamed into place right after)."""


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


# ---------------------------------------------------------------------------------------------------------
# Pure pieces


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR factor for optimizer step `step` (0-based): linear warm-up to 1, then cosine down to min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def shard_indices(n: int, rank: int, world: int, *, seed: int | None, epoch: int = 0,
                  drop_tail: bool = True) -> list[int]:
    """This rank's dataset indices: a permutation seeded by (seed, epoch) (identity if seed is None),
    truncated to a multiple of `world` when drop_tail (so every rank has the same count), strided by rank.
    Shards of different ranks are disjoint."""
    if seed is None:
        order = list(range(n))
    else:
        g = torch.Generator()
        g.manual_seed(int(seed) * 100_003 + int(epoch))
        order = torch.randperm(n, generator=g).tolist()
    if drop_tail:
        order = order[: n - n % world]
    return order[rank::world]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only; weight decay on >= 2-D tensors, none on biases/norm scales."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return groups


def count_tokens(batch: Mapping[str, Any]) -> int:
    if "attention_mask" in batch and torch.is_tensor(batch["attention_mask"]):
        return int(batch["attention_mask"].sum())
    if "input_ids" in batch and torch.is_tensor(batch["input_ids"]):
        return int(batch["input_ids"].numel())
    return 0


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class MetricSums:
    """Local float64 (sum, count) accumulators keyed by metric name; `reduce` gives exact global means."""

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

    def reduce(self, accelerator) -> dict[str, float]:
        """Means over all ranks (every rank must call; key sets are unioned across ranks)."""
        names = sorted(self.sums)
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            names = sorted(set(gather_object([names])[0]).union(*gather_object([names])))
        vals = torch.tensor([self.sums.get(n, [0.0, 0.0]) for n in names] or [[0.0, 0.0]],
                            dtype=torch.float64, device=accelerator.device)
        if accelerator.num_processes > 1:
            vals = accelerator.reduce(vals, reduction="sum")
        return {n: float(vals[i, 0] / vals[i, 1]) for i, n in enumerate(names) if float(vals[i, 1]) > 0}


# ---------------------------------------------------------------------------------------------------------
# Start-up decisions


def _resume_plan(cfg: BaseTrainConfig, out: pathlib.Path, world: int) -> pathlib.Path | None:
    """Which checkpoint to resume from (None: fresh start); ValueError for the refused cases.

    Read-only, so every rank reaches the same decision (and raises the same error)."""
    latest = ckpt.latest_checkpoint(out / "checkpoints")
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
        lines = "; ".join(f"{k}: saved {a!r} != now {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
        raise ValueError(
            f"cannot resume from {str(latest)!r}: its config differs in {sorted(diff)} ({lines}). Only "
            f"{sorted(type(cfg).resume_mutable)} may change on resume; use another output_dir for a new run.")
    saved_world = ckpt.read_json(latest / "state.json").get("world_size", 1)
    if saved_world != world:
        raise ValueError(
            f"checkpoint {str(latest)!r} was written by {saved_world} process(es) but this run has {world}: the "
            "data shards (and ZeRO partitions) would not line up; resume with the same number of processes")
    return latest


def _wipe_run(out: pathlib.Path) -> None:
    """overwrite=true: remove the previous run's artefacts (checkpoints, best, final, metrics)."""
    for name in ("checkpoints", "best", "final"):
        ckpt.remove(out / name)
    for name in ("metrics.jsonl", "config.yaml", "run_info.json", "wandb_run_id"):
        (out / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# The loop


class _Trainer:
    """State of one `train(task)` call; methods are the loop's phases."""

    def __init__(self, task: TrainTask):
        self.task = task
        self.cfg: BaseTrainConfig = task.config
        if task.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {task.best_mode!r}")
        self.out = pathlib.Path(self.cfg.output_dir)
        self.acc = dist_utils.make_accelerator(self.cfg)
        self.rank = self.acc.process_index
        self.world = self.acc.num_processes
        self.main = self.acc.is_main_process
        self.ds = dist_utils.deepspeed_plugin(self.acc) is not None

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate.utils import set_seed

        cfg, acc = self.cfg, self.acc
        self.resume_from = _resume_plan(cfg, self.out, self.world)
        if cfg.resume and self.resume_from is None:
            self.print(f"resume requested but {self.out}/checkpoints holds no checkpoint: starting fresh")
        acc.wait_for_everyone()
        if self.main:
            if self.resume_from is None and self.out.exists():
                _wipe_run(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_stale(self.out / "checkpoints")
            ckpt.clean_stale(self.out)
        acc.wait_for_everyone()

        set_seed(cfg.seed)  # same initial weights on every rank
        self.task.setup(acc)
        with dist_utils.trainable_init_context(acc):
            model = self.task.model()
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"task.model() must return a torch.nn.Module, got {type(model).__name__}")
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        if self.n_trainable == 0:
            raise ValueError("task.model() has no trainable parameter (all requires_grad=False)")

        self.train_ds = self.task.train_dataset()
        self.eval_ds = self.task.eval_dataset()
        if self.eval_ds is not None and len(self.eval_ds) == 0:
            self.eval_ds = None  # nothing to evaluate on: no eval, no best/
        n = len(self.train_ds)
        per_rank = len(shard_indices(n, 0, self.world, seed=None))
        self.batches_per_epoch = per_rank // cfg.batch_size
        self.steps_per_epoch = self.batches_per_epoch // cfg.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"train dataset has {n} rows: too few for one optimizer step of batch_size={cfg.batch_size} x "
                f"grad_accum={cfg.grad_accum} x {self.world} process(es)")
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.num_epochs * self.steps_per_epoch
        self.warmup_steps = int(round(cfg.warmup_ratio * self.total_steps))

        _set_training(model, True)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                      betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
        # The schedule is stepped by the loop once per optimizer step (not via accelerate, whose wrapper
        # would step it num_processes times per step).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_multiplier(s, self.total_steps, self.warmup_steps, cfg.min_lr_ratio))
        dist_utils.fill_deepspeed_config(acc, cfg, model)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.state = TrainState(world_size=self.world)
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)

        self.jsonl = JsonlLog(self.out / "metrics.jsonl")
        self.tracker = None
        if self.main:
            save_config(cfg, self.out / "config.yaml")
            if self.resume_from is not None:
                self.jsonl.truncate_after(self.state.step)
            else:
                self.jsonl.reset()
            info = {"world_size": self.world, "distributed_type": str(acc.distributed_type),
                    "zero_stage": dist_utils.zero_stage(acc), "device": str(acc.device),
                    "trainable_params": self.n_trainable, "frozen_params_in_model": self.n_frozen,
                    "train_rows": n, "eval_rows": len(self.eval_ds) if self.eval_ds is not None else 0,
                    "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                    "resumed_from": str(self.resume_from) if self.resume_from else None,
                    "start_step": self.state.step}
            ckpt.write_json(self.out / "run_info.json", info)
            self.print("run: " + ", ".join(f"{k}={v}" for k, v in info.items()))
            self.tracker = make_tracker(cfg.report_to, self.out, project=cfg.wandb_project,
                                        run_name=cfg.run_name or self.out.name, config=config_to_dict(cfg))

    def print(self, msg: str) -> None:
        if self.main:
            try:
                from tqdm.auto import tqdm

                tqdm.write(msg, file=sys.stdout)
            except ImportError:  # pragma: no cover
                print(msg, flush=True)
            sys.stdout.flush()

    # -- data -------------------------------------------------------------------------------------------
    def train_batches(self, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        """Micro-batches of this rank for `epoch`, from micro-batch `start` on (skipped batches are never
        collated), up to the last complete accumulation group."""
        idx = shard_indices(len(self.train_ds), self.rank, self.world, seed=self.cfg.seed, epoch=epoch)
        bs = self.cfg.batch_size
        for b in range(start, self.steps_per_epoch * self.cfg.grad_accum):
            rows = [self.train_ds[i] for i in idx[b * bs:(b + 1) * bs]]
            yield _to_device(self.task.collate(rows), self.acc.device)

    # -- evaluation -----------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Exact eval metrics over the whole eval set (every rank runs the same number of forwards, so
        ZeRO-3 collectives stay matched; padding batches are computed and discarded)."""
        ds, bs, acc = self.eval_ds, self.cfg.batch_size, self.acc
        idx = shard_indices(len(ds), self.rank, self.world, seed=None, drop_tail=False)
        chunks = [idx[i:i + bs] for i in range(0, len(idx), bs)]
        n_max = _max_over(acc, len(chunks))
        sums = MetricSums()
        _set_training(self.model, False)
        with torch.no_grad():
            for i in range(n_max):
                real = i < len(chunks)
                rows_idx = chunks[i] if real else (chunks[0] if chunks else [0])
                batch = _to_device(self.task.collate([ds[j] for j in rows_idx]), acc.device)
                with acc.autocast():
                    loss, metrics = self.task.loss(self.model, batch)
                if real:
                    sums.add_metrics(metrics)
                    if not metrics or "loss" not in metrics:
                        sums.add("loss", loss.detach().float(), 1.0)
        _set_training(self.model, True)
        means = sums.reduce(acc)
        means.update(self.task.derived_metrics(dict(means)) or {})
        return {f"eval/{k}": v for k, v in means.items()}

    def maybe_best(self, metrics: dict[str, float]) -> None:
        name = self.task.best_metric
        if name not in metrics:
            raise ValueError(f"best_metric {name!r} is not among the eval metrics {sorted(metrics)}")
        value = metrics[name]
        best = self.state.best_value
        better = best is None or (value < best if self.task.best_mode == "min" else value > best)
        if not better:
            return
        self.state.best_value, self.state.best_step = float(value), self.state.step
        self.write_model_dir(self.out / "best", {**metrics, "step": self.state.step, "best_metric": name})

    def write_model_dir(self, final: pathlib.Path, metrics: dict) -> None:
        """Model + config.yaml + metrics.json into `final`, atomically (collective under ZeRO-3)."""
        tmp = ckpt.tmp_dir_for(final, self._token())
        unwrapped = self.acc.unwrap_model(self.model)
        with dist_utils.gathered_parameters(self.acc, unwrapped):
            if self.main:
                if tmp.exists():
                    ckpt.remove(tmp)
                tmp.mkdir(parents=True)
                self.task.save_model(unwrapped, tmp)
                save_config(self.cfg, tmp / "config.yaml")
                ckpt.write_json(tmp / "metrics.json", metrics)
                if final.name == "final":
                    self.task.on_save(tmp, metrics)
                ckpt.publish(tmp, final)
        self.acc.wait_for_everyone()

    def _token(self) -> int:
        """A tmp-dir suffix shared by all ranks (the main process pid)."""
        from accelerate.utils import broadcast_object_list

        obj = [os.getpid()]
        if self.world > 1:
            broadcast_object_list(obj, from_process=0)
        return int(obj[0])

    # -- checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self, metrics: dict) -> pathlib.Path:
        acc, root = self.acc, self.out / "checkpoints"
        final = root / f"step_{self.state.step}"
        tmp = ckpt.tmp_dir_for(final, self._token())
        if self.main:
            if tmp.exists():
                ckpt.remove(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        unwrapped = acc.unwrap_model(self.model)
        if self.ds:
            # Every rank writes its ZeRO partition of the optimizer (and model) state.
            self.model.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False,
                                       exclude_frozen_parameters=True)
        ckpt.save_rng(tmp, self.rank)
        with dist_utils.gathered_parameters(acc, unwrapped):
            if self.main:
                self.task.save_model(unwrapped, tmp / "model")
        if self.main:
            if not self.ds:
                torch.save(ckpt.trainable_state_dict(unwrapped), tmp / "trainable.pt")
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            save_config(self.cfg, tmp / "config.yaml")
            self.task.on_save(tmp, metrics)
            ckpt.write_json(tmp / "state.json", dataclasses.asdict(self.state))  # last: marks completeness
        acc.wait_for_everyone()
        if self.main:
            ckpt.publish(tmp, final)
            ckpt.rotate(root, self.cfg.keep_last)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, directory: pathlib.Path) -> None:
        st = ckpt.read_json(directory / "state.json")
        state = TrainState(**st)
        unwrapped = self.acc.unwrap_model(self.model)
        if self.ds:
            path, _ = self.model.load_checkpoint(str(directory / "deepspeed"), tag="state",
                                                 load_module_strict=False, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
            if path is None:
                raise ValueError(f"DeepSpeed could not load {str(directory / 'deepspeed')!r}")
        else:
            ckpt.load_trainable_state_dict(unwrapped, torch.load(directory / "trainable.pt", weights_only=True))
            self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=False))
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False))
        self._rng_dir = directory
        state.world_size = self.world
        self.state = state
        self.print(f"resumed from {directory} at step {state.step} (epoch {state.epoch}, "
                   f"batch {state.batches_in_epoch})")

    # -- main loop ----------------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        if self.main:
            self.jsonl.append(record)
            if self.tracker is not None:
                self.tracker.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def run(self) -> dict[str, Any]:
        from accelerate.utils import set_seed

        cfg, acc, st = self.cfg, self.acc, self.state
        if self.resume_from is not None:
            ckpt.load_rng(self._rng_dir, self.rank)  # exactly where the saved run continued
        else:
            set_seed(cfg.seed + self.rank)  # per-rank streams (dropout) from here on
        progress = None
        if self.main:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=st.step, desc="train", dynamic_ncols=True,
                            mininterval=1.0, file=sys.stderr)
        window = MetricSums()
        win_tokens, win_start, grad_norm = 0, time.perf_counter(), None
        last_eval: dict[str, float] = {}
        last_train: dict[str, Any] = {}
        saved_at = evaluated_at = -1
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")

        while st.step < self.total_steps:
            acc.step = 0  # accumulation groups start at a step boundary (also right after resume)
            for batch in self.train_batches(st.epoch, st.batches_in_epoch):
                with acc.accumulate(self.model):
                    with acc.autocast():
                        loss, metrics = self.task.loss(self.model, batch)
                    if not torch.is_tensor(loss) or loss.dim() != 0:
                        raise ValueError("task.loss must return a scalar tensor as its first value")
                    acc.backward(loss)
                    if acc.sync_gradients:
                        gn = acc.clip_grad_norm_(params, max_norm)
                        grad_norm = float(gn) if gn is not None else None
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                st.batches_in_epoch += 1
                if not metrics or "loss" not in metrics:  # a task's own (sum, count) loss is exact
                    window.add("loss", loss.detach().float(), 1.0)
                window.add_metrics(metrics)
                win_tokens += count_tokens(batch)
                if not acc.sync_gradients:
                    continue
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                st.step += 1
                if progress is not None:
                    progress.update(1)
                if st.step % cfg.log_every == 0 or st.step == self.total_steps:
                    means = window.reduce(acc)
                    means.update(self.task.derived_metrics(dict(means)) or {})
                    tok = torch.tensor([win_tokens], dtype=torch.float64, device=acc.device)
                    tok = float(acc.reduce(tok, reduction="sum")) if self.world > 1 else float(tok)
                    elapsed = max(time.perf_counter() - win_start, 1e-9)
                    st.tokens += int(tok)
                    last_train = {"step": st.step, "epoch": st.epoch, "lr": lr,
                                  **{f"train/{k}": v for k, v in means.items()},
                                  "grad_norm": grad_norm, "tokens_per_s": tok / elapsed, "tokens": st.tokens}
                    self.log(last_train)
                    if progress is not None:
                        progress.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}",
                                             tok_s=f"{tok / elapsed:.0f}")
                    self.print(format_line(st.step, self.total_steps, last_train,
                                           ["train/loss", "lr", "grad_norm", "tokens_per_s"]))
                    window, win_tokens, win_start = MetricSums(), 0, time.perf_counter()
                paused = time.perf_counter()  # eval/save time is kept out of tokens/s
                if self.eval_ds is not None and cfg.eval_every and st.step % cfg.eval_every == 0:
                    last_eval = self._eval_and_log()
                    evaluated_at = st.step
                if st.step >= self.total_steps:
                    break
                if cfg.save_every and st.step % cfg.save_every == 0:
                    self._advance_epoch_if_done()
                    self.save_checkpoint({**last_train, **last_eval})
                    saved_at = st.step
                win_start += time.perf_counter() - paused
            self._advance_epoch_if_done()

        if progress is not None:
            progress.close()
        if self.eval_ds is not None and evaluated_at != st.step:
            last_eval = self._eval_and_log()
        if saved_at != st.step:
            self.save_checkpoint({**last_train, **last_eval})
        final_metrics = {**last_train, **last_eval, "step": st.step}
        self.write_model_dir(self.out / "final", final_metrics)
        if self.tracker is not None:
            self.tracker.finish()
        acc.wait_for_everyone()
        return {**final_metrics, "best_value": st.best_value, "best_step": st.best_step,
                "output_dir": str(self.out), "world_size": self.world}

    def _advance_epoch_if_done(self) -> None:
        st = self.state
        if st.batches_in_epoch >= self.steps_per_epoch * self.cfg.grad_accum:
            st.epoch += 1
            st.batches_in_epoch = 0

    def _eval_and_log(self) -> dict[str, float]:
        metrics = self.evaluate()
        self.log({"step": self.state.step, "epoch": self.state.epoch, **metrics})
        self.print(format_line(self.state.step, self.total_steps, metrics, sorted(metrics)))
        self.maybe_best(metrics)
        return metrics


_Sums = MetricSums  # older name, kept for callers


def _set_training(model: torch.nn.Module, training: bool) -> None:
    """train()/eval(), also on a DeepSpeed engine, whose eval() leaves its own `.training` flag True (tasks
    read `model.training` to tell training from evaluation)."""
    model.train(training)
    model.training = training


def _max_over(acc, value: int) -> int:
    """Max of an int over ranks."""
    if acc.num_processes == 1:
        return value
    from accelerate.utils import gather

    return int(gather(torch.tensor([value], device=acc.device)).max())


def train(task: TrainTask) -> dict[str, Any]:
    """Run the training loop for `task` (see the module docstring). Returns the final metrics."""
    trainer = _Trainer(task)
    trainer.setup()
    return trainer.run()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="hsd-train trainer. Extra arguments are key=value config overrides.")
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="delete a previous run in output_dir first")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=3e-4 data=[a.jsonl,b.jsonl]")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    return args


def main(task_cls: type[TrainTask], config_cls: type[BaseTrainConfig] = BaseTrainConfig,
         argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point: `--config path.yaml [--resume] [--overwrite] [key=value ...]` -> train(task_cls(cfg))."""
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("resume=true")
    if args.overwrite:
        overrides.append("overwrite=true")
    cfg = load_config(config_cls, args.config, overrides)
    return train(task_cls(cfg))
