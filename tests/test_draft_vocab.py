"""train.draft_vocab: frequency selection on assistant tokens, deterministic ties, padding, coverage; the
consistency check of hsd.models.vocab.DraftVocab."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from hsd.models.vocab import DraftVocab
from tests.tiny_tokenizers import tiny_chat_tokenizer
from train import chat_data, draft_vocab

# assistant counts: 7 -> 3, 2 -> 2, 5 -> 2, 9 -> 1; token 1 is frequent but only in prompts
ROWS = [
    {"input_ids": [1, 1, 1, 7, 7, 2], "loss_mask": [0, 0, 0, 1, 1, 1]},
    {"input_ids": [1, 1, 5, 7, 5, 9, 2], "loss_mask": [0, 0, 1, 1, 1, 1, 1]},
]


def test_selection_counts_only_assistant_tokens_with_id_tiebreak():
    vocab, cov = draft_vocab.build_draft_vocab(ROWS, target_vocab_size=10, draft_vocab_size=3)
    d2t, t2d, used = vocab.d2t, vocab.t2d, vocab.target_ids
    assert used.tolist() == [2, 5, 7]        # 7 (3x), then the tie 2/5 (2x each) beats 9 (1x); 1 is prompt-only
    assert d2t.tolist() == [2, 4, 5] and d2t.dtype == torch.long
    assert torch.nonzero(t2d).flatten().tolist() == [2, 5, 7]
    assert cov == pytest.approx(7 / 8)
    # tie between 2 and 5 for the last slot: the smaller id wins
    vocab, cov = draft_vocab.build_draft_vocab(ROWS, 10, 2)
    assert vocab.target_ids.tolist() == [2, 7] and cov == pytest.approx(5 / 8)


def test_padding_with_lowest_unused_ids():
    vocab, cov = draft_vocab.build_draft_vocab(ROWS, 10, 7)
    assert vocab.target_ids.tolist() == [0, 1, 2, 3, 5, 7, 9]     # seen {2,5,7,9} + lowest unused {0,1,3}
    assert cov == 1.0 and int(vocab.t2d.sum()) == 7
    vocab, cov = draft_vocab.build_draft_vocab(ROWS, 10, 10)
    assert vocab.d2t.tolist() == [0] * 10 and bool(vocab.t2d.all()) and cov == 1.0 and vocab.is_full


def test_matches_bruteforce_and_ignores_row_order():
    rng = random.Random(0)
    V = 50
    rows = []
    for _ in range(40):
        n = rng.randint(1, 30)
        rows.append({"input_ids": [min(int(rng.expovariate(0.15)), V - 1) for _ in range(n)],
                     "loss_mask": [rng.random() < 0.7 for _ in range(n)]})
    cnt = Counter(i for r in rows for i, m in zip(r["input_ids"], r["loss_mask"]) if m)
    for Vd in (1, 5, 17, 49):
        seen = sorted(cnt, key=lambda i: (-cnt[i], i))[:Vd]
        seen += [i for i in range(V) if i not in cnt][: Vd - len(seen)]
        vocab, cov = draft_vocab.build_draft_vocab(rows, V, Vd)
        assert vocab.target_ids.tolist() == sorted(seen)
        assert cov == pytest.approx(sum(cnt[i] for i in seen) / sum(cnt.values()))
        shuffled = rows[:]
        rng.shuffle(shuffled)
        again, _ = draft_vocab.build_draft_vocab(shuffled, V, Vd)
        assert torch.equal(vocab.d2t, again.d2t) and torch.equal(vocab.t2d, again.t2d)


def test_bad_sizes_and_ids():
    with pytest.raises(ValueError, match="larger than the target vocabulary"):
        draft_vocab.build_draft_vocab(ROWS, 10, 11)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        draft_vocab.build_draft_vocab(ROWS, 10, 0)
    with pytest.raises(ValueError, match="outside the target vocabulary"):
        draft_vocab.build_draft_vocab(ROWS, 8, 3)     # id 9 in the data, V = 8
    with pytest.raises(ValueError, match="differ"):
        draft_vocab.build_draft_vocab([{"input_ids": [1, 2], "loss_mask": [1]}], 10, 2)


def test_check_draft_vocab_catches_inconsistency():
    vocab, _ = draft_vocab.build_draft_vocab(ROWS, 10, 3)
    d2t, t2d = vocab.d2t, vocab.t2d
    DraftVocab.check(d2t, t2d)
    flipped = t2d.clone()
    flipped[2], flipped[3] = False, True
    with pytest.raises(ValueError, match="disagree"):
        DraftVocab.check(d2t, flipped)
    extra = t2d.clone()
    extra[0] = True
    with pytest.raises(ValueError, match="marks 4"):
        DraftVocab.check(d2t, extra)
    with pytest.raises(ValueError, match="ascending"):
        DraftVocab.check(torch.tensor([5, 1, 1]), t2d)
    with pytest.raises(ValueError, match="outside"):
        DraftVocab.check(torch.tensor([2, 4, 9]), t2d)
    with pytest.raises(ValueError, match="int64"):
        DraftVocab.check(d2t.int(), t2d)
    with pytest.raises(ValueError, match="bool"):
        DraftVocab.check(d2t, t2d.long())


def test_on_tokenized_chat_dataset():
    tok = tiny_chat_tokenizer("llama3")
    convs = [{"messages": [{"role": "user", "content": "what is the sum?"},
                           {"role": "assistant", "content": f"the sum is {k}."}]} for k in range(12)]
    tds, stats = chat_data.tokenize_dataset(tok, convs, max_length=64)
    vocab, cov = draft_vocab.build_draft_vocab(tds, len(tok), 24)
    used = set(vocab.target_ids.tolist())
    assistant_ids = {i for r in tds for i, m in zip(r["input_ids"], r["loss_mask"]) if m}
    assert assistant_ids <= used and cov == 1.0       # every assistant token fits in 24 slots
    assert tok.eos_token_id in used                   # the end-of-turn token is an assistant token
    assert tok.convert_tokens_to_ids("<|start_header_id|>") not in used   # headers are not
    _, cov_small = draft_vocab.build_draft_vocab(tds, len(tok), 4)
    assert 0.0 < cov_small < 1.0
