"""Copy the main job's printed lines and its results table into README.md (between the main-job markers).

    python scripts/readme_results.py runs/quickstart/smollm2-135m [--readme README.md]

The README's main-job numbers are therefore generated from a real run's ``report.md`` and ``main_job.log``,
never typed (``train.quickstart.update_readme``).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python scripts/readme_results.py`: put the repository root on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hsd.config import run_main  # noqa: E402
from train.quickstart import readme_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(readme_main))
