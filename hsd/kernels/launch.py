"""Launches of the verification kernels: workspace, argument lists and grids.

``Workspace`` holds every buffer a launch needs, sized once for a maximum batch (the serving plan,
``hsd.verify.serving.VerifyPlan``, owns one). ``verify_launches`` turns one call into a list of
``Launch`` records: one fused ``_verify_kernel`` launch, preceded by ``_lse_kernel`` launches only for
logits without a producer log-sum-exp (in batch chunks small enough for the second read to hit L2).
``run`` launches them; ``hsd.kernels.aot`` compiles exactly the same records for a GPU without one.
Nothing here reads tensor values: no host synchronisation, no allocation (capturable in a CUDA graph).

``verify_triton`` / ``verify_triton_logits`` are the one-shot entry points behind
``hsd.verify.verify(..., backend="triton")``: dense [B, K+1, V] inputs, explicit uniforms, a workspace
per call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
from torch import Tensor

from . import verify_kernels as kern

METHOD_CODES = {"tokenwise": 0, "blockwise": 1, "hsd": 1}  # HSD (capped) has the law of blockwise
DEFAULT_BLOCK_V = None  # auto: see choose_block_v
# Auto block: the largest of these that still gives the streaming grid MIN_PROGRAMS programs (about two
# waves of 8 resident 256-thread programs on a 132-SM H100), so that the last partial wave does not
# dominate at small B; otherwise the smallest.
AUTO_BLOCKS = (4096, 2048, 1024)
MIN_PROGRAMS = 2048
# The deciding program holds the [K_POW2, NB_POW2] tile of a request's block partials in registers: cap
# NB (a larger block is used when V / block_v would exceed it).
MAX_BLOCKS = 256
MAX_DRAFT = 31  # K_POW2 <= 32
DRAW_CHUNK = 512  # the deciding program re-reads its one block in chunks of this size (registers)
TILE_CHUNK = 64  # ... and reads the [K_POW2, NB] block partials in chunks of this many columns
PROB_DTYPES = (torch.float32, torch.bfloat16, torch.float64)  # float16 probabilities: refused
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def method_code(method: str) -> int:
    if method not in METHOD_CODES:
        raise ValueError(f"method: expected one of {sorted(METHOD_CODES)}, got {method!r}")
    return METHOD_CODES[method]


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


def block_config(max_batch: int, max_draft: int, vocab: int, device: torch.device,
                 block_v: int | None) -> tuple[int, int]:
    """(BLOCK_V, NB) for a plan: a power of two >= 16, raised so that NB <= MAX_BLOCKS, at most V."""
    if block_v is None:
        block_v = choose_block_v(max_batch * (max_draft + 1), vocab, device)
    if not isinstance(block_v, int) or block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v: expected a power of two >= 16, got {block_v}")
    block_v = max(block_v, triton.next_power_of_2(triton.cdiv(vocab, MAX_BLOCKS)))
    block_v = min(block_v, max(16, triton.next_power_of_2(vocab)))
    return block_v, triton.cdiv(vocab, block_v)


@dataclass
class Workspace:
    """Buffers of the kernels for at most ``max_batch`` requests of at most ``max_draft`` drafts.

    The arrival counters must be 0 between launches (the kernel resets them itself); ``reset()`` zeroes
    them after an aborted launch. Default side inputs (temperature 1, thresholds -inf, dense rows) are
    constant buffers, so a call passes pointers only.
    """

    max_batch: int
    max_draft: int
    vocab: int
    device: torch.device
    block_v: int
    nb: int
    num_warps: int
    buffers: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def create(cls, max_batch: int, max_draft: int, vocab: int, device, *, block_v: int | None = None,
               num_warps: int | None = None) -> Workspace:
        device = torch.device(device)
        if max_draft > MAX_DRAFT:
            raise ValueError(f"max_draft: at most {MAX_DRAFT} draft tokens per request, got {max_draft}")
        bv, nb = block_config(max(max_batch, 1), max_draft, vocab, device, block_v)
        # 8 warps from 1024-blocks on: the deciding program's [NB]-vectors spread over 256 threads (at 4
        # warps and NB_POW2 >= 128 it needs ~120 registers, which the whole streaming kernel would pay)
        ws = cls(max_batch, max_draft, vocab, device, bv, nb, num_warps or (8 if bv >= 1024 else 4))
        rows = max(max_batch, 1) * (max_draft + 1)
        f32 = dict(dtype=torch.float32, device=device)
        ws.buffers = {
            "part_p": torch.empty(rows * nb, **f32), "part_r": torch.empty(rows * nb, **f32),
            "part_i": torch.empty(rows * nb, dtype=torch.int32, device=device),
            "count": torch.zeros(max(max_batch, 1), dtype=torch.int32, device=device),
            "lse_p": torch.empty(rows, **f32), "lse_q": torch.empty(rows, **f32),
            "rows": torch.zeros(max(max_batch, 1), dtype=torch.int32, device=device),
            "temp": torch.ones(max(max_batch, 1), **f32),
            "thr": torch.full((rows,), float("-inf"), **f32),
            "i64": torch.zeros(max(max_batch, 1), dtype=torch.int64, device=device),
            "f32": torch.zeros(rows, **f32),
            "t2d": torch.zeros(1, dtype=torch.int32, device=device),
            "n": torch.empty(max(max_batch, 1), dtype=torch.int64, device=device),
            "next": torch.empty(max(max_batch, 1), dtype=torch.int64, device=device),
            "emit": torch.empty(rows, dtype=torch.int64, device=device),
            "flags": torch.empty(max(max_batch, 1), dtype=torch.int32, device=device),
        }
        return ws

    def __getitem__(self, name: str) -> Tensor:
        return self.buffers[name]

    @property
    def k_pow2(self) -> int:
        return max(2, triton.next_power_of_2(self.max_draft + 1))

    @property
    def nb_pow2(self) -> int:
        return max(2, triton.next_power_of_2(self.nb))

    def reset(self) -> None:
        self.buffers["count"].zero_()


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](*args, **kwargs)``."""

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class Rows:
    """Where the rows of each request live: element offset of row j of request b is
    rows[b] * sk + b * sb + j * sk (dense [B, K+1, V]: rows = 0; flattened [N, V]: sb = 0)."""

    tensor: Tensor
    rows: Tensor
    sb: int
    sk: int


def dense_rows(t: Tensor, ws: Workspace) -> Rows:
    return Rows(t, ws["rows"], t.stride(0), t.stride(1))


def indexed_rows(t: Tensor, rows: Tensor) -> Rows:
    return Rows(t, rows, 0, t.stride(0))


def verify_launches(ws: Workspace, *, method: int, tokens: Tensor, target: Rows, draft: Rows | None,
                    logits: bool, temperature: Tensor | None = None, t2d: Tensor | None = None,
                    lse_p: Tensor | None = None, lse_q: Tensor | None = None, thr_p: Tensor | None = None,
                    thr_q: Tensor | None = None, seeds: Tensor | None = None, steps: Tensor | None = None,
                    coins: Tensor | None = None, u: Tensor | None = None, l2_bytes: int | None = None,
                    out: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> list[Launch]:
    """The launches of one verification call of B = tokens.shape[0] requests, K = tokens.shape[1].

    Shapes are the caller's responsibility (``hsd.verify.serving.VerifyPlan`` checks them); nothing is
    read, copied or allocated. ``out`` = (num_accepted [B], next_token [B], tokens [B, K+1] contiguous,
    flags [B]), default the workspace's own buffers. Philox uniforms when ``seeds`` is given, otherwise
    the explicit ``coins`` [B, K] (unit stride along K) and ``u`` [B].
    """
    b, k = tokens.shape
    if b == 0:
        return []
    v = ws.vocab
    n_out, next_out, emit_out, flag_out = out if out is not None else (
        ws["n"], ws["next"], ws["emit"], ws["flags"])
    temp = ws["temp"] if temperature is None else temperature
    thr_p = ws["thr"] if thr_p is None else thr_p
    thr_q = ws["thr"] if thr_q is None else thr_q
    has_q = draft is not None
    q = draft if has_q else target
    philox = seeds is not None
    launches = []
    chunks = [(0, b)]
    if logits and (lse_p is None or (has_q and lse_q is None)):
        # No producer LSE: one row pass first. In chunks of requests whose rows fit in about half of L2,
        # so that the fused pass re-reads them from L2.
        if l2_bytes:
            per_request = (2 * k + 1) * v * target.tensor.element_size()
            step = max(1, int(l2_bytes // max(per_request, 1)))
            chunks = [(s, min(b, s + step)) for s in range(0, b, step)]
    for b0, b1 in chunks:
        nreq = b1 - b0
        if logits and lse_p is None:
            launches.append(Launch(kern._lse_kernel, (nreq * (k + 1),), (
                tokens, tokens.stride(0), target.tensor, target.rows, target.sb, target.sk, temp, thr_p, ws["lse_p"],
                b0, k, k + 1, v), dict(IS_DRAFT=False, BLOCK_V=ws.block_v, K_POW2=ws.k_pow2, num_warps=ws.num_warps)))
        if logits and has_q and lse_q is None and k > 0:
            launches.append(Launch(kern._lse_kernel, (nreq * k,), (
                tokens, tokens.stride(0), q.tensor, q.rows, q.sb, q.sk, temp, thr_q, ws["lse_q"],
                b0, k, k, q.tensor.shape[-1]),
                dict(IS_DRAFT=True, BLOCK_V=ws.block_v, K_POW2=ws.k_pow2, num_warps=ws.num_warps)))
        launches.append(Launch(kern._verify_kernel, (nreq * (k + 1) * ws.nb,), (
            tokens, tokens.stride(0),
            target.tensor, target.rows, target.sb, target.sk,
            q.tensor, q.rows, q.sb, q.sk, ws["t2d"] if t2d is None else t2d,
            temp, ws["lse_p"] if lse_p is None else lse_p, ws["lse_q"] if lse_q is None else lse_q, thr_p, thr_q,
            seeds if philox else ws["i64"], steps if philox else ws["i64"],
            ws["f32"] if philox else coins, 0 if philox else coins.stride(0), ws["f32"] if philox else u,
            ws["part_p"], ws["part_r"], ws["part_i"], ws["count"],
            n_out, next_out, emit_out, flag_out,
            b0, v, ws.nb, k), dict(
            METHOD=method, HAS_Q=has_q, LOGITS=logits, DRAFT_VOCAB=t2d is not None, PHILOX=philox,
            BLOCK_V=ws.block_v, K_POW2=ws.k_pow2, NB_POW2=ws.nb_pow2, DRAW=min(ws.block_v, DRAW_CHUNK),
            TILE=min(ws.nb_pow2, TILE_CHUNK),
            num_warps=ws.num_warps)))
    return launches


def run(launches: list[Launch]) -> None:
    for ln in launches:
        ln.kernel[ln.grid](*ln.args, **ln.kwargs)


# ---------------------------------------------------------------- one-shot entry points


def _check_dense(draft_tokens: Tensor, draft: Tensor | None, target: Tensor, coins: Tensor, u: Tensor,
                 names: tuple[str, str], dtypes: tuple[torch.dtype, ...]) -> tuple[int, int, int]:
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
    if k > MAX_DRAFT:
        raise ValueError(f"draft_tokens: at most {MAX_DRAFT} draft tokens per row, got K = {k}")
    if target.dim() != 3 or target.shape[0] != b or target.shape[1] != k + 1 or target.shape[2] == 0:
        raise ValueError(f"{pn}: expected shape {(b, k + 1, 'V')}, got {tuple(target.shape)}")
    v = target.shape[2]
    for name, t in ((pn, target), (qn, draft)):
        if t is not None and t.dtype not in dtypes:
            extra = " (float16 probabilities are refused: values below 6e-8 round to 0)" \
                if t.dtype == torch.float16 else ""
            raise ValueError(f"{name}: expected one of {[str(d) for d in dtypes]}, got {t.dtype}{extra}")
    if draft is not None and tuple(draft.shape) != (b, k, v):
        raise ValueError(f"{qn}: expected shape {(b, k, v)}, got {tuple(draft.shape)}")
    if tuple(coins.shape) != (b, k):
        raise ValueError(f"coins: expected shape {(b, k)}, got {tuple(coins.shape)}")
    if tuple(u.shape) != (b,):
        raise ValueError(f"u: expected shape {(b,)}, got {tuple(u.shape)}")
    for name, t in (("draft_tokens", draft_tokens), (qn, draft), ("coins", coins), ("u", u)):
        if t is not None and t.device != target.device:
            raise ValueError(f"{name}: on {t.device} but {pn} is on {target.device}")
    return b, k, v


def _unit_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _one_shot(draft_tokens: Tensor, draft: Tensor | None, target: Tensor, method: str, coins: Tensor, u: Tensor,
              temperature: float | None, block_v: int | None, num_warps: int | None) -> tuple[Tensor, Tensor]:
    logits = temperature is not None
    names = ("draft_logits", "target_logits") if logits else ("draft_probs", "target_probs")
    b, k, v = _check_dense(draft_tokens, draft, target, coins, u, names, LOGIT_DTYPES if logits else PROB_DTYPES)
    code = method_code(method)
    if b == 0:  # an empty batch launches nothing
        empty = torch.empty(0, dtype=torch.int64, device=target.device)
        return empty, empty.clone()
    ws = Workspace.create(b, k, v, target.device, block_v=block_v, num_warps=num_warps)
    temp = None
    if logits:
        temp = torch.full((b,), float(temperature), dtype=torch.float32, device=target.device)
    p = _unit_stride(target)
    q = None if draft is None else _unit_stride(draft)
    run(verify_launches(ws, method=code, tokens=_unit_stride(draft_tokens), target=dense_rows(p, ws),
                        draft=None if q is None else dense_rows(q, ws), logits=logits, temperature=temp,
                        coins=_unit_stride(coins.to(torch.float32)), u=u.to(torch.float32).contiguous()))
    return ws["n"][:b], ws["next"][:b]


def verify_triton(draft_tokens: Tensor, draft_probs: Tensor | None, target_probs: Tensor, method: str,
                  coins: Tensor, u: Tensor, *, block_v: int | None = DEFAULT_BLOCK_V,
                  num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """Single-chain verification from probabilities (the ``backend="triton"`` of hsd.verify.verify).

    draft_tokens [B, K] int64 or int32; draft_probs [B, K, V] or None (point-mass drafts); target_probs
    [B, K+1, V] (any row strides; float32, bfloat16 or float64, read as float32; float16 refused);
    method "tokenwise" | "blockwise" | "hsd"; coins [B, K] and u [B] in [0, 1). Returns (num_accepted
    [B] int64, next_token [B] int64). Values are not checked (no host sync): bad values fail closed
    (docs/verification.md). block_v: vocabulary block (a power of two >= 16; None: 4096, 2048 or 1024
    by grid size, see choose_block_v); num_warps: warps of the fused kernel (default 8 for blocks
    >= 1024). Results depend on the block only through float32 summation order.
    """
    return _one_shot(draft_tokens, draft_probs, target_probs, method, coins, u, None, block_v, num_warps)


def verify_triton_logits(draft_tokens: Tensor, draft_logits: Tensor | None, target_logits: Tensor,
                         temperature: float, method: str, coins: Tensor, u: Tensor, *,
                         block_v: int | None = DEFAULT_BLOCK_V, num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """Same as :func:`verify_triton` on softmax(logits / temperature), reading raw logits.

    draft_logits [B, K, V] or None; target_logits [B, K+1, V]; -inf entries (top-k truncation) are
    allowed, but every row needs a finite entry. temperature > 0 (greedy rows: the serving plan). The
    row log-sum-exps are computed by a first pass (the serving plan can take them from the producer).
    """
    if not isinstance(temperature, (int, float)) or not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    return _one_shot(draft_tokens, draft_logits, target_logits, method, coins, u, float(temperature),
                     block_v, num_warps)
