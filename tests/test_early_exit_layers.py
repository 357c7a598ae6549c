"""The ``layers`` early-exit head (k decoder layers of the target's own class, initialised from its last k
layers, own KV cache) and the draft-vocabulary exit LM head: exactness, cache, save/load, training (only
the head changes), export + validation, bad configs."""
from __future__ import annotations

import json

import pytest
import torch

from hsd.models.capture import capture
from hsd.models.early_exit import (
    EarlyExitConfig,
    EarlyExitHead,
    ResidualStreamError,
    expected_num_parameters,
    target_checksum,
)
from tests.conftest import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def frozen(model):
    model.requires_grad_(False)
    return model.eval()


def layers_head(t, exit_layer, k=1, vd=None):
    cfg = EarlyExitConfig.from_target(t, exit_layer, "layers", num_head_layers=k, draft_vocab_size=vd)
    head = EarlyExitHead(cfg).attach_target(t).init_from_target(t)
    if vd:
        head.set_draft_vocab(torch.arange(0, 2 * vd, 2) - torch.arange(vd))  # the even ids
    return head


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_skipping_nothing_is_the_target(family):
    """Exit at L - k with the target's last k layers reproduces the target's logits (the family's own
    layer code runs: Qwen2's biases included); a deeper skip does not."""
    t = frozen(tiny_causal_lm(family))
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    c = capture(t, ids, layers=[3, 6], logits=True)
    head = layers_head(t, 6, k=2)
    assert head.config.init_layers == [6, 7]
    with torch.no_grad():
        assert torch.allclose(head(c.hidden_states[6]).logits, c.logits, atol=1e-5)
        assert not torch.allclose(layers_head(t, 3, k=2)(c.hidden_states[3]).logits, c.logits, atol=1e-2)
    assert head.num_trainable_parameters() == expected_num_parameters(head.config) == 2 * sum(
        p.numel() for p in t.model.layers[0].parameters())
    assert all(k.startswith("body.layers.") for k in head.state_dict())
    ids_t = {id(p) for p in t.parameters()}
    assert not any(id(p) in ids_t for p in head.parameters())  # copies, never the target's tensors


def test_cached_steps_crop_and_save_load(tmp_path):
    t = frozen(tiny_causal_lm("llama"))
    head = layers_head(t, 3, k=2)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    h = capture(t, torch.randint(0, 96, (1, 12)), layers=[3], logits=False).hidden_states[3]
    h2 = h.clone()
    h2[:, 7:] = torch.randn(1, 5, 32)
    with torch.no_grad():
        full, full2 = head(h).logits, head(h2).logits
        out = head.step(h[:, :5])
        cache = out.cache
        parts = [out.logits, head.step(h[:, 5:9], cache=cache).logits]
        assert cache.length == 9
        cache.crop(7)  # rejected positions 7, 8: continue with other states
        parts.append(head.step(h2[:, 7:], cache=cache).logits)
    assert torch.allclose(torch.cat(parts[:2], 1)[:, :7], full[:, :7], atol=1e-5)
    assert torch.allclose(parts[2], full2[:, 7:], atol=1e-5)
    head.save_pretrained(tmp_path / "h")
    back = EarlyExitHead.from_pretrained(tmp_path / "h").attach_target(t)
    with torch.no_grad():
        assert torch.equal(back(h).logits, full)


def test_draft_vocab_rows_follow_the_vocab():
    """The cheap exit LM head: logits over V_d rows equal the full head's columns; the cached rows follow a
    new d2t; scattered to the target vocabulary, tokens outside get probability 0."""
    t = frozen(tiny_causal_lm("llama"))
    full = layers_head(t, 5)
    head = layers_head(t, 5, vd=24)
    h = torch.randn(1, 4, 32)
    with torch.no_grad():
        ref = full(h).logits
        assert torch.allclose(head(h).logits, ref[..., 0:48:2], atol=1e-6)
        head.set_draft_vocab(torch.arange(1, 49, 2) - torch.arange(24))  # now the odd ids
        got = head(h).logits
    assert torch.allclose(got, ref[..., 1:49:2], atol=1e-6)
    p = torch.softmax(head.draft_vocab.scatter_logits(got), -1)
    assert float(p[..., 0::2].sum()) == 0.0 and float(p[..., 49:].sum()) == 0.0


def test_training_changes_only_the_head():
    t = frozen(tiny_causal_lm("qwen2"))
    before = target_checksum(t)
    head = layers_head(t, 4, k=1).train()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    ids = torch.randint(0, 96, (2, 10))
    c = capture(t, ids, layers=[4], logits=True)
    teacher = torch.softmax(c.logits, -1)
    losses = []
    for _ in range(5):
        loss = -(teacher * torch.log_softmax(head(c.hidden_states[4]).logits, -1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert target_checksum(t) == before
    t.model.layers[7].mlp.up_proj.weight.requires_grad_(True)  # what a careless trainer would do
    with pytest.raises(ResidualStreamError):
        head.check_target()


def test_bad_configs():
    t = frozen(tiny_causal_lm("llama"))
    with pytest.raises(ValueError, match="num_head_layers"):
        EarlyExitConfig.from_target(t, 3, "layers", num_head_layers=0)
    with pytest.raises(ValueError, match="num_head_layers"):
        EarlyExitConfig.from_target(t, 3, "layers", num_head_layers=9)
    cfg = EarlyExitConfig.from_target(t, 3, "layers").to_dict()
    cfg["layer_config"]["layer_types"] = ["sliding_attention"] * 8
    with pytest.raises(ValueError, match="full-attention"):
        EarlyExitConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")})
    cfg = EarlyExitConfig.from_target(t, 3, "layers").to_dict()
    cfg["layer_class"] = "transformers.models.llama.modeling_llama.NoSuchLayer"
    with pytest.raises(ValueError, match="layer_class"):
        EarlyExitHead(EarlyExitConfig(**{k: v for k, v in cfg.items() if k not in ("model_type",
                                                                                   "transformers_version")}))


def test_trainer_and_export(tmp_path):
    """hsd-train's early-exit trainer with head_type=layers (initialised from the target), then the
    exporter and its validator on the result; the exported head loads back and gives the same logits."""
    from hsd.export import export_head, validate
    from hsd.models.early_exit import load_head
    from tests.conftest import write_tiny_chat_run
    from train.config import load_config
    from train.early_exit import EarlyExitTask, EarlyExitTrainConfig
    from train.loop import train

    env = write_tiny_chat_run(tmp_path / "env")
    out = tmp_path / "run"
    cfg = load_config(EarlyExitTrainConfig, None, [
        f"output_dir={out}", f"target={env / 'target'}", f"data=[{env / 'chat.jsonl'}]", "report_to=none",
        "eval_fraction=0.25", "max_length=64", "batch_size=4", "lr=1e-3", "warmup_ratio=0", "log_every=2",
        "head_type=layers", "head_layers=1", "exit_layers=[5]", "max_steps=4", "save_every=4",
        "draft_vocab_size=40"])
    res = train(EarlyExitTask(cfg))
    assert res["eval/alpha_L5"] > 0
    final = out / "final"
    saved = json.loads((final / "layer_5" / "config.json").read_text())
    assert saved["head_type"] == "layers" and saved["init_layers"] == [7] and saved["draft_vocab_size"] == 40
    ex = export_head(final, tmp_path / "export", dtype="float32")
    assert validate(tmp_path / "export").kind == "early_exit" and ex.report.kind == "early_exit"
    from transformers import AutoModelForCausalLM

    t = frozen(AutoModelForCausalLM.from_pretrained(env / "target"))
    a, b = load_head(str(final / "layer_5"), t), load_head(str(tmp_path / "export" / "layer_5"), t)
    h = torch.randn(1, 6, t.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(a(h).logits, b(h).logits)
