"""Models: EAGLE-3 draft head (``eagle3``), early-exit heads (``early_exit``), the primitives both share
(``layers``, ``kv``, ``vocab``), target capture (``capture``) and the model resolver (``resolve``).

The decoding state every head hands back is re-exported here: ``StepOutput``, ``KVCache``, ``DraftVocab``.
"""
from hsd.models.kv import KVCache, StepOutput
from hsd.models.vocab import DraftVocab

__all__ = ["DraftVocab", "KVCache", "StepOutput"]
