"""``python -m hsd.verify --demo`` runs and prints the toy table and the lossless check."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from hsd.verify.__main__ import toy_table

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_toy_table_values():
    table = dict(toy_table())
    assert 9 * table[2]["tokenwise"] == pytest.approx(10.0, abs=1e-9)
    assert 9 * table[2]["hsd"] == pytest.approx(11.0, abs=1e-9)
    assert 9 * table[5]["blockwise"] == pytest.approx(64 / 3, abs=1e-9)


def test_demo_runs():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "hsd.verify", "--demo", "--samples", "1000"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "21.333" in text and "15.630" in text and "12.667" in text
    tv_lines = [line for line in text.splitlines() if "TV" in line]
    assert len(tv_lines) == 5
    for line in tv_lines:  # every exact TV is printed at float precision
        tv = float(line.split("TV")[1].split("=")[1].split(",")[0])
        assert tv < 1e-12
    assert text.count("chi2 =") == 4
