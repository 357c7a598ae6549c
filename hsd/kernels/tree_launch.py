"""Launch of the tree verification kernel (``tree_kernels._verify_tree_kernel``).

``TreeWorkspace`` holds every buffer a launch needs for up to ``max_batch`` trees of up to ``max_nodes``
nodes over a ``vocab``-sized vocabulary (the residual rows, the outputs); ``tree_launch`` builds the one
``Launch`` record of a call from tensors only (no value read on the host, no allocation), so an engine
can capture it in a CUDA graph and ``hsd.kernels.aot`` can compile it without a GPU.
``verify_tree_triton`` is the one-shot entry behind ``hsd.verify.verify_tree(..., backend="triton")``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from . import tree_kernels as kern
from .launch import Launch

TREE_METHOD_CODES = {"rrs": 0, "weighted": 1, "greedy": 2}
MAX_NODES = 127  # N_POW2 <= 128: the per-node state lives in registers
DEFAULT_BLOCK_V = 1024


def tree_method_code(method: str) -> int:
    if method not in TREE_METHOD_CODES:
        raise ValueError(f"method: expected one of {sorted(TREE_METHOD_CODES)}, got {method!r}")
    return TREE_METHOD_CODES[method]


@dataclass
class TreeWorkspace:
    """cur [B, N+1, V] float32 (residual rows), outputs path [B, N] int64, num_accepted [B], next_token [B]."""

    cur: Tensor
    path: Tensor
    num_accepted: Tensor
    next_token: Tensor

    @classmethod
    def create(cls, max_batch: int, max_nodes: int, vocab: int, device: torch.device | str) -> TreeWorkspace:
        if not 1 <= max_nodes <= MAX_NODES:
            raise ValueError(f"max_nodes: expected 1..{MAX_NODES}, got {max_nodes}")
        dev = torch.device(device)
        return cls(torch.empty(max_batch, max_nodes + 1, vocab, dtype=torch.float32, device=dev),
                   torch.empty(max_batch, max_nodes, dtype=torch.int64, device=dev),
                   torch.empty(max_batch, dtype=torch.int64, device=dev),
                   torch.empty(max_batch, dtype=torch.int64, device=dev))


def tree_launch(ws: TreeWorkspace, tokens: Tensor, parents: Tensor, draft: Tensor | None, target: Tensor, *,
                method: str, seeds: Tensor | None = None, steps: Tensor | None = None,
                uniforms: tuple[Tensor, Tensor] | None = None, block_v: int = DEFAULT_BLOCK_V,
                num_warps: int = 4) -> Launch:
    """The launch verifying B trees: tokens/parents [B, N] (unit stride along N), draft [B, N, V] | None,
    target [B, N+1, V] (unit stride along V; any batch/row strides), randomness from ``seeds``/``steps``
    [B] int64 (Philox) or explicit ``uniforms`` = (coins [B, N], u [B]). Greedy ignores draft and
    randomness (target may hold logits)."""
    b, n = tokens.shape
    v = target.shape[-1]
    code = tree_method_code(method)
    if n > ws.path.shape[1] or b > ws.path.shape[0] or v > ws.cur.shape[-1]:
        raise ValueError(f"[B, N, V] = {[b, n, v]} exceeds the workspace {list(ws.cur.shape)}")
    philox = uniforms is None
    if code != TREE_METHOD_CODES["greedy"] and philox and (seeds is None or steps is None):
        raise ValueError("randomness: give seeds and steps (Philox), or uniforms = (coins, u)")
    dummy = ws.num_accepted  # an unused pointer argument
    coins, u = (dummy, dummy) if uniforms is None else uniforms
    has_q = draft is not None and code != TREE_METHOD_CODES["greedy"]
    q = draft if has_q else target
    args = (tokens, tokens.stride(0), parents, parents.stride(0),
            target, target.stride(0), target.stride(1), q, q.stride(0), q.stride(1),
            ws.cur, ws.cur.stride(0), ws.cur.stride(1),
            seeds if seeds is not None else dummy, steps if steps is not None else dummy,
            coins, coins.stride(0) if coins.dim() == 2 else 0, u,
            ws.path, ws.path.stride(0), ws.num_accepted, ws.next_token, n, v)
    kwargs = dict(METHOD=code, HAS_Q=has_q, PHILOX=philox and code != TREE_METHOD_CODES["greedy"],
                  BLOCK_V=min(block_v, max(16, triton.next_power_of_2(v))), N_POW2=triton.next_power_of_2(n + 1),
                  num_warps=num_warps)
    return Launch(kern._verify_tree_kernel, (b,), args, kwargs)


def verify_tree_triton(tokens: Tensor, parents: Tensor, draft_probs: Tensor | None, target_probs: Tensor,
                       method: str, uniforms: tuple[Tensor, Tensor] | None = None, seeds: Tensor | None = None,
                       steps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One-shot: (path [B, N] -1 padded, num_accepted [B], next_token [B]) with a workspace per call."""
    b, n = tokens.shape
    ws = TreeWorkspace.create(b, n, target_probs.shape[-1], target_probs.device)
    q = None if draft_probs is None else draft_probs.float().contiguous()
    p = target_probs.float().contiguous() if method != "greedy" else target_probs.contiguous()
    if uniforms is not None:
        uniforms = (uniforms[0].float().contiguous(), uniforms[1].float().contiguous())
    ln = tree_launch(ws, tokens.long().contiguous(), parents.long().contiguous(), q, p, method=method,
                     seeds=seeds, steps=steps, uniforms=uniforms)
    ln.kernel[ln.grid](*ln.args, **ln.kwargs)
    return ws.path[:b, :n], ws.num_accepted[:b], ws.next_token[:b]
