"""train.chat_data: loading both conversation shapes, template-derived assistant masks, overflow, collate."""
from __future__ import annotations

import json

import pytest
import torch

from tests.tiny_tokenizers import TINY_VOCAB_SIZE, tiny_chat_tokenizer
from train import chat_data

CONV = [
    {"role": "user", "content": "Hi there, what is 2+2?"},
    {"role": "assistant", "content": "The answer is 4."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]
EXPECTED_ASSISTANT_TEXT = {
    "chatml": "the answer is 4.<|im_end|>you're welcome.<|im_end|>",
    "llama3": "the answer is 4.<|eot_id|>you're welcome.<|eot_id|>",
}


def masked_text(tok, ex):
    return tok.decode([i for i, m in zip(ex["input_ids"], ex["loss_mask"]) if m])


# ----------------------------------------------------------------------------------- tiny tokenizers

@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_tiny_tokenizer_is_small_and_deterministic(family):
    a, b = tiny_chat_tokenizer(family), tiny_chat_tokenizer(family)
    assert len(a) == TINY_VOCAB_SIZE[family] < 96
    text = a.apply_chat_template(CONV, tokenize=False)
    ids = a(text, add_special_tokens=False)["input_ids"]
    assert ids == b(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < len(a) and a.unk_token_id not in ids
    assert a.decode(ids) == text.lower()
    assert a.pad_token_id is not None and a.eos_token_id is not None


# --------------------------------------------------------------------------------------------- masks

@pytest.mark.parametrize("family", ["chatml", "llama3"])
@pytest.mark.parametrize("tags", [False, True], ids=["diff", "generation_tags"])
def test_mask_covers_exactly_the_assistant_replies(family, tags):
    tok = tiny_chat_tokenizer(family, generation_tags=tags)
    assert chat_data.has_generation_tags(tok) == tags
    ex = chat_data.tokenize_conversation(tok, CONV)
    assert len(ex["input_ids"]) == len(ex["loss_mask"])
    assert masked_text(tok, ex) == EXPECTED_ASSISTANT_TEXT[family]
    # the ids are exactly what the template renders (nothing re-encoded differently)
    ref = tok.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    assert ex["input_ids"] == list(ref)
    # two contiguous spans, each ending with the end-of-turn (= eos) token
    m = ex["loss_mask"]
    starts = [t for t in range(len(m)) if m[t] and (t == 0 or not m[t - 1])]
    ends = [t for t in range(len(m)) if m[t] and (t == len(m) - 1 or not m[t + 1])]
    assert len(starts) == 2
    assert all(ex["input_ids"][e] == tok.eos_token_id for e in ends)


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_diff_and_generation_tags_agree(family):
    conv = [{"role": "system", "content": "be brief."}, *CONV,
            {"role": "user", "content": "and 3*3?"}, {"role": "assistant", "content": "9"}]
    a = chat_data.tokenize_conversation(tiny_chat_tokenizer(family), conv)
    b = chat_data.tokenize_conversation(tiny_chat_tokenizer(family, generation_tags=True), conv)
    assert a == b
    assert sum(a["loss_mask"]) > 0


def test_default_system_prompt_is_not_masked():
    tok = tiny_chat_tokenizer("chatml")  # injects a default system turn when there is none
    ex = chat_data.tokenize_conversation(tok, CONV[:2])
    assert masked_text(tok, ex) == "the answer is 4.<|im_end|>"
    assert "tiny helpful assistant" in tok.decode(ex["input_ids"])


def test_sharegpt_turns_are_accepted_by_tokenize_conversation():
    tok = tiny_chat_tokenizer("chatml")
    share = [{"from": "human", "value": "Hi there, what is 2+2?"}, {"from": "gpt", "value": "The answer is 4."}]
    assert chat_data.tokenize_conversation(tok, share) == chat_data.tokenize_conversation(tok, CONV[:2])


def test_truncation_by_max_length():
    tok = tiny_chat_tokenizer("llama3")
    full = chat_data.tokenize_conversation(tok, CONV)
    cut = chat_data.tokenize_conversation(tok, CONV, max_length=20)
    assert cut["input_ids"] == full["input_ids"][:20] and cut["loss_mask"] == full["loss_mask"][:20]


def _with_template(tok, template):
    tok.chat_template = template
    return tok


BAD_TEMPLATES = {
    # ignores add_generation_prompt: the role header would be trained as if the assistant wrote it
    "no_generation_prompt": "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}",
    # rewrites earlier assistant turns (like templates that strip reasoning from history)
    "rewrites_history": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ '...' }}{% else %}{{ m['content'] }}{% endif %}"
        "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # never renders assistant content
    "drops_replies": (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ '<|im_start|>' + m['role'] + '\n' + "
        "m['content'] + '<|im_end|>\n' }}{% else %}{{ '<|im_start|>assistant\n<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
}


@pytest.mark.parametrize("name", sorted(BAD_TEMPLATES))
def test_template_that_cannot_mark_assistant_spans_is_refused(name):
    tok = _with_template(tiny_chat_tokenizer("chatml"), BAD_TEMPLATES[name])
    with pytest.raises(ValueError, match="cannot mark the assistant tokens"):
        chat_data.tokenize_conversation(tok, CONV)


def test_missing_template_and_missing_assistant_are_refused():
    tok = _with_template(tiny_chat_tokenizer("chatml"), None)
    with pytest.raises(ValueError, match="no chat template"):
        chat_data.tokenize_conversation(tok, CONV)
    with pytest.raises(ValueError, match="no assistant turn"):
        chat_data.tokenize_conversation(tiny_chat_tokenizer("chatml"), CONV[:1])
    with pytest.raises(ValueError, match="unknown role"):
        chat_data.tokenize_conversation(tiny_chat_tokenizer("chatml"), [{"role": "narrator", "content": "x"}])


# ------------------------------------------------------------------------------------------- loading

def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_both_shapes_and_parquet(tmp_path):
    import datasets

    openai = _write_jsonl(tmp_path / "a.jsonl", [{"messages": CONV, "source": "mine"}])
    share = tmp_path / "b.json"
    share.write_text(json.dumps([{"conversations": [{"from": "system", "value": "s"},
                                                    {"from": "human", "value": "q"},
                                                    {"from": "gpt", "value": "a"}], "id": 7}]))
    pq = tmp_path / "c.parquet"
    datasets.Dataset.from_list([{"messages": CONV[:2]}]).to_parquet(str(pq))
    ds = chat_data.load_conversations([str(openai), str(share), str(pq)])
    assert ds.column_names == ["messages", "source"] and len(ds) == 3
    assert ds[0]["messages"] == CONV and ds[0]["source"] == "mine"
    assert ds[1]["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "a"}]
    assert ds[1]["source"] == str(share) and ds[2]["messages"] == CONV[:2]


def test_load_drops_rows_without_assistant_and_refuses_all_prompt_files(tmp_path):
    mixed = _write_jsonl(tmp_path / "m.jsonl", [{"messages": CONV}, {"messages": CONV[:1]}, {"messages": []}])
    assert len(chat_data.load_conversations(str(mixed))) == 1
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"messages": CONV[:1]}, {"messages": CONV[2:3]}])
    with pytest.raises(ValueError, match="none of its 2 conversations has an assistant turn"):
        chat_data.load_conversations(str(prompts))
    assert len(chat_data.load_conversations(str(prompts), require_assistant=False)) == 2


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        chat_data.load_conversations(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="no conversations"):
        chat_data.load_conversations(str(_write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])))
    with pytest.raises(ValueError, match="row 1: unknown role 'narrator'"):
        chat_data.load_conversations(str(_write_jsonl(
            tmp_path / "r.jsonl", [{"messages": CONV}, {"messages": [{"role": "narrator", "content": "x"}]}])))
    with pytest.raises(ValueError, match="could not be loaded from the Hugging Face Hub"):
        chat_data.load_conversations("some-owner/surely-not-cached-dataset")
    with pytest.raises(ValueError, match="sources is empty"):
        chat_data.load_conversations([])


# ------------------------------------------------------------------------------------ dataset + collate

def test_tokenize_dataset_overflow_counts():
    tok = tiny_chat_tokenizer("chatml")
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    long_reply = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "la " * 40}]}
    long_prompt = {"messages": [{"role": "user", "content": "la " * 40}, {"role": "assistant", "content": "ok"}]}
    rows = [short, long_reply, long_prompt]
    n_short = len(chat_data.tokenize_conversation(tok, short["messages"])["input_ids"])
    max_len = n_short + 5
    tds, stats = chat_data.tokenize_dataset(tok, rows, max_length=max_len, overflow="truncate")
    assert stats["rows"] == 3 and stats["kept"] == 2 and stats["truncated"] == 2
    assert stats["dropped_no_assistant"] == 1 and stats["dropped_too_long"] == 0  # prompt filled the window
    assert len(tds) == 2 and max(len(r) for r in tds["input_ids"]) == max_len
    assert stats["tokens"] == sum(len(r) for r in tds["input_ids"])
    assert stats["assistant_tokens"] == sum(sum(m) for m in tds["loss_mask"])
    tds, stats = chat_data.tokenize_dataset(tok, rows, max_length=max_len, overflow="drop")
    assert stats["kept"] == 1 and stats["dropped_too_long"] == 2 and stats["truncated"] == 0
    with pytest.raises(ValueError, match="overflow"):
        chat_data.tokenize_dataset(tok, rows, overflow="wrap")
    with pytest.raises(ValueError, match="no conversation left"):
        chat_data.tokenize_dataset(tok, [long_prompt], max_length=8)


def test_collate_right_pads():
    rows = [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8], "loss_mask": [1]}]
    b = chat_data.collate(rows, pad_id=2)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in b.values())
    assert chat_data.collate(rows, 0, pad_to_multiple_of=4)["input_ids"].shape == (2, 4)
    with pytest.raises(ValueError, match="loss_mask"):
        chat_data.collate([{"input_ids": [1, 2], "loss_mask": [1]}], 0)
    with pytest.raises(ValueError, match="pad_id"):
        chat_data.collate(rows, None)


# -------------------------------------------------------------------------------- real SmolLM2 template

@pytest.mark.slow
def test_smollm2_template_mask():
    from hsd.models import resolve

    tok = resolve.load_tokenizer("smollm2-135m")   # the tokenizer training uses (converted once, cached)
    assert not chat_data.has_generation_tags(tok)
    ex = chat_data.tokenize_conversation(tok, CONV)
    assert tok.decode([i for i, m in zip(ex["input_ids"], ex["loss_mask"]) if m]) == \
        "The answer is 4.<|im_end|>You're welcome.<|im_end|>"
    assert ex["input_ids"] == list(tok.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"])
    # the injected default system prompt and the user turns are not trained on
    assert "SmolLM" in tok.decode(ex["input_ids"]) and "SmolLM" not in masked_text(tok, ex)
