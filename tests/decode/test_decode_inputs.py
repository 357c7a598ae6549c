"""Bad input: one clear error naming the problem, raised before anything runs (no output folder, no
target pass): a head trained for another target (vocabulary, hidden size, captured layers out of range),
an exit layer outside the target, a prompt longer than the context, bad CLI values."""
from __future__ import annotations

import json

import pytest
import torch

from hsd.decode import DecodeConfig, Eagle3Drafter, SpeculativeDecoder
from hsd.decode.cli import main
from hsd.decode.exit_stage import ExitStage
from hsd.decode.loading import load_eagle3, load_exit_heads
from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel
from tests.decode import decode_fixtures as fx

pytestmark = pytest.mark.usefixtures("one_thread")


def saved_head(tmp_path, t, name="head", **cfg_overrides):
    head = Eagle3DraftModel(Eagle3Config.from_target(t.config, 32, **cfg_overrides))
    head.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def test_head_for_another_vocabulary(tmp_path):
    other = fx.target("llama", vocab=64)
    with pytest.raises(ValueError, match="vocabulary of 64 tokens"):
        load_eagle3(saved_head(tmp_path, other), fx.target("llama"))


def test_head_for_another_hidden_size(tmp_path):
    other = fx.target("llama", hidden_size=48)
    with pytest.raises(ValueError, match="hidden states of size 48"):
        load_eagle3(saved_head(tmp_path, other), fx.target("llama"))


def test_head_reading_layers_the_target_lacks(tmp_path):
    deep = fx.target("llama", num_layers=12)  # default aux layers [2, 6, 9]
    with pytest.raises(ValueError, match=r"indices \[9\]"):
        load_eagle3(saved_head(tmp_path, deep), fx.target("llama"))  # 8 layers
    head = Eagle3DraftModel(Eagle3Config.from_target(deep.config, 32)).attach_target(fx.target("llama"))
    with pytest.raises(ValueError, match="has 8 layers"):
        SpeculativeDecoder(fx.target("llama"), Eagle3Drafter(head))


def test_exit_layer_outside_the_target(tmp_path):
    deep = fx.target("llama", num_layers=12)
    fx.exit_head(deep, "mlp", layer=10).save_pretrained(tmp_path / "exit")
    t = fx.target("llama")
    with pytest.raises(ValueError, match="exit_layer"):
        load_exit_heads(str(tmp_path / "exit"), t)
    with pytest.raises(ValueError, match="out of range"):
        ExitStage(fx.exit_head(deep, "mlp", layer=10), t.config.num_hidden_layers)


def test_prompt_longer_than_context_runs_nothing(monkeypatch):
    t = fx.target("llama", max_position_embeddings=32)
    dec = SpeculativeDecoder(t, fx.drafter("eagle3", t))
    calls = []
    monkeypatch.setattr(dec.runner, "run", lambda *a, **k: calls.append(1))
    for n, new in ((40, 1), (20, 16)):
        with pytest.raises(ValueError, match="context of 32 positions"):
            dec.generate(torch.zeros(1, n, dtype=torch.long), config=DecodeConfig(max_new_tokens=new))
    assert not calls


def test_bad_token_ids_and_batch():
    dec = SpeculativeDecoder(fx.target("llama"))
    with pytest.raises(ValueError, match=r"\[0, 96\)"):
        dec.generate(torch.tensor([[1, 96]]))
    with pytest.raises(ValueError, match="batch size 2"):
        dec.generate(torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("kw,match", [({"k": -1}, "k:"), ({"method": "nope"}, "method:"),
                                      ({"temperature": 1.0, "method": "greedy"}, "greedy"),
                                      ({"top_p": 0.0}, "top_p"), ({"exit_window": 0}, "exit_window"),
                                      ({"backend": "cuda"}, "backend")])
def test_decode_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        DecodeConfig(**kw)
    with pytest.raises(ValueError, match="unknown decode config key"):
        DecodeConfig.from_dict({"kk": 3})


def test_cli_bad_input_writes_nothing(tmp_path, capsys):
    from tests.conftest import write_tiny_chat_run

    root = write_tiny_chat_run(tmp_path)
    out = tmp_path / "out"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"}], "source": "x"}) + "\n")
    other = fx.target("llama", vocab=64)
    cases = [(["--head", str(tmp_path / "missing")], "no such file"),
             (["--head", saved_head(tmp_path, other)], "vocabulary of 64"),
             (["--exit-head", str(tmp_path)], "layer_<l>"),
             (["--prompts", str(tmp_path / "none.jsonl")], "prompt file not found"),
             (["--draft-model", "layers:9"], "num_layers must be in"),
             (["--method", "bogus"], "--method"), (["--backend", "cuda"], "--backend"),
             (["--tree", "4x4"], "TOPK:DEPTH:TOTAL"), (["--tree", "2:3:40"], "total_tokens")]
    for extra, match in cases:
        rc = main(["--target", str(root / "target"), "--out-dir", str(out), "--prompts", str(prompts), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and match in err, (extra, err)
        assert not out.exists()
