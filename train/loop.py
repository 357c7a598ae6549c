"""The one training loop both trainers run on: a `TrainTask` (model + loss + data) over accelerate/DeepSpeed.

One CPU or GPU::

    hsd-train train eagle3 --config configs/eagle3/smollm2-135m.yaml lr=3e-4 max_steps=200
    python -m train.eagle3 --config configs/eagle3/smollm2-135m.yaml --resume      # continue exactly

Many processes (accelerate picks the launcher; the run config stays the same)::

    accelerate launch --config_file configs/accelerate/multi_gpu_zero2.yaml -m train.eagle3 --config ...
    accelerate launch --config_file configs/accelerate/cpu_ds_zero2_2proc.yaml -m train.eagle3 --config ...

A trainer module defines its task and config and ``main(argv) = train.loop.main(Task, Config, argv)``
(tests/toy_train_entry.py is the smallest example).

What `train(task)` does, in order:
1. builds the Accelerator (gloo on CPU with DeepSpeed; asserts the world size matches the launcher);
2. decides fresh start / resume / refuse (`train.checkpoint.resume_plan`);
3. `task.setup(accelerator)` (frozen target, tokenizer, data; every rank), `task.model()`;
4. AdamW over the trainable parameters only (weight decay on >= 2-D weights), cosine schedule with linear
   warm-up to `min_lr_ratio`, `accelerator.prepare(model, optimizer)`;
5. per epoch a seeded permutation (seed + epoch) cut into disjoint per-rank shards; full micro-batches;
   `grad_accum` micro-batches per optimizer step (an epoch's incomplete last group is dropped);
6. every `log_every` steps: loss/metrics reduced over ranks, tokens/s, metrics.jsonl + wandb/tensorboard;
   every `eval_every` steps and at the end: exact (sum, count) eval metrics, `task.derived_metrics`, best
   model to `<output_dir>/best/`; every `save_every` steps and at the end: atomic checkpoint, rotation;
   finally `<output_dir>/final/` (model + config + metrics). `task.on_save` runs for every checkpoint
   and model folder.

Metric names: `task.loss` returns `{name: (sum, count)}`; logged as `train/<name>` and `eval/<name>` (means).
`eval/loss` is the mean of the batches' `loss` unless the task reports its own `loss` pair (do so for an
exactly token-weighted loss). `task.best_metric` names a logged key, e.g. "eval/loss" or "eval/accept_len".
"""
from __future__ import annotations

import argparse
import builtins
import dataclasses
import math
import pathlib
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from hsd.config import config_to_dict, load_config, program_name, save_config
from hsd.machine import machine_info, machine_line
from hsd.models.resolve import parse_dtype
from train import checkpoint as ckpt
from train import distributed as dist_utils
from train.config import BaseTrainConfig
from train.metrics import Metrics, MetricSums, count_tokens
from train.tracking import JsonlLog, format_line, make_tracker


class TrainTask:
    """What a trainer provides. Subclass it; the loop calls the methods below in this order."""

    best_metric: str = "eval/loss"
    best_mode: str = "min"  # "min" | "max"

    def __init__(self, config: BaseTrainConfig):
        self.config = config

    def print(self, msg: str) -> None:
        """A line for the user. The loop replaces it (main process only, above the progress bar)."""
        builtins.print(msg, flush=True)

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

    def flops(self, batch: dict[str, torch.Tensor]) -> float | None:
        """Model FLOPs (forward + backward) of the last ``loss`` call on ``batch`` during training, for the
        MFU estimate the loop logs; None: no estimate."""
        return None

    def compute_dtype(self) -> torch.dtype | None:
        """The dtype most of the training compute runs in (the MFU's peak is measured in it); None: bf16
        under bf16 mixed precision, else float32."""
        return None

    def save_model(self, model: torch.nn.Module, directory: pathlib.Path) -> None:
        """Write the unwrapped trainable model to `directory` (save_pretrained). Main process only."""
        raise NotImplementedError

    def on_save(self, directory: pathlib.Path, metrics: dict) -> None:
        """Hook after a checkpoint or model folder (`best/`, `final/`) is written into `directory` (main
        process only; `directory` is the temporary folder that is renamed into place right after), with
        the metrics saved there."""


# ---------------------------------------------------------------------------------------------------------
# Pure pieces


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR factor for optimizer step `step` (0-based): linear warm-up to 1, then cosine down to min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only; weight decay on >= 2-D tensors, none on biases/norm scales."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _set_training(model: torch.nn.Module, training: bool) -> None:
    """train()/eval(), also on a DeepSpeed engine, whose eval() leaves its own `.training` flag True (tasks
    read `model.training` to tell training from evaluation)."""
    model.train(training)
    model.training = training


@dataclasses.dataclass
class _Window:
    """What one log line averages: metric sums, tokens and wall time since the last line."""

    sums: MetricSums = dataclasses.field(default_factory=MetricSums)
    tokens: int = 0
    useful: int = 0  # assistant tokens (loss-mask ones): what a head learns from, without padding or prompts
    flops: float = 0.0
    start: float = dataclasses.field(default_factory=time.perf_counter)


# ---------------------------------------------------------------------------------------------------------
# The loop


class _Trainer:
    """State of one `train(task)` call; methods are the loop's phases, in the order they run."""

    def __init__(self, task: TrainTask):
        if task.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {task.best_mode!r}")
        self.task, self.cfg = task, task.config
        self.out = pathlib.Path(self.cfg.output_dir)
        self.acc = dist_utils.make_accelerator(self.cfg)
        self.rank, self.world, self.main = self.acc.process_index, self.acc.num_processes, self.acc.is_main_process

    def print(self, msg: str) -> None:
        if self.main:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    # -- set-up -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate.utils import set_seed

        self._prepare_output_dir()
        set_seed(self.cfg.seed)  # same initial weights on every rank
        self.task.print = self.print
        self.task.setup(self.acc)
        with dist_utils.trainable_init_context(self.acc):
            model = self.task.model()
        self._setup_data()
        self._setup_optimization(model)
        self._setup_peak()
        self._start_logging()

    def _prepare_output_dir(self) -> None:
        self.resume_from = ckpt.resume_plan(self.cfg, self.out, self.world)
        if self.cfg.resume and self.resume_from is None:
            self.print(f"resume requested but {self.out}/checkpoints holds no checkpoint: starting fresh")
        self.acc.wait_for_everyone()
        if self.main:
            if self.resume_from is None and self.out.exists():
                ckpt.wipe_run(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_stale(self.out / "checkpoints")
            ckpt.clean_stale(self.out)
        self.acc.wait_for_everyone()

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.train_ds = self.task.train_dataset()
        self.eval_ds = self.task.eval_dataset()
        if self.eval_ds is not None and len(self.eval_ds) == 0:
            self.eval_ds = None  # nothing to evaluate on: no eval, no best/
        n = len(self.train_ds)
        per_rank = len(dist_utils.shard_indices(n, 0, self.world, seed=None))
        self.steps_per_epoch = per_rank // cfg.batch_size // cfg.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"train dataset has {n} rows: too few for one optimizer step of batch_size={cfg.batch_size} x "
                f"grad_accum={cfg.grad_accum} x {self.world} process(es)")
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.num_epochs * self.steps_per_epoch

    def _setup_optimization(self, model: torch.nn.Module) -> None:
        cfg, acc = self.cfg, self.acc
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"task.model() must return a torch.nn.Module, got {type(model).__name__}")
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        if self.n_trainable == 0:
            raise ValueError("task.model() has no trainable parameter (all requires_grad=False)")
        _set_training(model, True)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                      betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
        # Stepped by the loop once per optimizer step (accelerate's wrapper would step it per process).
        warmup = int(round(cfg.warmup_ratio * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_multiplier(s, self.total_steps, warmup, cfg.min_lr_ratio))
        dist_utils.fill_deepspeed_config(acc, cfg, model)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        self.grad_norm: float | None = None
        self.state = ckpt.TrainState(world_size=self.world)
        if self.resume_from is not None:
            self.state = ckpt.load_checkpoint(acc, self.resume_from, self.model, self.optimizer, self.scheduler)
            st = self.state
            self.print(f"resumed from {self.resume_from} at step {st.step} (epoch {st.epoch}, "
                       f"batch {st.batches_in_epoch})")

    def _setup_peak(self) -> None:
        """The peak FLOP/s the MFU estimate divides by: a large matmul measured on this device in the task's
        compute dtype (hsd.precision.matmul_peak_flops), with the threads training uses."""
        from hsd.precision import matmul_peak_flops

        dtype = self.task.compute_dtype() or (torch.bfloat16 if self.acc.mixed_precision == "bf16" else torch.float32)
        self.peak_dtype = str(dtype).removeprefix("torch.")
        self.peak_flops = matmul_peak_flops(self.acc.device, dtype)
        self.print(f"throughput: useful tokens = assistant tokens (no padding, no prompt); MFU = model FLOPs / "
                   f"(time x {self.peak_flops / 1e9:.1f} GFLOP/s, a measured {self.peak_dtype} matmul peak on "
                   f"{self.acc.device} with {torch.get_num_threads()} thread(s))")

    def _start_logging(self) -> None:
        cfg = self.cfg
        self.jsonl = JsonlLog(self.out / "metrics.jsonl")
        self.tracker = None
        if not self.main:
            return
        save_config(cfg, self.out / "config.yaml")
        if self.resume_from is not None:
            self.jsonl.truncate_after(self.state.step)
        else:
            self.jsonl.reset()
        info = {"world_size": self.world, "distributed_type": str(self.acc.distributed_type),
                "zero_stage": dist_utils.zero_stage(self.acc), "device": str(self.acc.device),
                "trainable_params": self.n_trainable, "frozen_params_in_model": self.n_frozen,
                "train_rows": len(self.train_ds), "eval_rows": len(self.eval_ds) if self.eval_ds is not None else 0,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "peak_flops": self.peak_flops, "peak_dtype": self.peak_dtype,
                "resumed_from": str(self.resume_from) if self.resume_from else None,
                "start_step": self.state.step,
                "machine": machine_info(self.acc.device, parse_dtype(cfg.target_dtype, self.acc.device))}
        ckpt.write_json(self.out / "run_info.json", info)
        self.print("run: " + ", ".join(f"{k}={v}" for k, v in info.items() if k != "machine"))
        self.print("machine: " + machine_line(info["machine"]))
        self.tracker = make_tracker(cfg.report_to, self.out, project=cfg.wandb_project,
                                    run_name=cfg.run_name or self.out.name, config=config_to_dict(cfg))

    # -- the run ------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from accelerate.utils import set_seed
        from tqdm.auto import tqdm

        cfg, acc, st = self.cfg, self.acc, self.state
        if self.resume_from is not None:
            ckpt.load_rng(self.resume_from, self.rank)  # exactly where the saved run continued
        else:
            set_seed(cfg.seed + self.rank)  # per-rank streams (dropout) from here on
        self.progress = tqdm(total=self.total_steps, initial=st.step, desc="train", dynamic_ncols=True,
                             mininterval=1.0, file=sys.stderr, disable=not self.main)
        window, last_train, last_eval = _Window(), {}, {}
        saved_at = evaluated_at = -1
        while st.step < self.total_steps:
            acc.step = 0  # accumulation groups start at a step boundary (also right after resume)
            for batch in self.train_batches(st.epoch, st.batches_in_epoch):
                loss, metrics = self.train_step(batch)
                st.batches_in_epoch += 1
                window.sums.add_batch(loss, metrics)
                window.tokens += count_tokens(batch)
                window.useful += count_tokens(batch, "loss_mask")
                window.flops += self.task.flops(batch) or 0.0
                if not acc.sync_gradients:
                    continue
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                st.step += 1
                self.progress.update(1)
                if st.step % cfg.log_every == 0 or st.step == self.total_steps:
                    last_train, window = self._log_window(window, lr), _Window()
                paused = time.perf_counter()  # eval/save time is kept out of tokens/s
                if self.eval_ds is not None and cfg.eval_every and st.step % cfg.eval_every == 0:
                    last_eval, evaluated_at = self._eval_and_log(), st.step
                if st.step >= self.total_steps:
                    break
                if cfg.save_every and st.step % cfg.save_every == 0:
                    self._advance_epoch_if_done()
                    self._save_checkpoint({**last_train, **last_eval})
                    saved_at = st.step
                window.start += time.perf_counter() - paused
            self._advance_epoch_if_done()
        self.progress.close()
        if self.eval_ds is not None and evaluated_at != st.step:
            last_eval = self._eval_and_log()
        if saved_at != st.step:
            self._save_checkpoint({**last_train, **last_eval})
        final_metrics = {**last_train, **last_eval, "step": st.step}
        ckpt.write_model_dir(acc, self.model, self.out / "final", self.task, cfg, final_metrics)
        if self.tracker is not None:
            self.tracker.finish()
        acc.wait_for_everyone()
        return {**final_metrics, "best_value": st.best_value, "best_step": st.best_step,
                "output_dir": str(self.out), "world_size": self.world}

    def train_batches(self, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        """Micro-batches of this rank for `epoch`, from micro-batch `start` on (skipped batches are never
        collated), up to the last complete accumulation group."""
        idx = dist_utils.shard_indices(len(self.train_ds), self.rank, self.world, seed=self.cfg.seed, epoch=epoch)
        bs = self.cfg.batch_size
        for b in range(start, self.steps_per_epoch * self.cfg.grad_accum):
            rows = [self.train_ds[i] for i in idx[b * bs:(b + 1) * bs]]
            yield _to_device(self.task.collate(rows), self.acc.device)

    def train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Metrics]:
        """Forward and backward of one micro-batch; clip and step the optimizer when its group is complete."""
        with self.acc.accumulate(self.model):
            with self.acc.autocast():
                loss, metrics = self.task.loss(self.model, batch)
            if not torch.is_tensor(loss) or loss.dim() != 0:
                raise ValueError("task.loss must return a scalar tensor as its first value")
            self.acc.backward(loss)
            if self.acc.sync_gradients:
                norm = self.acc.clip_grad_norm_(self.params, self.max_norm)
                self.grad_norm = float(norm) if norm is not None else None
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return loss, metrics

    def _advance_epoch_if_done(self) -> None:
        st = self.state
        if st.batches_in_epoch >= self.steps_per_epoch * self.cfg.grad_accum:
            st.epoch += 1
            st.batches_in_epoch = 0

    def _log_window(self, window: _Window, lr: float) -> dict[str, Any]:
        """Reduce the window over ranks, log one train record (jsonl, tracker, console, progress bar)."""
        st, acc = self.state, self.acc
        means = window.sums.reduce(acc)
        means.update(self.task.derived_metrics(dict(means)) or {})
        counts = torch.tensor([window.tokens, window.useful, window.flops], dtype=torch.float64, device=acc.device)
        if self.world > 1:
            counts = acc.reduce(counts, reduction="sum")
        tokens, useful, flops = (float(v) for v in counts)
        secs = max(time.perf_counter() - window.start, 1e-9)
        per_s = tokens / secs
        st.tokens += int(tokens)
        record = {"step": st.step, "epoch": st.epoch, "lr": lr, **{f"train/{k}": v for k, v in means.items()},
                  "grad_norm": self.grad_norm, "tokens_per_s": per_s, "useful_tokens_per_s": useful / secs,
                  "tokens": st.tokens}
        if flops > 0:  # every rank's work over all ranks' peak
            record["mfu"] = flops / (secs * self.peak_flops * self.world)
        self.log(record)
        self.progress.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}", tok_s=f"{per_s:.0f}")
        self.print(format_line(st.step, self.total_steps, record,
                               ["train/loss", "lr", "grad_norm", "tokens_per_s", "useful_tokens_per_s", "mfu"]))
        return record

    def log(self, record: dict[str, Any]) -> None:
        if self.main:
            self.jsonl.append(record)
            if self.tracker is not None:
                self.tracker.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    # -- evaluation, best model, checkpoints --------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Exact eval metrics over the whole eval set (every rank runs the same number of forwards, so
        ZeRO-3 collectives stay matched; padding batches are computed and discarded)."""
        ds, bs, acc = self.eval_ds, self.cfg.batch_size, self.acc
        idx = dist_utils.shard_indices(len(ds), self.rank, self.world, seed=None, drop_tail=False)
        chunks = [idx[i:i + bs] for i in range(0, len(idx), bs)]
        sums = MetricSums()
        _set_training(self.model, False)
        with torch.no_grad():
            for i in range(dist_utils.max_over_ranks(acc, len(chunks))):
                real = i < len(chunks)
                rows = chunks[i] if real else (chunks[0] if chunks else [0])
                batch = _to_device(self.task.collate([ds[j] for j in rows]), acc.device)
                with acc.autocast():
                    loss, metrics = self.task.loss(self.model, batch)
                if real:
                    sums.add_batch(loss, metrics)
        _set_training(self.model, True)
        means = sums.reduce(acc)
        means.update(self.task.derived_metrics(dict(means)) or {})
        return {f"eval/{k}": v for k, v in means.items()}

    def _eval_and_log(self) -> dict[str, float]:
        metrics = self.evaluate()
        self.log({"step": self.state.step, "epoch": self.state.epoch, **metrics})
        self.print(format_line(self.state.step, self.total_steps, metrics, sorted(metrics)))
        self._maybe_best(metrics)
        return metrics

    def _maybe_best(self, metrics: dict[str, float]) -> None:
        name, st = self.task.best_metric, self.state
        if name not in metrics:
            raise ValueError(f"best_metric {name!r} is not among the eval metrics {sorted(metrics)}")
        value = metrics[name]
        if st.best_value is not None and (value >= st.best_value if self.task.best_mode == "min"
                                          else value <= st.best_value):
            return
        st.best_value, st.best_step = float(value), st.step
        ckpt.write_model_dir(self.acc, self.model, self.out / "best", self.task, self.cfg,
                             {**metrics, "step": st.step, "best_metric": name})

    def _save_checkpoint(self, metrics: dict) -> None:
        ckpt.save_checkpoint(self.acc, self.out / "checkpoints", self.state, self.model, self.optimizer,
                             self.scheduler, self.task, self.cfg, metrics)


def train(task: TrainTask) -> dict[str, Any]:
    """Run the training loop for `task` (see the module docstring). Returns the final metrics."""
    trainer = _Trainer(task)
    trainer.setup()
    return trainer.run()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=program_name(),
                                description="hsd-train trainer. Extra arguments are key=value config overrides.")
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="delete a previous run in output_dir first")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=3e-4 data=[a.jsonl,b.jsonl]")
    return p.parse_args(list(sys.argv[1:] if argv is None else argv))


def main(task_cls: type[TrainTask], config_cls: type[BaseTrainConfig] = BaseTrainConfig,
         argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point: `--config path.yaml [--resume] [--overwrite] [key=value ...]` -> train(task_cls(cfg))."""
    args = parse_args(argv)
    overrides = list(args.overrides) + ["resume=true"] * args.resume + ["overwrite=true"] * args.overwrite
    return train(task_cls(load_config(config_cls, args.config, overrides)))
