"""Public single-chain API: ``verify``, ``greedy_verify`` and the exact decision law behind them."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import blockwise, hsd, tokenwise
from .common import (
    Levels,
    compute_dtype,
    inverse_cdf,
    normalized,
    residual_all,
    residual_at,
    select_tau,
    tau_law,
)
from .validate import check_chain_inputs, check_not_fp16, check_token_range, check_tokens, check_uniforms

LevelsFn = Callable[..., Levels]
METHODS: dict[str, LevelsFn] = {"tokenwise": tokenwise.levels, "blockwise": blockwise.levels, "hsd": hsd.levels}
BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class VerifyResult:
    """Outcome per batch row.

    num_accepted: [B] int64 in [0, K], accepted draft tokens.
    next_token: [B] int64, the residual token (or the bonus token when all K were accepted).
    chain: [B] int64 or None. verify_multi only: index m of the chain whose first num_accepted
        tokens were accepted; the emitted tokens are draft_tokens[b, chain[b], :num_accepted[b]]
        followed by next_token[b]. For verify / greedy_verify it is None (the only chain).
    """

    num_accepted: Tensor
    next_token: Tensor
    chain: Tensor | None = None


def levels_fn(method: str | LevelsFn) -> LevelsFn:
    """The Levels builder of a method name; a callable is passed through (tests inject variants)."""
    if callable(method):
        return method
    if method not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {method!r}")
    return METHODS[method]


def draw_uniforms(coins_shape: tuple[int, ...], device: torch.device,
                  generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """coins [coins_shape] and u [B] ~ U[0, 1) (float32), drawn in that order from ``generator``."""
    gen_device = generator.device if generator is not None else device
    coins = torch.rand(coins_shape, generator=generator, device=gen_device)
    u = torch.rand(coins_shape[:1], generator=generator, device=gen_device)
    return coins.to(device), u.to(device)


def cast_inputs(draft_tokens: Tensor, draft_probs: Tensor | None, target_probs: Tensor):
    """int64 tokens; probabilities in the compute dtype (float64 stays float64, else float32)."""
    dtype = compute_dtype(target_probs)
    q = None if draft_probs is None else draft_probs.to(dtype)
    return draft_tokens.long(), q, target_probs.to(dtype)


def sample(levels: Levels, draft_tokens: Tensor, draft_probs: Tensor | None, target_probs: Tensor,
           coins: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """The sampling path shared by every method: tau from the coins, then the inverse-CDF token."""
    tau = select_tau(levels, coins)
    rows, fallback = residual_at(levels, draft_tokens, draft_probs, target_probs, tau)
    return tau, inverse_cdf(rows, u, fallback)


def verify(draft_tokens: Tensor, draft_probs: Tensor | None, target_probs: Tensor, *,
           method: str = "hsd", backend: str = "torch", generator: torch.Generator | None = None,
           uniforms: tuple[Tensor, Tensor] | None = None, validate: bool = True) -> VerifyResult:
    """Lossless verification of one draft chain per row.

    draft_tokens [B, K] int64; draft_probs [B, K, V] (q of each draft position) or None for
    point-mass drafts; target_probs [B, K+1, V] (row K is the bonus distribution). Both are the
    processed distributions actually sampled.
    method: "tokenwise" | "blockwise" | "hsd" (HSD and blockwise have the same law). The torch
    backend also takes a Levels builder such as ``blockwise.levels``: that is how the tests run
    variants through the real sampling path.
    backend: "torch" | "triton" (hsd.kernels; identical results for the same uniforms).
    uniforms: optional (coins [B, K], u [B]) in [0, 1): coin k-1 decides level k (token-wise:
    accept position k iff coin * q <= p; block/HSD: level k succeeds iff coin <= h_k, tau = last
    success) and u picks the token by inverse CDF (docs/verification.md, "Uniforms"); otherwise
    drawn with ``generator``.
    validate=False skips every check that reads tensor values (no host sync: for hot loops; bad
    values then fail closed, see docs/verification.md). float16 probabilities are refused either
    way: fp16 flushes probabilities below 6e-8 to 0, so the rows are not the law that was sampled
    (pass float32/bfloat16 probabilities, or logits to the serving path).
    Emitted tokens: draft_tokens[b, :num_accepted[b]] then next_token[b].
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    build = levels_fn(method)
    check_not_fp16(("draft_probs", draft_probs), ("target_probs", target_probs))
    if validate:
        check_chain_inputs(draft_tokens, draft_probs, target_probs)
    b, k = draft_tokens.shape
    device = target_probs.device
    if uniforms is None:
        coins, u = draw_uniforms((b, k), device, generator)
    else:
        coins, u = check_uniforms(uniforms, (b, k), device, values=validate)
    if backend == "triton":
        if not isinstance(method, str):
            raise ValueError("method: the triton backend takes a method name")
        from hsd.kernels import verify_triton  # lazy: hsd.verify works without triton

        n, token = verify_triton(draft_tokens, draft_probs, target_probs, method, coins, u)
        return VerifyResult(n.long(), token.long())
    tokens, q, p = cast_inputs(draft_tokens, draft_probs, target_probs)
    tau, token = sample(build(tokens, q, p), tokens, q, p, coins, u)
    return VerifyResult(tau, token)


def decision_law(draft_tokens: Tensor, draft_probs: Tensor | None, target_probs: Tensor,
                 method: str | LevelsFn = "hsd") -> tuple[Tensor, Tensor]:
    """Exact law of verify's decision for fixed drafts, from the sampler's own functions.

    Returns (P_tau [B, K+1], rows [B, K+1, V]): P(num_accepted = k) and the normalised law of
    next_token given num_accepted = k (row K: the bonus row). Use float64 inputs for exact tests.
    """
    tokens, q, p = cast_inputs(draft_tokens, draft_probs, target_probs)
    levels = levels_fn(method)(tokens, q, p)
    rows, fallback = residual_all(levels, tokens, q, p)
    return tau_law(levels), normalized(rows, fallback)


def greedy_verify(draft_tokens: Tensor, target_logits: Tensor) -> VerifyResult:
    """Temperature-0 verification: accept while each draft token is the target's argmax.

    draft_tokens [B, K]; target_logits [B, K+1, V] (-inf allowed, NaN not). next_token is the
    argmax at the first mismatch (or of the bonus row); ties go to the lowest token id.
    """
    tokens = check_tokens("draft_tokens", draft_tokens, 2)
    if not isinstance(target_logits, Tensor):
        raise ValueError(f"target_logits: expected a torch.Tensor, got {type(target_logits).__name__}")
    b, k = tokens.shape
    if target_logits.dim() != 3 or target_logits.shape[0] != b or target_logits.shape[1] != k + 1:
        raise ValueError(f"target_logits: expected shape {(b, k + 1, 'V')}, got {tuple(target_logits.shape)}")
    if not target_logits.is_floating_point():
        raise ValueError(f"target_logits: expected a floating dtype, got {target_logits.dtype}")
    if target_logits.shape[-1] == 0:
        raise ValueError("target_logits: empty vocabulary (V = 0)")
    if target_logits.device != tokens.device:
        raise ValueError(f"target_logits: on {target_logits.device} but draft_tokens is on {tokens.device}")
    if bool(torch.isnan(target_logits).any()) or bool((target_logits == float("inf")).any()):
        raise ValueError("target_logits: contains NaN or +inf")
    check_token_range("draft_tokens", tokens, target_logits.shape[-1])
    best = target_logits.argmax(-1)  # [B, K+1]
    n = (tokens.long() == best[:, :k]).long().cumprod(-1).sum(-1)
    return VerifyResult(n, best.gather(1, n.unsqueeze(1)).squeeze(1))
