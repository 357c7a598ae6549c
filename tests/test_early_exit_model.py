"""Early-exit heads (hsd.models.early_exit): lens exactness, zero init, save/load, KV-cached steps,
reduced vocabulary, and the residual-stream rule."""
from __future__ import annotations

import pytest
import torch

from hsd.decode.sampling import process_logits
from hsd.models.capture import capture
from hsd.models.early_exit import (
    HEAD_TYPES,
    EarlyExitConfig,
    EarlyExitHead,
    ResidualStreamError,
    assert_frozen_target,
    default_exit_layers,
    expected_num_parameters,
    load_head,
    target_checksum,
)
from hsd.models.kv import KVCache
from tests.conftest import tiny_causal_lm

H, V, L = 32, 96, 8


def frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def llama():
    return frozen(tiny_causal_lm("llama"))


def make_head(target, head_type, exit_layer=3, **kw):
    kw.setdefault("rank", 4 if head_type == "lowrank" else 0)
    cfg = EarlyExitConfig.from_target(target, exit_layer, head_type, **kw)
    return EarlyExitHead(cfg).attach_target(target)


def perturb(head, seed=0):
    """Make every trainable parameter non-trivial (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return head


def ids(b=2, s=12, seed=1):
    return torch.randint(0, V, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layer", [1, 3, 7])
def test_lens_reproduces_final_norm_lm_head_exactly(tiny_target, layer):
    target = frozen(tiny_target)
    x = ids()
    with torch.no_grad():
        out = target(x, output_hidden_states=True)
        ref = target.lm_head(target.model.norm(out.hidden_states[layer]))
        head = make_head(target, "lens", layer)
        got = head(out.hidden_states[layer]).logits
        # The same through the capture hooks the trainer uses.
        got2 = head(capture(target, x, layers=[layer], logits=False).hidden_states[layer]).logits
    assert head.num_trainable_parameters() == 0
    assert torch.equal(got, ref)
    assert torch.equal(got2, ref)
    probs = head.draft_vocab.scatter_probs(process_logits(got, 0.7))  # the rows a decoder samples from
    assert torch.allclose(probs, torch.softmax(ref / 0.7, -1), atol=1e-7)


@pytest.mark.parametrize("head_type", [t for t in HEAD_TYPES if t != "layers"])  # layers: test_early_exit_layers
def test_head_starts_as_lens_and_has_expected_size(llama, head_type):
    head = make_head(llama, head_type, intermediate_size=48)
    lens = make_head(llama, "lens")
    x = capture(llama, ids(), layers=[3], logits=False).hidden_states[3]
    with torch.no_grad():
        assert torch.equal(head(x).logits, lens(x).logits)
    hand = {"lens": 0, "affine": H * H + H, "lowrank": 2 * H * 4 + H, "mlp": H + 3 * H * 48,
            # q: 4 heads x 8, k/v: 2 kv heads x 8, o: 32 -> 32, + norm
            "attn": H + H * 32 + 2 * H * 16 + 32 * H}[head_type]
    assert head.num_trainable_parameters() == hand == expected_num_parameters(head.config)
    # Only the output map is zero: the rest must be able to learn.
    nonzero = [n for n, p in head.named_parameters() if p.abs().sum() > 0]
    if head_type in ("lowrank", "mlp", "attn"):
        assert nonzero, "a zero-initialised input map would never receive gradient"
    # The head's state dict holds only its own parameters, never the target's norm / LM head.
    assert all(k.startswith("body.") for k in head.state_dict())


@pytest.mark.parametrize("head_type", ["affine", "lowrank", "mlp", "attn"])
def test_save_load_round_trip(llama, tmp_path, head_type):
    head = perturb(make_head(llama, head_type, training_temperature=0.8, base_model_name_or_path="tiny/llama",
                             base_model_revision="abc123"))
    x = capture(llama, ids(), layers=[3], logits=False).hidden_states[3]
    with torch.no_grad():
        before = head(x).logits
    head.save_pretrained(tmp_path)
    loaded = load_head(str(tmp_path), llama)
    with torch.no_grad():
        after = loaded(x).logits
    assert torch.equal(before, after)
    c = loaded.config
    assert (c.exit_layer, c.head_type, c.training_temperature, c.base_model_name_or_path,
            c.base_model_revision, c.num_target_layers) == (3, head_type, 0.8, "tiny/llama", "abc123", L)
    if head_type == "lowrank":
        assert c.rank == 4


def test_lens_round_trip_and_draft_vocab(llama, tmp_path):
    vd = 20
    keep = torch.sort(torch.randperm(V, generator=torch.Generator().manual_seed(3))[:vd]).values
    d2t = keep - torch.arange(vd)
    head = make_head(llama, "lens", draft_vocab_size=vd)
    head.set_draft_vocab(d2t)
    x = capture(llama, ids(), layers=[3], logits=False).hidden_states[3]
    with torch.no_grad():
        full = llama.lm_head(llama.model.norm(x))
        got = head(x).logits
    assert got.shape[-1] == vd
    assert torch.allclose(got, full[..., keep], atol=1e-6)
    step = head.step(x[:, :4])
    assert step.cache is None and step.hidden is None
    probs = head.draft_vocab.scatter_probs(process_logits(step.logits, head.config.training_temperature))
    assert probs.shape[-1] == V
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4), atol=1e-5)
    outside = torch.ones(V, dtype=torch.bool)
    outside[keep] = False
    assert probs[..., outside].abs().max() == 0
    assert torch.isneginf(head.draft_vocab.scatter_logits(step.logits)[..., outside]).all()
    head.save_pretrained(tmp_path)
    loaded = load_head(str(tmp_path), llama)
    assert torch.equal(loaded.d2t, d2t)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, got)
    with pytest.raises(ValueError, match="d2t"):
        head.set_draft_vocab(torch.zeros(vd, dtype=torch.long) + V)


def test_attn_cached_steps_equal_full_sequence(llama):
    head = perturb(make_head(llama, "attn"), seed=5)
    x = capture(llama, ids(s=14), layers=[3], logits=False).hidden_states[3]
    with torch.no_grad():
        full = head(x).logits
    cache = None
    chunks = []
    for a, b in [(0, 5), (5, 6), (6, 7), (7, 14)]:
        st = head.step(x[:, a:b], cache=cache)
        cache = st.cache
        chunks.append(st.logits)
    assert isinstance(cache, KVCache) and cache.length == 14
    assert torch.allclose(torch.cat(chunks, 1), full, atol=1e-5)
    # Reject the last 4 tokens, then feed different ones: equals a full pass over the new sequence.
    cache.crop(10)
    y = x.clone()
    y[:, 10:] = x[:, 10:].flip(0)
    st = head.step(y[:, 10:], cache=cache)
    with torch.no_grad():
        assert torch.allclose(st.logits, head(y).logits[:, 10:], atol=1e-5)
    # Attention is causal: the first positions do not depend on later ones.
    with torch.no_grad():
        assert torch.allclose(head(y).logits[:, :10], full[:, :10], atol=1e-6)
        assert not torch.allclose(head(y).logits[:, 10:], full[:, 10:], atol=1e-3)
    # Left padding: a padded batch row equals the unpadded row at its real positions.
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = head(x, position_ids=pos, attention_mask=mask).logits
        alone = head(x[1:, 3:]).logits
    assert torch.allclose(padded[1, 3:], alone[0], atol=1e-5)
    assert torch.isfinite(padded).all()


def test_residual_stream_rule_is_enforced(tmp_path):
    target = frozen(tiny_causal_lm("qwen2"))
    head = make_head(target, "affine", exit_layer=3)
    assert_frozen_target(target, 3, head=head)  # clean: no error
    # Planted violation 1: a trainable target layer <= l.
    target.model.layers[1].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(ResidualStreamError, match=r"require grad.*layers <= 3"):
        make_head(target, "affine", exit_layer=3)
    with pytest.raises(ResidualStreamError):
        head.check_target()
    frozen(target)
    # Planted violation 2: LoRA injected into target layer 0 with peft.
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0]), target)
    frozen(target)  # even with the adapter frozen, the target is no longer the original model
    with pytest.raises(ResidualStreamError, match=r"PEFT adapter.*layers <= 3"):
        make_head(target, "lens", exit_layer=3)
    # Planted violation 3: a head that owns a target parameter.
    clean = frozen(tiny_causal_lm("qwen2"))
    bad = make_head(clean, "affine", exit_layer=3)
    bad.body.proj.weight = clean.model.layers[0].self_attn.o_proj.weight
    with pytest.raises(ResidualStreamError, match="are target parameters"):
        bad.attach_target(clean)
    # The checksum detects any in-place change of the target.
    before = target_checksum(clean)
    assert target_checksum(clean) == before
    with torch.no_grad():
        clean.model.layers[2].mlp.down_proj.weight[0, 0] += 1e-3
    assert target_checksum(clean) != before


def test_bad_config_values(llama):
    with pytest.raises(ValueError, match=r"exit_layer: 8 is out of range; the target has 8 decoder layers"):
        EarlyExitConfig.from_target(llama, 8, "lens")
    with pytest.raises(ValueError, match="exit_layer"):
        EarlyExitConfig.from_target(llama, 0, "lens")
    with pytest.raises(ValueError, match="head_type: unknown head type 'mystery'"):
        EarlyExitConfig.from_target(llama, 2, "mystery")
    with pytest.raises(ValueError, match="rank: lowrank heads need rank > 0"):
        EarlyExitConfig.from_target(llama, 2, "lowrank", rank=0)
    with pytest.raises(ValueError, match="training_temperature"):
        EarlyExitConfig.from_target(llama, 2, "affine", training_temperature=0.0)
    head = make_head(llama, "affine")
    with pytest.raises(ValueError, match="hidden_states"):
        head(torch.zeros(2, 3, H + 1))
    detached = EarlyExitHead(EarlyExitConfig.from_target(llama, 2, "lens"))
    with pytest.raises(RuntimeError, match="attach_target"):
        detached(torch.zeros(1, 2, H))
    other = frozen(tiny_causal_lm("llama", num_layers=4))
    with pytest.raises(ValueError, match="decoder layers"):
        make_head(llama, "lens", exit_layer=5).attach_target(other)


def test_default_exit_layers():
    assert default_exit_layers(30) == [4, 8, 11, 15]  # SmolLM2-135M
    assert default_exit_layers(32) == [4, 8, 12, 16]
    assert default_exit_layers(8) == [1, 2, 3, 4]
    assert default_exit_layers(2) == [1]
