"""Triton kernel of draft-tree verification (``verify_tree``: greedy, rrs, weighted): one fused launch.

Same contract as :mod:`hsd.verify.tree` (read its docstring first): request b holds N nodes listed
parents first, node i has token ``tok[b, i]`` and parent ``par[b, i]`` (-1 root, -2 padding); slot
s = i + 1 addresses node i and slot 0 the root; target row s is ``p[b, s]``, draft row i is ``q[b, i]``
(the law node i was drawn from; none: point masses).

``_verify_tree_kernel``, grid (B,): one program per tree walks the nodes in index order, exactly as
``tree_levels`` does. For node i with parent slot a it gathers P_a(x_i) and q_i(x_i), updates the
path weights (weighted: log R, running max M) or the node test (rrs: min(1, P/q)), and then streams
the vocabulary once to form the parent's state "after this child's subtree failed": the residual
(w P_a - q_i)_+ is written over the parent's row in the caller's workspace ``cur`` [B, N+1, V] (P_a is
read from there once a child of a has failed; before that it is the target row, read in place), with
its mass and new weight kept in registers. Then, in registers: the node tests with the coins, the
selection (rrs: the first passing child at every node; weighted: the first passing node in post-order,
found as the first child whose subtree passes), the accepted path, and the next token by inverse CDF
over the last accepted slot's row (one pass for its mass, one scan).

Uniforms come from Philox keyed by (seed[b], step[b]) with the chain kernel's layout (coin of node i =
word 0 of block i, u = word 1 of block 0; ``hsd.verify.serving.philox_uniforms`` reproduces them) or
from explicit tensors. Nothing reads values on the host and every buffer belongs to the caller, so a
launch can be captured in a CUDA graph. Fail-closed: a NaN weight or test never passes.

Cost: the tree is sequential (each node's residual depends on its earlier siblings), so one program per
tree streams about 3 N V floats; at small batch this is latency-bound on a GPU (B programs). The chain
kernel (``verify_kernels``) spreads a chain over vocabulary blocks instead; a blocked tree variant is
future work. Accumulation in float32; the same code runs compiled and under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import triton
import triton.language as tl

from hsd.kernels.verify_kernels import philox_lanes

RRS: tl.constexpr = tl.constexpr(0)
WEIGHTED: tl.constexpr = tl.constexpr(1)
GREEDY: tl.constexpr = tl.constexpr(2)
RESIDUAL_EPS: tl.constexpr = tl.constexpr(1e-12)  # as hsd.verify.common.RESIDUAL_EPS


@triton.jit
def _get(v, lanes, i):
    """Scalar v[i] of a lane vector (only lane i is summed, so other lanes' inf/NaN do not leak)."""
    return tl.sum(tl.where(lanes == i, v, 0), axis=0)


@triton.jit
def _slot_row(cur_row, p_row, offs, V, use_cur):
    """Entries ``offs`` of a slot's current row as float32: its residual in the workspace (``use_cur``) or
    its target row (two masked loads: the pointers have different element types; only one reads)."""
    in_cur = offs < tl.where(use_cur, V, 0)
    in_p = offs < tl.where(use_cur, 0, V)
    return tl.load(cur_row + offs, mask=in_cur, other=0.0) + tl.load(p_row + offs, mask=in_p, other=0.0).to(tl.float32)


@triton.jit
def _slot_sum(cur_row, p_row, V, use_cur, BLOCK_V: tl.constexpr):
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    for v0 in range(0, V, BLOCK_V):
        s += tl.sum(_slot_row(cur_row, p_row, v0 + tl.arange(0, BLOCK_V), V, use_cur), axis=0)
    return s


@triton.jit
def _row_sum(row_ptr, V, BLOCK_V: tl.constexpr):
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        s += tl.sum(tl.load(row_ptr + offs, mask=offs < V, other=0.0).to(tl.float32), axis=0)
    return s


@triton.jit
def _row_argmax(row_ptr, V, BLOCK_V: tl.constexpr):
    """First index of the maximum of a row."""
    best = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
    arg = tl.min(tl.full([BLOCK_V], 0, tl.int32), axis=0) + V
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        a = tl.min(tl.where(x == m, offs, V), axis=0)
        arg = tl.where(m > best, a, arg)  # ties keep the earlier block
        best = tl.maximum(best, m)
    return arg


@triton.jit(do_not_specialize=["tok_sb", "par_sb", "coins_sb", "path_sb", "N"])
def _verify_tree_kernel(tok_ptr, tok_sb, par_ptr, par_sb,
                        p_ptr, p_sb, p_sk, q_ptr, q_sb, q_sk, cur_ptr, cur_sb, cur_sk,
                        seed_ptr, step_ptr, coins_ptr, coins_sb, u_ptr,
                        path_ptr, path_sb, n_ptr, next_ptr,
                        N, V,
                        METHOD: tl.constexpr, HAS_Q: tl.constexpr, PHILOX: tl.constexpr,
                        BLOCK_V: tl.constexpr, N_POW2: tl.constexpr):
    """One tree per program (module docstring). N_POW2 >= N + 1 (lanes address slots 0..N; node
    vectors use lane i for node i). Outputs: path [B, N] (-1 padded), n [B], next [B]."""
    b = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, N_POW2)
    node = lanes < N
    tok = tl.load(tok_ptr + b * tok_sb + lanes, mask=node, other=0).to(tl.int64)
    parent = tl.load(par_ptr + b * par_sb + lanes, mask=node, other=-2).to(tl.int64)
    real = node & (parent != -2)
    pslot = tl.where(real, parent + 1, 0)  # parent slot of node i (lane i)
    tok = tl.where(real & (tok >= 0) & (tok < V), tok, 0)
    p_b = p_ptr + b * p_sb
    q_b = q_ptr + b * q_sb
    cur_b = cur_ptr + b * cur_sb

    # depth of every slot (lane s): parents come first, so one pass in index order
    depth = tl.zeros([N_POW2], tl.int64)
    for i in range(N):
        d = _get(depth, lanes, _get(pslot, lanes, i)) + 1
        depth = tl.where((lanes == i + 1) & (_get(real.to(tl.int32), lanes, i) > 0), d, depth)

    if METHOD == GREEDY:
        # ok[s]: every token on the root path of s is the target argmax at its parent
        ok = lanes == 0
        best_all = tl.zeros([N_POW2], tl.int64)
        for s in range(N + 1):
            best_all = tl.where(lanes == s, _row_argmax(p_b + s * p_sk, V, BLOCK_V).to(tl.int64), best_all)
        for i in range(N):
            a = _get(pslot, lanes, i)
            hit = (_get(real.to(tl.int32), lanes, i) > 0) & (_get(ok.to(tl.int32), lanes, a) > 0) & \
                (_get(tok, lanes, i) == _get(best_all, lanes, a))
            ok = tl.where(lanes == i + 1, hit, ok)
        score = tl.where(ok & (lanes <= N), depth * (N + 1) + (N - lanes), -1)
        top = tl.max(score, axis=0)
        last = tl.min(tl.where(score == top, lanes, N_POW2), axis=0).to(tl.int64)
        # the accepted path: `last` and its ancestors (walk up; every one of them is ok)
        on_path = lanes == last
        s_cur = last
        for _ in range(N):
            up = tl.where(s_cur > 0, _get(pslot, lanes, s_cur - 1), 0)
            on_path = on_path | (lanes == up)
            s_cur = up
        token = _get(best_all, lanes, last)
    else:
        # ---- per-slot state (lane s) and per-node numbers (lane i) ----
        mass = tl.full([N_POW2], 1.0, tl.float32)
        has_res = lanes < 0  # slot s's row lives in cur (a child of s has failed)
        log_r = tl.zeros([N_POW2], tl.float32)
        log_m = tl.zeros([N_POW2], tl.float32)
        h = tl.zeros([N_POW2], tl.float32)
        p_tok = tl.zeros([N_POW2], tl.float32)
        q_tok = tl.full([N_POW2], 1.0, tl.float32)
        for i in range(N):
            if _get(real.to(tl.int32), lanes, i) > 0:
                a = _get(pslot, lanes, i)
                x = _get(tok, lanes, i)
                m_a = _get(mass, lanes, a)
                res_a = _get(has_res.to(tl.int32), lanes, a) > 0
                empty = res_a & ~(m_a > RESIDUAL_EPS)
                # the parent's current normalised row P_a: its residual / mass, else its target row
                # (normalised by its sum only where a residual had no mass, as current_row does)
                scale = tl.where(res_a, 1.0 / tl.where(m_a > 0, m_a, 1.0), 1.0)
                if empty:
                    scale = 1.0 / _row_sum(p_b + a * p_sk, V, BLOCK_V)
                use_cur = res_a & ~empty
                cur_a = cur_b + a * cur_sk
                p_a = p_b + a * p_sk
                px = _slot_row(cur_a, p_a, x, V, use_cur) * scale
                if HAS_Q:
                    qx = tl.load(q_b + i * q_sk + x).to(tl.float32)
                else:
                    qx = 1.0
                p_tok = tl.where(lanes == i, px, p_tok)
                q_tok = tl.where(lanes == i, qx, q_tok)
                lr_a = _get(log_r, lanes, a)
                lm_a = _get(log_m, lanes, a)
                if METHOD == WEIGHTED:
                    lr = lr_a + (tl.log(px) - tl.log(qx))
                    log_r = tl.where(lanes == i + 1, lr, log_r)
                    log_m = tl.where(lanes == i + 1, tl.maximum(lm_a, lr), log_m)
                    w = tl.exp(lr_a - lm_a)
                else:
                    h = tl.where(lanes == i, tl.minimum(px / qx, 1.0), h)
                    w = 1.0
                # stream the vocabulary: the parent's residual once this child's subtree failed
                r_mass = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
                for v0 in range(0, V, BLOCK_V):
                    offs = v0 + tl.arange(0, BLOCK_V)
                    inside = offs < V
                    row = _slot_row(cur_a, p_a, offs, V, use_cur) * scale
                    if HAS_Q:
                        q = tl.load(q_b + i * q_sk + offs, mask=inside, other=0.0).to(tl.float32)
                        r = tl.maximum(w * row - q, 0.0)
                    else:
                        r = tl.where(offs == x, 0.0, w * row)
                    tl.store(cur_a + offs, r, mask=inside)
                    r_mass += tl.sum(r, axis=0)
                if METHOD == WEIGHTED:
                    if HAS_Q:
                        s_w = r_mass
                    else:  # point mass: the closed form block verification uses
                        s_w = tl.maximum(w * (1.0 - px), 0.0)
                    den = s_w + 1.0 - w
                    h_a = tl.where(den > 0, s_w / tl.where(den > 0, den, 1.0), 1.0)
                    h_a = tl.minimum(tl.maximum(h_a, 0.0), 1.0)
                    new_lr = tl.log(h_a)
                else:
                    new_lr = 0.0
                mass = tl.where(lanes == a, r_mass, mass)
                has_res = has_res | (lanes == a)
                log_r = tl.where(lanes == a, new_lr, log_r)
                log_m = tl.where(lanes == a, 0.0, log_m)

        # ---- uniforms ----
        if PHILOX:  # the chain kernel's stream: coin of node i = word 0 of block i, u = word 1 of block 0
            coin, u = philox_lanes(seed_ptr, step_ptr, b, lanes)
        else:
            coin = tl.load(coins_ptr + b * coins_sb + lanes, mask=node, other=2.0).to(tl.float32)
            u = tl.load(u_ptr + b).to(tl.float32)

        # ---- node tests (lane i) ----
        if METHOD == WEIGHTED:
            # weights after every child failed: slot i + 1 -> lane i
            lr_n = tl.sum(tl.where(lanes[None, :] == lanes[:, None] + 1, log_r[None, :], 0.0), axis=1)
            lm_n = tl.sum(tl.where(lanes[None, :] == lanes[:, None] + 1, log_m[None, :], 0.0), axis=1)
            h = tl.where(real, tl.exp(lr_n - lm_n), 0.0)
            passed = real & (coin <= h) & (h > 0)
            # subtree_any: slot s holds "some node in s's subtree passed" (children after parents)
            sub = tl.zeros([N_POW2], tl.int32)
            for j in range(N):
                i = N - 1 - j
                flag = (_get(passed.to(tl.int32), lanes, i) + _get(sub, lanes, i + 1)) > 0
                sub = tl.where((lanes == i + 1) & flag, 1, sub)
                sub = tl.where((lanes == _get(pslot, lanes, i)) & flag & (_get(real.to(tl.int32), lanes, i) > 0),
                               1, sub)
            chosen = tl.sum(tl.where(lanes[None, :] == lanes[:, None] + 1, sub[None, :], 0), axis=1) > 0
        else:
            chosen = real & (coin * q_tok <= p_tok) & (p_tok > 0)
        chosen = chosen & real
        # first_child_path: from the root, move to the first chosen child at every node
        on_path = lanes == 0
        claimed = lanes < 0
        for i in range(N):
            a = _get(pslot, lanes, i)
            c = _get(chosen.to(tl.int32), lanes, i) > 0
            step_in = (_get(on_path.to(tl.int32), lanes, a) > 0) & c & (_get(claimed.to(tl.int32), lanes, a) == 0)
            on_path = on_path | ((lanes == i + 1) & step_in)
            claimed = claimed | ((lanes == a) & c)
        top = tl.max(tl.where(on_path, depth, -1), axis=0)
        last = tl.min(tl.where(on_path & (depth == top), lanes, N_POW2), axis=0).to(tl.int64)

        # ---- next token: inverse CDF over the last slot's row (its residual, else its target row) ----
        use_cur = _get(has_res.to(tl.int32), lanes, last) > 0
        cur_l = cur_b + last * cur_sk
        p_l = p_b + last * p_sk
        total = _slot_sum(cur_l, p_l, V, use_cur, BLOCK_V)
        if ~(total > RESIDUAL_EPS):  # a residual without mass (measure-zero ties): the target row
            use_cur = use_cur & (total > RESIDUAL_EPS)
            total = _slot_sum(cur_l, p_l, V, use_cur, BLOCK_V)
        thr = u * total
        token = tl.min(tl.full([BLOCK_V], 0, tl.int64), axis=0) + V
        last_pos = tl.min(tl.full([BLOCK_V], 0, tl.int64), axis=0) - 1
        acc = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            inside = offs < V
            r = _slot_row(cur_l, p_l, offs, V, use_cur)
            c = acc + tl.cumsum(r, axis=0)
            positive = inside & (r > 0)
            token = tl.minimum(token, tl.min(tl.where(positive & (c > thr), offs, V), axis=0).to(tl.int64))
            last_pos = tl.maximum(last_pos, tl.max(tl.where(positive, offs, -1), axis=0).to(tl.int64))
            acc += tl.sum(r, axis=0)
        token = tl.where(token < V, token, tl.maximum(last_pos, 0))

    # ---- outputs: the path by depth (lane d holds the node at depth d + 1), its length, the token ----
    sel = on_path[None, :] & (lanes[None, :] > 0) & (depth[None, :] == lanes[:, None] + 1)
    path = tl.where(tl.max(sel.to(tl.int32), axis=1) > 0, tl.sum(tl.where(sel, lanes[None, :] - 1, 0), axis=1), -1)
    tl.store(path_ptr + b * path_sb + lanes, path.to(tl.int64), mask=node)
    tl.store(n_ptr + b, _get(depth, lanes, last).to(tl.int64))
    tl.store(next_ptr + b, token.to(tl.int64))
