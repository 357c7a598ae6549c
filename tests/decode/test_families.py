"""Every common target family decodes exactly, or is refused before any work (issue 18).

For each tiny family of :mod:`tests.decode.families` (Llama tied / untied / eager, Qwen2/3, Qwen3-MoE,
Mistral / Mixtral / Phi-3 / Starcoder2 with a sliding window, OLMo-2, Gemma 1/2/3, Granite, SmolLM3,
GLM-4-MoE, gpt-oss, Llama 4, DeepSeek-V3): the self-check passes at float32 precision, the runner's
logits equal the model's own forward across window boundaries at the real window, and T = 0 decoding
(chain, tree, exit stage) equals ``generate``. At T > 0 the emitted law is exact by enumeration for a
windowed family (Mistral) and a windowed + softcapped one (Gemma 2). Planted faults (window dropped,
softcaps dropped, eager attention fed the runner's boolean mask, sinks dropped, Granite's multipliers
dropped, Gemma 3's local RoPE) fail the self-check, and the law tests see a dropped window / softcap.
The trainers' teacher logits and early-exit p_l carry the same output law.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json

import pytest
import torch

import hsd.decode.target as target_mod
import hsd.decode.verifier as verifier_mod
from hsd.decode import DecodeConfig, SpeculativeDecoder
from hsd.decode import target_check as check_mod
from hsd.decode.target import TargetRunner, UnsupportedTarget
from hsd.models import capture as cap
from tests.decode import decode_fixtures as fx
from tests.decode import families
from tests.decode.test_decode_law import TargetLaw, engine_law, replay_verify, tv
from tests.decode.test_decode_tree_law import patch_tree_replay, tree_law_tv

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = list(families.FAMILIES)
N = 10  # new tokens: prompt 7 + 10 positions cross the 4-position windows / chunks several times


@functools.cache
def setup(name: str):
    """(target, prompt [1, 7], generate's greedy continuation [1, N]), built once per family."""
    t = families.build(name)
    ids = fx.prompt(96, 7)
    return t, ids, fx.hf_greedy(t, ids, N)


def hf_logits(t, ids):
    with torch.no_grad():
        return t(ids).logits.float()


@pytest.mark.parametrize("name", NAMES)
def test_family_runner_and_greedy_decoding_exact(name):
    t, ids, ref = setup(name)
    res = check_mod.check_target(t)
    assert res.ok and res.max_dlogp < 1e-4, res.line()
    # the runner at the family's real window: prefill 9, a 1-token step, a 5-token chain split at layer 4
    x = torch.randint(0, 96, (1, 15), generator=torch.Generator().manual_seed(1))
    r = TargetRunner(t, cpu_kernels=False)
    st = r.new_state(1, 16)
    got = [r.run(st, tokens=x[:, :9], logit_rows=slice(None)).logits,
           r.run(st, tokens=x[:, 9:10], logit_rows=slice(None)).logits]
    low = r.run(st, tokens=x[:, 10:], end=4)
    got.append(r.run(st, hidden=low.hidden, start=4, logit_rows=slice(None)).logits)
    assert torch.allclose(torch.cat(got, 1), hf_logits(t, x), atol=1e-4, rtol=1e-4)
    # T = 0: chain, tree and exit stage all equal generate
    for tree, exit_head in ((None, None), ("2:2:4", None), (None, "mlp")):
        dec = SpeculativeDecoder(t, fx.drafter("eagle3", t, scale=0.05), fx.exit_stage(t, exit_head, 3))
        cfg = DecodeConfig(k=3, tree=tree, exit_window=2, max_new_tokens=N, eos_token_id=[])
        out = dec.generate(ids, config=cfg).new_tokens
        assert torch.equal(out, ref), (name, tree, exit_head, out, ref)


# -- planted faults: the self-check must refuse them ------------------------------------------------------


def _drop_window(r, stack):
    stack.enter_context(_patched(target_mod, "pass_mask",
                                 lambda past, pos, parents, span, real=target_mod.pass_mask:
                                 real(past, pos, parents, target_mod.FULL)))


def _drop_final_softcap(r, stack):
    r.law = dataclasses.replace(r.law, final_softcap=None)


def _attention_without(kwarg: str):
    def plant(r, stack):
        from transformers import AttentionInterface

        def attention(*a, **kw):
            kw.pop(kwarg, None)
            return target_mod.runner_attention(*a, **kw)

        AttentionInterface.register(target_mod.ATTENTION, attention)
        stack.callback(AttentionInterface.register, target_mod.ATTENTION, target_mod.runner_attention)
    return plant


def _eager_gets_boolean_mask(r, stack):
    """The old runner: HF's own attention function (eager adds the boolean mask; no causal mask at prefill)."""
    r._attention = contextlib.nullcontext


def _drop_embedding_multiplier(r, stack):
    r.law = dataclasses.replace(r.law, embedding_multiplier=1.0)


def _drop_logits_scaling(r, stack):
    r.law = dataclasses.replace(r.law, logit_scale=1.0)


def _global_rope_everywhere(r, stack):
    rotary = r.rotary
    r._rope_by_type = False
    r._rope = lambda h, pos, layers: rotary(h, pos, "full_attention")


def _window_off_by_one(r, stack):
    stack.enter_context(_patched(target_mod, "pass_mask",
                                 lambda past, pos, parents, span, real=target_mod.pass_mask:
                                 real(past, pos, parents, dataclasses.replace(span, window=span.window + 1)
                                      if span.window else span)))


def _tree_by_index(r, stack):
    """Tree nodes at positions past + index instead of past + depth."""
    stack.enter_context(_patched(target_mod, "tree_positions", lambda parents: torch.arange(
        parents.shape[1]).expand_as(parents)))


@contextlib.contextmanager
def _patched(mod, name, value):
    real = getattr(mod, name)
    setattr(mod, name, value)
    try:
        yield
    finally:
        setattr(mod, name, real)


PLANTS = [
    ("mistral_window", _drop_window), ("gemma2", _drop_window), ("gpt_oss", _drop_window),
    ("llama4_text", _drop_window), ("gemma3_text", _drop_window), ("starcoder2_window", _window_off_by_one),
    ("gemma2", _drop_final_softcap), ("gemma3_text", _drop_final_softcap),
    ("gemma2_full", _attention_without("softcap")), ("gpt_oss_full", _attention_without("s_aux")),
    ("llama_eager", _eager_gets_boolean_mask), ("gemma2", _eager_gets_boolean_mask),
    ("granite", _drop_embedding_multiplier), ("granite", _drop_logits_scaling),
    ("gemma3_text", _global_rope_everywhere), ("deepseek_v3", _tree_by_index),
]


@pytest.mark.parametrize("name,plant", PLANTS, ids=[f"{n}-{p.__name__.strip('_')}" for n, p in PLANTS])
def test_planted_fault_is_refused(name, plant):
    t = setup(name)[0]
    r = TargetRunner(t, cpu_kernels=False, check=False)
    with contextlib.ExitStack() as stack:
        plant(r, stack)
        res = check_mod.probe(r)
    assert not res.ok and res.max_dlogp > 20 * res.tolerance, res.line()
    line = res.line()
    assert "\n" not in line and res.family in line and res.worst_pass in line and "refused" in line


def test_probe_cost_and_windows_restored():
    t = setup("mistral_window")[0]
    res = check_mod.check_target(t)
    assert res.reference_tokens == 3 * 14 and res.runner_tokens == 17
    assert res.probe_spans == {"sliding_window": [4, 3]} and t.config.sliding_window == 4
    assert check_mod.check_target(t) is res  # once per target and process


# -- refusals before any work -----------------------------------------------------------------------------


def test_unknown_layer_type_refused_in_one_line():
    t = families.build("qwen2", num_layers=2)
    t.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UnsupportedTarget, match=r"layer 1 has attention type 'linear_attention'"):
        SpeculativeDecoder(t)


def test_llama4_tree_across_temperature_floor_refused():
    """Llama 4's NoPE layers take their attention temperature from token indices: a tree pass where that
    differs from the tree positions is refused (chains stay exact)."""
    t = families.build("llama4_text", num_layers=4, floor_scale=4)
    res = check_mod.check_target(t)
    assert not res.ok and "floor_scale=4" in res.line(), res.line()
    r = TargetRunner(t, cpu_kernels=False, check=False)
    x = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    st = r.new_state(1, 12)
    out = torch.cat([r.run(st, tokens=x[:, :6], logit_rows=slice(None)).logits,
                     r.run(st, tokens=x[:, 6:], logit_rows=slice(None)).logits], 1)
    assert torch.allclose(out, hf_logits(t, x), atol=1e-4)


def test_cli_refuses_before_any_baseline(tmp_path, monkeypatch, capsys):
    """decode exits 2 with one line, before the HF-generate baseline or any configuration runs."""
    import hsd.decode.evaluate as evaluate_mod
    from hsd.decode.cli import main
    from tests.conftest import write_tiny_chat_run

    root = write_tiny_chat_run(tmp_path)

    def no_norm_logits(self, hidden):  # planted: the final norm dropped
        return self.lm_head(hidden).float()

    def never(*a, **kw):
        raise AssertionError("a configuration or baseline ran before the target check")

    monkeypatch.setattr(TargetRunner, "logits", no_norm_logits)
    monkeypatch.setattr(evaluate_mod.Evaluator, "__init__", never)
    rc = main(["--target", str(root / "target"), "--max-new-tokens", "4", "--out-dir", str(tmp_path / "out")])
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]  # not the loading bars
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: target llama (sdpa attention, float32): the decode engine does not "
                             "reproduce this target's forward:") and "max |Δ log p|" in err[0]
    # the same check by hand: python -m hsd.decode.target_check --target ...
    assert check_mod.main(["--target", str(root / "target")]) == 2
    monkeypatch.undo()
    assert check_mod.main(["--target", str(root / "target"), "--json"]) == 0
    out = capsys.readouterr().out
    assert "target check: llama (sdpa attention, float32): runner = HF forward" in out and '"ok": true' in out


def test_training_and_export_warn_and_record(tmp_path, capsys):
    """`hsd-train train` records the check and warns in one line; export reads the record and warns too."""
    from types import SimpleNamespace

    from hsd.export.cli import engine_warning
    from train.common import check_engine_support

    t = families.build("gemma2", num_layers=2)
    t.config.layer_types = ["full_attention", "linear_attention"]
    acc = SimpleNamespace(is_main_process=True, state=SimpleNamespace(deepspeed_plugin=None),
                          distributed_type="NO")
    cfg = SimpleNamespace(output_dir=str(tmp_path / "run"), target="my/gemma2", shard_target=True)
    lines = []
    check_engine_support(t, cfg, acc, say=lines.append)
    assert len(lines) == 1 and lines[0].startswith("warning: target gemma2") and "linear_attention" in lines[0]
    rec = json.loads((tmp_path / "run" / check_mod.RECORD).read_text())
    assert rec["target"] == "my/gemma2" and rec["ok"] is False
    head = tmp_path / "run" / "final"
    head.mkdir()
    (head / "config.json").write_text(json.dumps({"model_type": "eagle3_draft"}))
    (head / "model.safetensors").write_bytes(b"")
    msg = engine_warning(str(head), "my/gemma2")
    assert msg and msg.startswith("warning: target gemma2") and "the export goes on" in msg


# -- the trainers' teacher and early-exit p_l have the target's output law --------------------------------


@pytest.mark.parametrize("name", ["gemma2", "granite", "gemma3_text"])
def test_teacher_and_exit_logits_have_the_output_law(name):
    from hsd.models.early_exit import EarlyExitConfig, EarlyExitHead

    t = setup(name)[0]
    x = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(2))
    ref = hf_logits(t, x)
    L = cap.num_layers(t)
    c = cap.capture(t, x, layers=[L], logits=True, final_hidden=True)
    assert torch.allclose(c.logits, ref, atol=1e-5)
    assert torch.allclose(cap.output_logits(t, c.final_hidden), ref, atol=1e-5)
    plain = cap.lm_head(t)(c.final_hidden).float()
    assert (plain - ref).abs().max() > 0.1  # the law matters for this family
    head = EarlyExitHead(EarlyExitConfig.from_target(t, 3, "lens")).attach_target(t)  # lens: p_l = the final law at h_L
    assert torch.allclose(head.output_logits(c.hidden_states[L]).float(), ref, atol=1e-5)


# -- T > 0: the exact emitted law, by enumeration ---------------------------------------------------------

V = 16


@pytest.fixture
def replay(monkeypatch):  # chains and trees
    patch_tree_replay(monkeypatch)
    monkeypatch.setattr(verifier_mod, "verify", replay_verify)


@functools.cache
def tiny(name: str):
    return families.build(name, vocab=V, num_layers=4, seed=3, initializer_range=0.2), fx.prompt(V, 6, seed=1)


@pytest.mark.parametrize("name", ["mistral_window", "gemma2"])
def test_emitted_law_equals_target(replay, name):
    t, ids = tiny(name)
    chain = tv(engine_law(t, ids, "eagle3", "mlp", "hsd"), TargetLaw(t, ids, 1.0).law())
    tree = tree_law_tv(t, ids, "2:1:1", "hsd", 3)
    print(f"{name}: TV chain+exit {chain:.2e}, tree {tree:.2e}")
    assert chain < 1e-4 and tree < 1e-4


def _law_drop_window(monkeypatch):
    real = target_mod.pass_mask
    monkeypatch.setattr(target_mod, "pass_mask", lambda past, pos, parents, span: real(past, pos, parents,
                                                                                      target_mod.FULL))


def _law_drop_output_law(monkeypatch):
    monkeypatch.setattr(TargetRunner, "logits", lambda self, h: self.lm_head(self.norm(h)).float())


@pytest.mark.parametrize("name,plant", [("mistral_window", _law_drop_window), ("gemma2", _law_drop_output_law)])
def test_planted_law_faults_fail(replay, monkeypatch, name, plant):
    """The same law test sees a dropped window / softcap (with the self-check off, so the engine runs)."""
    t, ids = tiny(name)
    monkeypatch.setattr(check_mod, "ensure_checked", lambda runner: None)
    plant(monkeypatch)
    d = tv(engine_law(t, ids, "eagle3", None, "hsd"), TargetLaw(t, ids, 1.0).law())
    print(f"planted {name}: TV {d:.3f}")
    assert d > 1e-2


@pytest.mark.parametrize("name", ["gemma3_text", "gemma", "granite"])
def test_eagle3_training_embeds_are_what_the_head_decodes_with(name):
    """The trainer feeds the head the same token inputs it gets when decoding (a plain lookup in the target's
    embedding matrix), not the embedding module's output, which Gemma 3 scales by sqrt(H)."""
    from types import SimpleNamespace

    from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel
    from train.eagle3 import Eagle3Task

    t = setup(name)[0]
    x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    head = Eagle3DraftModel(Eagle3Config.from_target(t.config, 16)).attach_target(t)
    trained_on = Eagle3Task.token_embeddings(SimpleNamespace(target=t), x)
    assert torch.equal(trained_on, head.embed(x))
    if name == "gemma3_text":  # the module's output is scaled: training on it would not be what decoding feeds
        assert not torch.allclose(t.get_input_embeddings()(x), head.embed(x))
