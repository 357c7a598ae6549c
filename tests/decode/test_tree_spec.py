"""TreeSpec parsing and validation: good specs round-trip to names, bad ones raise one clear error."""
import pytest

from hsd.decode.tree_spec import TreeSpec


def test_parse_and_name():
    spec = TreeSpec.parse("4:5:16")
    assert (spec.top_k, spec.depth, spec.total_tokens) == (4, 5, 16)
    assert spec.name == "tree4x5n16"
    assert TreeSpec.parse("1:3:3").name == "tree1x3n3"  # a chain is the top_k = 1 tree
    static = TreeSpec.parse("static:3x2x1")
    assert (static.name, static.depth, static.total_tokens, static.candidates) == ("static3x2x1", 3, 15, 15)


@pytest.mark.parametrize("text, needle", [
    ("4:5", "TOPK:DEPTH:TOTAL"), ("a:5:16", "TOPK:DEPTH:TOTAL"), ("4:5:16:2", "TOPK:DEPTH:TOTAL"),
    ("0:5:16", "top_k"), ("4:0:16", "depth"), ("4:5:-1", "total_tokens"),
    ("4:5:4", "total_tokens"),      # fewer nodes than the depth
    ("2:2:7", "total_tokens"),      # more than 2 + 4 nodes exist
    ("static:3x0", "branching"), ("static:3,2", "static:B1xB2"),
])
def test_bad_spec_names_the_problem(text, needle):
    with pytest.raises(ValueError, match=needle):
        TreeSpec.parse(text)


def test_prune_tree_keeps_best_ancestor_closed_nodes():
    import torch

    from hsd.decode.tree_spec import prune_tree
    # root -> 0 (-0.1), 1 (-1.0); 0 -> 2 (-0.3), 3 (-2.0); 1 -> 4 (-1.2); 2 -> 5 (-0.5)
    parents = torch.tensor([-1, -1, 0, 0, 1, 2])
    scores = torch.tensor([-0.1, -1.0, -0.3, -2.0, -1.2, -0.5])
    keep, new_parents = prune_tree(parents, scores, 4)
    assert keep.tolist() == [0, 1, 2, 5]
    assert new_parents.tolist() == [-1, -1, 0, 2]
    with pytest.raises(ValueError, match="cumulative"):
        prune_tree(torch.tensor([-1, 0]), torch.tensor([-1.0, -0.5]), 1)
