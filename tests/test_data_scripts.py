"""scripts/build_prompt_set.py, scripts/regenerate_data.py (tiny target) and the bundled data files."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import tiny_causal_lm
from tests.tiny_tokenizers import tiny_chat_tokenizer
from train import chat_data

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_build_prompt_set_is_deterministic_and_disjoint(tmp_path):
    build = _script("build_prompt_set")
    args = ["--gsm8k", "5", "3", "--chat", "4", "2", "--multiturn", "2", "1", "--code", "3", "1"]
    build.main(["--train-out", str(tmp_path / "a.jsonl"), "--eval-out", str(tmp_path / "b.jsonl"), *args])
    build.main(["--train-out", str(tmp_path / "c.jsonl"), "--eval-out", str(tmp_path / "d.jsonl"), *args])
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "c.jsonl").read_bytes()
    train, held = _rows(tmp_path / "a.jsonl"), _rows(tmp_path / "b.jsonl")
    assert len(train) == 14 and len(held) == 7
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    kinds = [r["source"].split("/")[0] for r in train]
    assert kinds.count("gsm8k") == 5 and kinds.count("chatterbot") == 6 and kinds.count("humaneval") == 3
    multi = [r for r in train if sum(m["role"] == "user" for m in r["messages"]) == 2]
    assert len(multi) == 2
    ds = chat_data.load_conversations(str(tmp_path / "a.jsonl"), require_assistant=False)
    assert len(ds) == 14


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_target")
    tiny_causal_lm("llama", vocab_size=96).save_pretrained(path)
    tiny_chat_tokenizer("chatml").save_pretrained(path)
    return path


def test_regenerate_multiturn_and_resume(tmp_path, tiny_folder, capsys):
    regen = _script("regenerate_data")
    inp = tmp_path / "in.jsonl"
    rows = [
        {"id": "p1", "messages": [{"role": "user", "content": "hello there"}], "source": "x"},
        {"id": "p2", "messages": [{"role": "system", "content": "be nice."},
                                  {"role": "user", "content": "what is 2+2?"},
                                  {"role": "assistant", "content": "old answer"},
                                  {"role": "user", "content": "and 3+3?"}], "source": "y"},
        {"id": "p3", "conversations": [{"from": "human", "value": "tell me a joke"},
                                       {"from": "gpt", "value": "old"}]},
    ]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    common = [str(inp), "--out", str(out), "--model", str(tiny_folder), "--max-new-tokens", "6",
              "--batch-size", "2", "--threads", "1"]
    regen.main([*common, "--limit", "2"])
    got = {r["id"]: r for r in _rows(out)}
    assert set(got) == {"p1", "p2"}
    p2 = got["p2"]["messages"]
    assert [m["role"] for m in p2] == ["system", "user", "assistant", "user", "assistant"]
    assert p2[0]["content"] == "be nice." and p2[3]["content"] == "and 3+3?"
    assert "old answer" not in [m["content"] for m in p2]
    assert len(got["p2"]["finished"]) == 2 and got["p2"]["source"] == "y"
    # a kill mid-write leaves a cut line: resume skips done ids and regenerates only the rest
    with open(out, "a") as fh:
        fh.write('{"id": "p3", "messa')
    capsys.readouterr()
    regen.main(common)
    assert "2 already in" in capsys.readouterr().out
    final = [r for r in _rows_tolerant(out)]
    assert sorted(r["id"] for r in final) == ["p1", "p2", "p3"]
    p3 = next(r for r in final if r["id"] == "p3")
    assert [m["role"] for m in p3["messages"]] == ["user", "assistant"] and p3["source"] == str(inp)


def _rows_tolerant(path):
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def test_bundled_data_files():
    for name in ("prompts_train.jsonl", "prompts_eval.jsonl"):
        path = ROOT / "data" / name
        assert path.stat().st_size < 2_000_000
        rows = _rows(path)
        assert all(r["messages"][0]["role"] == "user" and r["source"] for r in rows)
    train_ids = {r["id"] for r in _rows(ROOT / "data" / "prompts_train.jsonl")}
    assert not train_ids & {r["id"] for r in _rows(ROOT / "data" / "prompts_eval.jsonl")}
    chat = ROOT / "data" / "smollm2_chat.jsonl"
    assert chat.stat().st_size < 2_000_000
    rows = _rows(chat)
    assert len(rows) >= 250 and {r["id"] for r in rows} <= train_ids
    ds = chat_data.load_conversations(str(chat))
    assert len(ds) == len(rows)
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert roles[-1] == "assistant" and roles.count("assistant") == len(r["finished"])


def test_bundled_large_set_is_disjoint_from_every_held_out_file():
    """data/prompts_train_all.jsonl and its regenerated conversations never contain a held-out prompt
    (ids or opening user turns) from prompts_eval.jsonl or prompts_eval_multiturn.jsonl; every prefix size of the
    conversation file is the same prefix of the prompt file, so subsets are nested training sets."""
    held = [r for f in ("prompts_eval.jsonl", "prompts_eval_multiturn.jsonl") for r in _rows(ROOT / "data" / f)]
    held_ids = {r["id"] for r in held}
    held_text = {r["messages"][0]["content"].strip().lower() for r in held}  # openers are de-duplicated
    prompts = _rows(ROOT / "data" / "prompts_train_all.jsonl")
    chat = ROOT / "data" / "smollm2_chat_all.jsonl"
    assert chat.stat().st_size < 3_000_000
    convs = _rows(chat)
    assert [r["id"] for r in convs] == [r["id"] for r in prompts]
    assert [r["id"] for r in convs[:280]] == [r["id"] for r in _rows(ROOT / "data" / "prompts_train.jsonl")]
    for r in convs:
        assert r["id"] not in held_ids
        assert r["messages"][0]["content"].strip().lower() not in held_text, r["id"]
        roles = [m["role"] for m in r["messages"]]
        assert roles[-1] == "assistant" and roles.count("assistant") == len(r["finished"])


def test_build_all_prompts_keeps_train_first_and_eval_out(tmp_path):
    build = _script("build_prompt_set")
    args = ["--gsm8k", "5", "3", "--chat", "4", "2", "--multiturn", "2", "1", "--code", "3", "1"]
    build.main(["--train-out", str(tmp_path / "a.jsonl"), "--eval-out", str(tmp_path / "b.jsonl"), *args])
    build.main(["--all-out", str(tmp_path / "all.jsonl"), "--keep-train", str(tmp_path / "a.jsonl"),
                "--exclude", str(tmp_path / "b.jsonl")])
    train, held, every = (_rows(tmp_path / n) for n in ("a.jsonl", "b.jsonl", "all.jsonl"))
    assert every[:len(train)] == train
    ids = [r["id"] for r in every]
    assert len(ids) == len(set(ids)) and not set(ids) & {r["id"] for r in held}
    assert len(every) > 1000  # every GSM8K / chatterbot / HumanEval prompt but the held-out ones
    build.main(["--all-out", str(tmp_path / "again.jsonl"), "--keep-train", str(tmp_path / "a.jsonl"),
                "--exclude", str(tmp_path / "b.jsonl")])
    assert (tmp_path / "all.jsonl").read_bytes() == (tmp_path / "again.jsonl").read_bytes()
    with pytest.raises(SystemExit, match="shares prompts"):
        build.main(["--all-out", str(tmp_path / "x.jsonl"), "--keep-train", str(tmp_path / "a.jsonl"),
                    "--exclude", str(tmp_path / "a.jsonl")])
