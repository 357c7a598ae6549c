"""Planted bugs in the fused kernel must fail the tests that guard them.

Each plant replaces one exact piece of hsd/kernels/verify_kernels.py in a temporary copy, which the
launcher then uses (interpreted on the CPU); the guarding check must raise. If the kernel's text
changes, the plant is not found and its test fails: update the plant with the code.

- q0: the pre-fix numerics (closed-form log-weights log R - max log R, which is inf - inf = NaN at
  q(x) = 0, and "denominator not > 0 -> h = 1", which turns that NaN into an acceptance).
- uncapped: the official HSD recipe's final test min(1, R_K) instead of w_K.
- no_r0: the weights forget log R_0 = 0 (w_1 = 1 always).
- residual_weight: the in-block draw uses residual weight 1 instead of w_tau.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import hsd.kernels.launch as launch
from hsd.verify import exact
from hsd.verify.serving import VerifyPlan
from tests.test_verify_exact import check_lossless, instance
from tests.test_verify_numerics import check_no_acceptance_beyond_p

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
SOURCE = Path(launch.kern.__file__)

PLANTS = {
    "q0": [
        ('''    d = tl.log(p_x) - tl.log(q_x)
    bad = ((d != d) | (d == float("-inf"))).to(tl.int32)''',
         '''    d = tl.log(p_x) - tl.log(q_x)
    log_r = tl.cumsum(d, axis=0) - d
    run_max = tl.maximum(tl.max(tl.where(lanes[None, :] <= lanes[:, None], log_r[None, :], float("-inf")), axis=1), 0.0)
    return log_r - run_max
    bad = ((d != d) | (d == float("-inf"))).to(tl.int32)'''),
        ('''                h = tl.where(den > 0, s / tl.where(den > 0, den, 1.0), tl.where(den <= 0, 1.0, 0.0))''',
         '''                h = tl.where(den > 0, s / tl.where(den > 0, den, 1.0), 1.0)'''),
    ],
    "uncapped": [
        ('''                h = tl.where(lanes == kb - 1, w, h)  # capped final test h_K = w_K''',
         '''                r_k = tl.exp(tl.sum(tl.where(valid, tl.log(p_x) - tl.log(q_x), 0.0), axis=0))
                h = tl.where(lanes == kb - 1, tl.minimum(r_k, 1.0), h)'''),
    ],
    "no_r0": [
        ('''    sums = tl.where(lanes[None, :] <= lanes[:, None], sums, float("inf"))''',
         '''    sums = tl.where((lanes[None, :] <= lanes[:, None]) & (lanes[None, :] > 0), sums, float("inf"))'''),
    ],
    "residual_weight": [
        ('''row0, tau, kb, _lane(x, lanes, tau), tl.exp(_lane(log_w, lanes, tau)), u, NB,''',
         '''row0, tau, kb, _lane(x, lanes, tau), tl.exp(_lane(log_w, lanes, tau)) * 0.0 + 1.0, u, NB,'''),
    ],
}


def planted_module(name, tmp_path):
    text = SOURCE.read_text()
    for old, new in PLANTS[name]:
        assert text.count(old) == 1, f"plant {name}: kernel text not found (update the plant): {old[:60]!r}"
        text = text.replace(old, new)
    path = tmp_path / f"planted_{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"planted_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_exact_law(vocab=3, depth=2, seed=0, method="hsd"):
    """The kernel's exact law on a small instance (as test_kernels.test_fused_kernel_exact_law)."""
    inst = instance(vocab, depth, seed)

    def kernel(tok, q, p, coins, u):
        plan = VerifyPlan(max_batch=tok.shape[0], max_draft=depth, vocab=vocab, method=method, backend="triton")
        res = plan(tok, p.float(), q.float(), uniforms=(coins.float().contiguous(), u.float().contiguous()))
        return res.num_accepted, res.next_token

    law, _ = exact.single_chain_law(inst, method, sampler=True, run=kernel, margin=1e-4, both_ends=False)
    check_lossless(law, inst)


def test_q0_plant_fails_the_q_zero_check(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "kern", planted_module("q0", tmp_path))
    with pytest.raises(AssertionError, match="accepted a draft token with p = 0"):
        check_no_acceptance_beyond_p("hsd", "triton")


# The residual-weight plant only moves mass when (p - q)_+ has a positive entry before the first one of
# (w p - q)_+ inside the drawn block: not on the V = 3 instances, on this V = 4 one (TV 0.038).
@pytest.mark.parametrize("plant,inst", [("uncapped", (3, 2, 0)), ("no_r0", (3, 2, 0)),
                                        ("residual_weight", (4, 2, 0))])
def test_law_plants_fail_the_kernel_exact_law(tmp_path, monkeypatch, plant, inst):
    if inst != (3, 2, 0):  # (test_kernels checks the real kernel on (3, 2, 0))
        kernel_exact_law(*inst)  # the real kernel passes on this instance
    monkeypatch.setattr(launch, "kern", planted_module(plant, tmp_path))
    with pytest.raises(AssertionError, match="not lossless"):
        kernel_exact_law(*inst)
