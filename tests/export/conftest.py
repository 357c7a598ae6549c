"""Fixtures for the export tests: a tiny target folder and a trained-looking EAGLE-3 run folder.

A "trained-looking" head is a random head whose norms are moved away from 1 and whose draft vocabulary is
a random subset of the target's: everything an export reads (config.json, model.safetensors, config.yaml,
metrics.json, draft_vocab.json, run_info.json) is written the way the trainer writes it, without the
minutes a real training run costs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from hsd.machine import machine_info
from tests.conftest import tiny_causal_lm

AUX_CONVENTION = "Hugging Face output_hidden_states indices = vLLM 'capture before layer j'"


def perturbed_head(target, draft_vocab_size: int = 48, seed: int = 1, aux_ids=None, logit_scale: float = 20.0,
                   layer_scale: float = 6.0):
    """A random EAGLE-3 head for ``target`` that looks trained: norms ~ 1 +- 0.3, random draft vocabulary,
    ``lm_head`` scaled by ``logit_scale`` so that logits spread over a few units as a trained head's do (a
    fresh init's are ~0.1 apart: every row a near-tie), and the decoder layer's projections by
    ``layer_scale`` so that attention and MLP move the fed-back state as much as training makes them
    (at init they barely touch it, and a mistake inside the layer would not change the top-1)."""
    from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel

    cfg = Eagle3Config.from_target(target.config, draft_vocab_size, aux_ids)
    torch.manual_seed(seed)
    head = Eagle3DraftModel(cfg)
    g = torch.Generator().manual_seed(seed)
    v = cfg.vocab_size
    ids = torch.randperm(v, generator=g)[:draft_vocab_size].sort().values
    head.set_draft_vocab(ids - torch.arange(draft_vocab_size))
    with torch.no_grad():
        for name, p in head.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        head.lm_head.weight.mul_(logit_scale)
        for name, p in head.midlayer.named_parameters():
            if "proj" in name:
                p.mul_(layer_scale)
    return head.eval()


def write_head_run(root: Path, head, target_dir: Path, *, seed: int = 0, step: int = 40, ttt_steps: int = 3,
                   name: str = "run") -> Path:
    """Save ``head`` as ``root/name/final`` with the provenance files a training run writes; returns final/."""
    run = root / name
    final = run / "final"
    head.save_pretrained(final)
    ids = head.config.aux_layer_ids
    run_cfg = {"output_dir": str(run), "target": str(target_dir), "target_dtype": "auto",
               "data": [str(root / "chat.jsonl")], "eval_fraction": 0.1, "max_length": 64, "batch_size": 4,
               "num_epochs": 2, "max_steps": -1, "lr": 0.002, "seed": seed, "ttt_steps": ttt_steps,
               "step_weight": 0.8, "draft_vocab_size": head.config.draft_vocab_size, "aux_layer_ids": [],
               "init_from_target": True, "target_revision": ""}
    vocab = {"target": str(target_dir), "target_revision": None, "target_vocab_size": head.config.vocab_size,
             "draft_vocab_size": head.config.draft_vocab_size, "coverage": 0.93,
             "coverage_of": "assistant tokens of the training split", "aux_layer_ids": ids,
             "aux_layer_ids_convention": AUX_CONVENTION, "ttt_steps": ttt_steps, "step_weight": 0.8,
             "data": [str(root / "chat.jsonl")],
             "data_stats": {"rows": 48, "kept": 48, "truncated": 0, "dropped_too_long": 0, "tokens": 1500,
                            "assistant_tokens": 700, "max_length": 64, "overflow": "truncate"}}
    metrics = {"step": step, "epoch": 1, "eval/sim_accept_len": 0.71, "eval/sim_accept_len_cond": 0.8,
               "eval/sim_accept_len_alpha": 0.6, "eval/acc_0": 0.5, "eval/acc_1": 0.4, "eval/acc_2": 0.3}
    for d in (run, final):
        (d / "config.yaml").write_text(yaml.safe_dump(run_cfg))
        (d / "draft_vocab.json").write_text(json.dumps(vocab, indent=2))
    (final / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (run / "run_info.json").write_text(json.dumps({"total_steps": step, "train_rows": 43, "eval_rows": 5,
                                                   "world_size": 1, "machine": machine_info("cpu", torch.float32)}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": step, **metrics}) + "\n")
    return final


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(root, target model, final/ folder): tiny 8-layer Llama target saved in root/target, a trained-looking
    head (aux ids [2, 4, 5], draft vocab 48 of 96) in root/run/final."""
    root = tmp_path_factory.mktemp("export")
    target = tiny_causal_lm("llama", initializer_range=0.3)
    target.save_pretrained(root / "target")
    final = write_head_run(root, perturbed_head(target), root / "target")
    return root, target, final


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory):
    """The tiny head exported in the native layout (bfloat16) and in float32: {"bf16": dir, "fp32": dir}."""
    from hsd.export import export_head

    root, _, final = tiny_run
    out = tmp_path_factory.mktemp("exported")
    export_head(final, out / "bf16")
    export_head(final, out / "fp32", dtype="float32", clean_process=False)
    return {"bf16": out / "bf16", "fp32": out / "fp32"}
