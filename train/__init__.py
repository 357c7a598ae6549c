"""Training entry points (EAGLE-3 heads, early-exit heads) over one shared loop, plus the data pipeline."""
