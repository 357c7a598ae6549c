"""The target runner: passes over split layer ranges with per-layer cache lengths, tree drafts (positions
by depth, ancestor masks) and the commit of an accepted tree path, against plain full forwards."""
from __future__ import annotations

import pytest
import torch

from hsd.decode.draft import Draft
from hsd.decode.target import TargetRunner, tree_mask, tree_positions
from tests.decode import decode_fixtures as fx

pytestmark = pytest.mark.usefixtures("one_thread")


def full_logits(t, ids):
    with torch.no_grad():
        return t(ids).logits.float()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_split_passes_and_crops_match_full_forward(family, cpu_kernels):
    t = fx.target(family)
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(0))
    ref = full_logits(t, ids)
    r = TargetRunner(t, cpu_kernels=cpu_kernels)
    st = r.new_state(1, 32)
    out = r.run(st, tokens=ids[:, :12], logit_rows=slice(-1, None))
    assert torch.allclose(out.logits[:, -1], ref[:, 11], atol=1e-4)
    low = r.run(st, tokens=ids[:, 12:16], end=3)  # layers 0..2 run ahead
    assert st.lengths == [16] * 3 + [12] * 5
    with pytest.raises(ValueError, match="different cache lengths"):
        r.run(st, tokens=ids[:, 16:17])  # a pass over both frontiers is refused
    high = r.run(st, hidden=low.hidden, start=3, logit_rows=slice(None))
    assert torch.allclose(high.logits, ref[:, 12:16], atol=1e-4)
    st.crop(14)
    again = r.run(st, tokens=ids[:, 14:20], logit_rows=slice(None))
    assert torch.allclose(again.logits, ref[:, 14:20], atol=1e-4)


def test_tree_pass_and_path_commit():
    t = fx.target("llama")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 96, (1, 9), generator=g)
    root = torch.randint(0, 96, (1, 1), generator=g)
    #        root -> a -> c -> e
    #             -> b -> d
    tokens = torch.randint(0, 96, (1, 5), generator=g)
    parents = torch.tensor([[-1, -1, 0, 1, 2]])
    draft = Draft(tokens, parents)
    assert not draft.is_chain and Draft.chain(tokens).is_chain
    r = TargetRunner(t, cpu_kernels=False)
    st = r.new_state(1, 32)
    r.run(st, tokens=prompt)
    x = torch.cat([root, tokens], dim=1)
    px = torch.cat([torch.tensor([[-1]]), parents + 1], dim=1)  # node j of x hangs below px[j]; root at -1
    assert tree_positions(px).tolist() == [[0, 1, 1, 2, 2, 3]]
    assert tree_mask(px)[0, 5].tolist() == [True, True, False, True, False, True]
    out = r.run(st, tokens=x, parents=px, logit_rows=slice(None))
    above = {1: [], 2: [], 3: [0], 4: [1], 5: [0, 2]}  # x index j -> draft nodes above x[j] (below the root)
    for j in range(6):
        seq = torch.cat([prompt, root, tokens[:, above[j]], x[:, j:j + 1]] if j else [prompt, root], dim=1)
        assert torch.allclose(out.logits[:, j], full_logits(t, seq)[:, -1], atol=1e-4), j
    # commit the path root -> b -> d (x nodes 2, 4) and continue: equals a fresh prefill of that text
    st.keep(9, torch.tensor([0, 2, 4]))
    assert st.lengths == [12] * 8
    nxt = torch.randint(0, 96, (1, 2), generator=g)
    cont = r.run(st, tokens=nxt, logit_rows=slice(None))
    seq = torch.cat([prompt, root, tokens[:, [1, 3]], nxt], dim=1)
    assert torch.allclose(cont.logits, full_logits(t, seq)[:, -2:], atol=1e-4)
