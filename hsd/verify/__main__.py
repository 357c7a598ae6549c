"""``python -m hsd.verify --demo``: the toy table of expected acceptance and a short lossless check."""
from __future__ import annotations

import argparse

import torch

from . import exact, montecarlo
from .api import verify
from .multi import verify_multi

TOY_P, TOY_Q = (1 / 3, 2 / 3), (2 / 3, 1 / 3)
METHOD_ORDER = ("tokenwise", "blockwise", "hsd")


def toy_table(max_k: int = 5) -> list[tuple[int, dict[str, float]]]:
    """Exact E[accepted] on the toy p = (1/3, 2/3), q = (2/3, 1/3) for K = 1..max_k."""
    table = []
    for k in range(1, max_k + 1):
        inst = exact.fixed_instance(TOY_P, TOY_Q, k)
        table.append((k, {m: exact.single_chain_law(inst, m)[1] for m in METHOD_ORDER}))
    return table


def demo(samples: int = 20000, seed: int = 0) -> None:
    print("Toy p=(1/3, 2/3), q=(2/3, 1/3): exact E[accepted draft tokens] (x9 in brackets)")
    print(f"{'K':>2}  " + "  ".join(f"{m:>17}" for m in METHOD_ORDER))
    for k, row in toy_table():
        print(f"{k:>2}  " + "  ".join(f"{row[m]:8.4f} ({9 * row[m]:6.3f})" for m in METHOD_ORDER))

    inst = exact.random_instance(vocab=3, depth=3, seed=seed)
    target = exact.target_joint(inst)
    print("\nLossless check, exact enumeration (random context-dependent p, q; V=3, K=3):")
    for m in METHOD_ORDER:
        law, acc = exact.single_chain_law(inst, m)
        print(f"  verify {m:>9}: TV to target = {exact.total_variation(law, target):.1e}, E[acc] = {acc:.4f}")
    for m in ("tokenwise", "hsd"):
        law, acc = exact.multi_chain_law(inst, 2, m)
        print(f"  verify_multi {m:>9} (M=2): TV = {exact.total_variation(law, target):.1e}, E[acc] = {acc:.4f}")

    print(f"\nMonte Carlo, real sampling path (torch, N={samples}, seed {seed}); chi-square over "
          f"{inst.vocab ** (inst.depth + 1)} sequences:")
    gen = torch.Generator().manual_seed(seed)
    tokens = montecarlo.sample_chains(inst, samples, gen)
    q, p = exact.chain_rows(inst, tokens)
    for m in METHOD_ORDER:
        res = verify(tokens, q.float(), p.float(), method=m, generator=gen)
        seq = montecarlo.complete(inst, tokens, res.num_accepted, res.next_token, gen)
        chi2, dof, z = montecarlo.chi_square(inst, seq)
        print(f"  {m:>9}: chi2 = {chi2:7.1f}, dof = {dof}, z = {z:+.2f}, "
              f"mean accepted = {res.num_accepted.float().mean():.4f}")
    chains = torch.stack([montecarlo.sample_chains(inst, samples, gen) for _ in range(2)], dim=1)
    qm, pm = exact.chain_rows(inst, chains.view(-1, inst.depth))
    res = verify_multi(chains, qm.float().view(samples, 2, inst.depth, -1),
                       pm.float().view(samples, 2, inst.depth + 1, -1), method="hsd", generator=gen)
    prefixes = chains[torch.arange(samples), res.chain]
    seq = montecarlo.complete(inst, prefixes, res.num_accepted, res.next_token, gen)
    chi2, dof, z = montecarlo.chi_square(inst, seq)
    print(f"  verify_multi hsd (M=2): chi2 = {chi2:7.1f}, z = {z:+.2f}, "
          f"mean accepted = {res.num_accepted.float().mean():.4f}")
    print("|z| of a few units is sampling noise; the uncapped HSD recipe gives z in the hundreds (tests).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hsd.verify", description=__doc__)
    parser.add_argument("--demo", action="store_true", help="print the toy table and a lossless check")
    parser.add_argument("--samples", type=int, default=20000, help="Monte Carlo samples (default 20000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.demo:
        parser.print_help()
        return
    demo(args.samples, args.seed)


if __name__ == "__main__":
    main()
