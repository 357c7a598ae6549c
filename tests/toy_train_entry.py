"""Entry module for the toy task: the pattern every trainer module (train/eagle3.py, ...) follows.

    python -m tests.toy_train_entry --config cfg.yaml [--resume] [key=value ...]
    accelerate launch --config_file configs/accelerate/cpu_ds_zero2_2proc.yaml -m tests.toy_train_entry ...
"""
from __future__ import annotations

from collections.abc import Sequence

from hsd.config import run_main
from tests.toy_task import ToyConfig, ToyTask
from train import loop


def main(argv: Sequence[str] | None = None) -> dict:
    return loop.main(ToyTask, ToyConfig, argv)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
