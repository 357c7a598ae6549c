"""hsd.kernels (Triton, interpreted on CPU via TRITON_INTERPRET=1 from conftest) returns exactly what
the torch reference hsd.verify.verify returns for the same explicit uniforms, and what an independent
row-by-row float64 transcription of the algorithms (``loop_reference``) returns.

Sizes are small on purpose: every Triton program runs in Python here. BLOCK_V is small so that the
vocabulary spans several blocks, the last one partial (V is never a multiple of the block).
"""
from __future__ import annotations

import pytest
import torch

from hsd.kernels import verify_triton, verify_triton_logits
from hsd.verify import verify

METHODS = ["tokenwise", "blockwise", "hsd"]

# numpy warns about log(0) (a draft token with zero target probability) inside the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def chain_logits(b: int, k: int, v: int, seed: int, spread: float = 0.6, top: int | None = None):
    """Target logits [b, k+1, v], draft logits [b, k, v] close to the target (so that every level
    is reached), optionally top-`top` truncated with -inf; uniforms from the same generator."""
    g = torch.Generator().manual_seed(seed)
    target = 2.0 * torch.randn(b, k + 1, v, generator=g)
    draft = target[:, :k] + spread * torch.randn(b, k, v, generator=g)
    if top is not None:
        target = target.masked_fill(target < target.topk(top, -1).values[..., -1:], float("-inf"))
        draft = draft.masked_fill(draft < draft.topk(top, -1).values[..., -1:], float("-inf"))
    coins = torch.rand(b, k, generator=g)
    u = torch.rand(b, generator=g)
    return target, draft, coins, u, g


def sample_tokens(q: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b, k, v = q.shape
    return torch.multinomial(q.reshape(-1, v), 1, generator=g).view(b, k)


def reference(tokens, q, p, method, coins, u):
    res = verify(tokens, q, p, method=method, backend="torch", uniforms=(coins, u))
    return res.num_accepted, res.next_token


def _loop_residual(p_row, q_row, x, w):
    """(w p - q)_+, or for a point-mass draft (q_row None) w p with the draft token x removed."""
    if q_row is None:
        r = w * p_row
        r[x] = 0.0
        return r
    return (w * p_row - q_row).clamp_min(0.0)


def loop_reference(tokens, q, p, method, coins, u):
    """Independent oracle: a row-by-row float64 transcription of token-wise verification and block
    verification (docs/verification.md) with the uniforms convention of hsd.verify (BV weights by the
    recursion w_k = min(1, w_{k-1} p/q))."""
    b, k = tokens.shape
    p, q = p.double(), None if q is None else q.double()
    n_out, t_out = [], []
    for i in range(b):
        x = tokens[i].tolist()
        px = [float(p[i, j, x[j]]) for j in range(k)]
        qx = [1.0 if q is None else float(q[i, j, x[j]]) for j in range(k)]
        q_rows = [None if q is None else q[i, j] for j in range(k)]
        if method == "tokenwise":
            tau = next((j for j in range(k) if not (float(coins[i, j]) * qx[j] <= px[j] and px[j] > 0)), k)
            w = [1.0] * (k + 1)
        else:
            w = [1.0]
            for j in range(k):
                w.append(min(1.0, w[-1] * px[j] / qx[j]))
            h = []
            for lev in range(1, k):
                if q is None:
                    s = w[lev] * max(1.0 - px[lev], 0.0)
                else:
                    s = float(_loop_residual(p[i, lev], q_rows[lev], x[lev], w[lev]).sum())
                den = s + 1.0 - w[lev]
                h.append(min(max(s / den, 0.0), 1.0) if den > 0 else 1.0)
            h.append(w[k])
            tau = max((lev for lev in range(1, k + 1) if float(coins[i, lev - 1]) <= h[lev - 1] and h[lev - 1] > 0),
                      default=0)
        r = p[i, k] if tau == k else _loop_residual(p[i, tau], q_rows[tau], x[tau], w[tau])
        if float(r.sum()) <= 1e-12:
            r = p[i, tau]
        cdf = r.cumsum(0)
        tok = int((cdf <= float(u[i]) * float(cdf[-1])).sum())
        n_out.append(tau)
        t_out.append(min(tok, int(r.nonzero().max())))
    return torch.tensor(n_out), torch.tensor(t_out)


def assert_same(got, want):
    n, tok = got
    assert n.dtype == torch.int64 and tok.dtype == torch.int64
    assert torch.equal(n, want[0]), (n, want[0])
    assert torch.equal(tok, want[1]), (tok, want[1])


@pytest.mark.parametrize("v,block_v", [(37, 16), (257, 128)])  # last block: 5 lanes, resp. 1 lane
@pytest.mark.parametrize("has_q", [True, False], ids=["draft_probs", "point_mass"])
@pytest.mark.parametrize("method", METHODS)
def test_probs_equal_torch(method, has_q, v, block_v):
    k = 3
    target, draft, coins, u, g = chain_logits(8, k, v, seed=v + 7 * has_q)
    p, q = target.softmax(-1), draft.softmax(-1)
    tokens = sample_tokens(q, g)
    q_in = q if has_q else None
    want = reference(tokens, q_in, p, method, coins, u)
    got = verify_triton(tokens, q_in, p, method, coins, u, block_v=block_v)
    assert_same(got, want)
    assert_same(got, loop_reference(tokens, q_in, p, method, coins, u))
    n = want[0]
    assert bool((n < k).any())  # some rejection (a residual draw) ...
    if has_q:
        assert bool((n > 0).any())  # ... and some acceptance (close drafts)


@pytest.mark.parametrize("has_q", [True, False], ids=["draft_logits", "point_mass"])
@pytest.mark.parametrize("method", METHODS)
def test_logits_equal_torch(method, has_q):
    """verify_triton_logits(logits, T) == torch verify on softmax(logits / T), with top-k truncation
    (-inf logits) on half of the rows."""
    b, k, v, t = 8, 3, 100, 0.7
    target, draft, coins, u, g = chain_logits(b, k, v, seed=11 + has_q, spread=0.5)
    trunc_t, trunc_d, _, _, _ = chain_logits(b, k, v, seed=11 + has_q, spread=0.5, top=12)
    target[::2], draft[::2] = trunc_t[::2], trunc_d[::2]
    p, q = (target / t).softmax(-1), (draft / t).softmax(-1)
    tokens = sample_tokens(q, g)
    want = reference(tokens, q if has_q else None, p, method, coins, u)
    got = verify_triton_logits(tokens, draft if has_q else None, target, t, method, coins, u, block_v=64)
    assert_same(got, want)
    assert_same(got, loop_reference(tokens, q if has_q else None, p, method, coins, u))
    assert 0 < int(want[0].sum()) < b * k


@pytest.mark.parametrize("method", METHODS)
def test_zero_target_probability_on_draft_tokens(method):
    """p_j(x_j) = 0: the level is never accepted (w = 0 from there on) and no NaN appears."""
    b, k, v = 8, 3, 29
    target, draft, coins, u, g = chain_logits(b, k, v, seed=3, spread=0.3)
    p, q = target.softmax(-1), draft.softmax(-1)
    tokens = sample_tokens(q, g)
    rows = torch.arange(0, b, 2)
    p[rows, 1, tokens[rows, 1]] = 0.0  # second draft token impossible under the target
    p = p / p.sum(-1, keepdim=True)
    for q_in in (q, None):
        want = reference(tokens, q_in, p, method, coins, u)
        got = verify_triton(tokens, q_in, p, method, coins, u, block_v=16)
        assert_same(got, want)
        assert_same(got, loop_reference(tokens, q_in, p, method, coins, u))
        assert bool((want[0][rows] <= 1).all())
        assert bool((p[torch.arange(b), want[0], want[1]] > 0).all())  # never an impossible token


@pytest.mark.parametrize("method", METHODS)
def test_truncated_supports(method):
    """Top-k truncated p and q (different supports), given as probabilities."""
    b, k, v = 8, 3, 41
    target, draft, coins, u, g = chain_logits(b, k, v, seed=5, spread=1.0, top=6)
    p, q = target.softmax(-1), draft.softmax(-1)
    tokens = sample_tokens(q, g)
    want = reference(tokens, q, p, method, coins, u)
    got = verify_triton(tokens, q, p, method, coins, u, block_v=16)
    assert_same(got, want)
    assert_same(got, loop_reference(tokens, q, p, method, coins, u))
    assert bool((p[torch.arange(b), want[0], want[1]] > 0).all())


@pytest.mark.parametrize("method", METHODS)
def test_target_equals_draft(method):
    """p = q: every draft token is accepted (w = 1, zero denominators) and the bonus row is sampled.
    Then p = q at one level only, after a level with p > q (w = 1 there: h = 1 by convention)."""
    b, k, v = 8, 3, 19
    target, draft, coins, u, g = chain_logits(b, k, v, seed=9)
    p = target.softmax(-1)
    q = p[:, :k].clone()
    tokens = sample_tokens(q, g)
    want = reference(tokens, q, p, method, coins, u)
    assert_same(verify_triton(tokens, q, p, method, coins, u, block_v=16), want)
    assert bool((want[0] == k).all())

    q = draft.softmax(-1)
    tokens = sample_tokens(q, g)
    p[torch.arange(b), 0, tokens[:, 0]] += 1.0  # p_1(x_1) > q_1(x_1)
    p[:, 0] /= p[:, 0].sum(-1, keepdim=True)
    p[:, 1] = q[:, 1]
    want = reference(tokens, q, p, method, coins, u)
    assert_same(verify_triton(tokens, q, p, method, coins, u, block_v=16), want)


@pytest.mark.parametrize("method", METHODS)
def test_extreme_uniforms(method):
    """coins = 0 accept every level with positive probability, coins -> 1 almost none; u = 0 draws the
    first token with mass and u -> 1 the last one (padded lanes of the last block never win)."""
    b, k, v = 8, 2, 21
    target, draft, _, _, g = chain_logits(b, k, v, seed=13, top=5)
    p, q = target.softmax(-1), draft.softmax(-1)
    tokens = sample_tokens(q, g)
    top = 1.0 - 2.0**-24
    coins = torch.tensor([0.0, top]).repeat_interleave(4).unsqueeze(1).expand(b, k).contiguous()
    u = torch.tensor([0.0, top]).repeat(4)
    # At w_k = 1 the exact threshold is h_k = S_k / S_k = 1, which the kernel and torch "blockwise"
    # (both in the block-verification form) compute exactly. Torch "hsd" forms plus / max(plus, minus)
    # from the actual row sums (float32 rows sum to 1 +- 1e-7), so it may return 1 - 1e-6 there: a coin
    # that close to 1 is the one (measure ~1e-6) place where the two torch forms differ, so with these
    # coins the hsd kernel is held to the blockwise reference.
    ref_method = "blockwise" if method == "hsd" else method
    for q_in in (q, None):
        want = reference(tokens, q_in, p, ref_method, coins, u)
        got = verify_triton(tokens, q_in, p, method, coins, u, block_v=16)
        assert_same(got, want)
        assert_same(got, loop_reference(tokens, q_in, p, method, coins, u))


def test_single_token_and_tiny_vocab():
    """K = 1 (h_1 = w_1, no level mass), and V = 1 (every row is the point mass on token 0)."""
    target, draft, coins, u, g = chain_logits(6, 1, 23, seed=17)
    p, q = target.softmax(-1), draft.softmax(-1)
    tokens = sample_tokens(q, g)
    for method in METHODS:
        for q_in in (q, None):
            want = reference(tokens, q_in, p, method, coins, u)
            assert_same(verify_triton(tokens, q_in, p, method, coins, u, block_v=16), want)
    ones_p, ones_q = torch.ones(3, 3, 1), torch.ones(3, 2, 1)
    tokens = torch.zeros(3, 2, dtype=torch.int64)
    n, tok = verify_triton(tokens, ones_q, ones_p, "hsd", torch.rand(3, 2), torch.rand(3))
    assert n.tolist() == [2, 2, 2] and tok.tolist() == [0, 0, 0]


def test_block_size_and_layout_do_not_change_results():
    """Any BLOCK_V (one block, several blocks), int32 tokens, a non-contiguous view and bfloat16
    inputs: same results as the torch reference (bf16 rows are read and computed in float32)."""
    b, k, v = 6, 3, 50
    target, draft, coins, u, g = chain_logits(b, k, v, seed=19)
    p, q = target.softmax(-1), draft.softmax(-1)
    tokens = sample_tokens(q, g)
    want = reference(tokens, q, p, "hsd", coins, u)
    for block_v in (16, 64):
        assert_same(verify_triton(tokens, q, p, "hsd", coins, u, block_v=block_v), want)
    p_view = torch.cat([p, p], dim=-1)[..., :v]  # strided rows
    assert not p_view.is_contiguous()
    assert_same(verify_triton(tokens.int(), q, p_view, "hsd", coins, u, block_v=32), want)
    pb, qb = p.bfloat16(), q.bfloat16()
    want_bf16 = verify(tokens, qb, pb, method="blockwise", uniforms=(coins, u), validate=False)
    assert_same(verify_triton(tokens, qb, pb, "blockwise", coins, u, block_v=32),
                (want_bf16.num_accepted, want_bf16.next_token))


def test_empty_batch():
    n, tok = verify_triton(torch.zeros(0, 2, dtype=torch.int64), None, torch.ones(0, 3, 5) / 5, "hsd",
                           torch.zeros(0, 2), torch.zeros(0))
    assert n.shape == (0,) and tok.shape == (0,) and n.dtype == torch.int64


def test_public_api_dispatches_to_kernel():
    target, draft, coins, u, g = chain_logits(4, 2, 30, seed=23)
    p, q = target.softmax(-1), draft.softmax(-1)
    tokens = sample_tokens(q, g)
    res = verify(tokens, q, p, method="hsd", backend="triton", uniforms=(coins, u))
    assert_same((res.num_accepted, res.next_token), reference(tokens, q, p, "hsd", coins, u))


def test_bad_arguments_raise_value_error():
    target, draft, coins, u, g = chain_logits(2, 2, 10, seed=1)
    p, q = target.softmax(-1), draft.softmax(-1)
    tokens = sample_tokens(q, g)
    with pytest.raises(ValueError, match="method"):
        verify_triton(tokens, q, p, "greedy", coins, u)
    with pytest.raises(ValueError, match="target_probs: expected a torch.Tensor"):
        verify_triton(tokens, q, p.tolist(), "hsd", coins, u)
    with pytest.raises(ValueError, match="target_probs: expected shape"):
        verify_triton(tokens, q, p[:, :2], "hsd", coins, u)
    with pytest.raises(ValueError, match="draft_probs: expected shape"):
        verify_triton(tokens, q[..., :9], p, "hsd", coins, u)
    with pytest.raises(ValueError, match="draft_tokens"):
        verify_triton(tokens.float(), q, p, "hsd", coins, u)
    with pytest.raises(ValueError, match="coins"):
        verify_triton(tokens, q, p, "hsd", coins[:, :1], u)
    with pytest.raises(ValueError, match="u: expected shape"):
        verify_triton(tokens, q, p, "hsd", coins, u[:1])
    with pytest.raises(ValueError, match="block_v"):
        verify_triton(tokens, q, p, "hsd", coins, u, block_v=48)
    for bad_t in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            verify_triton_logits(tokens, draft, target, bad_t, "hsd", coins, u)
    with pytest.raises(ValueError, match="target_logits: expected one of"):
        verify_triton_logits(tokens, draft, target.long(), 1.0, "hsd", coins, u)
    with pytest.raises(ValueError, match="float16 probabilities are refused"):
        verify_triton(tokens, q.half(), p, "hsd", coins, u)


@pytest.mark.parametrize("method", ["tokenwise", "hsd"])
def test_fused_kernel_exact_law(method):
    """The fused kernel's exact law (its coins just inside/outside every threshold, u at every
    inverse-CDF interval midpoint, all chains of a V = 3, K = 2 instance) is the target joint; the
    uncapped recipe is rejected by the same check (run through torch at the same points)."""
    from hsd.verify import exact
    from hsd.verify.serving import VerifyPlan
    from tests.test_verify_exact import check_lossless, instance, uncapped_levels

    inst = instance(3, 2, 0)

    def kernel(tok, q, p, coins, u):
        plan = VerifyPlan(max_batch=tok.shape[0], max_draft=2, vocab=3, method=method, backend="triton")
        res = plan(tok, p.float(), q.float(), uniforms=(coins.float().contiguous(), u.float().contiguous()))
        return res.num_accepted, res.next_token

    law, acc = exact.single_chain_law(inst, method, sampler=True, run=kernel, margin=1e-4, both_ends=False)
    # The outcomes are the kernel's, the weights exact: every evaluation point must agree with the law.
    check_lossless(law, inst)
    target = exact.target_joint(inst)
    assert acc == pytest.approx(exact.single_chain_law(inst, method)[1], abs=1e-12)
    bad, _ = exact.single_chain_law(inst, uncapped_levels, sampler=True, margin=1e-4, both_ends=False)
    assert exact.total_variation(bad, target) > 1e-3
    with pytest.raises(AssertionError, match="not lossless"):
        check_lossless(bad, inst)
