"""The validator catches each planted fault, naming the key, shape or field; a good export passes."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hsd.export import ValidationError, validate
from tests.conftest import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def folder(tiny_export, tmp_path):
    out = tmp_path / "head"
    shutil.copytree(tiny_export["bf16"], out)
    return out


def edit_weights(folder, fn):
    state = load_file(str(folder / "model.safetensors"))
    fn(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def problems(folder, target=None, clean_process=False) -> str:
    with pytest.raises(ValidationError) as err:
        validate(folder, target=target, clean_process=clean_process)
    return "\n".join(err.value.problems)


def test_good_export_passes(tiny_run, tiny_export):
    _, target, _ = tiny_run
    report = validate(tiny_export["bf16"], target=target)  # includes the clean-process load
    assert report.kind == "eagle3" and report.fmt == "native"
    assert any("clean process" in c for c in report.checks) and any("aux ids [2, 4, 5]" in c for c in report.checks)
    assert validate(tiny_export["fp32"], clean_process=False).fmt == "native"  # recorded target facts


def test_dropped_lm_head(folder):
    edit_weights(folder, lambda s: s.pop("lm_head.weight"))
    assert "missing keys ['lm_head.weight']" in problems(folder)


def test_aux_ids_shifted_by_one(folder):
    def shift(cfg):
        ids = [i + 1 for i in cfg["eagle_aux_hidden_state_layer_ids"]]
        cfg["eagle_aux_hidden_state_layer_ids"] = ids
        cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = ids

    edit_config(folder, shift)
    msg = problems(folder)
    assert "draft_vocab.json says the head was trained on aux ids [2, 4, 5], config.json says [3, 5, 6]" in msg


def test_aux_ids_shifted_down_are_not_portable(folder):
    def shift(cfg):
        ids = [i - 1 for i in cfg["eagle_aux_hidden_state_layer_ids"]]
        cfg["eagle_aux_hidden_state_layer_ids"] = ids
        cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = ids

    edit_config(folder, shift)
    assert "[1, 3, 4] are not portable" in problems(folder)


def test_aux_ids_disagree_between_the_two_places(folder):
    edit_config(folder, lambda c: c.update(eagle_aux_hidden_state_layer_ids=[2, 4, 6]))
    assert "aux ids disagree: eagle_config.eagle_aux_hidden_state_layer_ids = [2, 4, 5]" in problems(folder)


def test_random_embed_tokens(folder):
    edit_weights(folder, lambda s: s.update({"embed_tokens.weight": torch.randn(96, 32).bfloat16()}))
    assert "embed_tokens.weight is present" in problems(folder)


def test_d2t_cast_to_bf16(folder):
    edit_weights(folder, lambda s: s.update(d2t=s["d2t"].to(torch.bfloat16)))
    assert "d2t is bfloat16, must be int64" in problems(folder)


def test_inconsistent_vocab_tables(folder):
    def flip(s):
        t2d = s["t2d"].clone()
        t2d[int(torch.nonzero(~t2d)[0])] = True
        s["t2d"] = t2d

    edit_weights(folder, flip)
    assert "d2t/t2d: disagree" in problems(folder)


def test_step0_norms(folder):
    def reset(s):
        for k in ("midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
                  "midlayer.post_attention_layernorm.weight"):
            s[k] = torch.ones_like(s[k])

    edit_weights(folder, reset)
    assert "all exactly 1.0, their initial value: this head was never trained (step 0)" in problems(folder)


def test_step0_fresh_init(folder, tiny_run):
    """Projections bit-equal to a fresh init with the run's seed (0) are step-0 weights."""
    from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel

    _, target, _ = tiny_run
    torch.manual_seed(0)
    fresh = Eagle3DraftModel(Eagle3Config.from_target(target.config, 48)).state_dict()
    edit_weights(folder, lambda s: s.update({"midlayer.self_attn.q_proj.weight": fresh[
        "midlayer.self_attn.q_proj.weight"].bfloat16()}))
    assert "['midlayer.self_attn.q_proj.weight'] are bit-equal to a fresh initialisation" in problems(folder)


def test_wrong_target(folder):
    other = tiny_causal_lm("llama", vocab_size=128, hidden_size=48)
    msg = problems(folder, target=other)
    assert "target: vocab_size 96 != 128" in msg and "hidden_size 48" in msg


def test_aux_ids_beyond_a_shallower_target(folder):
    shallow = tiny_causal_lm("llama", num_layers=5)  # N = 5: ids must be <= 4
    assert "[2, 4, 5] are not portable: every id must be <= N - 1 = 4" in problems(folder, target=shallow)


def test_shapes_come_from_config(folder):
    edit_config(folder, lambda c: c.update(intermediate_size=80))
    msg = problems(folder)
    assert "midlayer.mlp.gate_proj.weight has shape [64, 32], config.json implies [80, 32]" in msg
    assert "midlayer.mlp.down_proj.weight has shape [32, 64], config.json implies [32, 80]" in msg


def test_dtype_spellings_must_agree(folder):
    edit_config(folder, lambda c: c.update(dtype="float32"))
    msg = problems(folder)
    assert "dtype ('float32') and torch_dtype ('bfloat16') disagree" in msg


def test_float_weights_in_another_dtype(folder):
    edit_weights(folder, lambda s: s.update({"fc.weight": s["fc.weight"].float()}))
    assert "fc.weight is float32, must be bfloat16" in problems(folder)


def test_extra_weight_file(folder):
    torch.save({}, folder / "pytorch_model.bin")
    assert "weight files other than model.safetensors: ['pytorch_model.bin']" in problems(folder)


def test_training_config_fails_the_clean_process_load(folder, tiny_run):
    """The training layout's model_type: a server's AutoConfig does not know it (the bug this exporter fixes)."""
    _, _, final = tiny_run
    train_cfg = json.loads((final / "config.json").read_text())
    edit_config(folder, lambda c: c.update(model_type=train_cfg["model_type"], architectures=train_cfg["architectures"]))
    msg = problems(folder, clean_process=True)
    assert "field 'model_type' is 'eagle3_draft', must be 'llama'" in msg
    assert "clean process: config.json does not load with AutoConfig in a clean process" in msg
    assert "eagle3_draft" in msg.rsplit("in a clean process:", 1)[1]


def test_clean_process_never_imports_hsd(tiny_export):
    from hsd.export.validate import clean_process_config

    loaded = clean_process_config(tiny_export["bf16"])
    assert loaded["class"] == "LlamaConfig" and loaded["hsd_modules"] == []
    cfg = loaded["config"]
    assert cfg["eagle_config"] == {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": [2, 4, 5]}
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5] and cfg["draft_vocab_size"] == 48
    assert cfg["norm_before_residual"] is False and cfg["tie_word_embeddings"] is False
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1


def test_every_problem_is_reported_at_once(folder):
    edit_weights(folder, lambda s: (s.pop("lm_head.weight"), s.update(d2t=s["d2t"].float())))
    edit_config(folder, lambda c: c.update(tie_word_embeddings=True))
    msg = problems(folder)
    assert "lm_head.weight" in msg and "d2t is float32" in msg and "tie_word_embeddings" in msg


def test_trainers_step0_head_is_refused(tmp_path):
    """The head exactly as the trainer builds it before its first step (set_seed, setup, model): both the
    all-ones norms and the bit-equal-to-a-seeded-init projections give it away."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from hsd.export import ExportError, export_head
    from tests.conftest import write_tiny_chat_run
    from train.eagle3 import Eagle3Task, Eagle3TrainConfig

    root = write_tiny_chat_run(tmp_path)
    cfg = Eagle3TrainConfig(output_dir=str(root / "run"), target=str(root / "target"), data=[str(root / "chat.jsonl")],
                            draft_vocab_size=48, ttt_steps=3, report_to="none")
    set_seed(cfg.seed)
    task = Eagle3Task(cfg)
    task.setup(Accelerator(cpu=True))
    task.save_model(task.model(), root / "run" / "step0")
    with pytest.raises(ExportError) as err:
        export_head(root / "run" / "step0", tmp_path / "out", target=str(root / "target"), clean_process=False)
    assert "are all exactly 1.0, their initial value" in str(err.value)
    assert "'fc.weight'" in str(err.value) and "bit-equal to a fresh initialisation (torch.manual_seed(0))" in str(err.value)
