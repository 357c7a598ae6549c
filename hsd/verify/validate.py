"""Input checks for hsd.verify: every problem raises ValueError naming the argument and the problem."""
from __future__ import annotations

import torch
from torch import Tensor

ROW_SUM_TOL = 1e-3  # |sum - 1| allowed per probability row (float32 softmax/top-k outputs)


def row_sum_tolerance(dtype: torch.dtype) -> float:
    """ROW_SUM_TOL, widened to one machine epsilon for bfloat16 rows (8-bit mantissa)."""
    return max(ROW_SUM_TOL, torch.finfo(dtype).eps)


TOKEN_DTYPES = (torch.int64, torch.int32)
PROB_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_tokens(name: str, tokens: object, ndim: int) -> Tensor:
    """Integer tensor with ``ndim`` dims and a non-empty last (K) dimension."""
    t = _tensor(name, tokens)
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in TOKEN_DTYPES:
        raise ValueError(f"{name}: expected dtype int64 (or int32), got {t.dtype}")
    if t.shape[-1] == 0:
        raise ValueError(f"{name}: K = 0 draft tokens (need K >= 1)")
    return t


def check_token_range(name: str, tokens: Tensor, vocab: int) -> None:
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ValueError(f"{name}: token ids must lie in [0, {vocab}), got range "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")


def check_probs(name: str, probs: Tensor) -> None:
    """Finite, non-negative rows that sum to 1 within ROW_SUM_TOL."""
    if probs.dtype not in PROB_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype, got {probs.dtype}")
    if probs.shape[-1] == 0:
        raise ValueError(f"{name}: empty vocabulary (V = 0)")
    # Two passes over the data: row sums (a NaN/inf anywhere makes its row sum non-finite) and min.
    acc = torch.float64 if probs.dtype == torch.float64 else torch.float32
    sums = probs.sum(-1, dtype=acc)
    if sums.numel() and not bool(torch.isfinite(sums).all()):
        if bool(torch.isfinite(probs).all()):
            raise ValueError(f"{name}: rows must sum to 1 (a row sum overflows)")
        raise ValueError(f"{name}: contains NaN or inf")
    if probs.numel() and float(probs.min()) < 0:
        raise ValueError(f"{name}: contains negative probabilities")
    err = (sums - 1.0).abs()
    tol = row_sum_tolerance(probs.dtype)
    if err.numel() and float(err.max()) > tol:
        raise ValueError(f"{name}: rows must sum to 1 (worst |sum - 1| = {float(err.max()):.3g} > {tol:.3g})")


def check_chain_inputs(draft_tokens: object, draft_probs: object, target_probs: object, *,
                       names: tuple[str, str, str] = ("draft_tokens", "draft_probs", "target_probs"),
                       lead: int = 1, allow_point_mass: bool = True) -> None:
    """Check draft_tokens [*lead, K], draft_probs [*lead, K, V] | None, target_probs [*lead, K+1, V].

    ``lead`` is the number of leading batch dims (1 for verify: [B]; 2 for verify_multi: [B, M]).
    """
    tn, qn, pn = names
    tokens = check_tokens(tn, draft_tokens, lead + 1)
    p = _tensor(pn, target_probs)
    lead_shape, k = tuple(tokens.shape[:-1]), tokens.shape[-1]
    if p.dim() != lead + 2 or tuple(p.shape[:lead]) != lead_shape or p.shape[lead] != k + 1:
        raise ValueError(f"{pn}: expected shape {(*lead_shape, k + 1, 'V')} for {tn} of shape "
                         f"{tuple(tokens.shape)}, got {tuple(p.shape)}")
    if p.device != tokens.device:
        raise ValueError(f"{pn}: on {p.device} but {tn} is on {tokens.device}")
    vocab = p.shape[-1]
    check_probs(pn, p)
    check_token_range(tn, tokens, vocab)
    if draft_probs is None:
        if not allow_point_mass:
            raise ValueError(f"{qn}: required here (chains must be samples from q), got None")
        return
    q = check_draft_rows(qn, draft_probs, pn, p, tuple(tokens.shape))
    check_probs(qn, q)
    q_tok = q.gather(-1, tokens.long().unsqueeze(-1))
    if bool((q_tok <= 0).any()):
        raise ValueError(f"{qn}: a draft token has zero draft probability (it cannot have been sampled)")


def check_not_fp16(*named: tuple[str, object]) -> None:
    """Refuse float16 probability rows (a dtype check, no sync).

    float16 flushes every probability below ~6e-8 to 0 (at V = 152k that is 17-74% of the tokens of
    an LLM row, about 4e-4 of the sampled mass): a drafted token can then have q = 0 and the rows are
    no longer the law that was sampled, so losslessness is lost at that level.
    """
    for name, t in named:
        if isinstance(t, Tensor) and t.dtype == torch.float16:
            raise ValueError(f"{name}: float16 probabilities are refused (values below 6e-8 round to 0, so "
                             "the rows are not the sampled law); pass float32 or bfloat16 probabilities, "
                             "or float16 logits to the serving path")


def check_uniforms(uniforms: object, coins_shape: tuple[int, ...], device: torch.device, *,
                   values: bool = True) -> tuple[Tensor, Tensor]:
    """uniforms = (coins [coins_shape], u [B]) with values in [0, 1) (that range is checked only if
    ``values``: it reads the tensors, i.e. syncs with the device)."""
    if not isinstance(uniforms, (tuple, list)) or len(uniforms) != 2:
        raise ValueError("uniforms: expected a pair (coins, u)")
    coins = _tensor("uniforms[0] (coins)", uniforms[0])
    u = _tensor("uniforms[1] (u)", uniforms[1])
    for name, t, shape in (("uniforms[0] (coins)", coins, coins_shape), ("uniforms[1] (u)", u, coins_shape[:1])):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating dtype, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}: on {t.device} but the probabilities are on {device}")
        if values and t.numel() and not bool(((t >= 0) & (t < 1)).all()):
            raise ValueError(f"{name}: values must lie in [0, 1) (and not be NaN)")
    return coins, u


def check_draft_rows(qn: str, draft_probs, pn: str, p: Tensor, lead_shape: tuple[int, ...]) -> Tensor:
    """``draft_probs`` as a tensor of shape ``[*lead_shape, V]`` with the vocabulary, dtype and device of the
    target rows ``p`` (ValueError naming ``qn`` otherwise); the values are checked by the caller."""
    vocab = p.shape[-1]
    q = _tensor(qn, draft_probs)
    if q.dim() != len(lead_shape) + 1 or tuple(q.shape[:-1]) != tuple(lead_shape):
        raise ValueError(f"{qn}: expected shape {(*lead_shape, vocab)}, got {tuple(q.shape)}")
    if q.shape[-1] != vocab:
        raise ValueError(f"{qn}: vocabulary size {q.shape[-1]} does not match {pn} ({vocab})")
    if q.dtype != p.dtype:
        raise ValueError(f"{qn}: dtype {q.dtype} does not match {pn} dtype {p.dtype}")
    if q.device != p.device:
        raise ValueError(f"{qn}: on {q.device} but {pn} is on {p.device}")
    return q
