"""Early-exit drafting (``ExitDrafter``: target layers 1..l + an exit head), alone and under an exit stage
(HiSpec's three levels), and exit heads with a draft vocabulary (the cheap exit LM head):

* T = 0: the output equals ``generate`` (every head type, K, both families, windows), including the
  path where every draft is accepted (a ``layers`` head at L - 1 copied from the target = the target);
* caches: after any accept/reject pattern every target layer's KV and the head's own cache equal a
  fresh prefill of the committed text (the reused layers-<l entries of rejected drafts are gone);
* T > 0: the emitted law equals the target's by exact enumeration (tests/decode/test_decode_law.py);
* planted faults fail: stale reused h_l rows (T = 0), proposal rows that give tokens outside the draft
  vocabulary mass the head never samples (drafter and exit stage).
"""
from __future__ import annotations

import pytest
import torch

import hsd.decode.exit_draft as exit_draft_mod
import hsd.decode.exit_stage as exit_mod
from hsd.decode import DecodeConfig, SpeculativeDecoder, TargetRunner
from hsd.decode.exit_draft import ExitDrafter
from tests.decode import decode_fixtures as fx
from tests.decode.test_decode_law import TOPK, TargetLaw, exact_law, replay, tiny, tv  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL, RTOL = 1e-4, 1e-5  # fp32 chunking; the deep layers of the tiny target reach |h| ~ 20 (errors ~5e-5)
N = 16


def exit_decoder(t, head_type="mlp", layer=3, stage=None, **kw):
    return SpeculativeDecoder(t, fx.drafter("exit", t, head_type=head_type, layer=layer, **kw), stage,
                              cpu_kernels=False)


@pytest.mark.parametrize("family,head_type,k,vd", [("llama", "mlp", 1, None), ("qwen2", "attn", 3, None),
                                                   ("llama", "layers", 2, None), ("qwen2", "layers", 2, None),
                                                   ("llama", "lens", 3, 40), ("qwen2", "layers", 3, 40)])
def test_exit_drafter_greedy_equals_generate(family, head_type, k, vd):
    t = fx.target(family)
    ids = fx.prompt()
    ref = fx.hf_greedy(t, ids, N)
    dec = exit_decoder(t, head_type, 3, vd=vd)
    res = dec.generate(ids, config=DecodeConfig(k=k, max_new_tokens=N, eos_token_id=[]))
    assert torch.equal(res.new_tokens, ref)


@pytest.mark.parametrize("drafter_type,stage_type,window", [("mlp", "attn", 1), ("layers", "layers", 2),
                                                            ("attn", "mlp", 3)])
def test_three_levels_greedy_equals_generate(drafter_type, stage_type, window):
    """HiSpec: exit drafter at l1 = 2 -> exit verifier at l2 = 5 -> target."""
    t = fx.target("llama")
    ids = fx.prompt(seed=3)
    ref = fx.hf_greedy(t, ids, N)
    dec = exit_decoder(t, drafter_type, 2, fx.exit_stage(t, stage_type, 5))
    res = dec.generate(ids, config=DecodeConfig(k=2, exit_window=window, max_new_tokens=N, eos_token_id=[]))
    assert torch.equal(res.new_tokens, ref)
    assert any(len(r.stage1) > 1 for r in res.stats.rounds) or window == 1


def test_every_draft_accepted_path():
    """A layers head at L - 1 made of the target's own last layer is the target: every draft is accepted,
    so the last draft's h_l (computed only in the verification pass) must reach the head's cache."""
    t = fx.target("llama")
    n = t.config.num_hidden_layers
    ids = fx.prompt()
    ref = fx.hf_greedy(t, ids, N)
    dec = exit_decoder(t, "layers", n - 1, scale=0.0)
    seen = []
    res = dec.generate(ids, config=DecodeConfig(k=3, max_new_tokens=N, eos_token_id=[]),
                       callback=lambda run: check_caches(dec, run, seen))
    assert torch.equal(res.new_tokens, ref)
    assert [r.accepted for r in res.stats.rounds[:-1]] == [3] * (len(res.stats.rounds) - 1)
    assert len(seen) >= 2


def fresh(t, committed, layers):
    r = TargetRunner(t, cpu_kernels=False)
    st = r.new_state(1, committed.shape[1] + 1)
    out = r.run(st, tokens=committed, capture=tuple(layers))
    return st, out.captured


def check_feed(feed, h_l, n):
    """A stateful head's cache holds positions 0..fed-1 of h_l, the queue the rest up to n."""
    if not feed.stateful:
        return
    f = feed.fed
    pend = 0 if feed.pending is None else feed.pending.shape[1]
    assert f + pend == n
    ref = feed.head.step(hidden_states=h_l[:, :f], position_ids=torch.arange(f)[None]).cache
    mine = feed.cache
    pairs = zip(mine.layers, ref.layers) if hasattr(mine, "layers") else [(mine, ref)]
    for a, b in pairs:
        assert a.length == f
        assert torch.allclose(a.key, b.key, atol=ATOL, rtol=RTOL) and torch.allclose(a.value, b.value, atol=ATOL, rtol=RTOL)
    if pend:
        assert torch.allclose(feed.pending, h_l[:, f:n], atol=ATOL, rtol=RTOL)


def check_caches(dec, run, seen):
    if run.stats.stopped:
        return
    n = run.ctx.shape[1] - 1
    st = run.state
    assert st.lengths == [n] * st.num_layers, st.lengths
    layers = [dec.drafter.layer] + ([dec.exit_stage.layer] if dec.exit_stage is not None else [])
    ref, hidden = fresh(dec.target, run.ctx[:, :-1], layers)
    for i in range(st.num_layers):
        assert torch.allclose(st.keys[i][:, :, :n], ref.keys[i][:, :, :n], atol=ATOL, rtol=RTOL)
        assert torch.allclose(st.values[i][:, :, :n], ref.values[i][:, :, :n], atol=ATOL, rtol=RTOL)
    check_feed(dec.drafter.feed, hidden[dec.drafter.layer], n)
    if dec.exit_stage is not None:
        check_feed(dec.exit_stage.feed, hidden[dec.exit_stage.layer], n)
    seen.append(run.stats.rounds[-1].accepted)


@pytest.mark.parametrize("drafter_type,stage_type,window", [("layers", None, 1), ("attn", "layers", 2)])
def test_caches_equal_fresh_prefill(drafter_type, stage_type, window):
    t = fx.target("qwen2")
    stage = fx.exit_stage(t, stage_type, 5) if stage_type else None
    dec = exit_decoder(t, drafter_type, 6 if stage is None else 2, stage, scale=0.05)
    seen = []
    for temp, seed in ((1.0, 0), (0.0, 0), (1.0, 5)):
        cfg = DecodeConfig(temperature=temp, k=3, exit_window=window, max_new_tokens=N, eos_token_id=[])
        dec.generate(fx.prompt(), config=cfg, seed=seed, callback=lambda run: check_caches(dec, run, seen))
    assert len(set(seen)) > 1  # several accept/reject patterns were checked


def test_planted_stale_reused_rows_fail(monkeypatch):
    """Verifying from reused h_l rows whose last row is stale (d_{k-1}'s instead of d_k's) changes the greedy
    output: the reuse is what the equality tests above check."""
    t = fx.target("llama")
    n = t.config.num_hidden_layers
    ids = fx.prompt()
    ref = fx.hf_greedy(t, ids, N)
    real = ExitDrafter.lower_rows

    def stale(self):
        rows = real(self)
        return torch.cat([rows[:, :-1], rows[:, -2:-1]], dim=1)

    monkeypatch.setattr(exit_draft_mod.ExitDrafter, "lower_rows", stale)
    res = exit_decoder(t, "layers", n - 1, scale=0.0).generate(
        ids, config=DecodeConfig(k=3, max_new_tokens=N, eos_token_id=[]))
    assert not torch.equal(res.new_tokens, ref)


# ---------------------------------------------------------------------------------------------- T > 0 law


def exit_engine_law(t, ids, drafter_kw, stage_type=None, method="hsd", k=2, window=1, stage_kw=None):
    stage = fx.exit_stage(t, stage_type, 2, **(stage_kw or {})) if stage_type else None
    dec = SpeculativeDecoder(t, fx.drafter("exit", t, **drafter_kw), stage, cpu_kernels=False)
    cfg = DecodeConfig(temperature=1.0, top_k=TOPK, k=k, method=method, exit_window=window, max_new_tokens=4,
                       eos_token_id=[])

    def run():
        return tuple(dec.generate(ids, config=cfg, max_rounds=1).new_tokens[0].tolist())

    return TargetLaw(t, ids, 1.0).complete(exact_law(run))


LAW_CASES = [  # exit drafter (head at layer 1 or 2), exit stage at layer 2, verifier, K, window
    ({"head_type": "mlp", "layer": 2}, None, "hsd", 2, 1),
    ({"head_type": "layers", "layer": 2}, None, "tokenwise", 2, 1),
    ({"head_type": "attn", "layer": 1}, "mlp", "hsd", 1, 2),
    ({"head_type": "mlp", "layer": 2, "vd": 8}, None, "blockwise", 2, 1),  # cheap exit LM head as drafter
    ({"head_type": "lens", "layer": 1}, "lowrank", "hsd", 2, 1),
]


@pytest.mark.parametrize("drafter_kw,stage_type,method,k,window", LAW_CASES)
def test_emitted_law_equals_target(replay, tiny, drafter_kw, stage_type, method, k, window):  # noqa: F811
    t, ids = tiny
    law = exit_engine_law(t, ids, drafter_kw, stage_type, method, k, window)
    assert abs(sum(law.values()) - 1) < 1e-6
    assert tv(law, TargetLaw(t, ids, 1.0).law()) < 1e-4


def test_draft_vocab_exit_stage_law(replay, tiny):  # noqa: F811
    """An exit stage whose head has an 8-of-16 draft vocabulary: p_l is 0 outside it, the target still
    emits its own law (its residual covers the other tokens)."""
    t, ids = tiny
    law = exit_engine_law(t, ids, {"head_type": "lens", "layer": 1}, "mlp", stage_kw={"vd": 8})
    assert tv(law, TargetLaw(t, ids, 1.0).law()) < 1e-4


def _leak(q, ids_in):
    """Proposal rows that claim mass on tokens outside the draft vocabulary (which are never drawn)."""
    out = torch.zeros_like(q)
    out[..., ~ids_in] = 1.0
    out = out / out.sum(-1, keepdim=True)
    return 0.7 * q + 0.3 * out


def test_planted_out_of_vocab_mass_fails_drafter(replay, tiny, monkeypatch):  # noqa: F811
    t, ids = tiny
    real = exit_draft_mod.draw

    def lying(logits, params, generator):
        tok, q = real(logits, params, generator)
        return tok, _leak(q, torch.isfinite(logits[0]))

    monkeypatch.setattr(exit_draft_mod, "draw", lying)
    law = exit_engine_law(t, ids, {"head_type": "mlp", "layer": 2, "vd": 8})
    assert tv(law, TargetLaw(t, ids, 1.0).law()) > 1e-2


def test_planted_out_of_vocab_mass_fails_exit_stage(replay, tiny, monkeypatch):  # noqa: F811
    t, ids = tiny
    inside = torch.zeros(16, dtype=torch.bool)  # the vocabulary fx.exit_head(vd=8, seed=2) draws
    inside[torch.randperm(16, generator=torch.Generator().manual_seed(2))[:8]] = True
    monkeypatch.setattr(exit_mod, "window_proposal", lambda p_l, q: _leak(p_l, inside))
    law = exit_engine_law(t, ids, {"head_type": "lens", "layer": 1}, "mlp", stage_kw={"vd": 8})
    assert tv(law, TargetLaw(t, ids, 1.0).law()) > 1e-2


# ------------------------------------------------------------------------------------------------- inputs


def test_bad_combinations_are_refused():
    t = fx.target("llama")
    with pytest.raises(ValueError, match="shallower"):
        exit_decoder(t, "mlp", 5, fx.exit_stage(t, "mlp", 3))
    other = fx.target("llama", seed=4)
    dec = SpeculativeDecoder(t, ExitDrafter(fx.exit_head(other, "mlp", 3)), None, cpu_kernels=False)
    with pytest.raises(ValueError, match="another model"):
        dec.generate(fx.prompt(), config=DecodeConfig(k=2, max_new_tokens=4, eos_token_id=[]))
    with pytest.raises(ValueError, match="chains only"):
        exit_decoder(t, "mlp", 3).generate(fx.prompt(), config=DecodeConfig(tree="2:2:3", max_new_tokens=4))
