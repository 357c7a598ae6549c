"""hsd's own loader opens exported folders: ``load_draft`` / ``Eagle3DraftModel.from_pretrained`` on the
native layout and on the speculators twin give back final/'s weights and draft logits."""
from __future__ import annotations

import pytest
import torch

from hsd.export import export_head
from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel, load_draft

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("fmt", ["native", "speculators"])
def test_load_draft_opens_exports(tiny_run, tmp_path, fmt):
    _, target, final = tiny_run
    export_head(final, tmp_path / fmt, fmt=fmt, dtype="float32", clean_process=False)
    ref = load_draft(str(final), target)
    got = load_draft(str(tmp_path / fmt), target)
    assert isinstance(got.config, Eagle3Config) and got.config.aux_layer_ids == [2, 4, 5]
    for k, v in ref.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    feats, toks = torch.randn(1, 12, 96), torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        assert torch.equal(ref.forward_step(toks, features=feats).logits, got.forward_step(toks, features=feats).logits)
    bf16 = Eagle3DraftModel.from_pretrained(tmp_path / fmt, dtype=torch.bfloat16)
    assert bf16.fc.weight.dtype == torch.bfloat16 and bf16.d2t.dtype == torch.int64


def test_from_exported_refuses_foreign_layers():
    with pytest.raises(ValueError, match="norm_before_fc"):
        Eagle3Config.from_exported({"model_type": "llama", "norm_before_fc": True, "hidden_size": 8})
