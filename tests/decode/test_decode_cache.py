"""Every cache (target per layer, EAGLE-3 head, attn exit head, draft model) equals a fresh prefill of the
committed text after any accept/reject pattern; EOS and max_new_tokens cut exactly."""
from __future__ import annotations

import pytest
import torch

from hsd.decode import DecodeConfig, SpeculativeDecoder, TargetRunner
from tests.decode import decode_fixtures as fx

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 2e-5


def fresh_target_kv(t, committed):
    r = TargetRunner(t, cpu_kernels=False)
    st = r.new_state(1, committed.shape[1] + 1)
    out = r.run(st, tokens=committed, capture=tuple(range(r.num_layers + 1)))
    return st, out.captured


def check_caches(dec, run, seen):
    if run.stats.stopped:  # the last round: its output was cut at max_new_tokens; nothing reads the caches again
        return
    ctx = run.ctx
    n = ctx.shape[1] - 1  # everything but the root has been through the target
    st = run.state
    assert st.lengths == [n] * st.num_layers, st.lengths
    ref, hidden = fresh_target_kv(dec.target, ctx[:, :-1])
    for i in range(st.num_layers):
        assert torch.allclose(st.keys[i][:, :, :n], ref.keys[i][:, :, :n], atol=ATOL)
        assert torch.allclose(st.values[i][:, :, :n], ref.values[i][:, :, :n], atol=ATOL)
    d = dec.drafter
    if d.name == "eagle3":  # feature rows 0..n_feat-1 of the head cache
        feats = torch.cat([hidden[j] for j in d.feature_layers], dim=-1)
        m = d.n_feat
        assert m <= n and d.cache.length == m
        if m:
            out = d.head.forward_step(input_ids=ctx[:, 1: m + 1], features=feats[:, :m])
            assert torch.allclose(d.cache.key[:, :, :m], out.cache.key, atol=ATOL)
            assert torch.allclose(d.cache.value[:, :, :m], out.cache.value, atol=ATOL)
    if d.name == "model":
        keep = len(d.fed)
        assert d.fed == ctx[0, :keep].tolist()
        ref_d, _ = fresh_target_kv(d.runner.model, ctx[:, :keep])
        for i in range(d.state.num_layers):
            assert d.state.lengths[i] == keep
            assert torch.allclose(d.state.keys[i][:, :, :keep], ref_d.keys[i][:, :, :keep], atol=ATOL)
    es = dec.exit_stage
    if es is not None and es.stateful:
        f = es.fed
        pend = 0 if es.pending is None else es.pending.shape[1]
        assert f + pend == n  # every committed position is fed or queued
        h_l = hidden[es.layer]
        out = es.head.step(hidden_states=h_l[:, :f], position_ids=torch.arange(f)[None])
        assert torch.allclose(es.cache.key[:, :, :f], out.cache.key, atol=ATOL)
        if pend:
            assert torch.allclose(es.pending, h_l[:, f:n], atol=ATOL)
    seen.append(run.stats.rounds[-1].accepted)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("drafter,head_type,window", [("eagle3", "attn", 2), ("eagle3", None, 1),
                                                      ("model", "attn", 1)])
def test_caches_equal_fresh_prefill(family, drafter, head_type, window):
    t = fx.target(family)
    dec = SpeculativeDecoder(t, fx.drafter(drafter, t, **({"scale": 0.05} if drafter == "eagle3" else {})),
                             fx.exit_stage(t, head_type), cpu_kernels=False)
    seen = []
    for temp, seed in ((1.0, 0), (0.0, 0), (1.0, 7)):
        cfg = DecodeConfig(temperature=temp, k=3, exit_window=window, max_new_tokens=20, eos_token_id=[])
        dec.generate(fx.prompt(), config=cfg, seed=seed, callback=lambda run: check_caches(dec, run, seen))
    assert len(set(seen)) > 1  # several accept/reject patterns were checked


def test_check_catches_a_stale_cache():
    """The cache comparison itself can fail: an uncropped entry shows up."""
    t = fx.target("llama")
    dec = SpeculativeDecoder(t, fx.drafter("eagle3", t), None, cpu_kernels=False)
    cfg = DecodeConfig(temperature=1.0, k=3, max_new_tokens=8, eos_token_id=[])

    def corrupt_then_check(run):
        run.state.keys[3][:, :, 2] += 1.0
        check_caches(dec, run, [])

    with pytest.raises(AssertionError):
        dec.generate(fx.prompt(), config=cfg, seed=0, callback=corrupt_then_check)


@pytest.mark.parametrize("drafter,head_type", [("eagle3", "mlp"), ("lookup", None), ("none", None)])
def test_eos_cuts_exactly(drafter, head_type):
    t = fx.target("llama")
    ids = fx.prompt()
    ref = fx.hf_greedy(t, ids, 24)[0].tolist()
    eos = ref[9]  # a token the greedy text reaches at position 9 (first occurrence)
    first = ref.index(eos)
    dec = SpeculativeDecoder(t, fx.drafter(drafter, t), fx.exit_stage(t, head_type))
    res = dec.generate(ids, config=DecodeConfig(k=4, max_new_tokens=24, eos_token_id=[eos]))
    assert res.new_tokens[0].tolist() == ref[: first + 1]
    assert res.stats.stopped == "eos" and res.stats.new_tokens == first + 1
    out = t.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                     eos_token_id=eos, pad_token_id=eos)
    assert res.new_tokens[0].tolist() == out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("max_new", [1, 2, 5, 11])
def test_max_new_tokens_cut_exactly(max_new):
    t = fx.target("qwen2")
    for drafter, head_type, temp in (("eagle3", "attn", 1.0), ("model", None, 0.0), ("lookup", "mlp", 1.0)):
        dec = SpeculativeDecoder(t, fx.drafter(drafter, t), fx.exit_stage(t, head_type))
        cfg = DecodeConfig(temperature=temp, k=5, exit_window=2, max_new_tokens=max_new, eos_token_id=[])
        res = dec.generate(fx.prompt(), config=cfg, seed=1)
        assert res.new_tokens.shape[1] == max_new and res.stats.stopped == "length"
        assert sum(r.emitted for r in res.stats.rounds) == max_new - 1
        assert all(r.drafted <= max_new for r in res.stats.rounds)  # no drafts beyond what can be emitted
