"""The fused Triton tree kernel (hsd/kernels/tree_kernels.py, interpreted on the CPU) equals the torch
tree verifier draw for draw: random trees with padding and duplicate siblings, every method, sampled
q rows and point masses, several vocabulary blocks, explicit and in-kernel Philox uniforms; on the
trees and coin patterns of the exact-law tests; and planted kernel bugs break the equality. The torch
verifier's law is proved exactly (test_verify_tree_exact) and by chi-square (test_verify_tree_mc), so
equality carries the law over to the kernel."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import hsd.kernels.tree_launch as tree_launch
from hsd.verify import verify_tree
from hsd.verify.serving import philox_uniforms
from hsd.verify.tree_exact import Scheme, enumerate_trees
from tests.test_verify_tree_exact import draft_rows, instance

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def random_trees(b: int, n: int, v: int, seed: int):
    """Random parent-first trees (-2 padding after a random cut), target rows, q rows near the parent's
    target row, tokens drawn from q, with duplicate siblings forced on some nodes."""
    g = torch.Generator().manual_seed(seed)
    parents = torch.full((b, n), -1, dtype=torch.long)
    for i in range(1, n):
        parents[:, i] = torch.randint(-1, i, (b,), generator=g)
    cut = torch.randint(1, n + 1, (b,), generator=g)
    parents = torch.where(torch.arange(n)[None] >= cut[:, None], -2, parents)
    logits = 3 * torch.randn(b, n + 1, v, generator=g)
    p = torch.softmax(logits, -1)
    # each node's q row is a perturbed copy of its parent's target row: realistic acceptance
    slot = torch.where(parents >= 0, parents + 1, 0)
    near = logits.gather(1, slot.unsqueeze(-1).expand(b, n, v))
    q = torch.softmax(near + 0.7 * torch.randn(b, n, v, generator=g), -1)
    tokens = torch.multinomial(q.reshape(-1, v), 1, generator=g).reshape(b, n)
    tokens[:, 1::3] = tokens[:, :1]
    return tokens, parents, q, p, (torch.rand(b, n, generator=g), torch.rand(b, generator=g))


def assert_same(a, c):
    assert torch.equal(a.num_accepted, c.num_accepted)
    assert torch.equal(a.path, c.path)
    assert torch.equal(a.next_token, c.next_token)


@pytest.mark.parametrize("method", ["greedy", "rrs", "weighted"])
@pytest.mark.parametrize("rows", ["q", "point_mass"])
def test_kernel_equals_torch_draw_for_draw(method, rows):
    tokens, parents, q, p, uniforms = random_trees(24, 9, 40, seed=1)
    q = q if rows == "q" else None
    kw = dict(method=method, uniforms=uniforms)
    ref = verify_tree(tokens, parents, q, p, backend="torch", **kw)
    got = verify_tree(tokens, parents, q, p, backend="triton", **kw)
    assert_same(ref, got)
    if method != "greedy":
        assert int(ref.num_accepted.max()) >= 2  # the check saw accepted multi-node paths


def run_kernel(tokens, parents, q, p, method, block_v, **rng):
    ws = tree_launch.TreeWorkspace.create(tokens.shape[0], tokens.shape[1], p.shape[-1], "cpu")
    ln = tree_launch.tree_launch(ws, tokens, parents, q, p, method=method, block_v=block_v, **rng)
    ln.kernel[ln.grid](*ln.args, **ln.kwargs)
    return ws


@pytest.mark.parametrize("method", ["rrs", "weighted", "greedy"])
def test_kernel_several_vocabulary_blocks(method):
    """V = 50 in blocks of 16 (the last one partial): residual rows, sums and the draw span blocks."""
    tokens, parents, q, p, uniforms = random_trees(12, 7, 50, seed=2)
    ref = verify_tree(tokens, parents, q, p, method=method, uniforms=uniforms)
    ws = run_kernel(tokens, parents, q, p, method, 16, uniforms=uniforms)
    assert torch.equal(ws.num_accepted, ref.num_accepted) and torch.equal(ws.next_token, ref.next_token)
    assert torch.equal(ws.path[:, : ref.path.shape[1]], ref.path)
    assert bool((ws.path[:, ref.path.shape[1]:] == -1).all())


def test_in_kernel_philox_is_the_documented_stream():
    """seeds/steps uniforms in the kernel are philox_uniforms(seeds, steps, N): a request's draw depends
    on its own seed and step only (not on the batch it is in), and a new step gives new coins."""
    tokens, parents, q, p, _ = random_trees(16, 8, 30, seed=3)
    seeds = torch.randint(0, 2**62, (16,), generator=torch.Generator().manual_seed(4))
    steps = torch.arange(16, dtype=torch.int64) * 7
    ws = run_kernel(tokens, parents, q, p, "weighted", 1024, seeds=seeds, steps=steps)
    ref = verify_tree(tokens, parents, q, p, method="weighted", uniforms=philox_uniforms(seeds, steps, 8))
    assert torch.equal(ws.next_token, ref.next_token) and torch.equal(ws.num_accepted, ref.num_accepted)
    half = run_kernel(tokens[8:], parents[8:], q[8:], p[8:], "weighted", 1024, seeds=seeds[8:], steps=steps[8:])
    assert torch.equal(half.next_token[:8], ws.next_token[8:])
    moved = run_kernel(tokens, parents, q, p, "weighted", 1024, seeds=seeds, steps=steps + 1)
    assert not torch.equal(moved.next_token, ws.next_token)


@pytest.mark.parametrize("vocab,scheme,method", [(3, Scheme((2, 2)), "weighted"), (3, Scheme((2, 2)), "rrs"),
                                                 (4, Scheme((3, 1), "without_replacement"), "weighted"),
                                                 (3, Scheme((2, 2, 1), stop_token=0), "rrs")])
def test_kernel_on_exact_law_trees(vocab, scheme, method):
    """On enumerated trees of the exact-law tests (stop tokens give padding), with random coins."""
    draft = enumerate_trees(instance(vocab, scheme), scheme)
    pick = torch.randperm(draft.tokens.shape[0], generator=torch.Generator().manual_seed(0))[:48]
    tokens, parents, p = draft.tokens[pick], draft.parents[pick], draft.p[pick]
    q = draft_rows(draft)
    q = None if q is None else q[pick]
    g = torch.Generator().manual_seed(5)
    uniforms = (torch.rand(tokens.shape, generator=g), torch.rand(tokens.shape[0], generator=g))
    ref = verify_tree(tokens, parents, None if q is None else q.float(), p.float(), method=method, uniforms=uniforms)
    got = verify_tree(tokens, parents, None if q is None else q.float(), p.float(), method=method,
                      backend="triton", uniforms=uniforms)
    assert_same(ref, got)


# ---------------------------------------------------------------- planted kernel bugs
SOURCE = Path(tree_launch.kern.__file__)
PLANTS = {
    # the residual forgets the path weight w (rrs-style residual inside the weighted verifier)
    "weighted_residual_weight": ("weighted", "r = tl.maximum(w * row - q, 0.0)", "r = tl.maximum(row - q, 0.0)"),
    # a rejected sibling's residual is not renormalised for the next sibling (the lossy rrs variant)
    "rrs_no_renorm": ("rrs", "scale = tl.where(res_a, 1.0 / tl.where(m_a > 0, m_a, 1.0), 1.0)", "scale = 1.0"),
    # selection by the first passing node in pre-order instead of post-order
    "weighted_preorder": ("weighted", "chosen = tl.sum(tl.where(lanes[None, :] == lanes[:, None] + 1, sub[None, :], 0), "
                                      "axis=1) > 0", "chosen = passed"),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_planted_kernel_bugs_break_equality(plant, tmp_path, monkeypatch):
    method, old, new = PLANTS[plant]
    text = SOURCE.read_text()
    assert text.count(old) == 1, f"plant {plant}: kernel text not found (update the plant)"
    path = tmp_path / f"planted_{plant}.py"
    path.write_text(text.replace(old, new))
    spec = importlib.util.spec_from_file_location(f"planted_{plant}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(tree_launch, "kern", module)
    tokens, parents, q, p, uniforms = random_trees(24, 9, 40, seed=1)
    ref = verify_tree(tokens, parents, q, p, method=method, uniforms=uniforms)
    got = verify_tree(tokens, parents, q, p, method=method, backend="triton", uniforms=uniforms)
    with pytest.raises(AssertionError):
        assert_same(ref, got)
