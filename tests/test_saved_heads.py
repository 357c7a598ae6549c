"""Heads saved before the shared-primitives refactor still load and compute the same numbers.

``tests/fixtures/saved_heads/`` holds a tiny EAGLE-3 head (reduced draft vocabulary, llama3-scaled RoPE)
and one early-exit head of each trainable type (the ``lowrank`` one with a reduced draft vocabulary),
written with ``save_pretrained`` by the code of commit 902ece2 (before the heads shared their
primitives), together with ``reference.safetensors``: the inputs and the outputs that code computed from
them (EAGLE-3 prefill, chained steps after a crop, the scatter into the target vocabulary and the TTT
unroll; early-exit logits, cached ``attn`` steps, and the probability rows its since-removed
``EarlyExitHead.step(..., temperature=T).probs`` returned). They were written once, by the script
``git show e6e95ce:tests/fixtures/make_saved_heads.py``, and must never be regenerated: they pin the
checkpoint format (state-dict keys, ``config.json`` fields) and the numbers.

The target is built here from a config with every weight drawn from a seeded generator, so it does
not depend on how ``transformers`` initialises models.
"""
from __future__ import annotations

import json
import pathlib

import torch

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "saved_heads"
EE_TYPES = ("affine", "lowrank", "mlp", "attn")
ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def fixture_target():
    """A 4-layer Llama target (V = 32, H = 8, 2 heads, 1 KV head) with seeded weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=64,
                      tie_word_embeddings=False, rms_norm_eps=1e-6, rope_parameters=dict(ROPE))
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if p.ndim == 1 else 0.3 * noise)
    return model.requires_grad_(False)


def reference() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / "reference.safetensors"))


def same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 summation order: the reference was computed on one machine, and CPUs differ in
    their matmul kernels (an AVX2-only EPYC and an AMX Xeon give the same head numbers to ~4e-7, not bit
    for bit). A changed format, weight mapping or formula moves these outputs by orders of magnitude more."""
    if not got.dtype.is_floating_point:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        return
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def resaved_config(model, tmp_path) -> dict:
    model.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def assert_same_checkpoint_format(folder: pathlib.Path, model, tmp_path) -> None:
    """Loading and saving again keeps the state-dict keys, dtypes and every config.json field."""
    from safetensors.torch import load_file

    saved = load_file(str(folder / "model.safetensors"))
    assert set(model.state_dict()) == set(saved)
    again = resaved_config(model, tmp_path)
    old = json.loads((folder / "config.json").read_text())
    for d in (old, again):
        d.pop("transformers_version", None)
    assert again == old
    resaved = load_file(str(tmp_path / "model.safetensors"))
    assert set(resaved) == set(saved)
    for k, v in saved.items():
        assert resaved[k].dtype == v.dtype and torch.equal(resaved[k], v), k


def test_saved_eagle3_head(tmp_path):
    from hsd.models.eagle3 import load_draft
    from hsd.models.kv import KVCache
    from train import ttt

    ref, target = reference(), fixture_target()
    head = load_draft(str(FIXTURES / "eagle3"), target)
    assert_same_checkpoint_format(FIXTURES / "eagle3", head, tmp_path)
    ids, feats = ref["e3.ids"], ref["e3.features"]
    with torch.no_grad():
        pre = head(ids[:, :5], features=feats[:, :5])
        step = head(ids[:, 5:6], torch.full((2, 1), 5), pre.cache, hidden=pre.hidden[:, -1:])
        cache = step.cache.crop(4)
        again = head(ids[:, 4:6], torch.tensor([[4, 5], [4, 5]]), KVCache(cache.key, cache.value),
                     hidden=pre.hidden[:, 3:5])
        unroll = ttt.ttt_unroll(head, feats, head.embed(ids), torch.ones(2, 7, dtype=torch.bool), 3,
                                all_rows=True)
    same(head.draft_vocab.target_ids, ref["e3.draft_ids"])
    for name, out in (("prefill", pre), ("step", step), ("crop", again)):
        same(out.logits, ref[f"e3.{name}.logits"])
        same(out.hidden, ref[f"e3.{name}.hidden"])
    same(head.draft_vocab.scatter_logits(pre.logits), ref["e3.prefill.target_logits"])
    for k, lg in enumerate(unroll):
        same(lg, ref[f"e3.ttt.{k}"])


def test_saved_early_exit_heads(tmp_path):
    from hsd.decode.sampling import process_logits
    from hsd.models.early_exit import load_head

    ref, target = reference(), fixture_target()
    h = ref["ee.hidden"]
    for kind in EE_TYPES:
        folder = FIXTURES / f"early_exit_{kind}"
        head = load_head(str(folder), target)
        assert head.config.head_type == kind and head.config.exit_layer == 2
        assert_same_checkpoint_format(folder, head, tmp_path / kind)
        with torch.no_grad():
            same(head(h).logits, ref[f"ee.{kind}.logits"])
            logits = head.step(h).logits
            # the processed rows the head used to return (its removed `probs`): the decoder's one function
            for t in (0.7, 0.0):
                same(head.draft_vocab.scatter_probs(process_logits(logits, t)), ref[f"ee.{kind}.probs_t{t:g}"])
    head = load_head(str(FIXTURES / "early_exit_attn"), target)
    with torch.no_grad():
        first = head.step(h[:, :4])
        second = head.step(h[:, 4:], cache=first.cache)
        first.cache.crop(3)
        third = head.step(h[:, 3:].flip(0), cache=first.cache)
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[1, :2] = 0
        padded = head(h, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), attention_mask=mask).logits
    same(torch.cat([first.logits, second.logits], 1), ref["ee.attn.steps"])
    same(third.logits, ref["ee.attn.after_crop"])
    same(padded, ref["ee.attn.padded"])
