"""Training-time test (TTT) for EAGLE-3 heads: the K-step unroll, its attention, teacher, loss and metrics.

Alignment (one sequence ``x[0..S)``; ``E[s] = embed(x_s)``; ``f[t]`` = fused target features at ``t``;
``L[u]`` = target logits at ``u``, the distribution of ``x[u+1]``)::

    step 0, row t:  g = fc(f[t]),      token x[t+1], RoPE position t      -> predicts x[t+2], teacher L[t+1]
    step k, row t:  g = h_{k-1}[t],    token x[t+k+1], RoPE position t+k  -> predicts x[t+k+2], teacher L[t+k+1]

``h_{k-1}`` is the head's own output of the previous step (the "test" in TTT; gradients flow through it).
Tokens are ground truth (teacher forcing on ids). Row t of step k is the k-th draft of a chain anchored
at the verified prefix ``x[0..t+1]``, exactly what the step API computes at decoding time.

Attention at step k (query row t): step-0 keys/values at rows ``s <= t`` (causal) plus the step-1..k
keys/values at row ``t`` only (the chain's own earlier drafts). Two implementations, equal up to float
rounding (tests/test_eagle3_ttt.py checks loss and gradients):
* ``reference``: explicit causal scores against step-0 keys, per-step diagonal scores ``q . k_j``,
  concatenated before one softmax;
* ``sdpa``: one ``scaled_dot_product_attention`` call over the concatenated K sets of keys with a
  boolean mask ``[S, (k+1) S]`` (causal block + k diagonal blocks); step 0 is plain causal SDPA;
* ``auto`` (default): ``sdpa`` on CUDA (no [S, S] score tensor is materialised); on the CPU causal SDPA at
  step 0 and ``reference`` after it, because there the masked SDPA over (k+1)S keys measured ~2x slower
  than the explicit scores (S = 384, K = 7, forward + backward) while causal SDPA wins at step 0.
  The CUDA choice is by reasoning, not measured (no GPU here): ``scripts/bench_train.py --attention``
  measures it. flex_attention would skip the empty diagonal blocks on a GPU, but has no CPU backward to
  test here, so it is not offered.
Right padding is assumed (real tokens form a prefix), so causal masking alone keeps padding out of every
real row.

Packed rows (``packing: true``; ``hsd.models.packing``): several conversations per row, described by
``position_ids`` [B, S] restarting at 0 per conversation. Then step-0 attention is block-causal (same
conversation, key <= query), RoPE positions are the per-conversation ones (+ k at step k), a teacher row
needs its next token in the same conversation, and row t of step k is scored only when teacher row
``t + k + 1`` is in t's conversation (its position is >= k + 1). A row that reads tokens of the next
conversation is never scored and no other row attends to it, so every scored row, the loss and the
gradients equal those of the conversations unpacked (tests/test_packing.py).

Teacher and masks (docs/eagle3_contract.md, "Loss"): teacher rows are the positions ``u`` whose next
token ``x[u+1]`` is an assistant token (``loss_mask[u+1] = 1``); only those rows of the target's LM head
are computed. Per row, with ``draft_ids = vocab.target_ids``: ``teacher = softmax(L[u][draft_ids])``
(target restricted to the draft vocabulary and renormalised), ``p_draft = softmax(L[u])[draft_ids]``
(not renormalised; for alpha), ``top1 = argmax L[u]`` (full vocabulary), ``in_vocab = vocab.t2d[top1]``.

Loss: ``loss_k = sum_rows ce_k * in_vocab / max(1, sum_rows in_vocab)`` over step k's teacher rows, with
``ce = -sum_v teacher_v log q_v`` (soft-label CE = forward KL up to a constant). The normaliser is the
number of counted positions, never ``B * S``, so padding and mask density do not change the loss scale
(EAGLE's ``.mean()`` over B*S does). Total ``sum_k gamma^k loss_k`` (not renormalised by sum gamma^k).

Metrics per step k, as exact (sum, count) pairs over the step's assistant rows:
* ``loss_k``: the CE above (count = in-vocabulary rows);
* ``acc_k``: draft argmax (mapped to a target id) == target argmax; rows whose target argmax is outside
  the draft vocabulary count as misses (denominator = all assistant rows, as EAGLE's loss_mask.sum());
* ``cond_acc_k``: the same, over rows whose steps 0..k-1 were all assistant rows and all right
  (the acceptance of draft k given the chain survived so far; cond_acc_0 = acc_0);
* ``alpha_k = sum_v min(p_v, q_v)`` with ``p`` the target's full-vocabulary distribution on the draft ids
  (not renormalised) and ``q`` the draft's: the token-wise acceptance probability at temperature 1.
Derived (from the means, ``derived_metrics``): ``sim_accept_len = sum_k prod_{j<=k} acc_j`` (SpecForge's
simulated acceptance length; excludes the bonus token), ``sim_accept_len_cond`` (with cond_acc: the
expected number of accepted greedy drafts), ``sim_accept_len_alpha`` (with alpha).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hsd.models import packing
from hsd.models.eagle3 import Eagle3DraftModel
from hsd.models.layers import repeat_kv
from hsd.models.vocab import DraftVocab

Metrics = dict[str, tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------------------------
# Index helpers


def shift_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [B, S, ...] -> y with y[:, t] = x[:, t + n] (zeros past the end)."""
    if n == 0:
        return x
    out = torch.zeros_like(x)
    if n < x.shape[1]:
        out[:, : x.shape[1] - n] = x[:, n:]
    return out


def teacher_rows(loss_mask: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S] bool: rows u whose next token x[u+1] is a real assistant token (they get a teacher); with
    packed ``position_ids`` [B, S] also of u's own conversation (x[u+1] does not start the next one)."""
    m = loss_mask.bool()
    if attention_mask is not None:
        m = m & attention_mask.bool()
    if position_ids is not None:
        m = m & (position_ids > 0)
    rows = torch.zeros_like(m)
    rows[:, :-1] = m[:, 1:]
    return rows


def step_rows(rows: torch.Tensor, k: int, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S] bool: rows t of TTT step k that are scored (teacher row t + k + 1 exists, and with packed
    ``position_ids`` lies in t's conversation, i.e. its position is >= k + 1)."""
    if position_ids is not None:
        rows = rows & (position_ids >= k + 1)
    return shift_left(rows, k + 1)


# ---------------------------------------------------------------------------------------------------------
# Attention over the TTT key sets


@functools.lru_cache(maxsize=64)
def _mask_cached(seq_len: int, step: int, device: str) -> torch.Tensor:
    q = torch.arange(seq_len, device=device)[:, None]
    s = torch.arange(seq_len, device=device)[None, :]
    blocks = [s <= q] + [s == q] * step
    return torch.cat(blocks, dim=1)


def ttt_attention_mask(seq_len: int, step: int, device: torch.device | str = "cpu",
                       causal: torch.Tensor | None = None) -> torch.Tensor:
    """[S, (step+1) S] bool (True = attend): causal over step-0 keys, then one diagonal block per step 1..step.
    With ``causal`` [B, 1, S, S] (a packed batch's block-causal step-0 mask): [B, 1, S, (step+1) S]."""
    if causal is None:
        return _mask_cached(int(seq_len), int(step), str(torch.device(device)))
    diag = torch.eye(seq_len, dtype=torch.bool, device=causal.device).expand(*causal.shape[:2], -1, -1)
    return torch.cat([causal, *[diag] * step], dim=-1)


def ttt_attention_reference(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                            scale: float, causal: torch.Tensor | None = None) -> torch.Tensor:
    """Straightforward TTT attention. q [B, nh, S, d]; keys/values: step 0..k, each [B, nkv, S, d] -> [B, nh, S, d].

    Scores: q . K_0 (causal, or the block-causal ``causal`` [B, 1, S, S] of a packed batch) and, per step
    j >= 1, the diagonal q_t . K_j[t]; one softmax over all of them."""
    S = q.shape[2]
    n_rep = q.shape[1] // keys[0].shape[1]
    k0, v0 = repeat_kv(keys[0], n_rep), repeat_kv(values[0], n_rep)
    scores = torch.matmul(q, k0.transpose(-1, -2)) * scale
    if causal is None:
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    diag = [(q * repeat_kv(kj, n_rep)).sum(-1, keepdim=True) * scale for kj in keys[1:]]
    probs = torch.softmax(torch.cat([scores, *diag], dim=-1).float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs[..., :S], v0)
    for j, vj in enumerate(values[1:]):
        out = out + probs[..., S + j: S + j + 1] * repeat_kv(vj, n_rep)
    return out


def ttt_attention_sdpa(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                       scale: float, causal: torch.Tensor | None = None) -> torch.Tensor:
    """Fast TTT attention: one SDPA call over cat(K_0..K_k) with ``ttt_attention_mask``. Same shapes and
    ``causal`` as the reference."""
    n_rep = q.shape[1] // keys[0].shape[1]
    if len(keys) == 1:
        return F.scaled_dot_product_attention(q, repeat_kv(keys[0], n_rep), repeat_kv(values[0], n_rep),
                                              attn_mask=causal, is_causal=causal is None, scale=scale)
    kc = repeat_kv(torch.cat(list(keys), dim=2), n_rep)
    vc = repeat_kv(torch.cat(list(values), dim=2), n_rep)
    mask = ttt_attention_mask(q.shape[2], len(keys) - 1, q.device, causal)
    return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=scale)


def ttt_attention_auto(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                       scale: float, causal: torch.Tensor | None = None) -> torch.Tensor:
    """The faster exact path per device. CUDA: ``ttt_attention_sdpa`` (no [S, S] score tensor in memory).
    CPU: causal SDPA at step 0 and the explicit reference from step 1 on; measured on this 2-core CPU at
    S = 384, 9 heads, K = 7 (forward + backward): the masked SDPA over (k+1) S keys takes ~2x the
    reference's time there, while causal SDPA beats explicit scores at step 0."""
    if q.is_cuda or len(keys) == 1:
        return ttt_attention_sdpa(q, keys, values, scale, causal)
    return ttt_attention_reference(q, keys, values, scale, causal)


ATTENTION: dict[str, Callable] = {"auto": ttt_attention_auto, "sdpa": ttt_attention_sdpa,
                                  "reference": ttt_attention_reference}


# ---------------------------------------------------------------------------------------------------------
# Unroll


def ttt_unroll(draft: Eagle3DraftModel, features: torch.Tensor, embeds: torch.Tensor, rows: torch.Tensor,
               steps: int, attention: str = "auto", all_rows: bool = False,
               position_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Run K = ``steps`` TTT steps. features [B, S, 3H_t]; embeds [B, S, H] with ``embeds[:, s] = embed(x_s)``;
    rows [B, S] bool teacher rows (``teacher_rows``); ``position_ids`` [B, S] for packed rows (positions
    restarting at 0 per conversation; None = one conversation per row).

    Returns one float32 logits tensor per step: [N_k, Vd] at the rows ``step_rows(rows, k, position_ids)``
    (row-major order), or [B, S, Vd] for every row when ``all_rows`` (tests)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {sorted(ATTENTION)}, got {attention!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    attend = ATTENTION[attention]
    b, s, _ = features.shape
    if embeds.shape[:2] != (b, s) or rows.shape != (b, s):
        raise ValueError(f"features {tuple(features.shape)}, embeds {tuple(embeds.shape)} and rows "
                         f"{tuple(rows.shape)} must share [B, S]")
    scale = 1.0 / math.sqrt(draft.config.head_dim)
    g = draft.fuse(features)
    embeds = embeds.to(g.dtype)
    if position_ids is None:
        base_pos, causal = torch.arange(s, device=g.device).expand(b, s), None
    else:
        if position_ids.shape != (b, s):
            raise ValueError(f"position_ids {tuple(position_ids.shape)} must be [B, S] = {(b, s)}")
        base_pos, causal = position_ids.to(g.device), packing.block_causal_mask(position_ids.to(g.device))[:, None]
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    out = []
    for k in range(steps):
        e = shift_left(embeds, k + 1)  # row t reads token x[t+k+1]
        cos, sin = draft.rope(base_pos + k, g)
        q, kk, vv, residual = draft.midlayer.qkv(e, g, cos, sin)
        keys.append(kk)
        values.append(vv)
        h = draft.midlayer.finish(attend(q, keys, values, scale, causal), residual)
        hk = h if all_rows else h[step_rows(rows, k, position_ids)]
        out.append(draft.compute_logits(hk).float())
        g = h
    return out


# ---------------------------------------------------------------------------------------------------------
# Teacher, loss, metrics


@dataclass
class TTTTargets:
    """Teacher rows in row-major order of ``rows`` [B, S] (N = rows.sum())."""

    rows: torch.Tensor  # [B, S] bool
    teacher: torch.Tensor  # [N, Vd] float32, target restricted to the draft vocab, renormalised
    p_draft: torch.Tensor  # [N, Vd] float32, target probabilities of the draft ids (full-vocab softmax)
    top1: torch.Tensor  # [N] int64 target argmax (target ids)
    in_vocab: torch.Tensor  # [N] bool, top1 is in the draft vocabulary
    position: torch.Tensor  # [N] int64, u's position in its conversation (its column unless packed)
    positions: torch.Tensor | None = None  # [B, S] position_ids of a packed batch (None: unpacked)


@dataclass
class TeacherParts:
    """The compact per-row teacher (what a cache keeps): draft-vocab logits and two full-vocab statistics."""

    logits_draft: torch.Tensor  # [N, Vd] float32, target logits at the draft ids
    logsumexp: torch.Tensor  # [N] float32, over the full vocabulary
    top1: torch.Tensor  # [N] int64, full-vocabulary argmax (target id)


@torch.no_grad()
def teacher_parts(row_logits: torch.Tensor, vocab: DraftVocab) -> TeacherParts:
    """row_logits [N, V] (target logits at the teacher rows) -> TeacherParts."""
    logits = row_logits.float()
    return TeacherParts(logits_draft=logits[:, vocab.target_ids.to(logits.device)],
                        logsumexp=torch.logsumexp(logits, -1), top1=logits.argmax(-1))


@torch.no_grad()
def targets_from_parts(parts: TeacherParts, rows: torch.Tensor, vocab: DraftVocab,
                       position_ids: torch.Tensor | None = None) -> TTTTargets:
    """TeacherParts of the rows marked in ``rows`` [B, S] (row-major) -> TTTTargets (``position_ids`` [B, S]
    of a packed batch)."""
    n = int(rows.sum())
    if parts.logits_draft.shape[0] != n:
        raise ValueError(f"teacher has {parts.logits_draft.shape[0]} rows but rows marks {n}")
    ld = parts.logits_draft.float()
    position = torch.nonzero(rows)[:, 1] if position_ids is None else position_ids[rows]
    return TTTTargets(rows=rows, teacher=torch.softmax(ld, -1), p_draft=torch.exp(ld - parts.logsumexp[:, None]),
                      top1=parts.top1, in_vocab=vocab.t2d.to(ld.device)[parts.top1],
                      position=position, positions=position_ids)


@torch.no_grad()
def build_targets(row_logits: torch.Tensor, rows: torch.Tensor, vocab: DraftVocab,
                  position_ids: torch.Tensor | None = None) -> TTTTargets:
    """row_logits [N, V] (target logits at ``rows``, row-major) -> TTTTargets (``position_ids``: packed)."""
    if row_logits.shape[-1] != vocab.vocab_size:
        raise ValueError(f"row_logits vocab {row_logits.shape[-1]} != the target vocabulary {vocab.vocab_size}")
    if row_logits.shape[0] != int(rows.sum()):
        raise ValueError(f"row_logits has {row_logits.shape[0]} rows but rows marks {int(rows.sum())}")
    return targets_from_parts(teacher_parts(row_logits, vocab), rows, vocab, position_ids)


def ttt_loss(step_logits: Sequence[torch.Tensor], targets: TTTTargets, vocab: DraftVocab,
             gamma: float = 0.8) -> tuple[torch.Tensor, Metrics]:
    """Weighted TTT loss and per-step metrics from ``ttt_unroll`` logits ([N_k, Vd] per step)."""
    rows = targets.rows
    ids = vocab.target_ids.to(rows.device)
    total = torch.zeros((), device=rows.device)
    metrics: Metrics = {}
    chain = torch.ones_like(rows)  # rows whose earlier drafts were all scored and right
    for k, logits in enumerate(step_logits):
        sel = step_rows(rows, k, targets.positions)
        pick = targets.position >= k + 1  # teacher rows u = t + k + 1, t in u's conversation; row-major order
        if logits.shape[0] != int(pick.sum()):
            raise ValueError(f"step {k}: {logits.shape[0]} logits rows but {int(pick.sum())} teacher rows")
        teacher, p_draft = targets.teacher[pick], targets.p_draft[pick]
        top1, valid = targets.top1[pick], targets.in_vocab[pick]
        logq = torch.log_softmax(logits.float(), dim=-1)
        ce = -(teacher * logq).sum(-1)
        n_valid = valid.sum()
        loss_k = (ce * valid).sum() / n_valid.clamp_min(1)
        total = total + (float(gamma) ** k) * loss_k
        with torch.no_grad():
            correct = ids[logits.argmax(-1)] == top1
            alpha = torch.minimum(p_draft, logq.exp()).sum(-1)
            dense = torch.zeros_like(rows)
            dense[sel] = correct
            eligible = sel & chain
            n = torch.tensor(float(logits.shape[0]), device=rows.device)
            metrics[f"loss_{k}"] = ((ce.detach() * valid).sum(), n_valid.float())
            metrics[f"acc_{k}"] = (correct.float().sum(), n)
            metrics[f"cond_acc_{k}"] = ((eligible & dense).float().sum(), eligible.float().sum())
            metrics[f"alpha_{k}"] = (alpha.sum(), n)
            chain = eligible & dense
    return total, metrics


def accept_length(rates: Sequence[float]) -> float:
    """sum_k prod_{j<=k} rate_j (expected accepted drafts of a chain, if the rates were independent)."""
    out, prod = 0.0, 1.0
    for r in rates:
        prod *= float(r)
        out += prod
    return out


def derived_metrics(means: dict[str, float], steps: int) -> dict[str, float]:
    """Simulated acceptance lengths from per-step means (keys acc_k, cond_acc_k, alpha_k; a missing step,
    i.e. one with no counted row, counts as rate 0)."""
    out = {}
    for name, key in (("sim_accept_len", "acc"), ("sim_accept_len_cond", "cond_acc"),
                      ("sim_accept_len_alpha", "alpha")):
        if f"{key}_0" not in means:
            continue
        # a later step with no counted row (e.g. cond_acc_k when no chain survived) contributes nothing
        out[name] = accept_length([means.get(f"{key}_{k}", 0.0) for k in range(steps)])
    return out
