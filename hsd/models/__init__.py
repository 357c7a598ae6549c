"""Models: EAGLE-3 draft head, early-exit head, target capture and the model resolver."""
