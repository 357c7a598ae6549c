"""Export a trained head to a Hub-ready folder that vLLM and SGLang load unchanged (validated), and push it.

    python scripts/export.py runs/eagle3/smollm2-135m/final --out exports/smollm2-135m-eagle3
    python scripts/export.py runs/eagle3/smollm2-135m/final --out exports/x --format speculators
    python scripts/export.py runs/early_exit/smollm2-135m/final --out exports/smollm2-135m-exits
    python scripts/export.py HEAD_DIR --dry-run                      # file list + model card, writes nothing
    python scripts/export.py HEAD_DIR --out OUT --push-to-hub me/name [--private] [--revision BRANCH]

Options and exit codes: ``hsd.export.cli`` (``--help``). A real push needs a Hugging Face token with
write access (``hf auth login`` or ``HF_TOKEN``).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python scripts/export.py`: put the repository root on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hsd.export.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
