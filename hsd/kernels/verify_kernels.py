"""Triton kernels of single-chain verification (token-wise, block verification / HSD).

Design (research note hsd_algorithm.md §7.3). Row ``j`` of the target is p_{j+1} (j = 0..K, row K is
the bonus row), row ``j`` of the draft is q_{j+1} (j = 0..K-1), draft token x_{j+1} = tokens[b, j].
Level ``k`` (1..K) means "accept x_1..x_k"; the residual row of tau = k < K is (w_k p_{k+1} - q_{k+1})_+
(0-based row k), with w_0 = 1.

Kernels, in launch order:

1. ``_row_stats_kernel`` (logits only), grid (rows, NB): per vocabulary block, the max and the sum of
   exp(x / T - max), so that p = exp(x / T - lse) once the NB partials are combined.
2. ``_scalars_kernel``, grid (B,): the per-row scan over K (row log-sum-exps for logits, draft-token
   probabilities, capped log-weights log w_k in log space).
3. ``_partials_kernel``, grid (B * (K+1), NB): every (b, row) x vocabulary block in parallel writes
   the block sums of p and of the residual row (w_j p_{j+1} - q_{j+1})_+. For j >= 1 the residual
   sum is the level mass S_j of block verification.
4. ``_decide_kernel``, grid (B,): S_k = the NB partials summed in a fixed order, thresholds h_k,
   tau (last success; token-wise: first failure), then the inverse-CDF draw: the block is chosen
   from the cumulative block sums of the chosen row, and only that block is read again.

Everything is accumulated in float32. No construct is interpreter-only: the same code runs
compiled on a GPU and on the CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import triton
import triton.language as tl

TOKENWISE: tl.constexpr = tl.constexpr(0)
# Residual rows with at most this mass are measure-zero ties: draw from the target row instead
# (same constant as hsd.verify.common.RESIDUAL_EPS).
RESIDUAL_EPS: tl.constexpr = tl.constexpr(1e-12)


@triton.jit
def _probs(ptr, offs, mask, lse, temperature, LOGITS: tl.constexpr):
    """Probabilities at ``ptr + offs`` (0 where masked): the input itself, or exp(x / T - lse).

    Same formula as in ``_block`` (the gathered draft-token probabilities must equal the block values).
    """
    if LOGITS:
        x = tl.load(ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.exp(x / temperature - lse)
    else:
        p = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return p


@triton.jit
def _block(p_row, q_row, offs, mask, q_mask, lse_p, lse_q, w, x, temperature,
           HAS_Q: tl.constexpr, LOGITS: tl.constexpr):
    """One vocabulary block of a target row and of its residual row: (p, r), 0 where masked.

    r = (w p - q)_+, or for point-mass drafts (q = one-hot of x) w p with x removed. q is read only
    where ``q_mask`` holds (masked lanes cost no memory traffic). The probability formula is the
    one of ``_probs`` (written out: one helper call per program keeps the interpreter fast).
    """
    if LOGITS:
        p = tl.exp(tl.load(p_row + offs, mask=mask, other=float("-inf")).to(tl.float32) / temperature - lse_p)
    else:
        p = tl.load(p_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Q:
        if LOGITS:
            q = tl.exp(tl.load(q_row + offs, mask=q_mask, other=float("-inf")).to(tl.float32) / temperature
                       - lse_q)
        else:
            q = tl.load(q_row + offs, mask=q_mask, other=0.0).to(tl.float32)
        r = tl.maximum(w * p - q, 0.0)
    else:
        r = tl.where(offs == x, 0.0, w * p)
    return p, r


@triton.jit
def _row_stats_kernel(x_ptr, m_ptr, s_ptr, V, NB, temperature, BLOCK_V: tl.constexpr):
    """Logits [R, V] -> block max m [R, NB] and sum of exp(x / T - m) s [R, NB]."""
    row = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    offs = nb * BLOCK_V + tl.arange(0, BLOCK_V)
    x = tl.load(x_ptr + row * V + offs, mask=offs < V, other=float("-inf")).to(tl.float32) / temperature
    m = tl.max(x, axis=0)
    m_safe = tl.where(m > float("-inf"), m, 0.0)  # an all -inf block (top-k truncation): s = 0, no NaN
    s = tl.sum(tl.exp(x - m_safe), axis=0)
    tl.store(m_ptr + row * NB + nb, m)
    tl.store(s_ptr + row * NB + nb, s)


@triton.jit
def _combine_rows(m_ptr, s_ptr, rows, valid, NB, NB_POW2: tl.constexpr):
    """Log-sum-exp [R_POW2] of several rows from their [*, NB] block partials (fixed order)."""
    i = tl.arange(0, NB_POW2)
    offs = rows[:, None] * NB + i[None, :]
    mask = valid[:, None] & (i < NB)[None, :]
    m = tl.load(m_ptr + offs, mask=mask, other=float("-inf"))
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    mx = tl.max(m, axis=1)
    mx_safe = tl.where(mx > float("-inf"), mx, 0.0)
    return mx_safe + tl.log(tl.sum(s * tl.exp(m - mx_safe[:, None]), axis=1))


@triton.jit
def _scalars_kernel(tok_ptr, p_ptr, q_ptr, mp_ptr, sp_ptr, mq_ptr, sq_ptr, lse_p_ptr, lse_q_ptr,
                    logw_ptr, ptok_ptr, qtok_ptr, K, V, NB, temperature,
                    METHOD: tl.constexpr, HAS_Q: tl.constexpr, LOGITS: tl.constexpr,
                    K_POW2: tl.constexpr, NB_POW2: tl.constexpr):
    """The per-row scan over K (vectorised), one program per batch row b. K_POW2 >= K + 1.

    Logits: first the log-sum-exp of every row (lse_p [B, K+1], lse_q [B, K]). Then the draft-token
    probabilities p_tok = p_{j+1}(x_{j+1}), q_tok (1 for point-mass drafts) [B, K] and the level
    log-weights log_w [B, K+1]: log w_k = log R_k - max_{i<=k} log R_i (log R_0 = 0 joins the max,
    so log w <= 0 and log w_0 = 0; p_tok = 0 gives -inf, never NaN). Token-wise: log w = 0.
    """
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, K_POW2)  # draft position j (0-based) = level j + 1; also target row j
    valid = j < K
    prow = b * (K + 1) + j
    qrow = b * K + j
    if LOGITS:
        lse_p = _combine_rows(mp_ptr, sp_ptr, prow, j < K + 1, NB, NB_POW2)
        tl.store(lse_p_ptr + prow, lse_p, mask=j < K + 1)
    else:
        lse_p = 0.0
    x = tl.load(tok_ptr + qrow, mask=valid, other=0)
    p_x = tl.where(valid, _probs(p_ptr + prow * V, x, valid, lse_p, temperature, LOGITS), 1.0)
    if HAS_Q:
        if LOGITS:
            lse_q = _combine_rows(mq_ptr, sq_ptr, qrow, valid, NB, NB_POW2)
            tl.store(lse_q_ptr + qrow, lse_q, mask=valid)
        else:
            lse_q = 0.0
        q_x = tl.where(valid, _probs(q_ptr + qrow * V, x, valid, lse_q, temperature, LOGITS), 1.0)
        log_ratio = tl.log(p_x) - tl.log(q_x)
    else:
        q_x = tl.full([K_POW2], 1.0, tl.float32)
        log_ratio = tl.log(p_x)
    if METHOD == TOKENWISE:
        log_w = tl.zeros([K_POW2], dtype=tl.float32)
    else:
        log_r = tl.cumsum(log_ratio, axis=0)  # log R_{j+1}
        # Running max over i <= j as a K_POW2 x K_POW2 masked max (K is small).
        upto = j[None, :] <= j[:, None]
        run_max = tl.maximum(tl.max(tl.where(upto, log_r[None, :], float("-inf")), axis=1), 0.0)
        log_w = log_r - run_max
    tl.store(logw_ptr + prow + 1, log_w, mask=valid)
    tl.store(logw_ptr + prow, tl.zeros([K_POW2], dtype=tl.float32), mask=j == 0)
    tl.store(ptok_ptr + qrow, p_x, mask=valid)
    tl.store(qtok_ptr + qrow, q_x, mask=valid)


@triton.jit
def _partials_kernel(tok_ptr, p_ptr, q_ptr, lse_p_ptr, lse_q_ptr, logw_ptr, part_p_ptr, part_r_ptr,
                     K, V, NB, temperature,
                     HAS_Q: tl.constexpr, LOGITS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Block sums of every target row (part_p [B, K+1, NB]) and residual row (part_r [B, K, NB])."""
    row = tl.program_id(0).to(tl.int64)  # b * (K + 1) + jrow
    nb = tl.program_id(1)
    b = row // (K + 1)
    jrow = row % (K + 1)
    offs = nb * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    level = jrow < K  # rows 0..K-1 have a residual row; row K (bonus) only its p sums
    qrow = b * K + tl.minimum(jrow, K - 1)
    w = tl.exp(tl.load(logw_ptr + row))  # level jrow of batch row b
    x = tl.load(tok_ptr + qrow)
    lse_p = 0.0
    lse_q = 0.0
    if LOGITS:
        lse_p = tl.load(lse_p_ptr + row)
        if HAS_Q:
            lse_q = tl.load(lse_q_ptr + qrow)
    # q is read only for rows with a residual (a bonus-row program reads p alone).
    q_mask = offs < tl.where(level, V, 0)
    p, r = _block(p_ptr + row * V, q_ptr + qrow * V, offs, mask, q_mask, lse_p, lse_q, w, x,
                  temperature, HAS_Q, LOGITS)
    tl.store(part_p_ptr + row * NB + nb, tl.sum(p, axis=0))
    tl.store(part_r_ptr + qrow * NB + nb, tl.sum(r, axis=0), mask=level)


@triton.jit
def _decide_kernel(tok_ptr, p_ptr, q_ptr, lse_p_ptr, lse_q_ptr, logw_ptr, ptok_ptr, qtok_ptr,
                   part_p_ptr, part_r_ptr, coins_ptr, u_ptr, n_ptr, out_ptr, K, V, NB, temperature,
                   METHOD: tl.constexpr, HAS_Q: tl.constexpr, LOGITS: tl.constexpr,
                   BLOCK_V: tl.constexpr, K_POW2: tl.constexpr, NB_POW2: tl.constexpr):
    """Per batch row: tau from the coins, then the inverse-CDF token of the chosen row.

    Uniforms convention of hsd.verify: token-wise accepts position j iff coin * q <= p (and p > 0),
    stopping at the first rejection; block/HSD take tau = the last level k with coin <= h_k (h > 0).
    Token: min{v : cumsum(r)[v] > u * sum(r)} over the unnormalised row r, restricted to r > 0.
    """
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, K_POW2)
    valid = j < K
    coin = tl.load(coins_ptr + b * K + j, mask=valid, other=2.0)
    p_x = tl.load(ptok_ptr + b * K + j, mask=valid, other=1.0)
    nbi = tl.arange(0, NB_POW2)
    nb_valid = nbi < NB
    if METHOD == TOKENWISE:
        q_x = tl.load(qtok_ptr + b * K + j, mask=valid, other=1.0)
        ok = (coin * q_x <= p_x) & (p_x > 0)
        tau = tl.min(tl.where(valid & ~ok, j, K), axis=0)
    else:
        # Vector index j is level k = j + 1 (weight w_k); its mass S_k uses 0-based row k = j + 1.
        w = tl.exp(tl.load(logw_ptr + b * (K + 1) + j + 1, mask=valid, other=0.0))
        inner = j + 1 < K
        if HAS_Q:
            offs = (b * K + j + 1)[:, None] * NB + nbi[None, :]
            tile = tl.load(part_r_ptr + offs, mask=inner[:, None] & nb_valid[None, :], other=0.0)
            s = tl.sum(tile, axis=1)
        else:
            # Point-mass drafts: S_k = w_k (1 - p_{k+1}(x_{k+1})) in closed form.
            p_next = tl.load(ptok_ptr + b * K + j + 1, mask=inner, other=0.0)
            s = w * tl.maximum(1.0 - p_next, 0.0)
        den = s + 1.0 - w
        h = tl.where(den > 0, s / tl.where(den > 0, den, 1.0), 1.0)
        h = tl.minimum(tl.maximum(h, 0.0), 1.0)
        h = tl.where(j == K - 1, w, h)  # capped final test h_K = w_K
        success = valid & (coin <= h) & (h > 0)
        tau = tl.max(tl.where(success, j + 1, 0), axis=0)

    # ---- token draw from row tau: its residual, or the bonus row when tau = K ----
    prow = b * (K + 1) + tau
    jq = tl.minimum(tau, K - 1)
    qrow = b * K + jq
    part_p = tl.load(part_p_ptr + prow * NB + nbi, mask=nb_valid, other=0.0)
    part_r = tl.load(part_r_ptr + qrow * NB + nbi, mask=nb_valid, other=0.0)
    last = nbi == NB - 1
    mass_r = tl.sum(tl.where(last, tl.cumsum(part_r, axis=0), 0.0), axis=0)
    use_p = (tau == K) | (mass_r <= RESIDUAL_EPS)  # bonus row, or a measure-zero residual
    part = tl.where(use_p, part_p, part_r)
    cum = tl.cumsum(part, axis=0)
    total = tl.sum(tl.where(last, cum, 0.0), axis=0)
    thr = tl.load(u_ptr + b) * total
    # First block whose inclusive cumulative mass exceeds the threshold (never past the last block
    # with mass); then the scan inside it, starting from the mass before it.
    blk = tl.min(tl.where(nb_valid & (cum > thr), nbi, NB), axis=0)
    blk = tl.minimum(blk, tl.max(tl.where(nb_valid & (part > 0), nbi, 0), axis=0))
    before = tl.sum(tl.where(nbi == blk - 1, cum, 0.0), axis=0)

    offs = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    lse_p = 0.0
    lse_q = 0.0
    if LOGITS:
        lse_p = tl.load(lse_p_ptr + prow)
        if HAS_Q:
            lse_q = tl.load(lse_q_ptr + qrow)
    w_tau = tl.exp(tl.load(logw_ptr + prow))
    x_tau = tl.load(tok_ptr + qrow)
    q_mask = offs < tl.where(use_p, 0, V)
    p, r = _block(p_ptr + prow * V, q_ptr + qrow * V, offs, mask, q_mask, lse_p, lse_q, w_tau, x_tau,
                  temperature, HAS_Q, LOGITS)
    r = tl.where(use_p, p, r)
    c = before + tl.cumsum(r, axis=0)
    positive = mask & (r > 0)
    cand = tl.min(tl.where(positive & (c > thr), offs, V), axis=0)
    last_pos = tl.max(tl.where(positive, offs, -1), axis=0)
    token = tl.where(cand < V, cand, last_pos)
    tl.store(n_ptr + b, tau.to(tl.int64))
    tl.store(out_ptr + b, token.to(tl.int64))
