"""T > 0: the law of the emitted tokens equals the target's, by exact enumeration through the real engine.

Every random choice the engine makes goes through ``sample`` (drafts, plain draws) or ``verify`` (stage 1
and the final verification). The test swaps those two functions for enumerating versions (``Replay``:
``sample`` branches over the tokens of the row, ``verify`` over the outcomes of ``hsd.verify.decision_law``)
and replays the whole engine (prefill, drafter, exit stage, target passes, cache crops) once per branch.
One round is enumerated; what follows it is completed with the exact target law (a lossless round makes
the text so far a prefix of an exact target sample, and so does every later one, by induction). Top-k = 2
processing keeps the branching small; the law is the processed target law, as for plain sampling.

Planted wrong variants must fail the same test: verifying an exit stage's window with the drafter's q,
and drafting from one temperature while declaring the rows of another.
"""
from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import torch

import hsd.decode.drafters as drafters_mod
import hsd.decode.engine as engine_mod
import hsd.decode.exit_stage as exit_mod
import hsd.decode.verifier as verifier_mod
from hsd.decode import DecodeConfig, SpeculativeDecoder
from hsd.decode.sampling import process_logits
from hsd.verify import VerifyResult, decision_law
from tests.decode import decode_fixtures as fx

pytestmark = pytest.mark.usefixtures("one_thread")
V, M, TOPK = 16, 4, 2


class _Need(Exception):
    pass


class Replay:
    """Follows a trace of branch indices; past its end, records the options and stops the run."""

    current: Replay | None = None

    def __init__(self, trace):
        self.trace, self.i, self.prob, self.pending = trace, 0, 1.0, None

    def choose(self, options):
        if self.i < len(self.trace):
            value, p = options[self.trace[self.i]]
            self.i += 1
            self.prob *= p
            return value
        self.pending = options
        raise _Need


def replay_sample(probs, generator=None):
    row = probs.reshape(-1, probs.shape[-1])[0].double()
    row = row / row.sum()
    opts = [(i, float(row[i])) for i in torch.nonzero(row > 0).flatten().tolist()]
    tok = Replay.current.choose(opts)
    return torch.full(probs.shape[:-1], tok, dtype=torch.long)


def replay_verify(tokens, q, p, *, method="hsd", backend="torch", generator=None):
    ptau, rows = decision_law(tokens, None if q is None else q.double(), p.double(), method=method)
    opts = [((tau, y), float(ptau[0, tau] * rows[0, tau, y]))
            for tau in range(tokens.shape[1] + 1) for y in torch.nonzero(rows[0, tau] > 0).flatten().tolist()
            if float(ptau[0, tau] * rows[0, tau, y]) > 0]
    tau, y = Replay.current.choose(opts)
    return VerifyResult(torch.tensor([tau]), torch.tensor([y]))


def exact_law(run):
    out, stack = defaultdict(float), [()]
    while stack:
        tr = stack.pop()
        Replay.current = Replay(tr)
        try:
            res = run()
        except _Need:
            stack.extend(tr + (k,) for k in range(len(Replay.current.pending)))
            continue
        out[res] += Replay.current.prob
    return out


class TargetLaw:
    """Exact processed law of the target's continuations of ``ids`` (float64 rows, memoised per prefix)."""

    def __init__(self, t, ids, temperature, top_k: int = TOPK):
        self.t, self.ids, self.temp, self.top_k, self.memo = t, ids, temperature, top_k, {}

    def row(self, prefix: tuple) -> torch.Tensor:
        if prefix not in self.memo:
            x = torch.cat([self.ids, torch.tensor([prefix], dtype=torch.long)], dim=1) if prefix else self.ids
            with torch.no_grad():
                logits = self.t(x).logits[0, -1]
            self.memo[prefix] = process_logits(logits, self.temp, self.top_k).double()
        return self.memo[prefix]

    def complete(self, law: dict) -> dict:
        """Law of M-token sequences: each engine outcome followed by exact target sampling."""
        out = defaultdict(float)
        stack = list(law.items())
        while stack:
            seq, p = stack.pop()
            if len(seq) >= M:
                out[seq[:M]] += p
                continue
            row = self.row(seq)
            for y in torch.nonzero(row > 0).flatten().tolist():
                stack.append((seq + (y,), p * float(row[y])))
        return out

    def law(self) -> dict:
        return self.complete({(): 1.0})


def tv(a, b):
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


@pytest.fixture
def replay(monkeypatch):
    for mod in (drafters_mod, engine_mod, verifier_mod):
        monkeypatch.setattr(mod, "sample", replay_sample)
    monkeypatch.setattr(verifier_mod, "verify", replay_verify)


@pytest.fixture(scope="module")
def tiny():
    t = fx.target("llama", vocab=V, num_layers=4, seed=3, initializer_range=0.2)
    return t, fx.prompt(V, 6, seed=1)


def engine_law(t, ids, drafter, head_type, method, temperature=1.0, k=2, window=1, layer=2, family_seed=0):
    dec = SpeculativeDecoder(t, fx.drafter(drafter, t, **({"scale": 0.05} if drafter == "eagle3" else {})),
                             fx.exit_stage(t, head_type, layer) if head_type else None)
    cfg = DecodeConfig(temperature=temperature, top_k=TOPK, k=k, method=method, exit_window=window,
                       max_new_tokens=M, eos_token_id=[])

    def run():
        return tuple(dec.generate(ids, config=cfg, max_rounds=1).new_tokens[0].tolist())

    return TargetLaw(t, ids, temperature).complete(exact_law(run))


CASES = [  # drafter, exit head, verifier, K, exit window
    ("eagle3", None, "hsd", 2, 1),
    ("eagle3", "mlp", "hsd", 2, 1),
    ("eagle3", "mlp", "tokenwise", 2, 1),
    ("eagle3", "attn", "blockwise", 1, 2),  # two stage-1 rounds per window
    ("model", "mlp", "hsd", 2, 1),
    ("lookup", "lowrank", "hsd", 2, 1),
]


@pytest.mark.parametrize("drafter,head_type,method,k,window", CASES)
def test_emitted_law_equals_target(replay, tiny, drafter, head_type, method, k, window):
    t, ids = tiny
    law = engine_law(t, ids, drafter, head_type, method, k=k, window=window)
    assert abs(sum(law.values()) - 1) < 1e-6  # float32 rows
    d = tv(law, TargetLaw(t, ids, 1.0).law())
    print(f"TV {d:.2e}")
    assert d < 1e-4


def test_planted_q_after_exit_stage_fails(replay, tiny, monkeypatch):
    """Verifying the exit-stage window with the drafter's q (not p_l) must be detected."""
    t, ids = tiny
    monkeypatch.setattr(exit_mod, "window_proposal", lambda p_l, q: q if q is not None else p_l)
    law = engine_law(t, ids, "eagle3", "mlp", "hsd")
    d = tv(law, TargetLaw(t, ids, 1.0).law())
    print(f"planted TV {d:.3f}")
    assert d > 1e-2


def test_planted_undeclared_draft_temperature_fails(replay, tiny, monkeypatch):
    """A drafter that samples at T = 0.5 but hands over T = 1 rows breaks the law (rows must be the ones
    actually sampled from)."""
    t, ids = tiny
    real = drafters_mod.draw

    def lying(logits, params, generator):
        tok, _ = real(logits, type(params)(0.5, params.top_k, params.top_p), generator)
        return tok, drafters_mod.process(logits, params)

    monkeypatch.setattr(drafters_mod, "draw", lying)
    law = engine_law(t, ids, "eagle3", None, "hsd")
    d = tv(law, TargetLaw(t, ids, 1.0).law())
    print(f"planted TV {d:.3f}")
    assert d > 1e-2


def test_law_at_lower_temperature(replay, tiny):
    t, ids = tiny
    law = engine_law(t, ids, "eagle3", "mlp", "hsd", temperature=0.7)
    assert tv(law, TargetLaw(t, ids, 0.7).law()) < 1e-4


def test_target_law_sums_to_one(tiny):
    t, ids = tiny
    law = TargetLaw(t, ids, 1.0).law()
    assert abs(sum(law.values()) - 1) < 1e-6 and len(law) == TOPK ** M
    assert all(len(s) == M for s in itertools.islice(law, 3))


# ---------------------------------------------------------------------------------------------------------
# The real sampling path: torch generators and hsd.verify's own uniforms, many seeds, chi-square.

N_RUNS = 400


def sampled_counts(t, ids, drafter, head_type, method, n=N_RUNS):
    dec = SpeculativeDecoder(t, fx.drafter(drafter, t, **({"scale": 0.05} if drafter == "eagle3" else {})),
                             fx.exit_stage(t, head_type, 2) if head_type else None)
    cfg = DecodeConfig(temperature=1.0, top_k=TOPK, k=2, method=method, max_new_tokens=M, eos_token_id=[])
    counts = defaultdict(int)
    for seed in range(n):
        counts[tuple(dec.generate(ids, config=cfg, seed=seed).new_tokens[0].tolist())] += 1
    return counts


def chi2_pvalue(counts, law, n):
    from scipy.stats import chisquare

    keys = sorted(law, key=lambda k: -law[k])
    obs = [counts.get(k, 0) for k in keys]
    total = sum(law.values())
    exp = [law[k] / total * n for k in keys]
    assert sum(obs) == n, "the engine emitted a sequence the target law gives probability 0"
    return chisquare(obs, exp).pvalue


def test_sampled_law_chi_square(tiny):
    t, ids = tiny
    law = TargetLaw(t, ids, 1.0).law()
    assert chi2_pvalue(sampled_counts(t, ids, "eagle3", "mlp", "hsd"), law, N_RUNS) > 1e-3


def test_sampled_planted_q_fails_chi_square(tiny, monkeypatch):
    t, ids = tiny
    law = TargetLaw(t, ids, 1.0).law()
    monkeypatch.setattr(exit_mod, "window_proposal", lambda p_l, q: q if q is not None else p_l)
    assert chi2_pvalue(sampled_counts(t, ids, "eagle3", "mlp", "hsd"), law, N_RUNS) < 1e-6
