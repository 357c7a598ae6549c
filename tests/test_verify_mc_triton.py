"""Monte-Carlo chi-square of the Triton backend's real sampling path (interpreted on CPU).

The interpreter runs every Triton program instance in Python, so N is kept small by choosing the
instance with the largest bias of the uncapped recipe: the HSD README toy (p = (1/3, 2/3),
q = (2/3, 1/3), K = 2), where the uncapped recipe's non-centrality is 1/12 per sample. N is sized
so that the negative control fails at the same N (research note §4: N * nc >= 10 sqrt(2 dof)),
and that is asserted on the same draws, so the lossless verdict on Triton is not a weak test.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from hsd.verify import exact, montecarlo, verify
from tests.test_verify_exact import uncapped_levels

N = 600
TOY = exact.fixed_instance(torch.tensor([1 / 3, 2 / 3], dtype=torch.float64),
                           torch.tensor([2 / 3, 1 / 3], dtype=torch.float64), 2)


def sample(method, backend, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = montecarlo.sample_chains(TOY, N, gen)
    q, p = exact.chain_rows(TOY, tokens)
    res = verify(tokens, q.float(), p.float(), method=method, backend=backend, generator=gen)
    seq = montecarlo.complete(TOY, tokens, res.num_accepted, res.next_token, gen)
    chi2, dof, z = montecarlo.chi_square(TOY, seq)
    return float(stats.chi2.sf(chi2, dof)), z


def test_sample_size_detects_uncapped_bias():
    law, _ = exact.single_chain_law(TOY, uncapped_levels)
    target = exact.target_joint(TOY)
    nc = float(((law - target) ** 2 / target).sum())
    assert N * nc >= 10 * math.sqrt(2 * (2 ** 3 - 1))
    pv, z = sample(uncapped_levels, "torch", seed=5)  # same N, same seed as the Triton runs
    assert pv < 1e-6, f"negative control not detected at N={N}: p = {pv:.2g}, z = {z:.1f}"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tokenwise", "hsd"])
def test_triton_sampling_path_is_lossless(method):
    pv, z = sample(method, "triton", seed=5)
    assert pv > 1e-3, f"triton {method}: p = {pv:.2g}, z = {z:.1f}"
