"""Monte-Carlo chi-square of the serving kernel's real sampling path: Philox uniforms drawn inside the
fused kernel from per-request (seed, step), interpreted on the CPU.

The interpreter runs every Triton program in Python, so N is kept small by choosing the context-free
V = 2, K = 2 instance where the uncapped recipe's bias is largest (p = (1/4, 3/4), q = (3/4, 1/4):
non-centrality 1/9 per sample). N is sized so that the uncapped recipe fails at the same N (N * nc >=
10 sqrt(2 dof)), and that is asserted on the same uniforms (philox_uniforms reproduces the kernel's bits,
so the torch sampler running the uncapped recipe sees exactly the kernel's coins), so the lossless
verdict on the kernel is not a weak test. The explicit-uniforms path of the same kernel has an exact
law test (test_kernels.py).
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from hsd.verify import VerifyPlan, exact, montecarlo, philox_uniforms, verify
from tests.test_verify_exact import uncapped_levels

N = 400
INST = exact.fixed_instance(torch.tensor([1 / 4, 3 / 4], dtype=torch.float64),
                            torch.tensor([3 / 4, 1 / 4], dtype=torch.float64), 2)


def drafts(seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = montecarlo.sample_chains(INST, N, gen)
    q, p = exact.chain_rows(INST, tokens)
    seeds = torch.randint(0, 2**62, (N,), generator=gen)
    steps = torch.randint(0, 2**32, (N,), generator=gen)
    return tokens, q.float(), p.float(), seeds, steps, gen


def p_value(tokens, num_accepted, next_token, gen):
    seq = montecarlo.complete(INST, tokens, num_accepted, next_token, gen)
    chi2, dof, z = montecarlo.chi_square(INST, seq)
    return float(stats.chi2.sf(chi2, dof)), z


def test_sample_size_detects_uncapped_bias():
    law, _ = exact.single_chain_law(INST, uncapped_levels)
    target = exact.target_joint(INST)
    nc = float(((law - target) ** 2 / target).sum())
    assert N * nc >= 10 * math.sqrt(2 * (2**3 - 1))
    tokens, q, p, seeds, steps, gen = drafts(5)
    res = verify(tokens, q, p, method=uncapped_levels, uniforms=philox_uniforms(seeds, steps, 2))
    pv, z = p_value(tokens, res.num_accepted, res.next_token, gen)
    assert pv < 1e-6, f"negative control not detected at N={N}: p = {pv:.2g}, z = {z:.1f}"


@pytest.mark.slow
def test_philox_kernel_sampling_path_is_lossless():
    tokens, q, p, seeds, steps, gen = drafts(5)
    plan = VerifyPlan(max_batch=N, max_draft=2, vocab=2, method="hsd", backend="triton")
    res = plan(tokens, p, q, seeds=seeds, steps=steps)
    pv, z = p_value(tokens, res.num_accepted, res.next_token, gen)
    assert pv > 1e-3, f"triton philox hsd: p = {pv:.2g}, z = {z:.1f}"
    # The kernel drew exactly the uniforms philox_uniforms gives (same decisions as torch on them).
    ref = verify(tokens, q, p, method="hsd", uniforms=philox_uniforms(seeds, steps, 2))
    assert torch.equal(ref.num_accepted, res.num_accepted) and torch.equal(ref.next_token, res.next_token)
