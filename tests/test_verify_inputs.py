"""hsd.verify input checks, legal edge cases, the uniforms convention, and greedy_verify."""
from __future__ import annotations

import pytest
import torch

from hsd.verify import VerifyResult, greedy_verify, verify, verify_multi

METHODS = ["tokenwise", "blockwise", "hsd"]


def random_inputs(b=4, k=3, v=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(b, k, v, generator=g).to(dtype) + 0.05
    q = q / q.sum(-1, keepdim=True)
    p = torch.rand(b, k + 1, v, generator=g).to(dtype) + 0.05
    p = p / p.sum(-1, keepdim=True)
    tokens = torch.multinomial(q.reshape(-1, v).float(), 1, generator=g).view(b, k)
    return tokens, q, p


def multi_inputs(b=3, m=2, k=3, v=5, seed=0):
    tokens, q, p = random_inputs(b * m, k, v, seed)
    return tokens.view(b, m, k), q.view(b, m, k, v), p.view(b, m, k + 1, v)


# ---------------------------------------------------------------- bad input -> ValueError


def _bad_cases():
    t, q, p = random_inputs()
    nan_p = p.clone()
    nan_p[0, 1, 2] = float("nan")
    inf_q = q.clone()
    inf_q[1, 0, 0] = float("inf")
    neg_p = p.clone()
    neg_p[0, 0, 0] = -0.01
    neg_p[0, 0, 1] += 0.01
    unnorm_q = q * 1.01
    zero_q = q.clone()
    zero_q[0, 0] = 0.0
    zero_q[0, 0, (t[0, 0] + 1) % 7] = 1.0
    return [
        ("K = 0", (t[:, :0], q[:, :0], p[:, :1]), "draft_tokens"),
        ("tokens 1-D", (t[0], q, p), "draft_tokens"),
        ("float tokens", (t.float(), q, p), "draft_tokens"),
        ("target rows K", (t, q, p[:, :3]), "target_probs"),
        ("target batch", (t, q, p[:2]), "target_probs"),
        ("target 2-D", (t, q, p[:, 0]), "target_probs"),
        ("draft shape", (t, q[:, :2], p), "draft_probs"),
        ("vocab mismatch", (t, q[..., :6] / q[..., :6].sum(-1, keepdim=True), p), "draft_probs"),
        ("dtype mismatch", (t, q.double(), p), "draft_probs"),
        ("int probs", (t, q, p.long()), "target_probs"),
        ("NaN", (t, q, nan_p), "target_probs.*NaN"),
        ("inf", (t, inf_q, p), "draft_probs.*inf"),
        ("negative", (t, q, neg_p), "target_probs.*negative"),
        ("rows not summing to 1", (t, unnorm_q, p), "draft_probs.*sum to 1"),
        ("target rows not summing", (t, q, p * 0.99), "target_probs.*sum to 1"),
        ("token too large", (torch.where(t == t[0, 0], 7, t), q, p), "draft_tokens.*\\[0, 7\\)"),
        ("negative token", (t - 10, q, p), "draft_tokens"),
        ("draft token with q = 0", (t, zero_q, p), "draft_probs.*zero draft probability"),
        ("not a tensor", (t.tolist(), q, p), "draft_tokens"),
    ]


@pytest.mark.parametrize("name,args,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_value_error(name, args, match):
    with pytest.raises(ValueError, match=match):
        verify(*args, method="hsd")


def test_bad_method_backend_uniforms():
    t, q, p = random_inputs()
    with pytest.raises(ValueError, match="method"):
        verify(t, q, p, method="naive")
    with pytest.raises(ValueError, match="backend"):
        verify(t, q, p, backend="cuda")
    coins, u = torch.rand(4, 3), torch.rand(4)
    with pytest.raises(ValueError, match="uniforms"):
        verify(t, q, p, uniforms=coins)
    with pytest.raises(ValueError, match="coins.*shape"):
        verify(t, q, p, uniforms=(coins[:, :2], u))
    with pytest.raises(ValueError, match="u.*shape"):
        verify(t, q, p, uniforms=(coins, u[:3]))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        verify(t, q, p, uniforms=(coins, torch.ones(4)))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        verify(t, q, p, uniforms=(coins * float("nan"), u))


def test_multi_bad_inputs():
    t, q, p = multi_inputs()
    with pytest.raises(ValueError, match="draft_probs.*required"):
        verify_multi(t, None, p)
    with pytest.raises(ValueError, match="method"):
        verify_multi(t, q, p, method="blockwise")
    with pytest.raises(ValueError, match="target_probs"):
        verify_multi(t, q, p[:, :1])
    with pytest.raises(ValueError, match="draft_tokens"):
        verify_multi(t[:, 0], q, p)
    with pytest.raises(ValueError, match="coins.*shape"):
        verify_multi(t, q, p, uniforms=(torch.rand(3, 3), torch.rand(3)))
    with pytest.raises(ValueError, match="draft_probs.*sum to 1"):
        verify_multi(t, q * 2, p)


# ---------------------------------------------------------------- legal edge cases


def _assert_valid(res: VerifyResult, tokens, p, k):
    assert res.num_accepted.dtype == torch.int64 and res.next_token.dtype == torch.int64
    assert bool(((res.num_accepted >= 0) & (res.num_accepted <= k)).all())
    rows = torch.arange(tokens.shape[0])
    # Never emit a token with zero target probability at its position.
    assert bool((p[rows, res.num_accepted, res.next_token] > 0).all())


@pytest.mark.parametrize("method", METHODS)
def test_zero_target_prob_on_draft_token(method):
    t, q, p = random_inputs(b=64, seed=3)
    rows = torch.arange(64)
    p[rows, 1, t[:, 1]] = 0.0  # the target never produces the second draft token
    p = p / p.sum(-1, keepdim=True)
    res = verify(t, q, p, method=method, generator=torch.Generator().manual_seed(0))
    _assert_valid(res, t, p, 3)
    assert bool((res.num_accepted <= 1).all())  # token 2 cannot be accepted


@pytest.mark.parametrize("method", METHODS)
def test_truncated_supports(method):
    """Top-k on p and on q: many zeros, residual rows with few non-zeros, still valid tokens."""
    t, q, p = random_inputs(b=256, k=4, v=11, seed=4)
    for probs, keep in ((p, 2), (q, 4)):
        kth = probs.topk(keep, dim=-1).values[..., -1:]
        probs.mul_(probs >= kth)
        probs.div_(probs.sum(-1, keepdim=True))
    t = torch.multinomial(q.view(-1, 11), 1, generator=torch.Generator().manual_seed(1)).view(256, 4)
    res = verify(t, q, p, method=method, generator=torch.Generator().manual_seed(2))
    _assert_valid(res, t, p, 4)


@pytest.mark.parametrize("method", METHODS)
def test_p_equals_q_accepts_all(method):
    t, q, _ = random_inputs(b=32, k=4, seed=5)
    p = torch.cat([q, q[:, -1:]], dim=1)
    res = verify(t, q, p, method=method, generator=torch.Generator().manual_seed(0))
    assert bool((res.num_accepted == 4).all())
    _assert_valid(res, t, p, 4)


@pytest.mark.parametrize("method", METHODS)
def test_point_mass_drafts(method):
    t, _, p = random_inputs(b=128, k=3, seed=6)
    res = verify(t, None, p, method=method, generator=torch.Generator().manual_seed(0))
    _assert_valid(res, t, p, 3)
    rejected = res.num_accepted < 3
    # A rejected position's token comes from p without the draft token: never the draft token.
    assert bool((res.next_token[rejected] != t[rejected, res.num_accepted[rejected]]).all())
    # Same uniforms: explicit one-hot draft rows give the same decisions.
    gen = torch.Generator().manual_seed(9)
    coins, u = torch.rand(128, 3, generator=gen), torch.rand(128, generator=gen)
    a = verify(t, None, p, method=method, uniforms=(coins, u))
    b = verify(t, torch.nn.functional.one_hot(t, 7).float(), p, method=method, uniforms=(coins, u))
    assert torch.equal(a.num_accepted, b.num_accepted) and torch.equal(a.next_token, b.next_token)


def test_zero_residual_falls_back_to_target_row():
    """A residual row of zero mass (a measure-zero tie) draws from the target row, not NaN."""
    v = 4
    p = torch.full((1, 2, v), 0.25)
    q = torch.full((1, 1, v), 0.25)
    t = torch.tensor([[2]])
    for method in METHODS:
        # Force tau = 0 with a coin above every threshold (p = q so h = 1: use tokenwise-free path).
        res = verify(t, q, p, method=method, uniforms=(torch.tensor([[0.0]]), torch.tensor([0.6])))
        assert int(res.num_accepted) == 1 and int(res.next_token) == 2  # bonus row, inverse CDF at 0.6
    from hsd.verify.common import inverse_cdf

    token = inverse_cdf(torch.zeros(1, v), torch.tensor([0.6]), p[:, 0])
    assert int(token) == 2


def test_float64_and_bfloat16_inputs():
    t, q, p = random_inputs(b=16, seed=7)
    coins, u = torch.rand(16, 3), torch.rand(16)
    ref = verify(t, q, p, uniforms=(coins, u))
    for dtype in (torch.float64, torch.bfloat16):
        q2, p2 = q.to(dtype), p.to(dtype)
        res = verify(t, q2, p2, uniforms=(coins, u))
        _assert_valid(res, t, p2.float(), 3)
        if dtype == torch.float64:
            assert torch.equal(res.num_accepted, ref.num_accepted)


def test_empty_batch():
    t, q, p = random_inputs(b=1)
    res = verify(t[:0], q[:0], p[:0])
    assert res.num_accepted.shape == (0,) and res.next_token.shape == (0,)


# ---------------------------------------------------------------- the uniforms convention


def _toy(draft):
    p = torch.tensor([1 / 3, 2 / 3]).expand(1, 3, 2).contiguous()
    q = torch.tensor([2 / 3, 1 / 3]).expand(1, 2, 2).contiguous()
    return torch.tensor([draft]), q, p


@pytest.mark.parametrize("method", ["blockwise", "hsd"])
def test_uniforms_convention_block(method):
    """Toy, draft (B, A): w_1 = 1, h_1 = 1; w_2 = h_2 = 1/2. tau = last level with coin <= h."""
    t, q, p = _toy([1, 0])
    cases = [((0.9, 0.6), 0.0, 1, 1),   # level 2 fails: residual (w_1 p - q)_+ = (0, 1/3) -> B
             ((0.9, 0.4), 0.2, 2, 0),   # full accept: bonus p = (1/3, 2/3), u = 0.2 -> A
             ((0.9, 0.4), 0.5, 2, 1),   # u = 0.5 -> B
             ((0.9, 0.49), 0.9, 2, 1),
             ((0.0, 0.51), 0.9, 1, 1)]
    for coins, u, n, token in cases:
        res = verify(t, q, p, method=method, uniforms=(torch.tensor([coins]), torch.tensor([u])))
        assert (int(res.num_accepted), int(res.next_token)) == (n, token), (coins, u)
    # Draft (A, A): w_1 = 1/2, S_1 = (1/6 - 2/3)_+ + (1/3 - 1/3)_+ = 0, h_1 = 0; tau = 0 or 2.
    t, q, p = _toy([0, 0])
    res = verify(t, q, p, method=method, uniforms=(torch.tensor([[0.01, 0.3]]), torch.tensor([0.99])))
    assert (int(res.num_accepted), int(res.next_token)) == (0, 1)  # w_2 = 1/4 < 0.3; residual (p-q)_+ = B


@pytest.mark.parametrize("method", ["blockwise", "hsd"])
def test_uniforms_convention_failure_then_success(method):
    """A failed level followed by a successful one: tau is the LAST success, not the first failure.
    Toy, K = 3, draft (B, A, B): w = (1, 1/2, 1); h_1 = 1, h_2 = S_2 / (S_2 + 1/2) = 0 (S_2 = 0), h_3 = w_3 = 1."""
    p = torch.tensor([1 / 3, 2 / 3]).expand(1, 4, 2).contiguous()
    q = torch.tensor([2 / 3, 1 / 3]).expand(1, 3, 2).contiguous()
    t = torch.tensor([[1, 0, 1]])
    res = verify(t, q, p, method=method, uniforms=(torch.tensor([[0.9, 0.5, 0.3]]), torch.tensor([0.2])))
    assert (int(res.num_accepted), int(res.next_token)) == (3, 0)  # level 2 failed, level 3 succeeded
    res = verify(t, q, p, method="tokenwise", uniforms=(torch.tensor([[0.9, 0.6, 0.3]]), torch.tensor([0.2])))
    assert int(res.num_accepted) == 1  # token-wise stops at its first failure (p/q = 1/2 < 0.6)


def test_uniforms_convention_tokenwise():
    t, q, p = _toy([1, 0])  # position 1: p/q = 2 (always), position 2: p/q = 1/2
    for coins, n in (((0.99, 0.6), 1), ((0.99, 0.5), 2), ((0.99, 0.4), 2)):
        res = verify(t, q, p, method="tokenwise", uniforms=(torch.tensor([coins]), torch.tensor([0.0])))
        assert int(res.num_accepted) == n
        assert int(res.next_token) == (1 if n == 1 else 0)


def test_generator_reproducible_and_matches_explicit_uniforms():
    t, q, p = random_inputs(b=32, seed=8)
    a = verify(t, q, p, generator=torch.Generator().manual_seed(5))
    b = verify(t, q, p, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    coins = torch.rand(32, 3, generator=gen)
    u = torch.rand(32, generator=gen)
    c = verify(t, q, p, uniforms=(coins, u))
    for r in (b, c):
        assert torch.equal(a.num_accepted, r.num_accepted) and torch.equal(a.next_token, r.next_token)


def test_blockwise_and_hsd_agree_with_same_uniforms():
    t, q, p = random_inputs(b=512, k=5, v=9, seed=10)
    gen = torch.Generator().manual_seed(1)
    uniforms = (torch.rand(512, 5, generator=gen), torch.rand(512, generator=gen))
    a = verify(t, q, p, method="blockwise", uniforms=uniforms)
    b = verify(t, q, p, method="hsd", uniforms=uniforms)
    assert torch.equal(a.num_accepted, b.num_accepted) and torch.equal(a.next_token, b.next_token)


def test_multi_result_and_uniforms():
    t, q, p = multi_inputs(b=64, m=3, k=3, v=5, seed=11)
    gen = torch.Generator().manual_seed(0)
    coins, u = torch.rand(64, 3, 3, generator=gen), torch.rand(64, generator=gen)
    for method in ("hsd", "tokenwise"):
        a = verify_multi(t, q, p, method=method, uniforms=(coins, u))
        b = verify_multi(t, q, p, method=method, uniforms=(coins, u))
        assert torch.equal(a.num_accepted, b.num_accepted) and torch.equal(a.chain, b.chain)
        assert a.chain.dtype == torch.int64 and bool(((a.chain >= 0) & (a.chain < 3)).all())
        rows = torch.arange(64)
        assert bool((p[rows, a.chain, a.num_accepted, a.next_token] > 0).all())
    # One chain: verify_multi(hsd) = verify(blockwise) with the same uniforms.
    single = verify(t[:, 0], q[:, 0], p[:, 0], method="blockwise", uniforms=(coins[:, 0], u))
    multi = verify_multi(t[:, :1], q[:, :1], p[:, :1], method="hsd", uniforms=(coins[:, :1], u))
    assert torch.equal(single.num_accepted, multi.num_accepted)
    assert torch.equal(single.next_token, multi.next_token)


# ---------------------------------------------------------------- greedy


def test_greedy_verify():
    logits = torch.tensor([[[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]],
                           [[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]],
                           [[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]]])
    drafts = torch.tensor([[1, 0], [1, 2], [2, 0]])
    res = greedy_verify(drafts, logits)
    assert res.num_accepted.tolist() == [2, 1, 0]
    assert res.next_token.tolist() == [2, 0, 1]
    # Ties go to the lowest id; -inf logits are legal.
    tie = torch.tensor([[[2.0, 2.0, float("-inf")], [1.0, 0.0, 0.0]]])
    res = greedy_verify(torch.tensor([[1]]), tie)
    assert (int(res.num_accepted), int(res.next_token)) == (0, 0)
    res = greedy_verify(torch.tensor([[0]]), tie)
    assert (int(res.num_accepted), int(res.next_token)) == (1, 0)


def test_greedy_matches_sampling_at_one_hot_targets():
    """Greedy = verification against one-hot (temperature -> 0) target rows."""
    t, q, p = random_inputs(b=64, k=4, v=6, seed=12)
    logits = torch.randn(64, 5, 6, generator=torch.Generator().manual_seed(3))
    onehot = torch.nn.functional.one_hot(logits.argmax(-1), 6).float()
    g = greedy_verify(t, logits)
    for method in METHODS:
        s = verify(t, q, onehot, method=method, generator=torch.Generator().manual_seed(0))
        assert torch.equal(g.num_accepted, s.num_accepted) and torch.equal(g.next_token, s.next_token)


def test_greedy_bad_inputs():
    t = torch.tensor([[1, 0]])
    logits = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match="target_logits.*shape"):
        greedy_verify(t, logits[:, :2])
    with pytest.raises(ValueError, match="draft_tokens.*K = 0"):
        greedy_verify(t[:, :0], logits[:, :1])
    with pytest.raises(ValueError, match="NaN"):
        greedy_verify(t, logits * float("nan"))
    with pytest.raises(ValueError, match="draft_tokens"):
        greedy_verify(t + 4, logits)
    with pytest.raises(ValueError, match="target_logits.*floating"):
        greedy_verify(t, logits.long())
