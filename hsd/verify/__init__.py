"""Lossless verification of speculative drafts: token-wise, block verification and HSD.

``verify`` (one chain per row), ``verify_multi`` (M chains per row, recursive block verification
or recursive rejection sampling) and ``greedy_verify`` (temperature 0). See api.py / multi.py.
"""
from .api import METHODS, VerifyResult, decision_law, greedy_verify, verify
from .multi import MULTI_METHODS, multi_law, verify_multi

__all__ = ["METHODS", "MULTI_METHODS", "VerifyResult", "decision_law", "greedy_verify", "multi_law",
           "verify", "verify_multi"]
