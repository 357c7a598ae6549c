"""The portable aux-layer-id rule: exactly 3, integers, strictly ascending, 2 <= id <= N - 1."""
from __future__ import annotations

import pytest

from hsd.export.layout import check_aux_ids, eagle3_shapes, rope_fields


@pytest.mark.parametrize("ids, n", [([2, 15, 27], 30), ([2, 4, 5], 8), ([2, 3, 4], 5), ([2, 16, 29], 32)])
def test_portable(ids, n):
    assert check_aux_ids(ids, n) == ids


@pytest.mark.parametrize("ids, n, match", [
    ([2, 4], 8, "exactly 3"),
    ([2, 4, 5, 6], 8, "exactly 3"),
    ([2.5, 4, 5], 8, "integers"),
    ([True, 4, 5], 8, "integers"),
    ([2, 4, 99], 8, r"aux_layer_ids \[99\] do not exist in the target: it has 8 layers"),
    ([-1, 4, 5], 8, r"\[-1\] do not exist"),
    ([5, 4, 2], 8, "strictly ascending and unique"),
    ([2, 4, 4], 8, "strictly ascending and unique"),
    ([0, 4, 5], 8, "every id must be >= 2"),
    ([1, 4, 5], 8, "every id must be >= 2"),
    ([2, 4, 8], 8, "every id must be <= N - 1 = 7"),
])
def test_not_portable(ids, n, match):
    with pytest.raises(ValueError, match=match):
        check_aux_ids(ids, n)


def test_without_a_layer_count():
    assert check_aux_ids([2, 40, 90]) == [2, 40, 90]
    with pytest.raises(ValueError, match=">= 2"):
        check_aux_ids([1, 2, 3])


def test_default_ids_of_common_depths_are_portable():
    from hsd.models.eagle3 import default_aux_layer_ids

    for n in (7, 8, 12, 16, 24, 28, 30, 32, 36, 40, 48, 64, 80, 94, 126):
        check_aux_ids(default_aux_layer_ids(n), n)
    for n in (4, 5, 6):  # [2, 2, 1], [2, 2, 2], [2, 3, 3]: too shallow for three distinct portable layers
        with pytest.raises(ValueError, match="strictly ascending"):
            check_aux_ids(default_aux_layer_ids(n), n)


def test_shapes_from_config():
    cfg = {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
           "intermediate_size": 24, "vocab_size": 100, "draft_vocab_size": 10, "target_hidden_size": 32}
    s = eagle3_shapes(cfg)
    assert s["fc.weight"] == (16, 96) and s["midlayer.self_attn.q_proj.weight"] == (16, 32)
    assert s["midlayer.self_attn.k_proj.weight"] == (8, 32) and s["lm_head.weight"] == (10, 16)
    assert s["d2t"] == (10,) and s["t2d"] == (100,)


def test_rope_both_spellings():
    plain = rope_fields({"rope_theta": 1e5, "rope_scaling": None})
    assert plain == {"rope_theta": 1e5, "rope_scaling": None,
                     "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}
    llama3 = rope_fields({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}})
    assert llama3["rope_theta"] == 5e5 and llama3["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    legacy = rope_fields({"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert legacy["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
