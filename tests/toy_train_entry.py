"""Entry script for the toy task (the pattern every train/<x>.py entry point follows).

    python tests/toy_train_entry.py --config cfg.yaml [--resume] [key=value ...]
    accelerate launch --config_file configs/accelerate/cpu_ds_zero2_2proc.yaml tests/toy_train_entry.py ...
"""
import os
import sys

if __package__ in (None, ""):  # run as a script: sys.path[0] is tests/, put the repo root there instead
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tests.toy_task import ToyConfig, ToyTask  # noqa: E402
from train.loop import main  # noqa: E402

if __name__ == "__main__":
    main(ToyTask, ToyConfig)
