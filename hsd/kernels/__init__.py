"""Triton kernels of hsd-train: single-chain verification (token-wise, block verification / HSD).

One fused launch per call (``verify_kernels.py``). ``verify_triton`` (probabilities) is what
``hsd.verify.verify(..., backend="triton")`` calls; ``verify_triton_logits`` reads raw logits and applies
the temperature in-kernel; the serving path (``hsd.verify.VerifyPlan``) drives the same kernel with a
preallocated workspace, Philox uniforms, ragged drafts and per-request sampling parameters. On a machine
without a GPU, run them with TRITON_INTERPRET=1 (set before the kernels are first launched).
"""
from .launch import DEFAULT_BLOCK_V, verify_triton, verify_triton_logits

__all__ = ["DEFAULT_BLOCK_V", "verify_triton", "verify_triton_logits"]
