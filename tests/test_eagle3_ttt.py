"""Training-time test: mask, alignment, reference == fast attention (loss and gradients), padding-free
normalisation, hand-checked metrics, and memorisation of a tiny set (step-0 accuracy > 0.9)."""
from __future__ import annotations

import pytest
import torch

from hsd.models import capture as cap
from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel
from hsd.models.vocab import DraftVocab
from tests.conftest import tiny_causal_lm
from train import ttt

pytestmark = pytest.mark.usefixtures("one_thread")


def test_attention_mask_structure():
    m = ttt.ttt_attention_mask(3, 2)
    expected = torch.tensor([[1, 0, 0, 1, 0, 0, 1, 0, 0],
                             [1, 1, 0, 0, 1, 0, 0, 1, 0],
                             [1, 1, 1, 0, 0, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)
    assert torch.equal(ttt.ttt_attention_mask(3, 0), torch.ones(3, 3, dtype=torch.bool).tril())


def test_row_alignment():
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    rows = ttt.teacher_rows(loss_mask, attn)  # u such that x[u+1] is a real assistant token
    assert rows.int().tolist() == [[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    # step k row t is scored iff teacher row t+k+1 exists
    assert ttt.step_rows(rows, 0).int().tolist() == [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert ttt.step_rows(rows, 1).int().tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert ttt.shift_left(torch.arange(4)[None], 3).tolist() == [[3, 0, 0, 0]]


def _setup(family="llama", B=3, S=16, vd=48, seed=0):
    target = tiny_causal_lm(family, initializer_range=0.3, seed=seed)
    torch.manual_seed(seed + 1)
    head = Eagle3DraftModel(Eagle3Config.from_target(target.config, vd))
    used = torch.sort(torch.randperm(96)[:vd]).values
    head.set_draft_vocab(used - torch.arange(vd))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (B, S), generator=g)
    attn = torch.ones(B, S, dtype=torch.long)
    if B > 2:
        attn[1, S - 5:] = 0  # right padding
        attn[2, S - 2:] = 0
    loss_mask = attn.clone()
    loss_mask[:, :3] = 0  # a "prompt"
    return target, head, ids, attn, loss_mask


def _batch(target, head, ids, attn, loss_mask):
    aux = head.config.aux_layer_ids
    c = cap.capture(target, ids, attn, layers=sorted({0, *aux}), logits=True)
    feats = torch.cat([c.hidden_states[i] for i in aux], -1)
    rows = ttt.teacher_rows(loss_mask, attn)
    targets = ttt.build_targets(c.logits[rows], rows, head.draft_vocab)
    return feats, c.hidden_states[0], targets


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reference_equals_fast_path_loss_and_grads(family):
    target, head, ids, attn, loss_mask = _setup(family)
    feats, embeds, targets = _batch(target, head, ids, attn, loss_mask)
    assert not targets.in_vocab.all() and targets.in_vocab.any()  # both kinds of rows are exercised
    results = {}
    for attention in ("reference", "sdpa", "auto"):
        head.zero_grad(set_to_none=True)
        logits = ttt.ttt_unroll(head, feats, embeds, targets.rows, 5, attention=attention)
        loss, metrics = ttt.ttt_loss(logits, targets, head.draft_vocab, 0.8)
        loss.backward()
        results[attention] = (loss.detach(), {k: v[0].item() for k, v in metrics.items()},
                              {n: p.grad.clone() for n, p in head.named_parameters()})
    l_ref, m_ref, g_ref = results["reference"]
    for path in ("sdpa", "auto"):
        l_fast, m_fast, g_fast = results[path]
        torch.testing.assert_close(l_fast, l_ref, rtol=1e-5, atol=1e-5)
        assert m_fast.keys() == m_ref.keys()
        for k in m_ref:
            assert m_fast[k] == pytest.approx(m_ref[k], rel=1e-5, abs=1e-5), (path, k)
        for n in g_ref:
            scale = g_ref[n].abs().max().item()
            assert scale > 0, n  # every parameter gets a gradient through the unroll
            torch.testing.assert_close(g_fast[n], g_ref[n], rtol=1e-4, atol=1e-5 * max(1.0, scale),
                                       msg=f"{path} {n}")


def test_loss_independent_of_padding_and_batch_duplication():
    target, head, ids, attn, loss_mask = _setup(B=1, S=12)
    one = _batch(target, head, ids, attn, loss_mask)
    pad = 5
    ids_p = torch.cat([ids, torch.zeros(1, pad, dtype=torch.long)], 1)
    attn_p = torch.cat([attn, torch.zeros(1, pad, dtype=torch.long)], 1)
    lm_p = torch.cat([loss_mask, torch.zeros(1, pad, dtype=torch.long)], 1)
    padded = _batch(target, head, ids_p, attn_p, lm_p)
    dup = _batch(target, head, ids.repeat(2, 1), attn.repeat(2, 1), loss_mask.repeat(2, 1))
    losses = []
    for feats, embeds, targets in (one, padded, dup):
        with torch.no_grad():
            logits = ttt.ttt_unroll(head, feats, embeds, targets.rows, 3)
            loss, metrics = ttt.ttt_loss(logits, targets, head.draft_vocab)
        losses.append((loss.item(), {k: (v[0] / v[1]).item() for k, v in metrics.items() if v[1] > 0}))
    for other in losses[1:]:
        assert other[0] == pytest.approx(losses[0][0], rel=1e-5)
        for k, v in losses[0][1].items():
            assert other[1][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_metrics_by_hand():
    """V = 3, draft vocab {0, 1}; teacher rows u = 0..4 of one sequence; known target top-1 per row."""
    rows = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    L = torch.full((5, 3), -5.0)
    top1 = [0, 1, 0, 2, 1]  # u = 3: target argmax (id 2) is outside the draft vocab
    for u, v in enumerate(top1):
        L[u, v] = 5.0
    vocab = DraftVocab.from_target_ids(torch.tensor([0, 1]), 3)
    targets = ttt.build_targets(L, rows, vocab)
    assert targets.in_vocab.tolist() == [True, True, True, False, True]
    torch.testing.assert_close(targets.teacher.sum(-1), torch.ones(5))
    assert (targets.p_draft.sum(-1)[3] < 0.01) and (targets.p_draft.sum(-1)[0] > 0.99)

    def logit_rows(picks):  # confident draft logits choosing draft id `p` per row
        out = torch.full((len(picks), 2), -8.0)
        for i, p in enumerate(picks):
            out[i, p] = 8.0
        return out

    # step 0: rows t=0..3 <-> u=1..4 (top1 1,0,2,1): right, right, miss (out of vocab), wrong
    # step 1: rows t=0..2 <-> u=2..4 (top1 0,2,1):   right, miss, right
    step0 = logit_rows([1, 0, 0, 0])
    step1 = logit_rows([0, 0, 1])
    loss, m = ttt.ttt_loss([step0, step1], targets, vocab, gamma=0.5)
    mean = {k: (s / c).item() for k, (s, c) in m.items()}
    assert m["acc_0"][1].item() == 4 and m["loss_0"][1].item() == 3  # out-of-vocab row: in acc, not in loss
    assert mean["acc_0"] == pytest.approx(2 / 4) and mean["acc_1"] == pytest.approx(2 / 3)
    assert mean["cond_acc_0"] == pytest.approx(2 / 4)
    assert m["cond_acc_1"][1].item() == 2 and mean["cond_acc_1"] == pytest.approx(1 / 2)  # chains t=0,1 survive
    assert mean["alpha_0"] == pytest.approx((1 + 1 + 0 + 0) / 4, abs=1e-3)
    assert mean["loss_0"] == pytest.approx((0 + 0 + 16) / 3, rel=1e-3)  # CE of a wrong confident pick ~ 16
    assert loss.item() == pytest.approx(mean["loss_0"] + 0.5 * mean["loss_1"], rel=1e-5)
    d = ttt.derived_metrics(mean, 2)
    assert d["sim_accept_len"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert d["sim_accept_len_cond"] == pytest.approx(0.5 + 0.25)
    assert ttt.accept_length([1.0, 1.0, 1.0]) == 3.0


def test_memorises_tiny_set():
    """The unroll learns a fixed small set: loss falls and step-0 accuracy exceeds 0.9."""
    target = tiny_causal_lm("llama", initializer_range=0.3, seed=3)
    torch.manual_seed(0)
    head = Eagle3DraftModel(Eagle3Config.from_target(target.config, 96))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (4, 20), generator=g)
    ones = torch.ones_like(ids)
    feats, embeds, targets = _batch(target, head, ids, ones, ones)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = acc0 = None
    for step in range(400):  # noqa: B007 - read after the loop
        logits = ttt.ttt_unroll(head, feats, embeds, targets.rows, 2)
        loss, m = ttt.ttt_loss(logits, targets, head.draft_vocab)
        acc0 = (m["acc_0"][0] / m["acc_0"][1]).item()
        first = loss.item() if first is None else first
        if acc0 > 0.9:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert acc0 > 0.9, (step, acc0)
    # the soft-label CE cannot go below the teacher's entropy: compare the excess (= the KL part)
    ent = -(targets.teacher * targets.teacher.clamp_min(1e-30).log()).sum(-1)
    floor = sum(0.8 ** k * ent[targets.position >= k + 1].mean().item() for k in range(2))
    assert step > 5 and loss.item() - floor < 0.3 * (first - floor), (step, first, loss.item(), floor)


def test_loss_matches_naive_per_position_loop():
    """The vectorised selection equals the documented alignment, position by position: step k, row t is
    scored on teacher L[t+k+1] restricted to the draft vocab, iff x[t+k+2] is a real assistant token."""
    target, head, ids, attn, loss_mask = _setup("qwen2", B=3, S=12, vd=40)
    feats, embeds, targets = _batch(target, head, ids, attn, loss_mask)
    full = cap.capture(target, ids, attn, logits=True).logits
    K = 3
    with torch.no_grad():
        dense = ttt.ttt_unroll(head, feats, embeds, targets.rows, K, all_rows=True)  # [B, S, Vd] per step
        sparse = ttt.ttt_unroll(head, feats, embeds, targets.rows, K)
        loss, m = ttt.ttt_loss(sparse, targets, head.draft_vocab, 0.8)
    ids_d = head.draft_vocab.target_ids
    B, S = ids.shape
    expected = 0.0
    for k in range(K):
        ce_sum = n_loss = n_acc = hits = 0.0
        for b in range(B):
            for t in range(S):
                u = t + k + 1
                if u + 1 >= S or not (loss_mask[b, u + 1] and attn[b, u + 1]):
                    continue
                teacher = torch.softmax(full[b, u][ids_d], -1)
                logq = torch.log_softmax(dense[k][b, t], -1)
                top = int(full[b, u].argmax())
                n_acc += 1
                hits += float(int(ids_d[dense[k][b, t].argmax()]) == top)
                if head.t2d[top]:
                    ce_sum += float(-(teacher * logq).sum())
                    n_loss += 1
        assert m[f"acc_{k}"][1].item() == n_acc and m[f"loss_{k}"][1].item() == n_loss
        assert m[f"acc_{k}"][0].item() == hits
        assert m[f"loss_{k}"][0].item() == pytest.approx(ce_sum, rel=1e-5)
        expected += 0.8 ** k * ce_sum / max(n_loss, 1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
