"""Lossless verification of speculative drafts: token-wise, block verification and HSD.

``verify`` (one chain per row), ``verify_tree`` (one draft tree per row: greedy, recursive
rejection sampling, or the weighted tree verifier), ``verify_multi`` (M chains per row, a wrapper
over verify_tree) and ``greedy_verify`` (temperature 0). See api.py / tree.py / multi.py.
"""
from .api import METHODS, VerifyResult, decision_law, greedy_verify, verify
from .multi import MULTI_METHODS, multi_law, verify_multi
from .tree import TREE_METHODS, TreeVerifyResult, tree_decision_law, verify_tree, without_replacement_rows

__all__ = ["METHODS", "MULTI_METHODS", "TREE_METHODS", "TreeVerifyResult", "VerifyResult", "decision_law",
           "greedy_verify", "multi_law", "tree_decision_law", "verify", "verify_multi", "verify_tree",
           "without_replacement_rows"]
