"""hsd-train: train draft and early-exit heads, and verify speculative drafts losslessly."""

__version__ = "0.1.0"
