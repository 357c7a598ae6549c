"""Lossless verification of speculative drafts: token-wise, block verification and HSD.

``verify`` (one chain per row), ``verify_multi`` (M chains per row, recursive block verification
or recursive rejection sampling) and ``greedy_verify`` (temperature 0): see api.py / multi.py.
``VerifyPlan`` is the serving path for a batched decode engine (one fused kernel launch per step,
ragged drafts, per-request sampling parameters, Philox uniforms, CUDA graphs): see serving.py.
"""
from .api import METHODS, VerifyResult, decision_law, greedy_verify, verify
from .multi import MULTI_METHODS, multi_law, verify_multi
from .serving import (
    FLAGS,
    ServeResult,
    VerifyGraph,
    VerifyPlan,
    draft_vocab_ids,
    logit_thresholds,
    philox_uniforms,
    row_lse,
)

__all__ = ["FLAGS", "METHODS", "MULTI_METHODS", "ServeResult", "VerifyGraph", "VerifyPlan", "VerifyResult",
           "decision_law", "draft_vocab_ids", "greedy_verify", "logit_thresholds", "multi_law", "philox_uniforms",
           "row_lse", "verify", "verify_multi"]
