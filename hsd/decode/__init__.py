"""Speculative decoding with trained heads: target runner, drafters, exit stage, verification, metrics.

Library entry point::

    from hsd.decode import SpeculativeDecoder, DecodeConfig, Eagle3Drafter
    dec = SpeculativeDecoder(target, Eagle3Drafter(head), exit_stage=None, config=DecodeConfig(k=3))
    # early-exit drafting (target layers 1..l + an exit head, no extra model): ExitDrafter(exit_head)
    result = dec.generate(input_ids, seed=0)     # input_ids [1, S]; result.new_tokens, result.stats

``scripts/decode.py`` (``hsd.decode.cli``) evaluates configurations and baselines on prompt sets.
"""
from .config import DecodeConfig
from .draft import Draft
from .drafters import Drafter, Eagle3Drafter, ModelDrafter, NoDrafter, PromptLookupDrafter, truncated_copy
from .engine import DecodeResult, SpeculativeDecoder
from .exit_draft import ExitDrafter
from .exit_stage import ExitStage
from .sampling import SamplingParams, process_logits, sample
from .stats import DecodeStats, summarize
from .target import KVState, TargetRunner

__all__ = ["DecodeConfig", "DecodeResult", "DecodeStats", "Draft", "Drafter", "Eagle3Drafter", "ExitDrafter",
           "ExitStage",
           "KVState", "ModelDrafter", "NoDrafter", "PromptLookupDrafter", "SamplingParams", "SpeculativeDecoder",
           "TargetRunner", "process_logits", "sample", "summarize", "truncated_copy"]
