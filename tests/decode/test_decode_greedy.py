"""T = 0: the engine's tokens equal ``model.generate(do_sample=False)`` for every drafter x exit stage x
verifier, on tiny random Llama and Qwen2 targets; planted bugs (verifying against p_l, the stock forward's
single position offset) must break the equality."""
from __future__ import annotations

import functools

import pytest
import torch

import hsd.decode.exit_stage as exit_mod
import hsd.decode.target as target_mod
from hsd.decode import DecodeConfig, SpeculativeDecoder
from tests.decode import decode_fixtures as fx

pytestmark = pytest.mark.usefixtures("one_thread")
N = 24


@functools.cache
def setup(family: str):
    t = fx.target(family)
    ids = fx.prompt()
    return t, ids, fx.hf_greedy(t, ids, N)


def decode(family, drafter, head_type, method="greedy", k=3, window=1, backend="torch", **kw):
    t, ids, ref = setup(family)
    dec = SpeculativeDecoder(t, fx.drafter(drafter, t), fx.exit_stage(t, head_type, **kw))
    cfg = DecodeConfig(k=k, method=method, backend=backend, exit_window=window, max_new_tokens=N, eos_token_id=[])
    return dec.generate(ids, config=cfg), ref


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("drafter", fx.DRAFTERS)
@pytest.mark.parametrize("head_type", [None, "mlp", "attn"])
def test_greedy_equals_generate(family, drafter, head_type):
    for method in ("greedy", "hsd"):
        res, ref = decode(family, drafter, head_type, method)
        assert torch.equal(res.new_tokens, ref), (method, res.new_tokens, ref)
        assert res.stats.new_tokens == N
    if drafter in ("eagle3", "model") and head_type is None:
        assert sum(r.accepted for r in res.stats.rounds) > 0  # the check saw accepted drafts


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["tokenwise", "blockwise"])
def test_greedy_every_verifier(family, method):
    for head_type in (None, "lowrank"):
        res, ref = decode(family, "eagle3", head_type, method, k=4)
        assert torch.equal(res.new_tokens, ref)


@pytest.mark.parametrize("drafter", ["eagle3", "model", "lookup"])
def test_greedy_multi_round_windows(drafter):
    """exit_window 3: stage-1 rounds accumulate (the drafter continues from tentative tokens)."""
    res, ref = decode("llama", drafter, "attn", "greedy", k=2, window=3)
    assert torch.equal(res.new_tokens, ref)
    assert any(len(r.stage1) > 1 for r in res.stats.rounds)


def test_greedy_triton_backend():
    pytest.importorskip("triton")
    res, ref = decode("llama", "eagle3", "mlp", "hsd", backend="triton")
    assert torch.equal(res.new_tokens, ref)


def test_planted_unchecked_window_fails(monkeypatch):
    """Committing the exit stage's window without the final verification (trusting the exit head) must
    change the output: the equality test has the power to see a wrong final stage."""
    final = {"next": False}
    real_proposal, real_verify = exit_mod.window_proposal, exit_mod.verify_chain

    def mark(p_l, q):
        final["next"] = True
        return real_proposal(p_l, q)

    def verify(tokens, proposal, logits, *a, **kw):
        if final.pop("next", False):
            final["next"] = False
            return torch.tensor([tokens.shape[1]]), logits[:, -1].argmax(-1)
        return real_verify(tokens, proposal, logits, *a, **kw)

    monkeypatch.setattr(exit_mod, "window_proposal", mark)
    monkeypatch.setattr(exit_mod, "verify_chain", verify)
    res, ref = decode("llama", "eagle3", "mlp")
    assert res.stats.new_tokens == N
    assert not torch.equal(res.new_tokens, ref)


def test_planted_single_position_offset_fails(monkeypatch):
    """The stock forward's bug: RoPE positions from layer 0's cache length for every layer. With an exit
    stage the deep layers' final pass then gets the shallow frontier's positions; the test must catch it."""
    real = target_mod.TargetRunner.run

    def stock_positions(self, state, *, start=0, end=None, **kw):
        offset = state.lengths[0] - state.lengths[start]
        if start == 0 or offset == 0:
            return real(self, state, start=start, end=end, **kw)
        rotary = self.rotary
        self.rotary = lambda h, pos: rotary(h, pos + offset)
        try:
            return real(self, state, start=start, end=end, **kw)
        finally:
            self.rotary = rotary

    monkeypatch.setattr(target_mod.TargetRunner, "run", stock_positions)
    res, ref = decode("llama", "eagle3", "mlp", k=4, window=3)
    assert not torch.equal(res.new_tokens, ref)


@pytest.mark.parametrize("method", ["tokenwise", "hsd"])
def test_sampled_triton_equals_torch_serving_path(method):
    """T > 0 runs on the serving plan (``hsd.verify.serving.VerifyPlan``): its fused Triton kernel
    (interpreted) with in-kernel Philox uniforms gives the torch backend's tokens draw for draw, and the
    run is reproducible from its seed."""
    pytest.importorskip("triton")
    t, ids, _ = setup("llama")
    dec = SpeculativeDecoder(t, fx.drafter("eagle3", t), fx.exit_stage(t, "mlp"))
    out = {}
    for backend in ("torch", "triton"):
        cfg = DecodeConfig(temperature=1.0, k=3, method=method, backend=backend, max_new_tokens=N, eos_token_id=[])
        out[backend] = [dec.generate(ids, config=cfg, seed=s).new_tokens for s in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(out["torch"], out["triton"]))
    assert not torch.equal(out["torch"][0], out["torch"][1])  # the seed matters
