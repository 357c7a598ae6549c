"""Early-exit heads: a folder per exit layer + target reference + measured α, validated; loads back."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hsd.export import ExportError, ValidationError, export_head, validate
from tests.conftest import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def write_exit_run(root, target, target_dir, head_type="affine", layers=(2, 4), trained=True, vocab=None):
    from hsd.models.early_exit import EarlyExitConfig, EarlyExitHead

    final = root / "ee" / "final"
    g = torch.Generator().manual_seed(0)
    per_layer = {}
    for layer in layers:
        cfg = EarlyExitConfig.from_target(target, layer, head_type, rank=4 if head_type == "lowrank" else 0,
                                          base_model_name_or_path=str(target_dir), draft_vocab_size=vocab)
        head = EarlyExitHead(cfg)
        if vocab:
            head.set_draft_vocab(torch.zeros(vocab, dtype=torch.long))
        if trained:
            with torch.no_grad():
                for p in head.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        head.save_pretrained(final / f"layer_{layer}")
        per_layer[str(layer)] = {"lens": {"alpha": 0.3, "top1": 0.4, "kl": 2.0},
                                 "trained": {"alpha": 0.5 + 0.01 * layer, "top1": 0.6, "kl": 1.0, "ce": 3.0}}
    summary = {"target": str(target_dir), "target_revision": None, "head_type": head_type, "exit_layers": list(layers),
               "temperature": 1.0, "draft_vocab_size": vocab, "step": 12, "metrics_from": "eval",
               "alpha_mean": 0.53, "lens_alpha_mean": 0.3, "per_layer": per_layer}
    (final / "exit_metrics.json").write_text(json.dumps(summary))
    (final / "metrics.json").write_text(json.dumps({"step": 12, "eval/alpha_mean": 0.53}))
    run_cfg = {"target": str(target_dir), "head_type": head_type, "exit_layers": list(layers), "seed": 0,
               "lr": 0.001, "batch_size": 2, "max_steps": 12, "temperature": 1.0, "data": [str(root / "chat.jsonl")]}
    (final.parent / "config.yaml").write_text(yaml.safe_dump(run_cfg))
    (final / "config.yaml").write_text(yaml.safe_dump(run_cfg))
    (final.parent / "run_info.json").write_text(json.dumps({"total_steps": 12}))
    return final


@pytest.fixture(scope="module")
def exit_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ee")
    target = tiny_causal_lm("llama").requires_grad_(False)
    target.save_pretrained(root / "target")
    return root, target, write_exit_run(root, target, root / "target")


def test_export_and_load_back(exit_run, tmp_path):
    from hsd.models.early_exit import load_head

    root, target, final = exit_run
    res = export_head(final, tmp_path / "out", dtype="float32")
    names = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert names == ["README.md", "exit_metrics.json", "layer_2/config.json", "layer_2/model.safetensors",
                     "layer_4/config.json", "layer_4/model.safetensors", "target_reference.json",
                     "training_summary.json"]
    ref = json.loads((tmp_path / "out" / "target_reference.json").read_text())
    assert ref["num_hidden_layers"] == 8 and ref["revision"].startswith("sha256:") and "/" not in ref["name"]
    cfg = json.loads((tmp_path / "out" / "layer_2" / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32" and cfg["base_model_revision"] == ref["revision"]
    assert "| 2 | 0.520 | 0.300 |" in res.card and "| 4 | 0.540 | 0.300 |" in res.card
    h = torch.randn(2, 5, 32)
    for layer in (2, 4):
        a = load_head(str(final / f"layer_{layer}"), target)
        b = load_head(str(tmp_path / "out" / f"layer_{layer}"), target)
        with torch.no_grad():
            assert torch.equal(a(h).logits, b(h).logits)


def test_bf16_and_draft_vocab(tmp_path):
    target = tiny_causal_lm("llama")
    target.save_pretrained(tmp_path / "target")
    final = write_exit_run(tmp_path, target, tmp_path / "target", head_type="lowrank", layers=(3,), vocab=40)
    export_head(final, tmp_path / "out")
    state = load_file(str(tmp_path / "out" / "layer_3" / "model.safetensors"))
    assert state["d2t"].dtype == torch.int64 and state["body.lora_A.weight"].dtype == torch.bfloat16


def test_planted_faults(exit_run, tmp_path):
    root, target, final = exit_run
    export_head(final, tmp_path / "good", clean_process=False)

    def planted(name, fn):
        d = tmp_path / name
        shutil.copytree(tmp_path / "good", d)
        fn(d)
        with pytest.raises(ValidationError) as err:
            validate(d)
        return "\n".join(err.value.problems)

    def zero(d):
        p = d / "layer_4" / "model.safetensors"
        s = load_file(str(p))
        s = {k: torch.zeros_like(v) for k, v in s.items()}
        save_file(s, str(p), metadata={"format": "pt"})

    assert "this head equals the untrained logit lens" in planted("zero", zero)
    assert "missing keys ['body.proj.bias']" in planted("key", lambda d: save_file(
        {"body.proj.weight": load_file(str(d / "layer_2" / "model.safetensors"))["body.proj.weight"]},
        str(d / "layer_2" / "model.safetensors")))
    assert "target_reference.json is missing" in planted("ref", lambda d: (d / "target_reference.json").unlink())

    def no_alpha(d):
        m = json.loads((d / "exit_metrics.json").read_text())
        m["per_layer"]["4"] = {}
        (d / "exit_metrics.json").write_text(json.dumps(m))

    assert "no measured α for layer 4" in planted("alpha", no_alpha)
    with pytest.raises(ValidationError, match="hidden_size 32 != 48"):
        validate(tmp_path / "good", target=tiny_causal_lm("llama", hidden_size=48))
    with pytest.raises(ValidationError, match="exit layer must be in"):
        validate(tmp_path / "good", target=tiny_causal_lm("llama", num_layers=4))


def test_untrained_heads_are_refused(tmp_path):
    target = tiny_causal_lm("llama")
    target.save_pretrained(tmp_path / "target")
    final = write_exit_run(tmp_path, target, tmp_path / "target", trained=False)
    with pytest.raises(ExportError, match="equals the untrained logit lens"):
        export_head(final, tmp_path / "out")
    with pytest.raises(ExportError, match="EAGLE-3 heads only"):
        export_head(final, tmp_path / "out", fmt="speculators")
