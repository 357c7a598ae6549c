"""The one precision decision (hsd.precision): the rule, the measurement, the override, parse_dtype."""
from __future__ import annotations

import pytest
import torch

from hsd import machine, precision
from hsd.models import resolve


@pytest.fixture
def fresh(monkeypatch):
    precision._probe.cache_clear()
    precision._measured.cache_clear()
    yield monkeypatch
    precision._probe.cache_clear()
    precision._measured.cache_clear()


@pytest.mark.parametrize("batch, step, want", [
    (13.8, 1.0, "bfloat16"),      # AMX-BF16: much faster at a batch, even at a few rows
    (5.0, 0.85, "bfloat16"),      # a little slower at a few rows is fine
    (0.04, 0.04, "float32"),      # AVX2 only: emulated, ~25x slower
    (1.1, 1.1, "float32"),        # not clearly faster
    (3.0, 0.5, "float32"),        # decoding steps would be twice as slow
    (0.03, None, "float32"),      # the few-row shape is not timed once the batch shape loses
])
def test_rule(batch, step, want):
    dtype, reason = precision.decide(batch, step)
    assert dtype == want and f"{batch:.2f}x" in reason


def test_measured_decision_is_cached_and_consistent(fresh):
    fresh.delenv(precision.ENV_OVERRIDE, raising=False)
    calls = []
    real = precision.measure

    def counted(device="cpu", budget_s=0.1):
        calls.append(device)
        return real(device, budget_s=0.01)

    fresh.setattr(precision, "measure", counted)
    probe = precision.precision_probe("cpu")
    assert precision.precision_probe("cpu") is probe and len(calls) == 1      # once per process
    assert probe.batch_speedup > 0 and (probe.step_speedup is None) == (probe.batch_speedup < precision.MIN_BATCH_SPEEDUP)
    assert probe.dtype == precision.decide(probe.batch_speedup, probe.step_speedup)[0]
    assert precision.auto_dtype("cpu") == probe.torch_dtype == resolve.parse_dtype("auto", "cpu")
    assert "flags" in probe.hardware and probe.threads == torch.get_num_threads()


def test_override_and_bad_override(fresh):
    fresh.setenv(precision.ENV_OVERRIDE, "bf16")
    assert precision.auto_dtype("cpu") == torch.bfloat16 and resolve.parse_dtype(None) == torch.bfloat16
    assert "HSD_AUTO_DTYPE" in precision.precision_probe().reason
    fresh.setenv(precision.ENV_OVERRIDE, "float8")
    with pytest.raises(ValueError, match="HSD_AUTO_DTYPE='float8'"):
        precision.auto_dtype("cpu")


def test_explicit_dtypes_are_obeyed(fresh):
    fresh.setenv(precision.ENV_OVERRIDE, "bfloat16")
    assert resolve.parse_dtype("float32") == torch.float32 and resolve.parse_dtype(torch.float16) == torch.float16


def test_machine_record_names_cpu_flags_versions_and_precision():
    info = machine.machine_info("cpu", torch.bfloat16)
    assert info["cpu"] and set(info["cpu_flags"]) <= set(machine.CPU_FLAGS) and info["gpu"] is None
    assert info["torch"] == torch.__version__ and info["precision"] == "bfloat16"
    line = machine.machine_line(info)
    assert info["cpu"] in line and "bfloat16" in line and "torch thread" in line
