"""What ``auto`` precision means on this machine, decided by measurement (one function for training, data
regeneration and decoding).

The project's machines are not all the same CPU: on an AVX2-only CPU bf16 matmuls are emulated and run
~25x slower than fp32, on a CPU with AMX-BF16 they run 5-14x faster, and every recent GPU has bf16 tensor
cores. A constant cannot be right everywhere, so :func:`auto_dtype` times one fp32 and one bf16 matmul at
a batch shape (a training / multi-token pass) and at a few-row shape (a decoding step) on the device, once
per process, and picks bf16 only where it is faster at the batch shape and not much slower at the few-row
one. The decision and the measured ratios are logged and kept (:func:`precision_probe`) so that reports can
say which precision ran and why.

``HSD_AUTO_DTYPE=float32|bfloat16`` overrides the measurement (reproducible runs, tests).
"""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import asdict, dataclass

import torch

from hsd.machine import hardware_description

log = logging.getLogger(__name__)

ENV_OVERRIDE = "HSD_AUTO_DTYPE"
# The shapes timed: [M, K] @ [K, N]. M = 256 is a training batch / long pass, M = 8 a speculative pass.
BATCH_SHAPE = (128, 576, 1536)
STEP_SHAPE = (8, 576, 1536)
# bf16 must be at least this much faster at the batch shape, and at most this much slower at the step shape.
MIN_BATCH_SPEEDUP = 1.25
MAX_STEP_SLOWDOWN = 1.25
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PrecisionProbe:
    """One machine's measured precision decision.

    dtype: what ``auto`` means here ("bfloat16" or "float32"); reason: one line saying why;
    batch_speedup / step_speedup: fp32 time / bf16 time at :data:`BATCH_SHAPE` / :data:`STEP_SHAPE`
    (None when not measured: an override or a GPU); device: "cpu" / "cuda"; hardware: CPU model and the
    flags that matter, or the GPU name; threads: torch intra-op threads during the measurement.
    """

    dtype: str
    reason: str
    device: str
    hardware: str
    threads: int
    batch_speedup: float | None = None
    step_speedup: float | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def as_dict(self) -> dict:
        return asdict(self)


def _time_matmul(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, budget_s: float) -> float:
    """Median seconds of one [M, K] @ [K, N] in ``dtype`` (one warm-up; repeats within ``budget_s``)."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    times: list[float] = []
    spent = 0.0
    while len(times) < 3 or (spent < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        a @ b
        sync()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if spent > budget_s and dt > budget_s / 2:  # a slow emulated dtype: one long sample says enough
            break
    times.sort()
    return times[len(times) // 2]


def decide(batch_speedup: float, step_speedup: float | None) -> tuple[str, str]:
    """The rule, as a pure function of the measured fp32/bf16 time ratios -> (dtype, reason)."""
    ratios = f"bf16 is {batch_speedup:.2f}x fp32 speed at {BATCH_SHAPE[0]} rows"
    if step_speedup is not None:
        ratios += f", {step_speedup:.2f}x at {STEP_SHAPE[0]}"
    if batch_speedup >= MIN_BATCH_SPEEDUP and step_speedup is not None and step_speedup >= 1 / MAX_STEP_SLOWDOWN:
        return "bfloat16", f"{ratios}: bf16 is fast here"
    return "float32", f"{ratios}: bf16 is not faster here"


def measure(device: torch.device | str = "cpu", budget_s: float = 0.1) -> PrecisionProbe:
    """Time fp32 vs bf16 matmuls on ``device`` and decide (uncached; :func:`precision_probe` caches)."""
    dev = torch.device(device)
    hw = hardware_description(dev)
    threads = torch.get_num_threads()
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return PrecisionProbe("float32", "this GPU has no bf16 support", dev.type, hw, threads)
    def speedup(shape):
        return _time_matmul(shape, torch.float32, dev, budget_s) / max(_time_matmul(shape, torch.bfloat16, dev,
                                                                                    budget_s), 1e-9)

    batch = speedup(BATCH_SHAPE)
    # where bf16 already loses at the batch shape (emulated), the few-row shape cannot change the answer
    step = speedup(STEP_SHAPE) if batch >= MIN_BATCH_SPEEDUP else None
    dtype, reason = decide(batch, step)
    return PrecisionProbe(dtype, reason, dev.type, hw, threads, round(batch, 3), None if step is None else round(step, 3))


@functools.cache
def _probe(device_type: str, override: str | None) -> PrecisionProbe:
    if override:
        if override not in _DTYPES:
            raise ValueError(f"{ENV_OVERRIDE}={override!r}: expected one of {sorted(_DTYPES)}")
        dt = "bfloat16" if _DTYPES[override] == torch.bfloat16 else "float32"
        return PrecisionProbe(dt, f"set by {ENV_OVERRIDE}={override}", device_type,
                              hardware_description(device_type), torch.get_num_threads())
    probe = measure(device_type)
    log.info("precision auto -> %s on %s (%s)", probe.dtype, probe.hardware, probe.reason)
    return probe


def precision_probe(device: torch.device | str = "cpu") -> PrecisionProbe:
    """The (per-process cached) precision decision for ``device``'s type."""
    return _probe(torch.device(device).type, os.environ.get(ENV_OVERRIDE) or None)


def auto_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """What ``auto`` means on this machine for ``device``: bfloat16 where measured fast, else float32."""
    return precision_probe(device).torch_dtype


def bf16_speedup(device: torch.device | str = "cpu") -> float | None:
    """Measured fp32-time / bf16-time at the batch shape (for warnings such as "bf16 is 0.04x fp32 here");
    measured even when ``HSD_AUTO_DTYPE`` overrides the decision. None on a GPU without bf16."""
    probe = precision_probe(device)
    if probe.batch_speedup is None and not probe.reason.startswith("this GPU"):
        probe = _measured(torch.device(device).type)
    return probe.batch_speedup


@functools.cache
def _measured(device_type: str) -> PrecisionProbe:
    return measure(device_type)


# The shape whose measured speed stands for a device's peak matmul FLOP/s (MFU estimates): large enough to
# reach a CPU core's or a GPU's steady-state rate, small enough to time in well under a second.
PEAK_SHAPE = {"cpu": (1024, 1024, 1024), "cuda": (8192, 8192, 8192)}


def matmul_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      budget_s: float = 0.25) -> float:
    """Measured FLOP/s of one large matmul (:data:`PEAK_SHAPE`) in ``dtype`` on ``device`` with the current
    torch threads: the denominator of the trainers' MFU estimates. Measured, not a datasheet figure, because a
    CPU's real peak depends on its vector units, clocks and how many threads run (cached per process)."""
    dev = torch.device(device)
    return _peak(dev.type, str(dtype), torch.get_num_threads(), budget_s)


@functools.cache
def _peak(device_type: str, dtype: str, threads: int, budget_s: float) -> float:
    m, k, n = PEAK_SHAPE.get(device_type, PEAK_SHAPE["cpu"])
    dt, dev = getattr(torch, dtype.removeprefix("torch.")), torch.device(device_type)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=dev, dtype=dt)
    b = torch.randn(k, n, generator=gen).to(device=dev, dtype=dt)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = max(1, m // 8)
    t0 = time.perf_counter()
    a[:rows] @ b  # warm-up on an eighth of the rows
    sync()
    small = time.perf_counter() - t0
    if 8 * small > 4 * budget_s:  # an emulated dtype (bf16 on AVX2): its slow rate does not depend on the shape
        return 2.0 * rows * k * n / max(small, 1e-12)
    a @ b
    sync()
    best, spent = float("inf"), 0.0
    while spent < budget_s:  # the fastest of as many as fit the budget (one, where the dtype is emulated)
        t0 = time.perf_counter()
        a @ b
        sync()
        dt_s = time.perf_counter() - t0
        best, spent = min(best, dt_s), spent + dt_s
    return 2.0 * m * k * n / max(best, 1e-12)

