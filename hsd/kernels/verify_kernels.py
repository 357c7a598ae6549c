"""Triton kernels of single-chain verification (token-wise, block verification / HSD): one fused launch.

Notation (docs/verification.md). Request b drafts K_b tokens x_1..x_{K_b} (``tokens[b, :K_b]``; the first
-1 ends the block, so K_b can be 0). Target row j of request b is p_{j+1} (j = 0..K_b; row K_b is the
bonus row), draft row j is q_{j+1} (j < K_b). Level k (1..K_b) means "accept x_1..x_k"; the residual
row of tau = k < K_b is (w_k p_{k+1} - q_{k+1})_+ with w_0 = 1.

``_verify_kernel``, grid (B * (K_MAX + 1) * NB,), ordered so that the programs of one request are
adjacent (they finish together). Program (b, j, nb):

1. for a residual row j >= 1 of a block method, gathers the draft-token probabilities of its request
   (2 K_b scalars, L2-resident after the first program) and forms its weight from the log-weights
   log w_k = min(0, log w_{k-1} + log p_k(x_k) - log q_k(x_k)), in closed, loop-free form;
2. streams vocabulary block nb of target row j (and draft row j): the block sums of p and of the
   residual row (w_j p - q)_+, written to a small workspace (greedy rows: block max and argmax);
3. arrives on the per-request counter. The last program of a request (an acq_rel atomic sees every
   other program's partials) resets the counter to 0, so no memset is needed between calls and a
   CUDA graph can replay the launch, and then decides: thresholds h_k = S_k / (S_k + 1 - w_k) from
   the partial sums (h_{K_b} = w_{K_b}), tau (last success; token-wise: first failure; greedy: first
   draft token that is not the argmax), and the next token by a two-level inverse CDF: the block from
   the cumulative block sums of the chosen row, then one re-read of that block only.

p and q are read once. Inputs are processed probabilities (``LOGITS`` False) or raw logits with a
per-request temperature, per-row logit thresholds (top-k/top-p) and a per-row log-sum-exp (given by the
producer, or computed by ``_lse_kernel`` first). Draft rows may live on a draft vocabulary
(``DRAFT_VOCAB``: ``t2d[v]`` is the draft index of target id v, -1 outside). Uniforms come from
Philox keyed by (seed[b], step[b]) (``PHILOX``), or from explicit tensors (tests, and the public
``verify(..., uniforms=...)``).

Fail-closed numerics: a draft token with q = 0 gives the limit w = 1 (ratio +inf), NaN steps give
w = 0, NaN thresholds never succeed, out-of-range draft ids are rejected; ``flags`` records each case.
Everything is accumulated in float32; no construct is interpreter-only (the same code runs compiled on
a GPU and on the CPU under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import triton
import triton.language as tl

TOKENWISE: tl.constexpr = tl.constexpr(0)
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
# Residual rows with at most this mass are measure-zero ties: draw from the target row instead
# (same constant as hsd.verify.common.RESIDUAL_EPS).
RESIDUAL_EPS: tl.constexpr = tl.constexpr(1e-12)
# Bits of the per-request ``flags`` output (hsd.kernels.plan.FLAGS documents them for callers).
FLAG_NAN: tl.constexpr = tl.constexpr(1)
FLAG_Q_ZERO: tl.constexpr = tl.constexpr(2)
FLAG_TOKEN_RANGE: tl.constexpr = tl.constexpr(4)
FLAG_EMPTY_RESIDUAL: tl.constexpr = tl.constexpr(8)


@triton.jit
def _probs(ptr, offs, mask, scale, lse2, thr, LOGITS: tl.constexpr):
    """Probabilities at ``ptr + offs`` (0 where masked): as stored, or exp2(x * scale - lse2) where the
    logit x >= thr (scale = log2(e) / T, lse2 = log2-sum-exp of x * scale; one FMA and one ex2)."""
    if LOGITS:
        x = tl.load(ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.where(x >= thr, tl.exp2(x * scale - lse2), 0.0)
    else:
        p = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return p


@triton.jit
def _draft_probs(row_ptr, offs, mask, t2d_ptr, scale, lse2, thr, LOGITS: tl.constexpr,
                 DRAFT_VOCAB: tl.constexpr):
    """q at target ids ``offs`` of one draft row; with a draft vocabulary the row is indexed by
    t2d[offs] and ids outside it have q = 0 (the map is tiny and stays in L2)."""
    if DRAFT_VOCAB:
        di = tl.load(t2d_ptr + offs, mask=mask, other=-1)
        q = _probs(row_ptr, di, mask & (di >= 0), scale, lse2, thr, LOGITS)
    else:
        q = _probs(row_ptr, offs, mask, scale, lse2, thr, LOGITS)
    return q


@triton.jit
def _token_probs(p_row0, p_sk, q_row0, q_sk, t2d_ptr, x, in_range, valid, lanes, b, K_MAX, scale,
                 lse_p_ptr, thr_p_ptr, lse_q_ptr, thr_q_ptr,
                 HAS_Q: tl.constexpr, LOGITS: tl.constexpr, DRAFT_VOCAB: tl.constexpr):
    """Draft-token probabilities p_{i+1}(x_{i+1}) and q_{i+1}(x_{i+1}) per lane i (0 past K_b; q = 1 for
    point-mass drafts): 2 K_b gathered scalars, L2-resident after the first program of the request."""
    if LOGITS:
        side = b * (K_MAX + 1) + lanes
        xl = tl.load(p_row0 + lanes * p_sk + x, mask=in_range, other=float("-inf")).to(tl.float32)
        lse2 = tl.load(lse_p_ptr + side, mask=valid, other=0.0) * LOG2E
        p_x = tl.where(xl >= tl.load(thr_p_ptr + side, mask=valid, other=0.0), tl.exp2(xl * scale - lse2), 0.0)
    else:
        p_x = tl.load(p_row0 + lanes * p_sk + x, mask=in_range, other=0.0).to(tl.float32)
    if HAS_Q:
        xq = x
        q_ok = in_range
        if DRAFT_VOCAB:  # a token outside the draft vocabulary has q = 0
            xq = tl.load(t2d_ptr + x, mask=in_range, other=-1).to(tl.int64)
            q_ok = in_range & (xq >= 0)
        if LOGITS:
            side = b * K_MAX + lanes
            xl = tl.load(q_row0 + lanes * q_sk + xq, mask=q_ok, other=float("-inf")).to(tl.float32)
            lse2 = tl.load(lse_q_ptr + side, mask=valid, other=0.0) * LOG2E
            q_x = tl.where(xl >= tl.load(thr_q_ptr + side, mask=valid, other=0.0), tl.exp2(xl * scale - lse2), 0.0)
        else:
            q_x = tl.load(q_row0 + lanes * q_sk + xq, mask=q_ok, other=0.0).to(tl.float32)
    else:
        q_x = tl.where(in_range, 1.0, 0.0)  # point-mass draft: q = 1 on the drafted token
    return p_x, q_x


@triton.jit
def _log_weights(p_x, q_x, lanes):
    """Lane k: log w_k (k = 0..K_b), from the token probabilities of positions 1..k.

    log w_k = min(0, log w_{k-1} + d_k), d = log p - log q, unrolls to the min over j <= k of the sums of
    d over positions j+1..k (the empty sum 0 included). A sum holding a -inf or a NaN (p = 0, 0 * inf)
    is -inf (fail closed, and it stays -inf); else one holding +inf (q = 0) is +inf; else it is a
    difference of exclusive prefix sums. Vectorised over a [K_POW2, K_POW2] tile: no loop, no NaN.
    """
    d = tl.log(p_x) - tl.log(q_x)
    bad = ((d != d) | (d == float("-inf"))).to(tl.int32)
    pos_inf = (d == float("inf")).to(tl.int32)
    finite = tl.where((bad + pos_inf) > 0, 0.0, d)
    e_fin = tl.cumsum(finite, axis=0) - finite
    e_bad = tl.cumsum(bad, axis=0) - bad
    e_inf = tl.cumsum(pos_inf, axis=0) - pos_inf
    sums = tl.where(e_bad[:, None] > e_bad[None, :], float("-inf"),
                    tl.where(e_inf[:, None] > e_inf[None, :], float("inf"), e_fin[:, None] - e_fin[None, :]))
    sums = tl.where(lanes[None, :] <= lanes[:, None], sums, float("inf"))
    return tl.minimum(tl.min(sums, axis=1), 0.0)


@triton.jit
def philox_lanes(seed_ptr, step_ptr, b, lanes):
    """Uniforms of request b from Philox4x32-10 keyed by seed[b]: one block per lane with counter
    (lane, step_lo, 0, step_hi); word 0 of block i is the coin of lane i, word 1 of block 0 is u.
    (``hsd.verify.serving.philox_uniforms`` reproduces it; the tree kernel uses the same stream.)"""
    seed = tl.load(seed_ptr + b)
    step = tl.load(step_ptr + b)
    zero = (lanes * 0).to(tl.uint32)
    lo = zero + (step & 0xFFFFFFFF).to(tl.uint32)
    hi = zero + ((step >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c_coin, c_u, _, _ = tl.philox(seed, lanes.to(tl.uint32), lo, zero, hi)
    return tl.uint_to_uniform_float(c_coin), _lane(tl.uint_to_uniform_float(c_u), lanes, 0)


@triton.jit
def _lane(v, lanes, i):
    """Scalar v[i] of a lane vector (v may hold -inf: exactly one lane is selected)."""
    return tl.sum(tl.where(lanes == i, v, 0), axis=0)


@triton.jit
def _shift(v, lanes):
    """out[i] = v[i + 1] (0 past the end), as a tiny [K_POW2, K_POW2] selection."""
    return tl.sum(tl.where(lanes[None, :] == lanes[:, None] + 1, v[None, :], 0), axis=1)


@triton.jit(do_not_specialize=["b0", "K_MAX", "NB", "tok_sb", "coins_sb"])
def _verify_kernel(tok_ptr, tok_sb,
                   p_ptr, p_rows_ptr, p_sb, p_sk,
                   q_ptr, q_rows_ptr, q_sb, q_sk, t2d_ptr,
                   temp_ptr, lse_p_ptr, lse_q_ptr, thr_p_ptr, thr_q_ptr,
                   seed_ptr, step_ptr, coins_ptr, coins_sb, u_ptr,
                   part_p_ptr, part_r_ptr, part_i_ptr, count_ptr,
                   n_ptr, next_ptr, emit_ptr, flag_ptr,
                   b0, V, NB, K_MAX,
                   METHOD: tl.constexpr, HAS_Q: tl.constexpr, LOGITS: tl.constexpr,
                   DRAFT_VOCAB: tl.constexpr, PHILOX: tl.constexpr,
                   BLOCK_V: tl.constexpr, K_POW2: tl.constexpr, NB_POW2: tl.constexpr,
                   DRAW: tl.constexpr, TILE: tl.constexpr):
    """One fused verification launch (see the module docstring). K_POW2 >= K_MAX + 1.

    Rows: element offset of target row j of request b = p_rows[b] * p_sk + b * p_sb + j * p_sk (dense
    [B, K+1, V]: p_rows = 0; flattened [N, V]: p_sb = 0, p_rows[b] = first row of b); same for q.
    Side data (lse, thresholds) is dense [B, K_MAX + 1] (target) and [B, K_MAX] (draft).
    """
    pid = tl.program_id(0)
    nb = pid % NB
    rj = pid // NB
    j = rj % (K_MAX + 1)
    b = (b0 + rj // (K_MAX + 1)).to(tl.int64)
    lanes = tl.arange(0, K_POW2)

    # ---- request data: K_b, draft tokens, temperature, row offsets ----
    tok = tl.load(tok_ptr + b * tok_sb + lanes, mask=lanes < K_MAX, other=-1).to(tl.int64)
    kb = tl.min(tl.where(tok < 0, lanes, K_MAX), axis=0)
    valid = lanes < kb
    in_range = valid & (tok < V)
    x = tl.where(in_range, tok, 0)
    temp = tl.load(temp_ptr + b)
    greedy = temp == 0.0
    scale = LOG2E / tl.where(greedy, 1.0, temp)
    p_base = tl.load(p_rows_ptr + b).to(tl.int64) * p_sk + b * p_sb
    q_base = tl.load(q_rows_ptr + b).to(tl.int64) * q_sk + b * q_sb

    # ---- stream block nb of target row j (and draft row j) ----
    offs = nb * BLOCK_V + tl.arange(0, BLOCK_V)
    active = j <= kb  # rows past the bonus row are padding: no traffic
    level = j < kb  # rows with a residual
    # (masks are built as offs < where(flag, V, 0): the interpreter mishandles tensor & scalar-bool)
    v_active = tl.where(active, V, 0)
    v_level = tl.where(level, V, 0)
    jq = tl.maximum(tl.minimum(j, K_MAX - 1), 0)  # an in-bounds draft row / side-data index
    part = (b * (K_MAX + 1) + j) * NB + nb
    row_p = p_ptr + p_base + j * p_sk
    if greedy:
        xv = tl.load(row_p + offs, mask=offs < v_active, other=float("-inf")).to(tl.float32)
        m = tl.max(xv, axis=0)
        tl.store(part_p_ptr + part, m)
        tl.store(part_i_ptr + part, tl.min(tl.where(xv == m, offs, V), axis=0).to(tl.int32))
    else:
        if LOGITS:
            xv = tl.load(row_p + offs, mask=offs < v_active, other=float("-inf")).to(tl.float32)
            lse2 = tl.load(lse_p_ptr + b * (K_MAX + 1) + j) * LOG2E
            p = tl.where(xv >= tl.load(thr_p_ptr + b * (K_MAX + 1) + j), tl.exp2(xv * scale - lse2), 0.0)
        else:
            p = tl.load(row_p + offs, mask=offs < v_active, other=0.0).to(tl.float32)
        w = tl.full([], 1.0, tl.float32)  # w_0 = 1; the bonus row has no residual
        if METHOD != TOKENWISE:
            if (j > 0) & level:
                p_x, q_x = _token_probs(p_ptr + p_base, p_sk, q_ptr + q_base, q_sk, t2d_ptr, x, in_range, valid,
                                        lanes, b, K_MAX, scale, lse_p_ptr, thr_p_ptr, lse_q_ptr, thr_q_ptr,
                                        HAS_Q, LOGITS, DRAFT_VOCAB)
                w = tl.exp(tl.sum(tl.where(lanes == j, _log_weights(p_x, q_x, lanes), 0.0), axis=0))
        if HAS_Q:
            row_q = q_ptr + q_base + jq * q_sk
            q_offs = offs
            q_mask = offs < v_level
            if DRAFT_VOCAB:  # the draft row is indexed by t2d (tiny, L2-resident); ids outside it: q = 0
                q_offs = tl.load(t2d_ptr + offs, mask=q_mask, other=-1)
                q_mask = q_mask & (q_offs >= 0)
            if LOGITS:
                xv = tl.load(row_q + q_offs, mask=q_mask, other=float("-inf")).to(tl.float32)
                lse2 = tl.load(lse_q_ptr + b * K_MAX + jq) * LOG2E
                q = tl.where(xv >= tl.load(thr_q_ptr + b * K_MAX + jq), tl.exp2(xv * scale - lse2), 0.0)
            else:
                q = tl.load(row_q + q_offs, mask=q_mask, other=0.0).to(tl.float32)
            r = tl.maximum(w * p - q, 0.0)
        else:  # point-mass draft: the residual is w p without the drafted token
            r = tl.where(offs == tl.sum(tl.where(lanes == j, x, 0), axis=0), 0.0, w * p)
        tl.store(part_p_ptr + part, tl.sum(p, axis=0))
        tl.store(part_r_ptr + part, tl.sum(tl.where(level, r, 0.0), axis=0))

    # ---- arrival: the last program of request b decides ----
    tl.debug_barrier()  # every thread's partial store happens before the release below
    arrived = tl.atomic_add(count_ptr + b, 1, sem="acq_rel", scope="gpu")
    if arrived == (K_MAX + 1) * NB - 1:
        tl.store(count_ptr + b, 0)  # self-reset: all programs of b have arrived
        row0 = b * (K_MAX + 1)
        flags = tl.where(tl.max((valid & (tok >= V)).to(tl.int32), axis=0) > 0, FLAG_TOKEN_RANGE, 0)
        # The [K_POW2, NB] tiles of block partials are read in chunks of TILE columns (registers).
        if greedy:
            row_max = tl.full([K_POW2], float("-inf"), tl.float32)
            arg = tl.full([K_POW2], V, tl.int32)
            for n0 in range(0, NB_POW2, TILE):
                cols = n0 + tl.arange(0, TILE)
                tile = (row0 + lanes)[:, None] * NB + cols[None, :]
                tmask = (lanes <= kb)[:, None] & (cols < NB)[None, :]
                t_max = tl.load(part_p_ptr + tile, mask=tmask, other=float("-inf"), cache_modifier=".cg")
                t_arg = tl.load(part_i_ptr + tile, mask=tmask, other=V, cache_modifier=".cg")
                c_max = tl.max(t_max, axis=1)
                c_arg = tl.min(tl.where(t_max == c_max[:, None], t_arg, V), axis=1)
                arg = tl.where(c_max > row_max, c_arg, arg)  # ties keep the earlier (lower) id
                row_max = tl.maximum(row_max, c_max)
            arg = arg.to(tl.int64)
            tau = tl.min(tl.where(valid & (x != arg), lanes, kb), axis=0)
            token = _lane(arg, lanes, tau)
            flags = flags | tl.where(token < V, 0, FLAG_NAN)  # only a NaN row has no argmax
            token = tl.where(token < V, token, 0).to(tl.int64)
        else:
            p_x, q_x = _token_probs(p_ptr + p_base, p_sk, q_ptr + q_base, q_sk, t2d_ptr, x, in_range, valid, lanes,
                                    b, K_MAX, scale, lse_p_ptr, thr_p_ptr, lse_q_ptr, thr_q_ptr,
                                    HAS_Q, LOGITS, DRAFT_VOCAB)
            if METHOD == TOKENWISE:
                log_w = tl.zeros([K_POW2], dtype=tl.float32)
            else:
                log_w = _log_weights(p_x, q_x, lanes)
            flags = flags | tl.where(tl.max((in_range & (q_x == 0.0)).to(tl.int32), axis=0) > 0, FLAG_Q_ZERO, 0)
            nan = valid & ((p_x != p_x) | (q_x != q_x))
            flags = flags | tl.where(tl.max(nan.to(tl.int32), axis=0) > 0, FLAG_NAN, 0)
            if PHILOX:
                coin, u = philox_lanes(seed_ptr, step_ptr, b, lanes)
            else:
                coin = tl.load(coins_ptr + b * coins_sb + lanes, mask=valid, other=2.0).to(tl.float32)
                u = tl.load(u_ptr + b).to(tl.float32)
            if METHOD == TOKENWISE:
                ok = (coin * q_x <= p_x) & (p_x > 0)
                tau = tl.min(tl.where(valid & ~ok, lanes, kb), axis=0)
            else:
                # lane i is level k = i + 1: weight w_k, mass S_k from 0-based row k = i + 1
                w = tl.exp(_shift(log_w, lanes))
                inner = lanes + 1 < kb
                if HAS_Q:
                    s = tl.zeros([K_POW2], dtype=tl.float32)
                    for n0 in range(0, NB_POW2, TILE):
                        cols = n0 + tl.arange(0, TILE)
                        tile = (row0 + lanes + 1)[:, None] * NB + cols[None, :]
                        s += tl.sum(tl.load(part_r_ptr + tile, mask=inner[:, None] & (cols < NB)[None, :], other=0.0,
                                            cache_modifier=".cg"), axis=1)
                else:  # point-mass drafts: S_k = w_k (1 - p_{k+1}(x_{k+1})) in closed form
                    s = w * tl.maximum(1.0 - _shift(p_x, lanes), 0.0)
                den = s + 1.0 - w
                # den <= 0 only when w = 1 and p = q (h = 1); a NaN fails closed (h = 0)
                h = tl.where(den > 0, s / tl.where(den > 0, den, 1.0), tl.where(den <= 0, 1.0, 0.0))
                flags = flags | tl.where(tl.max((inner & (den != den)).to(tl.int32), axis=0) > 0, FLAG_NAN, 0)
                h = tl.where(h == h, tl.minimum(tl.maximum(h, 0.0), 1.0), 0.0)
                h = tl.where(lanes == kb - 1, w, h)  # capped final test h_K = w_K
                success = valid & (coin <= h) & (h > 0)
                tau = tl.max(tl.where(success, lanes + 1, 0), axis=0)
            token, empty = _draw(p_ptr + p_base, p_sk, q_ptr + q_base, q_sk, t2d_ptr, part_p_ptr, part_r_ptr,
                                 row0, tau, kb, _lane(x, lanes, tau), tl.exp(_lane(log_w, lanes, tau)), u, NB,
                                 V, scale, lse_p_ptr, thr_p_ptr, lse_q_ptr, thr_q_ptr, b * K_MAX,
                                 HAS_Q, LOGITS, DRAFT_VOCAB, BLOCK_V, NB_POW2, DRAW)
            token = token.to(tl.int64)
            flags = flags | tl.where(empty, FLAG_EMPTY_RESIDUAL, 0)
        tl.store(n_ptr + b, tau.to(tl.int64))
        tl.store(next_ptr + b, token.to(tl.int64))
        emit = tl.where(lanes < tau, x, tl.where(lanes == tau, token, -1))
        tl.store(emit_ptr + b * (K_MAX + 1) + lanes, emit.to(tl.int64), mask=lanes <= K_MAX)
        tl.store(flag_ptr + b, flags.to(tl.int32))


@triton.jit
def _draw(p_row0, p_sk, q_row0, q_sk, t2d_ptr, part_p_ptr, part_r_ptr, row0, tau, kb, x_tau, w_tau, u,
          NB, V, scale, lse_p_ptr, thr_p_ptr, lse_q_ptr, thr_q_ptr, side_q0,
          HAS_Q: tl.constexpr, LOGITS: tl.constexpr, DRAFT_VOCAB: tl.constexpr,
          BLOCK_V: tl.constexpr, NB_POW2: tl.constexpr, DRAW: tl.constexpr):
    """Next token: min{v : cumsum(r)[v] > u * sum(r)} over the row r of tau (its residual, or the bonus
    row p when tau = K_b, or p when the residual has no mass), restricted to r > 0. The block comes from
    the cumulative block sums, then only that block is read again. Returns (token, empty residual)."""
    nbi = tl.arange(0, NB_POW2)
    nb_ok = nbi < NB
    prow = row0 + tau
    part_p = tl.load(part_p_ptr + prow * NB + nbi, mask=nb_ok, other=0.0, cache_modifier=".cg")
    part_r = tl.load(part_r_ptr + prow * NB + nbi, mask=nbi < tl.where(tau < kb, NB, 0), other=0.0,
                     cache_modifier=".cg")
    mass_r = tl.sum(part_r, axis=0)
    empty = (tau < kb) & ~(mass_r > RESIDUAL_EPS)  # a measure-zero tie (or NaN): use the target row
    use_p = (tau == kb) | empty
    part = tl.where(use_p, part_p, part_r)
    cum = tl.cumsum(part, axis=0)
    total = tl.sum(tl.where(nbi == NB - 1, cum, 0.0), axis=0)
    thr = u * total
    # first block whose inclusive cumulative mass exceeds the threshold (never past the last block with
    # mass); then the scan inside it, starting from the mass before it
    blk = tl.min(tl.where(nb_ok & (cum > thr), nbi, NB), axis=0)
    blk = tl.minimum(blk, tl.max(tl.where(nb_ok & (part > 0), nbi, 0), axis=0))
    before = tl.sum(tl.where(nbi == blk - 1, cum, 0.0), axis=0)
    lse2 = 0.0
    thr_v = 0.0
    lse2_q = 0.0
    thr_q = 0.0
    if LOGITS:
        lse2 = tl.load(lse_p_ptr + prow) * LOG2E
        thr_v = tl.load(thr_p_ptr + prow)
        if HAS_Q:
            tq = tl.maximum(tl.minimum(tau, kb - 1), 0)  # in bounds; unused when tau = K_b
            lse2_q = tl.load(lse_q_ptr + side_q0 + tq) * LOG2E
            thr_q = tl.load(thr_q_ptr + side_q0 + tq)
    # The block is scanned in chunks of DRAW so that this once-per-request step does not raise the
    # register count of the whole (streaming) kernel; the cumulative mass is carried across chunks,
    # so the first chunk with a candidate holds the token.
    token = tl.full([], V, tl.int32)
    last_pos = tl.full([], -1, tl.int32)
    mass = before
    q_len = tl.where(use_p, 0, V)
    for c0 in range(0, BLOCK_V, DRAW):
        offs = blk * BLOCK_V + c0 + tl.arange(0, DRAW)
        in_v = offs < V
        p = _probs(p_row0 + tau * p_sk, offs, in_v, scale, lse2, thr_v, LOGITS)
        if HAS_Q:
            q = _draft_probs(q_row0 + tau * q_sk, offs, offs < q_len, t2d_ptr, scale, lse2_q, thr_q, LOGITS,
                             DRAFT_VOCAB)
            r = tl.maximum(w_tau * p - q, 0.0)
        else:
            r = tl.where(offs == x_tau, 0.0, w_tau * p)
        r = tl.where(use_p, p, r)
        c = mass + tl.cumsum(r, axis=0)
        positive = in_v & (r > 0)
        token = tl.minimum(token, tl.min(tl.where(positive & (c > thr), offs, V), axis=0))
        last_pos = tl.maximum(last_pos, tl.max(tl.where(positive, offs, -1), axis=0))
        mass = mass + tl.sum(r, axis=0)
    token = tl.where(token < V, token, tl.maximum(last_pos, 0))
    return token, empty


@triton.jit(do_not_specialize=["b0", "K_MAX", "ROWS", "tok_sb"])
def _lse_kernel(tok_ptr, tok_sb, x_ptr, rows_ptr, sb, sk, temp_ptr, thr_ptr, lse_ptr,
                b0, K_MAX, ROWS, LEN, IS_DRAFT: tl.constexpr, BLOCK_V: tl.constexpr, K_POW2: tl.constexpr):
    """Fallback when the producer gives no log-sum-exp: one program per row (b, j) of a logits tensor
    (target: ROWS = K_MAX + 1 rows per request, j <= K_b; draft: ROWS = K_MAX, j < K_b) writes
    lse[b * ROWS + j] = log sum_{x >= thr} exp(x / T) (natural log), by an online max/sum over the row.
    Greedy rows (T = 0) and padding rows are skipped."""
    pid = tl.program_id(0)
    j = pid % ROWS
    b = (b0 + pid // ROWS).to(tl.int64)
    lanes = tl.arange(0, K_POW2)
    tok = tl.load(tok_ptr + b * tok_sb + lanes, mask=lanes < K_MAX, other=-1)
    kb = tl.min(tl.where(tok < 0, lanes, K_MAX), axis=0)
    temp = tl.load(temp_ptr + b)
    if IS_DRAFT:
        active = (temp > 0) & (j < kb)
    else:
        active = (temp > 0) & (j <= kb)
    scale = LOG2E / tl.where(temp > 0, temp, 1.0)
    thr = tl.load(thr_ptr + b * ROWS + j)
    row = x_ptr + tl.load(rows_ptr + b).to(tl.int64) * sk + b * sb + j * sk
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    for start in range(0, LEN, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        xv = tl.load(row + offs, mask=offs < tl.where(active, LEN, 0), other=float("-inf")).to(tl.float32)
        xv = tl.where(xv >= thr, xv * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(xv, axis=0))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # an all -inf block: no NaN
        s = s * tl.exp2(m - m_safe) + tl.sum(tl.exp2(xv - m_safe), axis=0)
        m = m_new
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    tl.store(lse_ptr + b * ROWS + j, (m_safe + tl.log2(s)) / LOG2E, mask=active)
