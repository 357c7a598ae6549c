"""Decode the bundled held-out prompts with trained heads and every configuration, next to the Hugging Face
baselines; table, JSON, answer files and plots. All options: ``python scripts/decode.py --help``
(the implementation is ``hsd.decode.cli``, also run as ``hsd-train decode``)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsd.decode.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
