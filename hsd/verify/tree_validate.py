"""Input checks for verify_tree: every problem raises ValueError naming the argument and the problem."""
from __future__ import annotations

import torch
from torch import Tensor

from .validate import TOKEN_DTYPES, _tensor, check_draft_rows, check_probs, check_token_range

PAD = -2  # parent id of a padding node


def check_method(method: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(method, str) or method not in allowed:
        raise ValueError(f"method: expected one of {allowed}, got {method!r}")


def _on_cycle(parents: list[int], i: int) -> bool:
    seen, j = set(), i
    while 0 <= j < len(parents) and j not in seen:
        seen.add(j)
        j = parents[j]
        if j == i:
            return True
    return False


def check_parents(tokens: Tensor, parents: object) -> Tensor:
    """parents [B, N]: -1 (root), -2 (padding) or an earlier real node; returns the real-node mask."""
    par = _tensor("parents", parents)
    if tuple(par.shape) != tuple(tokens.shape):
        raise ValueError(f"parents: expected shape {tuple(tokens.shape)} (as tokens), got {tuple(par.shape)}")
    if par.dtype not in TOKEN_DTYPES:
        raise ValueError(f"parents: expected dtype int64 (or int32), got {par.dtype}")
    if par.device != tokens.device:
        raise ValueError(f"parents: on {par.device} but tokens is on {tokens.device}")
    par = par.long()
    if par.numel() and int(par.min()) < PAD:
        raise ValueError("parents: ids must be -1 (root), -2 (padding) or a node index, got "
                         f"{int(par.min())}")
    real = par != PAD
    n = par.shape[1]
    index = torch.arange(n, device=par.device).unsqueeze(0)
    bad = real & (par >= index)
    if bool(bad.any()):
        b, i = (int(v) for v in bad.nonzero()[0])
        j = int(par[b, i])
        if j >= n:
            raise ValueError(f"parents: row {b} node {i} has parent {j}, outside [0, {n})")
        what = "lies on a cycle" if _on_cycle(par[b].tolist(), i) else "is not topological"
        raise ValueError(f"parents: row {b} node {i} has parent {j} >= {i}; the order {what} "
                         "(list every parent before its children)")
    has_parent = real & (par >= 0)
    parent_real = real.gather(1, par.clamp(min=0))
    orphan = has_parent & ~parent_real
    if bool(orphan.any()):
        b, i = (int(v) for v in orphan.nonzero()[0])
        raise ValueError(f"parents: row {b} node {i} hangs under padding node {int(par[b, i])}")
    return real


def check_tree_inputs(tokens: object, parents: object, draft_probs: object, target_probs: object, *,
                      logits: bool = False, names: tuple[str, str, str, str] =
                      ("tokens", "parents", "draft_probs", "target_probs")) -> None:
    """tokens [B, N], parents [B, N], draft_probs [B, N, V] | None, target_probs [B, N+1, V].

    Rows of padding nodes are not read and not checked. ``logits``: target_probs only needs to be
    free of NaN and +inf (greedy takes logits), and draft_probs is ignored.
    """
    tn, _, qn, pn = names
    t = _tensor(tn, tokens)
    if t.dim() != 2:
        raise ValueError(f"{tn}: expected 2 dims [B, N], got shape {tuple(t.shape)}")
    if t.dtype not in TOKEN_DTYPES:
        raise ValueError(f"{tn}: expected dtype int64 (or int32), got {t.dtype}")
    real = check_parents(t, parents)
    b, n = t.shape
    p = _tensor(pn, target_probs)
    if p.dim() != 3 or p.shape[0] != b or p.shape[1] != n + 1:
        raise ValueError(f"{pn}: expected shape {(b, n + 1, 'V')} for {tn} of shape {(b, n)}, got {tuple(p.shape)}")
    if p.device != t.device:
        raise ValueError(f"{pn}: on {p.device} but {tn} is on {t.device}")
    if not p.is_floating_point():
        raise ValueError(f"{pn}: expected a floating dtype, got {p.dtype}")
    vocab = p.shape[-1]
    if vocab == 0:
        raise ValueError(f"{pn}: empty vocabulary (V = 0)")
    slots = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=real.device), real], dim=1)
    if logits:
        used = p[slots]
        if bool(torch.isnan(used).any()) or bool((used == float("inf")).any()):
            raise ValueError(f"{pn}: contains NaN or +inf")
    else:
        check_probs(pn, p[slots])
    check_token_range(tn, t[real], vocab)
    if logits or draft_probs is None:
        return
    q = check_draft_rows(qn, draft_probs, pn, p, (b, n))
    check_probs(qn, q[real])
    q_tok = q.gather(-1, torch.where(real, t.long(), 0).unsqueeze(-1)).squeeze(-1)
    zero = real & (q_tok <= 0)
    if bool(zero.any()):
        b0, i0 = (int(v) for v in zero.nonzero()[0])
        raise ValueError(f"{qn}: row {b0} node {i0} has zero draft probability for its own token "
                         f"{int(t[b0, i0])} (it cannot have been drawn from that row)")
