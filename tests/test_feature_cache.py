"""scripts/cache_hidden_states.py + train.feature_cache on a tiny target: exact features, resume, refusals."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from hsd.models.capture import capture
from tests.conftest import tiny_causal_lm
from tests.tiny_tokenizers import tiny_chat_tokenizer
from train import chat_data
from train.feature_cache import FeatureCache, collate_features, read_meta, shard_name

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a mat and then it ran far away from home".split()


def _script():
    spec = importlib.util.spec_from_file_location("cache_hidden_states", ROOT / "scripts" / "cache_hidden_states.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fc")
    model = tiny_causal_lm("llama", vocab_size=96)
    tok = tiny_chat_tokenizer("llama3")
    model.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    rows = [{"messages": [{"role": "user", "content": " ".join(WORDS[: 2 + i % 5])},
                          {"role": "assistant", "content": " ".join(WORDS[i % 7: i % 7 + 3 + i % 4])}]}
            for i in range(11)]
    data = root / "conv.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model, tok, data


def _run(root, data, out, *extra):
    _script().main([str(data), "--model", str(root / "target"), "--out", str(out), "--shard-size", "4",
                    "--batch-size", "3", "--max-length", "64", *extra])


def test_features_equal_a_direct_capture(setup):
    root, model, tok, data = setup
    out = root / "cache32"
    _run(root, data, out, "--store-dtype", "float32")
    meta = read_meta(out)
    assert meta["layers"] == [2, 4, 5] and meta["num_rows"] == 11 and meta["num_shards"] == 3
    fc = FeatureCache(out)
    assert len(fc) == 11 and fc.hidden_size == 32
    tds, _ = chat_data.tokenize_dataset(tok, chat_data.load_conversations(str(data)), max_length=64)
    for i in (0, 5, 10):
        row = fc[i]
        ids = torch.tensor(tds[i]["input_ids"])
        assert torch.equal(row["input_ids"], ids)
        assert row["loss_mask"].tolist() == tds[i]["loss_mask"]
        cap = capture(model, ids[None], layers=[2, 4, 5], logits=False, final_hidden=True)
        aux = torch.cat([cap.hidden_states[j] for j in (2, 4, 5)], -1)[0]
        assert row["aux_hidden"].shape == (len(ids), 96) and row["final_hidden"].shape == (len(ids), 32)
        # stored unpadded, computed in right-padded batches: equal to the unbatched forward
        assert torch.allclose(row["aux_hidden"], aux, atol=1e-5)
        assert torch.allclose(row["final_hidden"], cap.final_hidden[0], atol=1e-5)
        # teacher logits come back from the final hidden state through the target's LM head
        assert torch.allclose(model.lm_head(row["final_hidden"]), model(ids[None]).logits[0], atol=1e-4)
    batch = collate_features([fc[0], fc[1]], pad_id=0)
    n0, n1 = fc[0]["input_ids"].numel(), fc[1]["input_ids"].numel()
    assert batch["aux_hidden"].shape == (2, max(n0, n1), 96)
    assert batch["attention_mask"].sum().item() == n0 + n1
    assert batch["final_hidden"][batch["attention_mask"] == 0].abs().sum() == 0


def test_resume_skips_finished_shards_and_refuses_other_settings(setup):
    root, _, _, data = setup
    out = root / "cache16"
    _run(root, data, out)                           # bfloat16 storage by default
    assert FeatureCache(out)[3]["aux_hidden"].dtype == torch.float32
    stamps = {k: (out / shard_name(k)).stat().st_mtime_ns for k in range(3)}
    (out / shard_name(1)).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        FeatureCache(out)
    _run(root, data, out)
    assert (out / shard_name(1)).is_file()
    assert all((out / shard_name(k)).stat().st_mtime_ns == stamps[k] for k in (0, 2))
    assert not list(out.glob("*.tmp-*"))
    with pytest.raises(SystemExit, match="different settings"):
        _run(root, data, out, "--layers", "1", "3", "6")
    with pytest.raises(ValueError, match="not a feature cache"):
        FeatureCache(root)
    with pytest.raises(IndexError):
        FeatureCache(out)[11]
