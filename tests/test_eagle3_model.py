"""EAGLE-3 draft head: export key set and shapes, config from the target (aux ids, RoPE, head_dim), the
draft vocabulary buffers, save/load round trip without the embedding, and the step API with a KV cache
reproducing the TTT forward."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hsd.export.layout import EAGLE3_KEYS as EXPORT_KEYS
from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel, load_draft
from hsd.models.kv import KVCache
from tests.conftest import tiny_causal_lm
from train import ttt

pytestmark = pytest.mark.usefixtures("one_thread")


def make_head(target, vd=64, seed=1, **overrides) -> Eagle3DraftModel:
    torch.manual_seed(seed)
    head = Eagle3DraftModel(Eagle3Config.from_target(target.config, vd, **overrides))
    ids = torch.sort(torch.randperm(target.config.vocab_size)[:vd]).values  # a scattered draft vocab
    head.set_draft_vocab(ids - torch.arange(vd))
    return head.attach_target(target)


def test_export_key_set_and_shapes(tiny_target):
    c = tiny_target.config
    head = make_head(tiny_target)
    sd = head.state_dict()
    assert set(sd) == set(EXPORT_KEYS)  # exactly the vLLM/SGLang names; no embed_tokens, no prefix
    H, V, n_h, n_kv, d = c.hidden_size, c.vocab_size, c.num_attention_heads, c.num_key_value_heads, 8
    shapes = {"fc.weight": (H, 3 * H), "midlayer.self_attn.q_proj.weight": (n_h * d, 2 * H),
              "midlayer.self_attn.k_proj.weight": (n_kv * d, 2 * H), "midlayer.self_attn.v_proj.weight": (n_kv * d, 2 * H),
              "midlayer.self_attn.o_proj.weight": (H, n_h * d), "midlayer.mlp.gate_proj.weight": (c.intermediate_size, H),
              "midlayer.mlp.down_proj.weight": (H, c.intermediate_size), "lm_head.weight": (64, H), "norm.weight": (H,),
              "midlayer.hidden_norm.weight": (H,), "d2t": (64,), "t2d": (V,)}
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert sd["d2t"].dtype == torch.int64 and sd["t2d"].dtype == torch.bool
    assert not any(b for b in head.midlayer.self_attn.q_proj.parameters() if b.ndim == 1)  # no bias (Qwen2 has)
    assert head.embed_tokens.shape == (V, H) and not head.embed_tokens.requires_grad
    assert all("embed" not in n for n, _ in head.named_parameters())
    out = head(torch.randint(0, V, (2, 5)), features=torch.randn(2, 5, 3 * H))
    assert out.logits.shape == (2, 5, 64) and out.hidden.shape == (2, 5, H) and out.cache.length == 5


def test_config_from_target_defaults_and_rope():
    target = tiny_causal_lm("llama", num_layers=12, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5,
                                                                     "factor": 8.0, "low_freq_factor": 1.0,
                                                                     "high_freq_factor": 4.0,
                                                                     "original_max_position_embeddings": 64},
                            bos_token_id=5, eos_token_id=7)
    c = Eagle3Config.from_target(target.config, 48)
    assert c.aux_layer_ids == [2, 6, 9]  # [2, N//2, N-3] as HF hidden_states indices
    assert c.eagle_config["use_aux_hidden_state"] is True
    assert (c.vocab_size, c.draft_vocab_size, c.bos_token_id, c.eos_token_id) == (96, 48, 5, 7)
    assert c.tie_word_embeddings is False and c.norm_before_residual is False and c.attention_bias is False
    d = c.to_dict()
    assert d["rope_theta"] == 5e5 and d["rope_parameters"]["rope_type"] == "llama3"
    assert d["rope_scaling"]["rope_type"] == "llama3" and d["rope_scaling"]["factor"] == 8.0
    assert "target_hidden_size" not in d  # written only when it differs from hidden_size
    plain = Eagle3Config.from_target(tiny_causal_lm("qwen2").config).to_dict()
    assert plain["rope_scaling"] is None and plain["rope_theta"] == 10000.0

    # the head's RoPE is the recorded llama3-scaled one: it differs from plain RoPE at the same theta
    head = Eagle3DraftModel(c)
    plain_head = Eagle3DraftModel(Eagle3Config.from_target(target.config, 48, rope_parameters={"rope_theta": 5e5}))
    pos = torch.arange(40)[None]
    x = torch.zeros(1, 40, 8)
    cos_a, _ = head.rope(pos, x)
    cos_b, _ = plain_head.rope(pos, x)
    assert not torch.allclose(cos_a, cos_b)


def test_head_dim_independent_of_hidden_and_target_hidden_size():
    target = tiny_causal_lm("qwen2", hidden_size=32, num_attention_heads=4, head_dim=16)  # 4*16 != 32
    c = Eagle3Config.from_target(target.config, 64)
    assert c.head_dim == 16
    head = make_head(target)
    assert head.midlayer.self_attn.q_proj.weight.shape == (64, 64)
    assert head.midlayer.self_attn.o_proj.weight.shape == (32, 64)
    rows = torch.ones(2, 9, dtype=torch.bool)
    logits = ttt.ttt_unroll(head, torch.randn(2, 9, 96), torch.randn(2, 9, 32), rows, 2)
    assert logits[0].shape == (2 * 8, 64) and logits[1].shape == (2 * 7, 64)
    # a draft narrower than the target: fc reads 3 * target_hidden_size
    small = Eagle3Config.from_target(target.config, 64, hidden_size=16, num_attention_heads=2,
                                     num_key_value_heads=1, head_dim=8, intermediate_size=24)
    assert small.target_hidden_size == 32 and small.to_dict()["target_hidden_size"] == 32
    m = Eagle3DraftModel(small)
    assert m.fc.weight.shape == (16, 96)


@pytest.mark.parametrize("ids, vd, match", [
    ([2, 4, 8], 200, "draft_vocab_size"),
    ([2, 4, 9], 64, r"aux_layer_ids \[9\] do not exist.*\[0, 8\]"),
    ([2, 4], 64, "exactly 3"),
])
def test_config_from_target_rejects_bad_input(ids, vd, match):
    target = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match=match):
        Eagle3Config.from_target(target.config, vd, ids)


def test_draft_vocab_buffers_and_mapping():
    target = tiny_causal_lm("llama")
    head = Eagle3DraftModel(Eagle3Config.from_target(target.config, 5))
    used = torch.tensor([3, 10, 11, 40, 95])
    head.set_draft_vocab(used - torch.arange(5))
    assert head.d2t.tolist() == [3, 9, 9, 37, 91]
    assert torch.equal(torch.nonzero(head.t2d).flatten(), used) and head.t2d.sum() == 5
    assert torch.equal(head.draft_vocab.target_ids, used)
    logits = torch.randn(2, 3, 5)
    full = head.draft_vocab.scatter_logits(logits)
    assert full.shape == (2, 3, 96)
    assert torch.equal(full[..., used], logits)
    mask = torch.ones(96, dtype=torch.bool)
    mask[used] = False
    assert torch.isneginf(full[..., mask]).all()
    assert torch.equal(full.argmax(-1), used[logits.argmax(-1)])
    with pytest.raises(ValueError, match="disagree"):
        bad = torch.zeros(96, dtype=torch.bool)
        bad[:5] = True
        head.set_draft_vocab(used - torch.arange(5), bad)
    with pytest.raises(ValueError, match="ascending"):
        head.set_draft_vocab(torch.tensor([10, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="outside"):
        head.set_draft_vocab(torch.tensor([0, 0, 0, 0, 95]))


def test_save_load_round_trip_without_embedding(tmp_path):
    target = tiny_causal_lm("qwen2")
    head = make_head(target)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.01 * torch.randn_like(p))
    head.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert keys == set(EXPORT_KEYS)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 64 and cfg["tie_word_embeddings"] is False
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert cfg["rope_theta"] == 10000.0 and "rope_parameters" in cfg and "rope_scaling" in cfg

    loaded = Eagle3DraftModel.from_pretrained(tmp_path)
    for k, v in head.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    ids, feats = torch.randint(0, 96, (2, 6)), torch.randn(2, 6, 96)
    with pytest.raises(ValueError, match="attach_target"):
        loaded(ids, features=feats)
    loaded = load_draft(str(tmp_path), target)
    torch.testing.assert_close(loaded(ids, features=feats).logits, head(ids, features=feats).logits,
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="vocabulary"):
        load_draft(str(tmp_path), tiny_causal_lm("qwen2", vocab_size=128))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_step_api_with_cache_reproduces_ttt(family):
    """Chain decoding with the KV cache (prefill, then one row per step from the previous hidden state)
    gives the TTT unroll's step-k logits at every anchor row."""
    target = tiny_causal_lm(family)
    head = make_head(target)
    B, S, K = 2, 14, 4
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (B, S), generator=g)
    feats = torch.randn(B, S, 96, generator=g)
    rows = torch.ones(B, S, dtype=torch.bool)
    with torch.no_grad():
        ttt_logits = ttt.ttt_unroll(head, feats, head.embed(ids), rows, K, all_rows=True)
        worst = 0.0
        for t in (0, 5, 9):
            pre = head(ids[:, 1:t + 2], features=feats[:, :t + 1])  # rows 0..t read tokens x[1..t+1]
            worst = max(worst, (pre.logits[:, -1] - ttt_logits[0][:, t]).abs().max().item())
            cache, h = pre.cache, pre.hidden[:, -1:]
            for k in range(1, K):
                step = head(ids[:, t + k + 1:t + k + 2], torch.full((B, 1), t + k), cache, hidden=h)
                worst = max(worst, (step.logits[:, 0] - ttt_logits[k][:, t]).abs().max().item())
                cache, h = step.cache, step.hidden
            assert cache.length == t + K
            cache.crop(t + 1)  # a rejected chain: keep the verified prefix
            assert cache.length == t + 1 and cache.key.shape[2] == t + 1
    assert worst < 1e-5, worst


def test_step_api_tree_mask_and_errors():
    target = tiny_causal_lm("llama")
    head = make_head(target)
    ids, feats = torch.randint(0, 96, (1, 4)), torch.randn(1, 4, 96)
    full = head(ids, features=feats)
    # an explicit causal mask equals the default
    mask = torch.ones(4, 4, dtype=torch.bool).tril()[None]
    same = head(ids, features=feats, attention_mask=mask)
    torch.testing.assert_close(same.logits, full.logits)
    # two siblings after a 2-row prefix, each seeing the prefix and itself only: equal to separate chains
    pre = head(ids[:, :2], features=feats[:, :2])
    sib_tokens = torch.tensor([[7, 9]])
    h = pre.hidden[:, -1:].expand(1, 2, -1)
    tree = torch.tensor([[[True, True, True, False], [True, True, False, True]]])
    both = head(sib_tokens, torch.tensor([[2, 2]]), KVCache(pre.cache.key, pre.cache.value), hidden=h,
                attention_mask=tree)
    for i in range(2):
        one = head(sib_tokens[:, i:i + 1], torch.tensor([[2]]), KVCache(pre.cache.key, pre.cache.value),
                   hidden=h[:, :1])
        torch.testing.assert_close(both.logits[:, i], one.logits[:, 0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        head(ids, features=feats, hidden=torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="3 \\* target_hidden_size"):
        head(ids, features=torch.randn(1, 4, 32))
