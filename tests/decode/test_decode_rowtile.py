"""Batch-invariant passes (hsd.decode.rowtile): with a row tile, a row's logits and hidden states in a
multi-row pass (chain, tree, deep layers from hidden states) equal those of 1-row steps bit for bit, in bf16
and fp32; so greedy speculative decoding (chains, trees, the exit stage, oracle drafts that fill every pass)
equals this engine's plain greedy decoding bit for bit in bf16. Planted: the untiled runner is not
row-invariant in bf16 on this class of CPU (its attention kernel changes with the number of query rows), and
untiled speculative decoding then leaves plain greedy decoding."""
from __future__ import annotations

import functools

import pytest
import torch

from hsd.decode import DecodeConfig, SpeculativeDecoder, TargetRunner
from hsd.decode.draft import Draft
from hsd.decode.rowtile import TiledRunner, resolve_row_tile, tile_for
from tests.decode import decode_fixtures as fx
from tests.decode.test_decode_tree import OracleTree

pytestmark = pytest.mark.usefixtures("one_thread")
V, N = 96, 20


@functools.cache
def bf16_target(hidden: int = 64):
    return fx.target("llama", vocab=V, hidden_size=hidden, num_layers=4).to(torch.bfloat16)


def rows_vs_steps(runner, x, parents=None, start=0, past=20, seed=0):
    """(pass, steps): logits and captured states of one multi-row pass over x [1, T] from a ``past``-token
    context, and of T one-row steps over the same positions (a tree's rows stepped along their paths)."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, V, (1, past), generator=g)
    caps = tuple(range(start, runner.num_layers + 1))
    st = runner.new_state(1, past + 40)
    runner.run(st, tokens=ctx)
    many = runner.run(st, tokens=x, parents=parents, logit_rows=slice(None), capture=caps)
    t = x.shape[1]
    par = list(range(-1, t - 1)) if parents is None else parents[0].tolist()
    steps = []
    for j in range(t):
        path = [j]
        while par[path[-1]] >= 0:
            path.append(par[path[-1]])
        st = runner.new_state(1, past + 40)
        runner.run(st, tokens=ctx)
        for i in reversed(path):  # ancestors first, one row per pass
            out = runner.run(st, tokens=x[:, i:i + 1], logit_rows=slice(None), capture=caps)
        steps.append(out)
    return many, steps


def equal_rows(many, steps) -> list[bool]:
    return [torch.equal(many.logits[0, j], s.logits[0, 0])
            and all(torch.equal(many.captured[i][0, j], s.captured[i][0, 0]) for i in s.captured)
            for j, s in enumerate(steps)]


@functools.cache
def fp32_target():
    return fx.target("llama", vocab=V, hidden_size=64, num_layers=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tiled_rows_equal_one_row_steps(dtype):
    """Chains in both precisions; trees where the runner's gap probe says the attention is invariant to
    masked siblings between a row's ancestors (bf16 here), and the probe's "no" is right (fp32 here)."""
    t = bf16_target() if dtype == torch.bfloat16 else fp32_target()
    runner = TiledRunner(t, 16, cpu_kernels=False)
    x = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(1))
    assert all(equal_rows(*rows_vs_steps(runner, x)))  # a chain of 9
    assert all(equal_rows(*rows_vs_steps(runner, x[:, :3])))  # a short chain
    tree = torch.tensor([[-1, 0, 0, 1, -1, 4, 2, 6, 3]])
    rows = equal_rows(*rows_vs_steps(runner, x, parents=tree))
    assert rows[:2] == [True, True]  # nodes whose ancestors are contiguous
    if runner.tree_exact():  # the probe's yes: every tree row equals its path's steps
        assert all(rows)
    if dtype == torch.float32:  # its no, where the fp32 kernel rounds gapped rows differently (this CPU class)
        assert not all(rows) and not runner.tree_exact()
    # the caches hold exactly the real rows, and the outputs cover only them
    st = runner.new_state(1, 40)
    out = runner.run(st, tokens=x[:, :5], logit_rows=slice(1, 3), capture=(0, 2))
    assert st.lengths == [5] * runner.num_layers and out.logits.shape[:2] == (1, 2) and out.hidden.shape[1] == 5
    assert all(c.shape[1] == 5 for c in out.captured.values())


def test_tiled_deep_layers_from_hidden_states():
    """The exit stage's final pass enters at layer l with hidden states: its rows equal 1-row steps."""
    t = bf16_target()
    runner = TiledRunner(t, 8, cpu_kernels=False)
    g = torch.Generator().manual_seed(2)
    ctx = torch.randint(0, V, (1, 15), generator=g)
    h = torch.randn(1, 6, t.config.hidden_size, generator=g).to(torch.bfloat16)
    st = runner.new_state(1, 40)
    runner.run(st, tokens=ctx)
    st.crop(15)
    many = runner.run(st, hidden=h, start=2, logit_rows=slice(None))
    for j in range(6):
        st2 = runner.new_state(1, 40)
        runner.run(st2, tokens=ctx)
        for i in range(j + 1):
            one = runner.run(st2, hidden=h[:, i:i + 1], start=2, logit_rows=slice(None))
        assert torch.equal(many.logits[0, j], one.logits[0, 0]), j


def test_planted_untiled_bf16_rows_differ():
    """Without the tile the same comparison fails in bf16 (the power of the tests above)."""
    runner = TargetRunner(bf16_target(), cpu_kernels=False)
    x = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(1))
    assert not all(equal_rows(*rows_vs_steps(runner, x)))


class OracleChain(fx.Oracle):
    """Drafts the reference continuation with one wrong token at position ``round % (k + 1)`` (none when it
    falls past k): every pass is full and acceptance lengths cycle through 0..k."""

    name = "oracle-chain"

    def extend(self, tokens):
        self.ctx += tokens[0].tolist()

    def propose(self, k, params, generator=None):
        c, bad = len(self.ctx), self.rounds % (k + 1)
        self.rounds += 1
        toks = [(tok + 1) % self.vocab if i == bad else tok for i, tok in enumerate(self.ref[c: c + k])]
        return Draft.chain(torch.tensor([toks], dtype=torch.long))


def decode(dec, ids, cfg):
    """(new tokens, [(n, keys of every layer at committed positions 0..n-1)] after every round)."""
    snaps = []

    def keep(run):
        n = run.ctx.shape[1] - 1  # everything but the root has been through the target
        snaps.append((n, [k[:, :, :n].clone() for k in run.state.keys]))

    return dec.generate(ids, config=cfg, callback=keep).new_tokens, snaps


def speculative_runs(t, ids, ref, tile):
    """Greedy oracle chains (k = 5: every pass full), oracle trees whose paths skip earlier siblings, EAGLE-3
    chains and trees, and an exit stage with windows: (new tokens, cache snapshots) of each."""
    full = torch.cat([ids, ref], 1)[0].tolist() + [0] * 8
    runs = [(OracleChain(full, V), None, DecodeConfig(k=5, max_new_tokens=N, eos_token_id=[])),
            (OracleTree(full, V), None, DecodeConfig(tree="2:3:6", max_new_tokens=N, eos_token_id=[])),
            (fx.drafter("eagle3", t, scale=0.05), None, DecodeConfig(k=3, max_new_tokens=N, eos_token_id=[])),
            (fx.drafter("eagle3", t, scale=0.05), None, DecodeConfig(tree="4:3:12", max_new_tokens=N, eos_token_id=[])),
            (OracleChain(full, V), fx.exit_stage(t, "mlp", layer=2),
             DecodeConfig(k=3, exit_window=2, max_new_tokens=N, eos_token_id=[]))]
    out = []
    for drafter, es, cfg in runs:
        if es is not None:
            es.head.to(torch.bfloat16)
        dec = SpeculativeDecoder(t, drafter, es, row_tile=tile, cpu_kernels=False)
        if cfg.tree and tile != "off" and not dec.runner.tree_exact():  # refused where the gap probe fails
            with pytest.raises(ValueError, match="greedy trees would not equal"):
                dec.generate(ids, config=cfg)
            continue
        out.append(decode(dec, ids, cfg))
    return out


def same_caches(snaps, ref_snaps) -> bool:
    """Every committed cache entry of a speculative run equals plain decoding's at the same position."""
    n_ref, ref = max(ref_snaps, key=lambda s: s[0])
    return all(torch.equal(k[:, :, :min(n, n_ref)], r[:, :, :min(n, n_ref)]) for n, ks in snaps for k, r in zip(ks, ref))


def test_bf16_speculative_greedy_equals_plain_greedy():
    """Tokens and every committed KV entry (all layers) equal plain greedy decoding's, bit for bit, with the
    tile; without it (planted) the caches leave plain decoding's."""
    t = bf16_target()
    ids = fx.prompt(V, n=11, seed=0)
    plain_cfg = DecodeConfig(k=0, max_new_tokens=N, eos_token_id=[])
    for tile, exact in ((16, True), ("off", False)):
        ref, ref_snaps = decode(SpeculativeDecoder(t, row_tile=tile, cpu_kernels=False), ids, plain_cfg)
        runs = speculative_runs(t, ids, ref, tile)
        caches = [same_caches(snaps, ref_snaps) for _, snaps in runs]
        if exact:
            assert all(torch.equal(out, ref) for out, _ in runs)
            assert all(caches), caches
            assert sum(len(s) for _, s in runs) < len(runs) * N * 0.8  # drafts were accepted: passes carried many rows
        else:
            assert not all(caches), caches


def test_row_tile_setting():
    assert resolve_row_tile("auto", torch.float32, 17) is None
    assert resolve_row_tile("auto", torch.bfloat16, 17) == 24 == tile_for(17)
    assert resolve_row_tile("auto", torch.float16, 4) == 8
    assert resolve_row_tile(32, torch.float32, 17) == 32 and resolve_row_tile("off", torch.bfloat16, 4) is None
    for bad, msg in ((8, "row_tile >= 17"), ("big", "expected .auto."), (0.5, "expected"), (-1, ">= 2"), (1, ">= 2")):
        with pytest.raises(ValueError, match=msg):
            resolve_row_tile(bad, torch.bfloat16, 17)
    t = fx.target("llama", vocab=V)
    dec = SpeculativeDecoder(t, fx.drafter("eagle3", t), row_tile=8, cpu_kernels=False)
    assert dec.row_tile == 8
    with pytest.raises(ValueError, match="row_tile >= 17"):
        dec.generate(fx.prompt(V), config=DecodeConfig(tree="4:4:16", max_new_tokens=4))
    # float32 with a tile: the gap probe fails here, so greedy trees are refused (T > 0 trees run)
    dec = SpeculativeDecoder(t, fx.drafter("eagle3", t), row_tile=24, cpu_kernels=False)
    with pytest.raises(ValueError, match="greedy trees would not equal"):
        dec.generate(fx.prompt(V), config=DecodeConfig(tree="4:4:16", max_new_tokens=4))
    dec.generate(fx.prompt(V), config=DecodeConfig(tree="4:4:16", temperature=1.0, max_new_tokens=4), seed=0)
