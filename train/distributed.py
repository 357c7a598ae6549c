"""Accelerator construction and the DeepSpeed details the loop and the trainers need.

Launch modes (see configs/accelerate/*.yaml):
* one process (`hsd-train train <trainer>`, `python -m train.<trainer>` or `accelerate launch --config_file configs/accelerate/cpu.yaml ...`);
* many processes with DeepSpeed ZeRO-2/3 (GPU, or CPU with gloo: `cpu_ds_zero2_2proc.yaml`);
* many processes with plain DDP (GPU).

Pitfalls handled here (docs/environment.md): on a CPU-only machine accelerate picks no process-group
backend for DeepSpeed and silently runs world size 1 per process, so `make_accelerator` passes
`InitProcessGroupKwargs(backend="gloo")` there, and checks `accelerator.num_processes == $WORLD_SIZE`.

Frozen target under ZeRO-3 (`shard_target: true`): load it inside `target_init_context(accelerator, cfg)`
(transformers then partitions it with `deepspeed.zero.Init`) and wrap it with
`prepare_frozen_target(accelerator, model, cfg)`, which gives it an inference-only DeepSpeed engine that
gathers each layer's shards on the fly. Every rank must then run the target forward on the same number
of batches (the loop guarantees this). Without ZeRO-3 the target is simply moved to the device.
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Any

import torch


def use_deepspeed_env() -> bool:
    """True when `accelerate launch` was configured for DeepSpeed."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def make_accelerator(cfg: Any):
    """Build the `Accelerator` for `cfg` (grad_accum, mixed_precision), fixing the CPU backend pitfalls.

    Raises RuntimeError when the process group does not match the launcher's WORLD_SIZE.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    kwargs: dict[str, Any] = {}
    if not torch.cuda.is_available():
        if use_deepspeed_env():
            _skip_deepspeed_shm_op()
            # accelerate leaves backend=None on CPU; DeepSpeed then builds its own 2-rank group while
            # accelerate believes it is alone (train_batch_size assertion or silent world size 1).
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        elif world_env > 1:
            kwargs["cpu"] = True  # MULTI_CPU with gloo; a plain Accelerator() would run N separate jobs
    mixed = resolve_mixed_precision(cfg)
    _forget_other_precision(mixed)
    acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed, **kwargs)
    if acc.num_processes != world_env:
        raise RuntimeError(
            f"accelerate sees {acc.num_processes} process(es) ({acc.distributed_type}) but the launcher started "
            f"WORLD_SIZE={world_env}: every rank would train alone on all data. Use an accelerate config from "
            "configs/accelerate/ (DeepSpeed on CPU needs the gloo backend, which make_accelerator sets).")
    if acc.gradient_accumulation_steps != cfg.grad_accum:
        raise ValueError(f"grad_accum={cfg.grad_accum} but accelerate uses {acc.gradient_accumulation_steps} "
                         "(set by the accelerate config / ACCELERATE_GRADIENT_ACCUMULATION_STEPS); make them agree")
    return acc


def resolve_mixed_precision(cfg: Any, warn=None) -> str:
    """The autocast mode accelerate gets for ``cfg.mixed_precision`` on this machine: "no", "bf16" or "fp16".

    ``auto`` is the one measured precision decision (:func:`hsd.precision.precision_probe`): bf16 where bf16
    matmuls are faster than fp32 on this device, else no. An explicit ``bf16`` is obeyed everywhere, on a CPU
    through torch's CPU autocast; where bf16 was measured slower than fp32 (an AVX2-only CPU emulates it) one
    line says so with the measured ratio. ``fp16`` needs a GPU (a CPU has no fp16 autocast with loss scaling).
    """
    from hsd.precision import bf16_speedup, precision_probe

    mode = cfg.mixed_precision
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if mode == "auto":
        return "bf16" if precision_probe(device).dtype == "bfloat16" else "no"
    if mode == "fp16" and device == "cpu":
        raise ValueError("mixed_precision=fp16 needs a GPU (CPU autocast has no fp16 loss scaling); use "
                         "mixed_precision=bf16 or no")
    if mode == "bf16" and device == "cpu":
        ratio = bf16_speedup(device)
        if ratio is not None and ratio < 1.0:
            import logging

            (warn or logging.getLogger(__name__).warning)(
                f"mixed_precision=bf16 on this CPU: bf16 matmuls measured {ratio:.2f}x fp32 speed here "
                f"({precision_probe(device).hardware}); training will be slower than with mixed_precision=no")
    return mode


def _forget_other_precision(mixed: str) -> None:
    """accelerate keeps one process-wide AcceleratorState and refuses an Accelerator with another mixed
    precision; two runs in one process (the main job trains EAGLE-3 with bf16 autocast, then early-exit
    heads without) get a fresh AcceleratorState. The process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed):
        AcceleratorState._reset_state(reset_partial_state=False)


def _skip_deepspeed_shm_op() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op at process-group start (~95 s on a fresh
    machine) that only its inference all-reduce uses; training never calls it, so it is not built.
    Set HSD_DEEPSPEED_SHM_OP=1 to keep DeepSpeed's default."""
    if os.environ.get("HSD_DEEPSPEED_SHM_OP") == "1":
        return
    import importlib

    try:
        # import_module, not `import deepspeed.comm.torch as m`: the package namespace has a `torch`
        # attribute (the real torch) that the `as` form would bind instead of the submodule.
        ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:  # pragma: no cover - deepspeed absent: accelerate will say so
        return
    if hasattr(ds_comm_torch, "build_shm_op"):
        ds_comm_torch.build_shm_op = lambda: None


def deepspeed_plugin(accelerator):
    """The active DeepSpeedPlugin, or None when DeepSpeed is not in use."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return accelerator.state.deepspeed_plugin


def zero_stage(accelerator) -> int:
    """DeepSpeed ZeRO stage in use (0 when DeepSpeed is off)."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return 0
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def fill_deepspeed_config(accelerator, cfg: Any, model: torch.nn.Module | None = None) -> None:
    """Fill DeepSpeed "auto" values from the run config; a concrete value that disagrees -> ValueError.

    The loop prepares no dataloader (it shards data itself), so accelerate cannot infer the batch size.
    ZeRO-3 bucket sizes left "auto" are sized from `model.config.hidden_size` by accelerate; for a model
    without a config (e.g. a ModuleDict of heads) they are sized here from its widest 2-D weight.
    """
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * accelerator.num_processes,
        "gradient_clipping": float(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else 0.0,
    }
    for key, value in wanted.items():
        cur = ds.get(key)
        if cur is None or cur == "auto":
            ds[key] = value
        elif (float(cur) if key == "gradient_clipping" else cur) != value:
            raise ValueError(f"DeepSpeed config has {key}={cur} but the run config implies {value}; set it to "
                             "\"auto\" in configs/deepspeed/*.json or change the run config")
    zero = ds.get("zero_optimization", {})
    if model is not None and not hasattr(getattr(model, "config", None), "hidden_size"):
        h = max([p.shape[-1] for p in model.parameters() if p.ndim == 2] or [1024])
        sizes = {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                 "stage3_param_persistence_threshold": 10 * h}
        for key, value in sizes.items():
            if zero.get(key) == "auto":
                zero[key] = value
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError("the DeepSpeed config must not define optimizer/scheduler: the loop builds AdamW and "
                         "the cosine schedule itself (remove those sections)")


def shards_target(accelerator, cfg: Any) -> bool:
    """True when the frozen target is to be partitioned by ZeRO-3 (stage 3 and cfg.shard_target)."""
    return zero_stage(accelerator) == 3 and bool(getattr(cfg, "shard_target", True))


@contextlib.contextmanager
def _hf_zero3_init(plugin, enable: bool):
    """Make transformers build models partitioned by `deepspeed.zero.Init` (enable) or whole (not enable).

    accelerate registers its DeepSpeed config with transformers for every ZeRO-3 run (whatever
    `zero3_init_flag` says), and transformers then partitions any model it loads; this switches that
    registration on or off for the duration of the block and restores it afterwards.
    """
    from transformers.integrations import deepspeed as hf_ds

    previous = hf_ds._hf_deepspeed_config_weak_ref
    keep = plugin.dschf if hasattr(plugin, "dschf") else None  # keeps the weakly referenced config alive
    try:
        if enable:
            plugin.set_deepspeed_weakref()
        else:
            hf_ds.unset_hf_deepspeed_config()
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = previous
        del keep


def target_init_context(accelerator, cfg: Any):
    """Context in which to load the frozen target (e.g. `AutoModelForCausalLM.from_pretrained`).

    Under ZeRO-3 with `shard_target`, transformers partitions the weights as it loads them
    (`deepspeed.zero.Init`), so no rank ever holds the whole target. Under ZeRO-3 without it, the target
    loads whole on every rank. Without ZeRO-3: no effect.
    """
    if zero_stage(accelerator) != 3:
        return contextlib.nullcontext()
    return _hf_zero3_init(deepspeed_plugin(accelerator), shards_target(accelerator, cfg))


def trainable_init_context(accelerator):
    """Context for building the trainable head(s): never partitioned at construction under ZeRO-3
    (heads copy weights from the target at init; accelerator.prepare partitions them afterwards).
    The loop calls `task.model()` inside it; build heads there or wrap their construction in it."""
    if zero_stage(accelerator) != 3:
        return contextlib.nullcontext()
    return _hf_zero3_init(deepspeed_plugin(accelerator), False)


def prepare_frozen_target(accelerator, model: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    """Freeze `model` (eval, requires_grad False) and place it: device move, or a ZeRO-3 inference engine.

    Returns the module to call. Under ZeRO-3 sharding this is a DeepSpeed engine (call it like the model;
    `.module` is the partitioned model). Never pass the target to `accelerator.prepare` or the optimizer.
    """
    model.eval()
    model.requires_grad_(False)
    if not shards_target(accelerator, cfg):
        return model.to(accelerator.device)
    import deepspeed

    plugin = deepspeed_plugin(accelerator)
    ds = copy.deepcopy(plugin.deepspeed_config)
    # Inference-only engine: no optimizer, no offload of optimizer state; batch keys must be concrete.
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    zero = ds.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            h = int(getattr(getattr(model, "config", None), "hidden_size", 1024))
            zero[key] = {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                         "stage3_param_persistence_threshold": 10 * h}[key]
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = cfg.batch_size * accelerator.num_processes
    ds.pop("gradient_clipping", None)
    for prec in ("bf16", "fp16"):
        if isinstance(ds.get(prec), dict) and ds[prec].get("enabled") == "auto":
            ds[prec]["enabled"] = accelerator.mixed_precision == prec
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return engine


@contextlib.contextmanager
def gathered_parameters(accelerator, model: torch.nn.Module):
    """Under ZeRO-3, gather the full parameters of `model` (collective: every rank must enter); else no-op."""
    if zero_stage(accelerator) != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


# ---------------------------------------------------------------------------------------------------------
# Per-rank data


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


def max_over_ranks(accelerator, value: int) -> int:
    """Max of an int over ranks (collective when there are several)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import gather

    return int(gather(torch.tensor([value], device=accelerator.device)).max())


def shared_token(accelerator) -> int:
    """One number all ranks agree on (the main process pid), e.g. a temporary folder's suffix."""
    from accelerate.utils import broadcast_object_list

    obj = [os.getpid()]
    if accelerator.num_processes > 1:
        broadcast_object_list(obj, from_process=0)
    return int(obj[0])
