"""Sequence packing: bin packing, collation, the block-diagonal masks, and exactness: packed vs unpacked EAGLE-3
TTT loss, metrics and gradients equal in fp32 on tiny Llama and Qwen2 targets (sdpa and eager), K = 1 and
K > 1; a leak across conversations (in the target or in the head's attention) is caught."""
from __future__ import annotations

import random

import pytest
import torch

from hsd.models import capture as cap
from hsd.models import packing
from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel
from tests.conftest import tiny_causal_lm
from train import chat_data, ttt
from train.packing import fill_stats, pack_lengths, pack_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pack_lengths_best_fit_decreasing():
    lengths = [5, 9, 3, 7, 2, 10, 1, 4]
    bins = pack_lengths(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # each item exactly once
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 5 == -(-sum(lengths) // 10)  # optimal here: 41 tokens in 5 bins of 10
    assert bins[0] == [5] and bins[1][0] == 1  # longest first
    assert [sum(lengths[i] for i in b) for b in bins] == [10, 9, 10, 10, 2]  # small items close the gaps
    assert pack_lengths(lengths, 10) == bins  # deterministic
    rng = random.Random(0)
    many = [rng.randint(1, 512) for _ in range(3000)]
    big = pack_lengths(many, 512)
    assert sorted(i for b in big for i in b) == list(range(3000))
    assert all(sum(many[i] for i in b) <= 512 for b in big)
    assert sum(many) / (len(big) * 512) > 0.95
    with pytest.raises(ValueError, match="length 11 > capacity 10"):
        pack_lengths([3, 11], 10)


def _rows(lengths, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        prompt = max(1, n // 3)
        rows.append({"row_id": 10 + i, "input_ids": ids, "loss_mask": [0] * prompt + [1] * (n - prompt)})
    return rows


def test_pack_rows_and_collate():
    rows = _rows([6, 3, 4, 2])
    packed = pack_rows(rows, 8)
    assert [p["lengths"] for p in packed] == [[6, 2], [4, 3]]
    assert [p["row_ids"] for p in packed] == [[10, 13], [12, 11]] and [p["row_id"] for p in packed] == [10, 12]
    assert packed[0]["input_ids"] == rows[0]["input_ids"] + rows[3]["input_ids"]
    assert packed[0]["loss_mask"] == rows[0]["loss_mask"] + rows[3]["loss_mask"]
    batch = chat_data.collate(packed, pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 3, 0, 1, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 7 + [0]]
    assert "position_ids" not in chat_data.collate(rows, pad_id=0)  # unpacked batches are unchanged
    with pytest.raises(ValueError, match="mix packed"):
        chat_data.collate([packed[0], rows[0]], pad_id=0)
    stats = fill_stats(rows, packed, batch_size=2)
    assert stats["fill_padded"] == pytest.approx(15 / 20) and stats["fill_packed"] == pytest.approx(15 / 16)


def test_block_causal_mask():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert packing.segment_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2]]
    m = packing.block_causal_mask(pos)[0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                 [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    full = ttt.ttt_attention_mask(6, 1, causal=packing.block_causal_mask(pos)[:, None])
    assert full.shape == (1, 1, 6, 12) and torch.equal(full[0, 0, :, 6:], torch.eye(6, dtype=torch.bool))
    assert packing.positions_for_lengths([3, 2], 7).tolist() == [0, 1, 2, 0, 1, 0, 1]


def test_packed_row_alignment():
    """Teacher rows and step rows never cross into the next conversation."""
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0]])
    lm = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0]])
    am = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    rows = ttt.teacher_rows(lm, am, pos)
    assert rows.int().tolist() == [[1, 1, 1, 0, 1, 1, 0, 0]]
    assert ttt.step_rows(rows, 0, pos).int().tolist() == [[1, 1, 0, 0, 1, 0, 0, 0]]
    assert ttt.step_rows(rows, 1, pos).int().tolist() == [[1, 0, 0, 0, 0, 0, 0, 0]]
    assert ttt.step_rows(rows, 1).int().tolist() == [[1, 0, 1, 1, 0, 0, 0, 0]]  # unpacked rule: would cross


def _target(family, impl):
    return tiny_causal_lm(family, initializer_range=0.3, attn_implementation=impl)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_target_honours_packed_positions(family, impl, monkeypatch):
    target = _target(family, impl)
    packing.check_packed_target(target, 96)
    # planted: the same packed row with a plain causal mask (what a 2-D attention mask gives) must be refused
    monkeypatch.setattr(packing, "target_inputs", lambda am, pos: {"attention_mask": torch.ones_like(pos)})
    with pytest.raises(ValueError, match="does not keep packed conversations apart"):
        packing.check_packed_target(target, 96)


def _head(target, vd=48, seed=1):
    torch.manual_seed(seed)
    head = Eagle3DraftModel(Eagle3Config.from_target(target.config, vd))
    used = torch.sort(torch.randperm(96, generator=torch.Generator().manual_seed(seed))[:vd]).values
    return head.set_draft_vocab(used - torch.arange(vd))


def _loss_and_grads(target, head, batch, steps, attention, target_kwargs=None):
    ids, am, pos = batch["input_ids"], batch["attention_mask"], batch.get("position_ids")
    aux = head.config.aux_layer_ids
    kwargs = packing.target_inputs(am, pos) if target_kwargs is None else target_kwargs
    c = cap.capture(target, ids, layers=sorted({0, *aux}), logits=False, final_hidden=True, **kwargs)
    feats = torch.cat([c.hidden_states[i] for i in aux], -1)
    rows = ttt.teacher_rows(batch["loss_mask"], am, pos)
    targets = ttt.build_targets(cap.lm_head(target)(c.final_hidden[rows]).float(), rows, head.draft_vocab, pos)
    head.zero_grad(set_to_none=True)
    logits = ttt.ttt_unroll(head, feats, c.hidden_states[0], rows, steps, attention, position_ids=pos)
    loss, metrics = ttt.ttt_loss(logits, targets, head.draft_vocab, 0.8)
    loss.backward()
    return (loss.detach(), {k: (float(s), float(n)) for k, (s, n) in metrics.items()},
            {n: p.grad.clone() for n, p in head.named_parameters()})


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert a[1][k][1] == b[1][k][1], k  # the same rows are counted
        assert a[1][k][0] == pytest.approx(b[1][k][0], rel=1e-5, abs=1e-5), k
    for n in a[2]:
        scale = max(1.0, a[2][n].abs().max().item())
        torch.testing.assert_close(a[2][n], b[2][n], rtol=1e-4, atol=2e-6 * scale, msg=n)


LENGTHS = [11, 4, 9, 7, 13, 5]


@pytest.mark.parametrize("family,impl,steps,attention", [
    ("llama", "sdpa", 1, "auto"), ("llama", "eager", 3, "reference"), ("qwen2", "sdpa", 3, "sdpa"),
    ("qwen2", "eager", 1, "reference"), ("llama", "sdpa", 4, "auto")])
def test_packed_equals_unpacked_loss_and_grads(family, impl, steps, attention):
    target = _target(family, impl)
    head = _head(target)
    rows = _rows(LENGTHS, seed=3)
    packed = pack_rows(rows, 16)
    assert len(packed) < len(rows) and max(len(p["lengths"]) for p in packed) > 1
    unpacked = _loss_and_grads(target, head, chat_data.collate(rows, 0), steps, attention)
    ours = _loss_and_grads(target, head, chat_data.collate(packed, 0), steps, attention)
    assert unpacked[1]["acc_0"][1] > 20 and (steps == 1 or unpacked[1][f"acc_{steps - 1}"][1] > 5)
    _assert_same(ours, unpacked)


def test_planted_leaks_are_caught(monkeypatch):
    """The equality above fails when conversations see each other: in the target (a plain causal mask over
    the packed row) or in the head (its step-0 attention not block-diagonal)."""
    target = _target("llama", "sdpa")
    head = _head(target)
    rows = _rows(LENGTHS, seed=3)
    batch = chat_data.collate(pack_rows(rows, 16), 0)
    unpacked = _loss_and_grads(target, head, chat_data.collate(rows, 0), 3, "auto")
    leaky_target = _loss_and_grads(target, head, batch, 3, "auto",
                                   target_kwargs={"attention_mask": batch["attention_mask"]})
    with pytest.raises(AssertionError):
        _assert_same(leaky_target, unpacked)
    s = batch["input_ids"].shape[1]
    monkeypatch.setattr(packing, "block_causal_mask",
                        lambda pos: torch.ones(s, s, dtype=torch.bool).tril().expand(pos.shape[0], s, s))
    for attention in ("reference", "sdpa"):
        leaky_head = _loss_and_grads(target, head, batch, 3, attention)
        with pytest.raises(AssertionError):
            _assert_same(leaky_head, unpacked)
