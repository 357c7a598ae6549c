"""verify(..., backend="triton") (hsd.kernels, interpreted on CPU) returns exactly what the torch
backend returns for the same uniforms, and dispatches the generator path the same way."""
from __future__ import annotations

import pytest
import torch

from hsd.verify import verify

METHODS = ["tokenwise", "blockwise", "hsd"]


def close_inputs(b, k, v, seed, spread=0.5):
    """Draft close to the target (many acceptances, every level exercised); drafts sampled from q."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(b, k + 1, v, generator=g)
    p = torch.softmax(logits, -1)
    q = torch.softmax(logits[:, :k] + spread * torch.randn(b, k, v, generator=g), -1)
    tokens = torch.multinomial(q.reshape(-1, v), 1, generator=g).view(b, k)
    uniforms = (torch.rand(b, k, generator=g), torch.rand(b, generator=g))
    return tokens, q, p, uniforms


def assert_same(tokens, q, p, method, uniforms):
    ref = verify(tokens, q, p, method=method, uniforms=uniforms)
    tri = verify(tokens, q, p, method=method, backend="triton", uniforms=uniforms)
    assert tri.num_accepted.dtype == torch.int64 and tri.next_token.dtype == torch.int64
    assert torch.equal(ref.num_accepted, tri.num_accepted), (ref.num_accepted, tri.num_accepted)
    assert torch.equal(ref.next_token, tri.next_token), (ref.next_token, tri.next_token)
    return ref


# V = 37: one partial block; V = 5000: two blocks of 4096, the second one partial.
@pytest.mark.parametrize("b,k,v,spread", [(12, 4, 37, 0.5), (6, 3, 5000, 1.0)])
@pytest.mark.parametrize("method", METHODS)
def test_triton_equals_torch(b, k, v, spread, method):
    tokens, q, p, uniforms = close_inputs(b, k, v, seed=b + k + v, spread=spread)
    ref = assert_same(tokens, q, p, method, uniforms)
    assert 0 < int(ref.num_accepted.sum()) < b * k  # a mix of acceptances and rejections
    # Point-mass drafts (q = one-hot of the draft token).
    ref = assert_same(tokens, None, p, method, uniforms)


@pytest.mark.parametrize("method", METHODS)
def test_triton_equals_torch_edge_cases(method):
    tokens, q, p, uniforms = close_inputs(8, 3, 23, seed=7)
    rows = torch.arange(8)
    zero = p.clone()
    zero[rows[::2], 1, tokens[::2, 1]] = 0.0  # zero target probability on a draft token
    zero = zero / zero.sum(-1, keepdim=True)
    assert_same(tokens, q, zero, method, uniforms)
    same = torch.cat([q, p[:, -1:]], dim=1)  # p = q: w = 1, zero denominators
    res = assert_same(tokens, q, same, method, uniforms)
    assert bool((res.num_accepted == 3).all())
    top = p * (p >= p.topk(3, dim=-1).values[..., -1:])  # top-3 truncated target rows
    top = top / top.sum(-1, keepdim=True)
    assert_same(tokens, q, top, method, uniforms)


def test_triton_generator_path():
    tokens, q, p, _ = close_inputs(16, 3, 50, seed=3)
    a = verify(tokens, q, p, method="hsd", generator=torch.Generator().manual_seed(4))
    b = verify(tokens, q, p, method="hsd", backend="triton", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.num_accepted, b.num_accepted) and torch.equal(a.next_token, b.next_token)


def test_triton_backend_validates_inputs():
    tokens, q, p, uniforms = close_inputs(4, 2, 9, seed=1)
    with pytest.raises(ValueError, match="target_probs.*sum to 1"):
        verify(tokens, q, p * 2, backend="triton", uniforms=uniforms)
