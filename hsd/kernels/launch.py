"""Python entry points of the Triton verification kernels: buffers, grids and launches.

``verify_triton`` reads probabilities, ``verify_triton_logits`` raw logits with a temperature. Both
return (num_accepted [B] int64, next_token [B] int64) with exactly the uniforms convention of
``hsd.verify`` (see verify_kernels.py). No host synchronisation happens here, so a call can be
captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor

from . import verify_kernels as kern

METHOD_CODES = {"tokenwise": 0, "blockwise": 1, "hsd": 1}  # HSD (capped) has the law of blockwise
DEFAULT_BLOCK_V = None  # auto: see choose_block_v
# Auto block: the largest of these that still gives the streaming grid MIN_PROGRAMS programs
# (about two waves of 8 resident 256-thread programs on a 132-SM H100), so that the last partial
# wave does not dominate at small B; otherwise the smallest.
AUTO_BLOCKS = (4096, 2048, 1024)
MIN_PROGRAMS = 2048
# The per-row kernels hold all NB block partials of a row in one tile: cap NB (a larger block_v is used
# when V / block_v would exceed it).
MAX_BLOCKS = 1024
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _method_code(method: str) -> int:
    if method not in METHOD_CODES:
        raise ValueError(f"method: expected one of {sorted(METHOD_CODES)}, got {method!r}")
    return METHOD_CODES[method]


def _check(draft_tokens: Tensor, draft: Tensor | None, target: Tensor, coins: Tensor, u: Tensor,
           names: tuple[str, str]) -> tuple[int, int, int]:
    """Shape/dtype/device checks that read no data (no host sync). Returns (B, K, V)."""
    qn, pn = names
    for name, t in (("draft_tokens", draft_tokens), (pn, target), (qn, draft), ("coins", coins), ("u", u)):
        if t is not None and not isinstance(t, Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if draft_tokens.dim() != 2 or draft_tokens.shape[1] == 0:
        raise ValueError(f"draft_tokens: expected shape [B, K] with K >= 1, got {tuple(draft_tokens.shape)}")
    if draft_tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"draft_tokens: expected int64 or int32, got {draft_tokens.dtype}")
    b, k = draft_tokens.shape
    if target.dim() != 3 or target.shape[0] != b or target.shape[1] != k + 1 or target.shape[2] == 0:
        raise ValueError(f"{pn}: expected shape {(b, k + 1, 'V')}, got {tuple(target.shape)}")
    v = target.shape[2]
    if target.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{pn}: expected a floating dtype, got {target.dtype}")
    if draft is not None:
        if tuple(draft.shape) != (b, k, v):
            raise ValueError(f"{qn}: expected shape {(b, k, v)}, got {tuple(draft.shape)}")
        if draft.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{qn}: expected a floating dtype, got {draft.dtype}")
    if tuple(coins.shape) != (b, k):
        raise ValueError(f"coins: expected shape {(b, k)}, got {tuple(coins.shape)}")
    if tuple(u.shape) != (b,):
        raise ValueError(f"u: expected shape {(b,)}, got {tuple(u.shape)}")
    for name, t in (("draft_tokens", draft_tokens), (qn, draft), ("coins", coins), ("u", u)):
        if t is not None and t.device != target.device:
            raise ValueError(f"{name}: on {t.device} but {pn} is on {target.device}")
    return b, k, v


def _workspace(sizes: dict[str, int], device: torch.device) -> dict[str, Tensor]:
    """One float32 allocation split into named 1-D buffers. Each starts on a 64-byte boundary, so
    Triton always sees 16-byte aligned pointers (one compiled variant whatever B, K and V)."""
    padded = {name: triton.cdiv(n, 16) * 16 for name, n in sizes.items()}
    flat = torch.empty(sum(padded.values()), dtype=torch.float32, device=device)
    views, start = {}, 0
    for name, n in sizes.items():
        views[name] = flat[start:start + n]
        start += padded[name]
    return views


def choose_block_v(rows: int, v: int, device: torch.device) -> int:
    """Auto BLOCK_V for a streaming grid of ``rows`` rows x ceil(V / BLOCK_V) vocabulary blocks.

    The wave-count rule is a GPU occupancy heuristic; elsewhere (the CPU interpreter, where every
    program costs Python time) the largest block is used.
    """
    if device.type != "cuda":
        return AUTO_BLOCKS[0]
    for block in AUTO_BLOCKS:
        if rows * triton.cdiv(v, block) >= MIN_PROGRAMS:
            return block
    return AUTO_BLOCKS[-1]


def _launch(draft_tokens: Tensor, draft: Tensor | None, target: Tensor, method: str, coins: Tensor,
            u: Tensor, temperature: float | None, block_v: int | None,
            num_warps: int | None) -> tuple[Tensor, Tensor]:
    logits = temperature is not None
    names = ("draft_logits", "target_logits") if logits else ("draft_probs", "target_probs")
    b, k, v = _check(draft_tokens, draft, target, coins, u, names)
    code = _method_code(method)
    if b == 0:  # an empty batch launches nothing
        empty = torch.empty(0, dtype=torch.int64, device=target.device)
        return empty, empty.clone()
    if block_v is None:
        block_v = choose_block_v(b * (k + 1), v, target.device)
    if not isinstance(block_v, int) or block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v: expected a power of two >= 16, got {block_v}")
    block_v = max(block_v, triton.next_power_of_2(triton.cdiv(v, MAX_BLOCKS)))
    block_v = min(block_v, max(16, triton.next_power_of_2(v)))
    dev = target.device
    tokens = draft_tokens.to(torch.int64).contiguous()
    p = target.contiguous()
    has_q = draft is not None
    q = draft.contiguous() if has_q else p  # dummy pointer for point-mass drafts (never read)
    coins = coins.to(torch.float32).contiguous()
    u = u.to(torch.float32).contiguous()
    nb = triton.cdiv(v, block_v)
    k_pow2 = triton.next_power_of_2(k + 1)  # holds K draft positions and K + 1 target rows
    nb_pow2 = max(2, triton.next_power_of_2(nb))
    # Streaming kernels (row stats, partials): 8 warps for 2K-4K blocks keep ~16-32 elements per thread
    # in flight; the per-row kernels (scalars, decide) are tiny and keep Triton's default.
    warps = {"num_warps": num_warps or (8 if block_v >= 2048 else 4)}
    temp = 1.0 if temperature is None else float(temperature)
    rows_p, rows_q = b * (k + 1), b * k
    # One float32 workspace for every intermediate buffer and one int64 output (fewer allocations:
    # at small B the host-side cost of a call is what the GPU waits for).
    sizes = {"log_w": rows_p, "p_tok": rows_q, "q_tok": rows_q, "part_p": rows_p * nb, "part_r": rows_q * nb}
    if logits:
        sizes.update(lse_p=rows_p, mp=rows_p * nb, sp=rows_p * nb)
        if has_q:
            sizes.update(lse_q=rows_q, mq=rows_q * nb, sq=rows_q * nb)
    ws = _workspace(sizes, dev)
    dummy = ws["log_w"]  # passed where a buffer is not used (never dereferenced)
    mp, sp, mq, sq = (ws.get(name, dummy) for name in ("mp", "sp", "mq", "sq"))
    lse_p, lse_q = ws.get("lse_p", dummy), ws.get("lse_q", dummy)
    out = torch.empty(2, b, dtype=torch.int64, device=dev)
    num_accepted, next_token = out[0], out[1]
    flags = dict(HAS_Q=has_q, LOGITS=logits)

    if logits:
        kern._row_stats_kernel[(rows_p, nb)](p, mp, sp, v, nb, temp, BLOCK_V=block_v, **warps)
        if has_q:
            kern._row_stats_kernel[(rows_q, nb)](q, mq, sq, v, nb, temp, BLOCK_V=block_v, **warps)
    kern._scalars_kernel[(b,)](tokens, p, q, mp, sp, mq, sq, lse_p, lse_q, ws["log_w"], ws["p_tok"], ws["q_tok"],
                               k, v, nb, temp, METHOD=code, **flags, K_POW2=k_pow2, NB_POW2=nb_pow2)
    kern._partials_kernel[(rows_p, nb)](tokens, p, q, lse_p, lse_q, ws["log_w"], ws["part_p"], ws["part_r"],
                                        k, v, nb, temp, **flags, BLOCK_V=block_v, **warps)
    kern._decide_kernel[(b,)](tokens, p, q, lse_p, lse_q, ws["log_w"], ws["p_tok"], ws["q_tok"], ws["part_p"],
                              ws["part_r"], coins, u, num_accepted, next_token, k, v, nb, temp, METHOD=code,
                              **flags, BLOCK_V=block_v, K_POW2=k_pow2, NB_POW2=nb_pow2)
    return num_accepted, next_token


def verify_triton(draft_tokens: Tensor, draft_probs: Tensor | None, target_probs: Tensor, method: str,
                  coins: Tensor, u: Tensor, *, block_v: int | None = DEFAULT_BLOCK_V,
                  num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """Single-chain verification from probabilities (the ``backend="triton"`` of hsd.verify.verify).

    draft_tokens [B, K] int64; draft_probs [B, K, V] or None (point-mass drafts); target_probs
    [B, K+1, V]; method "tokenwise" | "blockwise" | "hsd"; coins [B, K] and u [B] in [0, 1).
    Returns (num_accepted [B] int64, next_token [B] int64). Values are validated by the caller
    (rows sum to 1, q > 0 on draft tokens); only shapes, dtypes and devices are checked here.
    Computed in float32 (float64 inputs are read as float32). block_v: vocabulary block of the
    streaming kernels (a power of two >= 16; None: 4096, 2048 or 1024 by grid size, see
    choose_block_v); num_warps: their warps (default 8 for blocks >= 2048). Results depend on the
    block only through float32 summation order (measure-zero boundary cases).
    """
    return _launch(draft_tokens, draft_probs, target_probs, method, coins, u, None, block_v, num_warps)


def verify_triton_logits(draft_tokens: Tensor, draft_logits: Tensor | None, target_logits: Tensor,
                         temperature: float, method: str, coins: Tensor, u: Tensor, *,
                         block_v: int | None = DEFAULT_BLOCK_V, num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """Same as :func:`verify_triton` on softmax(logits / temperature), reading raw logits.

    draft_logits [B, K, V] or None; target_logits [B, K+1, V]; -inf entries (top-k truncation)
    are allowed, but every row needs a finite entry. temperature > 0 (use greedy_verify for T = 0).
    A row log-sum-exp pass runs first, so the logits are read twice.
    """
    if not isinstance(temperature, (int, float)) or not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    return _launch(draft_tokens, draft_logits, target_logits, method, coins, u, float(temperature),
                   block_v, num_warps)
