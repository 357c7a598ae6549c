"""Early-exit trainer: pure pieces (metrics, positions, split, config validation)."""
from __future__ import annotations

import pytest
import torch

from train.chat_data import split_rows
from train.config import load_config
from train.early_exit import (
    EarlyExitHeads,
    EarlyExitTrainConfig,
    exit_metrics,
    next_token_positions,
    plot_exit_quality,
    summarise,
)


def test_exit_metrics_full_vocab():
    g = torch.Generator().manual_seed(0)
    target = 3 * torch.randn(50, 17, generator=g)
    head = 3 * torch.randn(50, 17, generator=g)
    t = 0.7
    m = exit_metrics(head, target, t)
    p, q = torch.softmax(target / t, -1), torch.softmax(head / t, -1)
    # alpha = sum min(p, q) = 1 - TV(p, q)
    assert torch.allclose(m["alpha"], 1 - 0.5 * (p - q).abs().sum(-1), atol=1e-6)
    # ce = H(p) + KL(p || q)
    ent = -(p * p.log()).sum(-1)
    assert torch.allclose(m["ce"], ent + m["kl"], atol=1e-5)
    assert (m["kl"] > 0).all()
    assert torch.equal(m["top1"], (q.argmax(-1) == p.argmax(-1)).float())
    same = exit_metrics(target, target, t)
    assert torch.allclose(same["alpha"], torch.ones(50), atol=1e-6)
    assert same["kl"].abs().max() < 1e-5 and same["top1"].min() == 1
    # The loss is the differentiable part; metrics are not.
    head.requires_grad_(True)
    out = exit_metrics(head, target, t)
    assert out["ce"].requires_grad and not out["alpha"].requires_grad


def test_exit_metrics_draft_vocab():
    g = torch.Generator().manual_seed(1)
    V, ids = 12, torch.tensor([0, 2, 3, 7, 11])
    target = 2 * torch.randn(30, V, generator=g)
    target[:5, 7] = 20.0  # confident rows inside the draft vocab
    p = torch.softmax(target, -1)
    # The best a draft-vocab head can do: the restricted, renormalised teacher.
    best = torch.log(p[:, ids] / p[:, ids].sum(-1, keepdim=True))
    m = exit_metrics(best, target, 1.0, ids)
    assert m["kl"].abs().max() < 1e-5
    # alpha uses the true p_f: mass outside the draft vocab cannot be accepted.
    assert torch.allclose(m["alpha"], p[:, ids].sum(-1), atol=1e-5)
    assert torch.equal(m["top1"][:5], torch.ones(5))
    worse = exit_metrics(best + torch.randn(30, 5, generator=g), target, 1.0, ids)
    assert (worse["alpha"] <= m["alpha"] + 1e-6).all() and worse["ce"].mean() > m["ce"].mean()


def test_next_token_positions():
    am = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    lm = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 1, 1]])
    sel = next_token_positions(am, lm)
    assert sel.tolist() == [[False, True, True, True, False, False], [True, True, False, True, True, False]]


def test_split_rows_is_seeded_and_disjoint():
    rows = [{"i": i} for i in range(40)]
    tr, ev = split_rows(rows, 0.1, seed=3)
    assert len(ev) == 4 and len(tr) == 36
    assert {r["i"] for r in tr}.isdisjoint({r["i"] for r in ev})
    assert split_rows(rows, 0.1, seed=3) == (tr, ev)
    assert split_rows(rows, 0.1, seed=4)[1] != ev
    assert split_rows(rows, 0.0, seed=3)[1] == []
    with pytest.raises(ValueError, match="eval_fraction"):
        split_rows(rows[:1], 0.5, seed=0)


@pytest.mark.parametrize("override, message", [
    ("head_type=mystery", "head_type' must be one of"),
    ("head_type=lens", r"head_type' must be one of \['affine', 'lowrank', 'mlp', 'attn', 'layers'\]"),  # lens: none
    ("rank=0", "rank must be > 0"),
    ("temperature=0", "temperature must be"),
    ("exit_layers=[0,3]", "exit_layers must be >= 1"),
    ("exit_layers=[3,3]", "must not repeat"),
    ("best_layer=5", "best_layer 5 is not one of"),
    ("draft_vocab_size=-1", "draft_vocab_size must be >= 0"),
    ("no_such_key=1", "unknown config key"),
])
def test_config_rejects_bad_values(override, message):
    base = ["head_type=lowrank", "rank=8", "exit_layers=[2,3]"]
    with pytest.raises(ValueError, match=message):
        load_config(EarlyExitTrainConfig, None, base + [override])


def test_shipped_configs_load():
    for name in ("smollm2-135m", "cpu_smoke", "gpu_deepspeed"):
        cfg = load_config(EarlyExitTrainConfig, f"configs/early_exit/{name}.yaml")
        assert cfg.head_type in ("affine", "lowrank", "mlp", "attn")


def test_summary_and_plot(tmp_path):
    means = {"alpha_L2": 0.6, "top1_L2": 0.5, "kl_L2": 0.4, "ce_L2": 2.0, "lens_alpha_L2": 0.3,
             "lens_top1_L2": 0.2, "lens_kl_L2": 1.1, "alpha_L4": 0.7, "top1_L4": 0.6, "kl_L4": 0.3, "ce_L4": 1.5}
    s = summarise(means, [2, 4])
    assert s["2"]["lens"] == {"alpha": 0.3, "top1": 0.2, "kl": 1.1}
    assert s["4"]["trained"]["ce"] == 1.5 and "lens" not in s["4"]
    plot_exit_quality(tmp_path / "q.png", s, "test")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heads_module_checks_input_count():
    heads = EarlyExitHeads({})
    with pytest.raises(ValueError, match="hidden_states"):
        heads([torch.zeros(1, 2, 3)], torch.ones(1, 2, dtype=torch.bool))
