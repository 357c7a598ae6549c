"""Lossless verification of speculative drafts: token-wise, block verification, HSD and draft trees.

``verify`` (one chain per row), ``verify_tree`` (one draft tree per row: greedy, recursive
rejection sampling, or the weighted tree verifier), ``verify_multi`` (M chains per row, a wrapper
over verify_tree) and ``greedy_verify`` (temperature 0): see api.py / tree.py / multi.py.
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
from .tree import TREE_METHODS, TreeVerifyResult, tree_decision_law, verify_tree, without_replacement_rows

__all__ = ["FLAGS", "METHODS", "MULTI_METHODS", "TREE_METHODS", "ServeResult", "TreeVerifyResult", "VerifyGraph",
           "VerifyPlan", "VerifyResult", "decision_law", "draft_vocab_ids", "greedy_verify", "logit_thresholds",
           "multi_law", "philox_uniforms", "row_lse", "tree_decision_law", "verify", "verify_multi", "verify_tree",
           "without_replacement_rows"]
