"""hsd.models primitives shared by both heads: RMSNorm, RoPE, GQA attention, KVCache, DraftVocab, StepOutput."""
from __future__ import annotations

import math

import pytest
import torch

from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel
from hsd.models.early_exit import EarlyExitConfig, EarlyExitHead
from hsd.models.kv import KVCache, StepOutput
from hsd.models.layers import RMSNorm, RotaryEmbedding, apply_rope, attend, causal_mask, repeat_kv
from hsd.models.vocab import DraftVocab
from tests.conftest import tiny_causal_lm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_llamas(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ours, theirs = RMSNorm(16, 1e-6), LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        w = torch.randn(16)
        ours.weight.copy_(w)
        theirs.weight.copy_(w)
    x = (3 * torch.randn(2, 5, 16)).to(dtype)
    got, want = ours(x), theirs(x)
    assert got.dtype == want.dtype == torch.float32  # input dtype promoted with the fp32 weight
    assert torch.equal(got, want)
    half = RMSNorm(16, 1e-6).to(dtype)
    assert half(x).dtype == dtype


def test_rope_matches_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    params = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    rope = RotaryEmbedding(8, params, max_position_embeddings=256)
    ref = LlamaRotaryEmbedding(LlamaConfig(hidden_size=16, num_attention_heads=2, head_dim=8,
                                           max_position_embeddings=256, rope_parameters=dict(params)))
    pos = torch.tensor([[0, 3, 50, 200], [1, 2, 3, 4]])
    q, k = torch.randn(2, 2, 4, 8), torch.randn(2, 1, 4, 8)
    cos, sin = rope(pos, q)
    rcos, rsin = ref(q, pos)
    assert torch.equal(cos, rcos) and torch.equal(sin, rsin)
    want_q, want_k = apply_rotary_pos_emb(q, k, rcos, rsin)
    assert torch.equal(apply_rope(q, cos, sin), want_q) and torch.equal(apply_rope(k, cos, sin), want_k)
    # default RoPE is the closed form theta^(-2i/d), and the scaled one differs from it
    plain = RotaryEmbedding(8, {"rope_type": "default", "rope_theta": 5e5})
    pcos, _ = plain(pos, q)
    inv = 5e5 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    ang = pos[..., None].double() * inv
    torch.testing.assert_close(pcos, torch.cat([ang, ang], -1).cos().float(), rtol=0, atol=1e-6)
    assert not torch.allclose(pcos, cos)
    # the position of a rotation is all that matters: q.k depends on the offset only
    a, b = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def dot(i, j):
        ci, si = plain(torch.tensor([[i]]), a)
        cj, sj = plain(torch.tensor([[j]]), b)
        return float((apply_rope(a, ci, si) * apply_rope(b, cj, sj)).sum())

    assert dot(7, 3) == pytest.approx(dot(14, 10), abs=1e-5)


def test_attend_gqa_and_masks():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g),
               torch.randn(2, 2, 5, 8, generator=g))
    mask = causal_mask(2, 3)
    assert mask.tolist() == [[True, True, True, False, False], [True, True, True, True, False],
                             [True, True, True, True, True]]
    out = attend(q, k, v, mask)
    kk, vv = repeat_kv(k, 2), repeat_kv(v, 2)
    assert torch.equal(kk[:, 1], k[:, 0]) and torch.equal(kk[:, 2], k[:, 1])  # head h reads KV head h // 2
    scores = (q @ kk.transpose(-1, -2)) / math.sqrt(8)
    want = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ vv
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_kv_cache_append_crop_length():
    cache = KVCache()
    assert cache.length == 0 and cache.crop(0) is cache
    k1, v1 = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    keys, values = cache.append(k1, v1)
    assert keys is k1 and cache.length == 3
    k2, v2 = torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4)
    keys, values = cache.append(k2, v2)
    assert torch.equal(keys, torch.cat([k1, k2], 2)) and torch.equal(values, torch.cat([v1, v2], 2))
    assert cache.crop(4) is cache and cache.length == 4 and torch.equal(cache.value[:, :, 3], v2[:, :, 0])
    with pytest.raises(ValueError, match=r"crop: n must be in \[0, 4\]"):
        cache.crop(5)
    with pytest.raises(ValueError, match="crop"):
        cache.crop(-1)


def test_draft_vocab_scatter_and_saved_form():
    vocab = DraftVocab.from_target_ids(torch.tensor([1, 4, 5, 9]), 10)
    assert vocab.size == 4 and not vocab.is_full
    assert vocab.d2t.tolist() == [1, 3, 3, 6] and torch.nonzero(vocab.t2d).flatten().tolist() == [1, 4, 5, 9]
    again = DraftVocab.from_d2t(vocab.d2t, 10, vocab.t2d)
    assert torch.equal(again.target_ids, vocab.target_ids)
    x = torch.randn(2, 3, 4)
    logits, probs = vocab.scatter_logits(x), vocab.scatter_probs(x.softmax(-1))
    assert logits.shape == probs.shape == (2, 3, 10)
    assert torch.equal(logits[..., [1, 4, 5, 9]], x) and torch.isneginf(logits[..., [0, 2, 3, 6, 7, 8]]).all()
    assert torch.equal(probs[..., [0, 2, 3, 6, 7, 8]], torch.zeros(2, 3, 6))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))
    assert torch.equal(logits.argmax(-1), vocab.target_ids[x.argmax(-1)])
    full = DraftVocab.full(10)
    assert full.is_full and full.d2t.eq(0).all() and full.scatter_logits(logits) is logits
    with pytest.raises(ValueError, match="columns"):
        vocab.scatter_probs(torch.randn(3, 5))
    with pytest.raises(ValueError, match="ascending"):
        DraftVocab.from_target_ids(torch.tensor([1, 1, 2]), 10)
    with pytest.raises(ValueError, match="outside"):
        DraftVocab.from_target_ids(torch.tensor([1, 10]), 10)
    with pytest.raises(ValueError, match="t2d has 9 entries"):
        DraftVocab.from_d2t(vocab.d2t, 10, torch.zeros(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="disagree"):
        DraftVocab.from_d2t(vocab.d2t, 10, torch.arange(10) < 4)


def test_both_heads_share_the_primitives():
    """One RMSNorm class, one cache type, one step output, one draft-vocabulary object in both heads."""
    target = tiny_causal_lm("llama").requires_grad_(False)
    e3 = Eagle3DraftModel(Eagle3Config.from_target(target.config, 40))
    e3.set_draft_vocab(DraftVocab.from_target_ids(torch.arange(0, 80, 2), 96))
    e3.attach_target(target)
    ee = EarlyExitHead(EarlyExitConfig.from_target(target, 3, "attn", draft_vocab_size=40))
    ee.set_draft_vocab(e3.draft_vocab).attach_target(target)
    assert torch.equal(ee.draft_vocab.target_ids, e3.draft_vocab.target_ids)
    assert torch.equal(e3.t2d, e3.draft_vocab.t2d)
    norms = {type(m) for head in (e3, ee) for m in head.modules() if "norm" in type(m).__name__.lower()}
    assert norms == {RMSNorm}
    out_e3 = e3(torch.randint(0, 96, (1, 4)), features=torch.randn(1, 4, 96))
    out_ee = ee.step(torch.randn(1, 4, 32))
    for out in (out_e3, out_ee):
        assert type(out) is StepOutput and type(out.cache) is KVCache and out.cache.length == 4
        assert out.logits.shape == (1, 4, 40)
    assert out_e3.hidden.shape == (1, 4, 32) and out_ee.hidden is None
    assert ee.step(torch.randn(1, 4, 32), cache=out_ee.cache.crop(2)).cache.length == 6
    with pytest.raises(ValueError, match="does not fit"):
        e3.set_draft_vocab(DraftVocab.from_target_ids(torch.arange(10), 96))
