"""What machine a figure was measured on: CPU model and the flags that decide bf16 speed, GPU, versions,
threads. Every report and benchmark records :func:`machine_info` next to its numbers, because the project's
machines differ (an AVX2-only CPU emulates bf16 ~25x slower than fp32; a CPU with AMX-BF16 runs it 5-14x
faster) and only a ratio measured in one run on one machine carries over.
"""
from __future__ import annotations

import functools
import platform

import torch

# The CPU flags that decide how fast bf16 (and wide fp32) matmuls are.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")


@functools.cache
def cpu_model_and_flags() -> tuple[str, tuple[str, ...]]:
    """(model name, the :data:`CPU_FLAGS` this CPU has) from /proc/cpuinfo; the platform's processor
    string and no flags where /proc/cpuinfo does not exist."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = val.strip()
                elif key == "flags" and not flags:
                    flags = set(val.split())
                if model and flags:
                    break
    except OSError:
        model = platform.processor() or platform.machine()
    return model or "unknown CPU", tuple(f for f in CPU_FLAGS if f in flags)


def cpu_description() -> str:
    """"MODEL (flags: avx2 amx_bf16 ...)"."""
    model, flags = cpu_model_and_flags()
    return f"{model} (flags: {' '.join(flags) or 'none of ' + '/'.join(CPU_FLAGS)})"


def hardware_description(device: torch.device | str = "cpu") -> str:
    """The GPU name of a CUDA ``device``, else the CPU (model + bf16-relevant flags)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_description()


def machine_info(device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> dict:
    """A JSON-able record of where a figure was measured: cpu, cpu_flags, gpu (or None), torch and
    transformers versions, torch threads, platform, and ``precision`` when given."""
    import transformers

    model, flags = cpu_model_and_flags()
    dev = torch.device(device)
    info = {
        "cpu": model,
        "cpu_flags": list(flags),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if dtype is not None:
        info["precision"] = str(dtype).removeprefix("torch.")
    return info


def machine_line(info: dict) -> str:
    """One line for a report or a benchmark's output: "CPU (flags) | GPU | torch X, transformers Y | N
    threads | precision"."""
    parts = [f"{info['cpu']} (flags: {' '.join(info['cpu_flags']) or 'none of ' + '/'.join(CPU_FLAGS)})"]
    if info.get("gpu"):
        parts.append(f"GPU {info['gpu']}")
    parts.append(f"torch {info['torch']}, transformers {info['transformers']}")
    parts.append(f"{info['torch_threads']} torch thread(s)")
    if info.get("precision"):
        parts.append(info["precision"])
    return " | ".join(parts)
