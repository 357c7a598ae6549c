"""The serving path of single-chain verification: one call per decode step inside a batched engine.

    plan = VerifyPlan(max_batch=64, max_draft=8, vocab=V, device="cuda", method="hsd", inputs="logits",
                      draft_vocab=d2t)           # once: workspace, outputs, constant buffers
    res = plan(draft_tokens, target, draft, temperature=temps, seeds=seeds, steps=steps)   # every step
    # res.num_accepted [B], res.next_token [B], res.tokens [B, K+1] (emitted, -1 after), res.flags [B]

What a call takes (B <= max_batch requests, K <= max_draft draft positions):

- ``draft_tokens`` [B, K] int32/int64 (unit stride along K), target-vocabulary ids; request b drafted
  the leading non-negative entries (K_b of them, 0 allowed): pad with -1.
- ``target`` [B, K+1, V] (any batch/row strides, unit stride along V), or [N, V] rows with
  ``target_rows`` [B] (first row of request b; its K_b + 1 rows are consecutive). Row j of request b
  is the target distribution after x_1..x_j; row K_b is the bonus row.
- ``draft`` None (point-mass drafts: greedy or n-gram drafters), or [B, K, Vq] / [N, Vq] with
  ``draft_rows``: the distributions the draft tokens were sampled from. Vq = V, or the draft vocabulary
  size with ``draft_vocab`` (EAGLE-3 ``d2t`` offsets: target id = draft id + d2t[draft id]).
- inputs="probs": processed probabilities (float32/bfloat16; float16 is refused: it rounds small
  probabilities to 0). inputs="logits": raw logits; the processed law is softmax(x / T) over the
  entries with x >= threshold, T = ``temperature[b]`` (draft and target alike), thresholds per row
  (``target_threshold`` [B, K+1], ``draft_threshold`` [B, K]; default -inf; ``logit_thresholds``
  turns top-k/top-p into them), and ``target_lse`` [B, K+1] / ``draft_lse`` [B, K]: the natural
  log-sum-exp of x / T over the kept entries, from the producer (one read of the logits); without it a
  row pass computes it first (``row_lse`` is the same formula in torch).
- ``temperature`` [B] float32: 0 marks a greedy request (accept while the draft token is the target
  argmax; next token = the argmax); in probs mode only that 0 matters.
- randomness: ``seeds`` [B] int64 and ``steps`` [B] int64 (Philox4x32-10 keyed by the seed, counter =
  (lane, step); deterministic per request whatever the batch; ``philox_uniforms`` reproduces it: use a
  new step for every verification of a request, e.g. its number of generated tokens), or
  explicit ``uniforms`` = (coins [B, K], u [B]) (tests, replays).

No call reads tensor values on the host, copies inputs or allocates (outputs are views of the plan's
buffers, overwritten by the next call, or of caller-owned ``out``), so the triton backend can be
captured in a CUDA graph (``capture``). Bad values fail closed (never an acceptance) and are
reported in ``flags`` (FLAGS). backend="torch" computes the same thing with torch ops (CPU engines,
reference); it groups requests by K_b and syncs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .api import verify
from .common import inverse_cdf

FLAGS = {
    1: "nan: a NaN met in the thresholds, masses or argmax (it counted as a rejection)",
    2: "q_zero: a draft token with q(x) = 0 (float16 flush, or a token the draft could not sample)",
    4: "token_range: a draft id >= V (rejected)",
    8: "empty_residual: the residual row had no mass (a measure-zero tie, or bad rows): drew from p",
}
LOG2E = 1.4426950408889634
INPUTS = ("probs", "logits")
PROB_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class ServeResult:
    """num_accepted [B] int64; next_token [B] int64; tokens [B, K+1] int64: the emitted tokens (the
    accepted drafts, then next_token, then -1); flags [B] int32 (bits of FLAGS)."""

    num_accepted: Tensor
    next_token: Tensor
    tokens: Tensor
    flags: Tensor


# ---------------------------------------------------------------- Philox4x32-10, bit-exact with the kernel

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mulhilo(a: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit halves of a * c for a in [0, 2^32) (int64 tensor) and a 32-bit constant c,
    exactly, from 16-bit pieces (the 64-bit product does not fit int64)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    c_hi, c_lo = c >> 16, c & 0xFFFF
    lo_lo = a_lo * c_lo
    mid = a_hi * c_lo + a_lo * c_hi + (lo_lo >> 16)
    hi = a_hi * c_hi + (mid >> 16)
    lo = ((mid & 0xFFFF) << 16) | (lo_lo & 0xFFFF)
    return hi & _M32, lo & _M32


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: Tensor, k1: Tensor,
               rounds: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 (Salmon et al. 2011) on int64 tensors holding uint32 values, as Triton's tl.philox."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(c2, _ROUND_B)
        hi_a, lo_a = _mulhilo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _uniform(x: Tensor) -> Tensor:
    """uint32 -> float32 in [0, 1) exactly as tl.uint_to_uniform_float."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def philox_uniforms(seeds: Tensor, steps: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The uniforms the kernel draws for requests with ``seeds`` [B] and ``steps`` [B] (int64): one
    Philox4x32-10 block per lane i with counter (i, step_lo, 0, step_hi) and key (seed_lo, seed_hi);
    coin i (level i + 1) is word 0 of block i, u is word 1 of block 0. Returns coins [B, k], u [B]."""
    seeds, steps = seeds.long(), steps.long()
    k0, k1 = (seeds & _M32).unsqueeze(1), ((seeds >> 32) & _M32).unsqueeze(1)
    lo, hi = (steps & _M32).unsqueeze(1), ((steps >> 32) & _M32).unsqueeze(1)
    c0 = torch.arange(max(k, 1), device=seeds.device).unsqueeze(0).expand(seeds.shape[0], max(k, 1))
    w0, w1, _, _ = philox4x32(c0, lo.expand_as(c0), torch.zeros_like(c0), hi.expand_as(c0), k0.expand_as(c0),
                              k1.expand_as(c0))
    return _uniform(w0[:, :k]).contiguous(), _uniform(w1[:, 0]).contiguous()


# ---------------------------------------------------------------- producer-side helpers


def logit_thresholds(logits: Tensor, temperature: float | Tensor = 1.0, top_k: int | Tensor = 0,
                     top_p: float | Tensor = 1.0) -> Tensor:
    """Per-row logit thresholds [...] for top-k / top-p: the kept set is {x >= threshold}.

    Same kept set as hsd.decode.sampling.process_logits (temperature, then top-k keeping ties, then
    top-p on the softmax: the smallest most-likely set reaching top_p), except that tokens tied with
    the last kept one at the top-p boundary are kept too. temperature/top_k/top_p: scalars or tensors
    broadcastable to logits.shape[:-1]; top_k = 0 and top_p = 1 mean off (-inf).
    """
    x = logits.float()
    shape = x.shape[:-1]
    t = torch.as_tensor(temperature, dtype=torch.float32, device=x.device).expand(shape).clamp_min(1e-30)
    k = torch.as_tensor(top_k, dtype=torch.long, device=x.device).expand(shape)
    p = torch.as_tensor(top_p, dtype=torch.float32, device=x.device).expand(shape)
    v = x.shape[-1]
    xs = x.sort(-1, descending=True).values
    kth = xs.gather(-1, (k.clamp(1, v) - 1).unsqueeze(-1)).squeeze(-1)
    thr_k = torch.where((k > 0) & (k < v), kth, torch.full_like(kth, float("-inf")))
    kept = xs.masked_fill(xs < thr_k.unsqueeze(-1), float("-inf"))
    probs = torch.softmax(kept / t.unsqueeze(-1), -1)
    mass_before = probs.cumsum(-1) - probs
    n_keep = ((mass_before < p.unsqueeze(-1)) & (kept > float("-inf"))).sum(-1).clamp_min(1)
    thr_p = xs.gather(-1, (n_keep - 1).unsqueeze(-1)).squeeze(-1)
    thr_p = torch.where(p < 1, thr_p, torch.full_like(thr_p, float("-inf")))
    return torch.maximum(thr_k, thr_p)


def row_lse(logits: Tensor, temperature: Tensor | float, threshold: Tensor | None = None) -> Tensor:
    """Natural log-sum-exp of x / T over the entries x >= threshold, per row: logits [..., V],
    temperature broadcastable to [...] (a 0 is treated as 1: greedy rows do not use it)."""
    x = logits.float()
    t = torch.as_tensor(temperature, dtype=torch.float32, device=x.device).expand(x.shape[:-1])
    t = torch.where(t > 0, t, torch.ones_like(t))
    if threshold is not None:
        x = x.masked_fill(x < threshold.unsqueeze(-1), float("-inf"))
    return torch.logsumexp(x / t.unsqueeze(-1), -1)


def draft_vocab_ids(d2t: Tensor) -> Tensor:
    """Target id of each draft id: arange(V_d) + d2t (EAGLE-3 offsets)."""
    d2t = torch.as_tensor(d2t).long()
    return torch.arange(d2t.numel(), device=d2t.device) + d2t


# ---------------------------------------------------------------- the torch implementation


def _rows(t: Tensor, rows: Tensor | None, b: int, n: int) -> Tensor:
    """[B, n, V] rows of each request: a dense [B', >=n, V] tensor, or [N, V] with first rows ``rows``."""
    if rows is None:
        return t[:b, :n]
    idx = (rows[:b].long().unsqueeze(1) + torch.arange(n, device=t.device)).clamp(max=t.shape[0] - 1)
    return t[idx]


def _processed(x: Tensor, logits: bool, t: Tensor, thr: Tensor | None, lse: Tensor | None) -> Tensor:
    """Probabilities the kernel uses: as given, or exp2(x * log2e / T - lse * log2e) for x >= thr."""
    if not logits:
        return x.float()
    x = x.float()
    tt = torch.where(t > 0, t, torch.ones_like(t)).view(-1, *([1] * (x.dim() - 1)))
    if thr is None:
        thr = torch.full(x.shape[:-1], float("-inf"), device=x.device)
    if lse is None:
        lse = row_lse(x, tt.squeeze(-1).expand(x.shape[:-1]), thr)
    p = torch.exp2(x * (LOG2E / tt) - (lse * LOG2E).unsqueeze(-1))
    return torch.where(x >= thr.unsqueeze(-1), p, torch.zeros_like(p))


def serve_torch(draft_tokens: Tensor, target: Tensor, draft: Tensor | None = None, *, method: str = "hsd",
                inputs: str = "probs", draft_ids: Tensor | None = None, temperature: Tensor | None = None,
                seeds: Tensor | None = None, steps: Tensor | None = None,
                uniforms: tuple[Tensor, Tensor] | None = None, target_rows: Tensor | None = None,
                draft_rows: Tensor | None = None, target_lse: Tensor | None = None, draft_lse: Tensor | None = None,
                target_threshold: Tensor | None = None, draft_threshold: Tensor | None = None) -> ServeResult:
    """The serving semantics (module docstring) with torch ops: processed rows, then ``verify`` per group
    of requests with the same K_b (the reference the kernel is tested against, and the CPU backend).

    draft_ids: target id of each draft-vocabulary id (``draft_vocab_ids(d2t)``) or None. A draft id
    >= V ends that request's block there (the kernel rejects it as a level with p = 0; both never
    accept it). Host syncs: K_b grouping.
    """
    b, k = draft_tokens.shape
    dev = target.device
    tokens = draft_tokens.long()
    v = target.shape[-1]
    logits = inputs == "logits"
    t = torch.ones(b, device=dev) if temperature is None else temperature[:b].float()
    p_raw = _rows(target, target_rows, b, k + 1)
    p = _processed(p_raw, logits, t, None if target_threshold is None else target_threshold[:b],
                   None if target_lse is None else target_lse[:b])
    q = None
    if draft is not None and k > 0:
        q = _processed(_rows(draft, draft_rows, b, k), logits, t,
                       None if draft_threshold is None else draft_threshold[:b],
                       None if draft_lse is None else draft_lse[:b])
        if draft_ids is not None:
            full = torch.zeros(b, k, v, dtype=q.dtype, device=dev)
            q = full.index_copy_(2, draft_ids.to(dev), q)
    if uniforms is not None:
        coins, u = uniforms[0][:b].float(), uniforms[1][:b].float()
    else:
        coins, u = philox_uniforms(seeds[:b], steps[:b], k)
    stop = (tokens < 0) | (tokens >= v)
    lanes = torch.arange(k, device=dev)
    kb = torch.where(stop, lanes, k).amin(-1) if k else torch.zeros(b, dtype=torch.long, device=dev)
    range_flag = ((tokens >= v) & (lanes < torch.where(tokens < 0, lanes, k).amin(-1, keepdim=True))).any(-1)
    tokens = torch.where(stop, torch.zeros_like(tokens), tokens)
    n = torch.zeros(b, dtype=torch.long, device=dev)
    nxt = torch.zeros(b, dtype=torch.long, device=dev)
    flags = torch.where(range_flag, 4, 0).to(torch.int32)
    greedy = t == 0
    for kk in sorted(set(kb.tolist())):
        for g in (True, False):
            sel = ((kb == kk) & (greedy == g)).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            if g:
                best = p_raw[sel, : kk + 1].float().argmax(-1)  # raw logits or probs: same argmax
                acc = (tokens[sel, :kk] == best[:, :kk]).long().cumprod(-1).sum(-1)
                n[sel], nxt[sel] = acc, best.gather(1, acc.unsqueeze(1)).squeeze(1)
            elif kk == 0:
                row = p[sel, 0]
                nxt[sel] = inverse_cdf(row, u[sel], row)
            else:
                qs = None if q is None else q[sel, :kk]
                res = verify(tokens[sel, :kk], qs, p[sel, : kk + 1], method=method,
                             uniforms=(coins[sel, :kk], u[sel]), validate=False)
                n[sel], nxt[sel] = res.num_accepted, res.next_token
                if qs is not None:
                    q_tok = qs.gather(-1, tokens[sel, :kk].unsqueeze(-1)).squeeze(-1)
                    flags[sel] |= torch.where((q_tok == 0).any(-1), 2, 0).to(torch.int32)
    emitted = torch.where(torch.arange(k + 1, device=dev) < n.unsqueeze(1),
                          torch.cat([tokens, tokens.new_zeros(b, 1)], 1), -1)
    emitted.scatter_(1, n.unsqueeze(1), nxt.unsqueeze(1))
    return ServeResult(n, nxt, emitted, flags)


# ---------------------------------------------------------------- the plan


def _fingerprint(a):
    """What a launch record depends on: (address, shape, strides, dtype) of a tensor, recursively."""
    if isinstance(a, Tensor):
        return a.data_ptr(), a.shape, a.stride(), a.dtype
    if isinstance(a, tuple):
        return tuple(_fingerprint(x) for x in a)
    return a


class VerifyGraph:
    """A captured verification call: ``replay()`` re-runs it on the current contents of the tensors it
    was captured with and returns the ServeResult views (valid until the next replay)."""

    def __init__(self, graph, result: ServeResult):
        self.graph = graph
        self.result = result

    def replay(self) -> ServeResult:
        self.graph.replay()
        return self.result


class VerifyPlan:
    """Per-engine verification state: workspace and outputs for up to ``max_batch`` requests of up to
    ``max_draft`` draft tokens over a ``vocab``-sized target vocabulary (see the module docstring).

    method: "tokenwise" | "blockwise" | "hsd" (block verification = capped HSD, one kernel). inputs:
    "probs" | "logits". draft_vocab: EAGLE-3 ``d2t`` offsets [V_d] when draft rows cover a draft
    vocabulary. backend: "triton" (the fused kernel; on a CPU only under TRITON_INTERPRET=1),
    "torch", or "auto" (triton on CUDA, torch elsewhere). block_v / num_warps: kernel tuning (default:
    a block giving >= 2 waves at max_batch). l2_bytes: with logits but no producer log-sum-exp, the
    row pass runs on request chunks of about this many bytes so the second read hits L2 (default: half
    the device's L2).
    """

    def __init__(self, *, max_batch: int, max_draft: int, vocab: int, device: torch.device | str = "cpu",
                 method: str = "hsd", inputs: str = "probs", draft_vocab: Tensor | None = None,
                 backend: str = "auto", block_v: int | None = None, num_warps: int | None = None,
                 l2_bytes: int | None = None):
        from .api import METHODS

        if method not in METHODS:
            raise ValueError(f"method: expected one of {sorted(METHODS)}, got {method!r}")
        if inputs not in INPUTS:
            raise ValueError(f"inputs: expected one of {INPUTS}, got {inputs!r}")
        for name, value in (("max_batch", max_batch), ("max_draft", max_draft), ("vocab", vocab)):
            if not isinstance(value, int) or value < (0 if name == "max_draft" else 1):
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        self.device = torch.device(device)
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        if backend not in ("triton", "torch"):
            raise ValueError(f"backend: expected 'triton', 'torch' or 'auto', got {backend!r}")
        self.max_batch, self.max_draft, self.vocab = max_batch, max_draft, vocab
        self.method, self.inputs, self.backend = method, inputs, backend
        self.draft_ids = None
        self.t2d = None
        if draft_vocab is not None:
            ids = draft_vocab_ids(torch.as_tensor(draft_vocab).to(self.device))
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise ValueError(f"draft_vocab: d2t maps draft ids outside the target vocabulary [0, {vocab})")
            if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
                raise ValueError("draft_vocab: target ids arange(V_d) + d2t must be strictly ascending")
            self.draft_ids = ids
            self.t2d = torch.full((vocab,), -1, dtype=torch.int32, device=self.device)
            self.t2d[ids] = torch.arange(ids.numel(), dtype=torch.int32, device=self.device)
        self.draft_vocab_size = vocab if self.draft_ids is None else self.draft_ids.numel()
        if l2_bytes is None and self.device.type == "cuda":
            l2_bytes = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) // 2
        self.l2_bytes = l2_bytes
        self.ws = None
        self._last_key = None
        if backend == "triton":
            from hsd.kernels.launch import Workspace, method_code

            self.ws = Workspace.create(max_batch, max_draft, vocab, self.device, block_v=block_v, num_warps=num_warps)
            self._code = method_code(method)

    # -- checks that read metadata only (no sync)
    def _check(self, draft_tokens, target, draft, temperature, seeds, steps, uniforms, target_rows, draft_rows,
               target_lse, draft_lse, target_threshold, draft_threshold) -> tuple[int, int]:
        def tensor(name, t):
            if not isinstance(t, Tensor):
                raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.device != self.device:
                raise ValueError(f"{name}: on {t.device}, the plan is on {self.device}")
            return t

        tensor("draft_tokens", draft_tokens)
        if draft_tokens.dim() != 2 or draft_tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"draft_tokens: expected [B, K] int32/int64, got {tuple(draft_tokens.shape)} "
                             f"{draft_tokens.dtype}")
        b, k = draft_tokens.shape
        if b > self.max_batch or k > self.max_draft:
            raise ValueError(f"draft_tokens: [B, K] = {[b, k]} exceeds the plan's max_batch = {self.max_batch}, "
                             f"max_draft = {self.max_draft}")
        if k and draft_tokens.stride(1) != 1:
            raise ValueError("draft_tokens: needs unit stride along K")
        logits = self.inputs == "logits"
        for name, t, rows, n, width in (("target", target, target_rows, k + 1, self.vocab),
                                        ("draft", draft, draft_rows, k, self.draft_vocab_size)):
            if t is None:
                if name == "target":
                    raise ValueError("target: required")
                continue
            tensor(name, t)
            if not t.is_floating_point() or (not logits and t.dtype not in PROB_DTYPES):
                extra = " (float16 probabilities round values below 6e-8 to 0)" if t.dtype == torch.float16 else ""
                raise ValueError(f"{name}: expected float32/bfloat16 {self.inputs}, got {t.dtype}{extra}")
            if t.shape[-1] != width or t.stride(-1) != 1:
                raise ValueError(f"{name}: expected a last dimension of {width} with unit stride, got shape "
                                 f"{tuple(t.shape)}, strides {t.stride()}")
            if rows is None:
                if t.dim() != 3 or t.shape[0] < b or t.shape[1] < n:
                    raise ValueError(f"{name}: expected [B, {n}, {width}] (or [N, {width}] with {name}_rows), "
                                     f"got {tuple(t.shape)}")
            else:
                tensor(f"{name}_rows", rows)
                if t.dim() != 2 or rows.dim() != 1 or rows.shape[0] < b or rows.dtype not in (torch.int32, torch.int64):
                    raise ValueError(f"{name}: with {name}_rows expected [N, {width}] and [B] int rows, got "
                                     f"{tuple(t.shape)} and {tuple(rows.shape)}")
        if temperature is not None:
            tensor("temperature", temperature)
            if temperature.dtype != torch.float32 or temperature.dim() != 1 or temperature.shape[0] < b:
                raise ValueError(f"temperature: expected [B] float32, got {tuple(temperature.shape)} {temperature.dtype}")
        elif logits:
            raise ValueError("temperature: required with inputs='logits' ([B] float32, 0 = greedy)")
        for name, t, n in (("target_lse", target_lse, k + 1), ("draft_lse", draft_lse, k),
                           ("target_threshold", target_threshold, k + 1), ("draft_threshold", draft_threshold, k)):
            if t is None:
                continue
            if not logits:
                raise ValueError(f"{name}: only with inputs='logits'")
            tensor(name, t)
            if t.dtype != torch.float32 or tuple(t.shape) != (b, n) or not t.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous [B, {n}] float32 tensor, got {tuple(t.shape)} {t.dtype}")
        if (seeds is None) != (steps is None):
            raise ValueError("seeds and steps: pass both (Philox uniforms) or neither")
        if seeds is not None:
            if uniforms is not None:
                raise ValueError("uniforms: pass either seeds/steps or uniforms, not both")
            for name, t in (("seeds", seeds), ("steps", steps)):
                tensor(name, t)
                if t.dtype != torch.int64 or t.dim() != 1 or t.shape[0] < b:
                    raise ValueError(f"{name}: expected [B] int64, got {tuple(t.shape)} {t.dtype}")
        elif uniforms is None:
            raise ValueError("randomness: pass seeds and steps ([B] int64), or uniforms=(coins, u)")
        else:
            coins, u = uniforms
            tensor("uniforms[0] (coins)", coins)
            tensor("uniforms[1] (u)", u)
            if coins.dtype != torch.float32 or tuple(coins.shape) != (b, k) or (k and coins.stride(1) != 1):
                raise ValueError(f"uniforms[0] (coins): expected [B, K] float32 with unit stride, got {tuple(coins.shape)}")
            if u.dtype != torch.float32 or tuple(u.shape) != (b,) or not u.is_contiguous():
                raise ValueError(f"uniforms[1] (u): expected [B] float32, got {tuple(u.shape)}")
        return b, k

    def __call__(self, draft_tokens: Tensor, target: Tensor, draft: Tensor | None = None, *,
                 temperature: Tensor | None = None, seeds: Tensor | None = None, steps: Tensor | None = None,
                 uniforms: tuple[Tensor, Tensor] | None = None, target_rows: Tensor | None = None,
                 draft_rows: Tensor | None = None, target_lse: Tensor | None = None, draft_lse: Tensor | None = None,
                 target_threshold: Tensor | None = None, draft_threshold: Tensor | None = None,
                 out: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> ServeResult:
        """Verify one step for B requests; see the module docstring for every argument. ``out`` =
        (num_accepted [B] int64, next_token [B] int64, tokens [B, K+1] int64 contiguous, flags [B] int32)."""
        b, k = self._check(draft_tokens, target, draft, temperature, seeds, steps, uniforms, target_rows,
                           draft_rows, target_lse, draft_lse, target_threshold, draft_threshold)
        if self.backend == "torch":
            res = serve_torch(draft_tokens, target, draft, method=self.method, inputs=self.inputs,
                              draft_ids=self.draft_ids, temperature=temperature, seeds=seeds, steps=steps,
                              uniforms=uniforms, target_rows=target_rows, draft_rows=draft_rows,
                              target_lse=target_lse, draft_lse=draft_lse, target_threshold=target_threshold,
                              draft_threshold=draft_threshold)
            if out is None:
                return res
            for dst, src in zip(out, (res.num_accepted, res.next_token, res.tokens, res.flags)):
                dst.copy_(src)
            return ServeResult(*out)
        return self._run_triton(b, k, draft_tokens, target, draft, temperature, seeds, steps, uniforms,
                                target_rows, draft_rows, target_lse, draft_lse, target_threshold, draft_threshold, out)

    def launches(self, draft_tokens: Tensor, target: Tensor, draft: Tensor | None = None, **kwargs):
        """The kernel launches a call would make (``hsd.kernels.aot`` compiles them without a GPU)."""
        b, k = draft_tokens.shape
        return self._launches(b, k, draft_tokens, target, draft, kwargs.get("temperature"), kwargs.get("seeds"),
                              kwargs.get("steps"), kwargs.get("uniforms"), kwargs.get("target_rows"),
                              kwargs.get("draft_rows"), kwargs.get("target_lse"), kwargs.get("draft_lse"),
                              kwargs.get("target_threshold"), kwargs.get("draft_threshold"), kwargs.get("out"))

    def _launches(self, b, k, draft_tokens, target, draft, temperature, seeds, steps, uniforms, target_rows,
                  draft_rows, target_lse, draft_lse, target_threshold, draft_threshold, out):
        from hsd.kernels.launch import dense_rows, indexed_rows, verify_launches

        ws = self.ws
        if k == 0:
            draft = None  # nothing was drafted: no draft rows to read
        p = dense_rows(target, ws) if target_rows is None else indexed_rows(target, target_rows)
        q = None if draft is None else (dense_rows(draft, ws) if draft_rows is None else indexed_rows(draft, draft_rows))
        if out is not None:
            out = (out[0], out[1], out[2].view(-1), out[3])
        coins, u = (None, None) if uniforms is None else uniforms
        return verify_launches(ws, method=self._code, tokens=draft_tokens, target=p, draft=q,
                               logits=self.inputs == "logits", temperature=temperature,
                               t2d=self.t2d if draft is not None else None, lse_p=target_lse, lse_q=draft_lse,
                               thr_p=target_threshold, thr_q=draft_threshold, seeds=seeds, steps=steps,
                               coins=coins, u=u, l2_bytes=self.l2_bytes, out=out)

    def _run_triton(self, b, k, *args) -> ServeResult:
        # The launch records depend only on the tensors' addresses, shapes, strides and dtypes: an engine
        # that passes the same buffers every step reuses the last call's records (and result views).
        key = (b, k, *(_fingerprint(a) for a in args))
        if key != self._last_key:
            out = args[-1]
            if out is not None:
                result = ServeResult(*out)
            else:
                ws = self.ws
                result = ServeResult(ws["n"][:b], ws["next"][:b], ws["emit"][: b * (k + 1)].view(b, k + 1),
                                     ws["flags"][:b])
            self._last = (self._launches(b, k, *args), result)
            self._last_key = key
        launches, result = self._last
        for ln in launches:
            ln.kernel[ln.grid](*ln.args, **ln.kwargs)
        return result

    def warmup(self) -> None:
        """Compile every kernel variant this plan can launch (draft rows or none, Philox or explicit
        uniforms), so that no compilation happens while serving or capturing. CUDA only (no-op else)."""
        if self.backend != "triton" or self.device.type != "cuda":
            return
        dev, k = self.device, max(self.max_draft, 1)
        dtype = torch.float32
        tokens = torch.zeros(1, k, dtype=torch.int32, device=dev)
        target = torch.full((1, k + 1, self.vocab), 1.0 / self.vocab, dtype=dtype, device=dev)
        draft = torch.full((1, k, self.draft_vocab_size), 1.0 / self.draft_vocab_size, dtype=dtype, device=dev)
        temp = torch.ones(1, device=dev)
        rng = [dict(seeds=torch.zeros(1, dtype=torch.int64, device=dev), steps=torch.zeros(1, dtype=torch.int64, device=dev)),
               dict(uniforms=(torch.zeros(1, k, device=dev), torch.zeros(1, device=dev)))]
        for q in (draft, None):
            for r in rng:
                self(tokens, target, q, temperature=temp, **r)
        torch.cuda.synchronize(dev)

    def capture(self, *args, **kwargs) -> VerifyGraph:
        """Capture one call (same arguments as ``__call__``) in a CUDA graph. The tensors passed are the
        graph's static inputs: write each step's data into them, then ``graph.replay()``."""
        if self.backend != "triton" or self.device.type != "cuda":
            raise RuntimeError("capture: CUDA graphs need backend='triton' on a CUDA device")
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self(*args, **kwargs)  # compiles the variant and initialises the autotuning-free caches
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            result = self(*args, **kwargs)
        return VerifyGraph(graph, result)

    def reset(self) -> None:
        """Zero the kernel's arrival counters (only needed after a launch was aborted mid-way)."""
        if self.ws is not None:
            self.ws.reset()


__all__ = ["FLAGS", "ServeResult", "VerifyGraph", "VerifyPlan", "draft_vocab_ids", "logit_thresholds",
           "philox_uniforms", "row_lse", "serve_torch"]
