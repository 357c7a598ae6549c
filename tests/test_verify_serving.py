"""The serving path (hsd.verify.serving.VerifyPlan): the fused Triton kernel (interpreted on the CPU)
returns exactly what the torch backend returns, draw for draw, for every engine-facing feature:
ragged K with -1 padding (K_b = 0 included), Philox uniforms from (seed, step), greedy rows in the same
launch, logits with per-row thresholds and producer or fallback log-sum-exp, flattened rows with row
indices, strided rows, a draft vocabulary (d2t), caller-owned outputs, and the self-resetting
arrival counters. The torch backend itself is checked against per-request ``verify``/``greedy_verify``.

Shapes are tiny (every Triton program runs in Python here): B = 6 requests, K <= 3, V = 37 in blocks
of 16 (the last block partial).
"""
from __future__ import annotations

import pytest
import torch

from hsd.verify import greedy_verify, verify
from hsd.verify.serving import (
    VerifyPlan,
    draft_vocab_ids,
    logit_thresholds,
    philox4x32,
    philox_uniforms,
    row_lse,
    serve_torch,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
B, K, V = 6, 3, 37


def scenario(seed: int, vd: int | None = None):
    """Logits for B requests (draft close to the target), tokens sampled from the draft rows, ragged K
    (request 1 drafts 2, request 2 none, request 3 one), temperatures with a greedy request 4."""
    g = torch.Generator().manual_seed(seed)
    target = 2.0 * torch.randn(B, K + 1, V, generator=g)
    draft = target[:, :K] + 0.5 * torch.randn(B, K, V, generator=g)
    temp = torch.tensor([1.0, 0.8, 1.3, 0.7, 0.0, 1.0])
    ids = None
    if vd is not None:  # draft vocabulary: every other token plus the ones below 10 (ascending ids)
        ids = torch.unique(torch.cat([torch.arange(0, V, 2), torch.arange(10)]))[:vd]
        draft = draft[..., ids]
    q = torch.softmax(draft / temp.clamp_min(0.1).view(-1, 1, 1), -1)
    tok = torch.multinomial(q.reshape(-1, q.shape[-1]), 1, generator=g).view(B, K)
    if ids is not None:
        tok = ids[tok]
    tok[1, 2:] = -1
    tok[2, :] = -1
    tok[3, 1:] = -1
    uniforms = (torch.rand(B, K, generator=g), torch.rand(B, generator=g))
    seeds = torch.randint(0, 2**62, (B,), generator=g)
    steps = torch.randint(0, 2**40, (B,), generator=g)
    return dict(target=target, draft=draft, temp=temp, tok=tok, ids=ids, uniforms=uniforms, seeds=seeds, steps=steps)


def plans(method, inputs="probs", d2t=None, max_batch=B):
    kw = dict(max_batch=max_batch, max_draft=K, vocab=V, method=method, inputs=inputs, draft_vocab=d2t)
    return VerifyPlan(backend="triton", block_v=16, **kw), VerifyPlan(backend="torch", **kw)


def assert_same(a, b):
    for name in ("num_accepted", "next_token", "tokens", "flags"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x, y), (name, x.tolist(), y.tolist())


def check_emitted(res, tok):
    """tokens = accepted drafts, then next_token, then -1."""
    for i in range(tok.shape[0]):
        n = int(res.num_accepted[i])
        row = res.tokens[i].tolist()
        assert row[:n] == tok[i, :n].tolist() and row[n] == int(res.next_token[i]) and set(row[n + 1:]) <= {-1}


@pytest.mark.parametrize("method", ["tokenwise", "hsd"])
@pytest.mark.parametrize("has_q", [True, False], ids=["draft_probs", "point_mass"])
def test_probs_ragged_philox_and_explicit(method, has_q):
    """Probabilities, ragged K, Philox uniforms: kernel == torch; and Philox == the explicit uniforms
    that philox_uniforms reproduces (the in-kernel RNG is bit-exact with the torch one)."""
    s = scenario(1)
    p = torch.softmax(s["target"] / s["temp"].clamp_min(0.1).view(-1, 1, 1), -1)
    q = torch.softmax(s["draft"] / s["temp"].clamp_min(0.1).view(-1, 1, 1), -1) if has_q else None
    tri, ref = plans(method)
    kw = dict(temperature=s["temp"], seeds=s["seeds"], steps=s["steps"])
    got = tri(s["tok"], p, q, **kw)
    assert_same(got, ref(s["tok"], p, q, **kw))
    check_emitted(got, s["tok"])
    assert int(got.num_accepted[2]) == 0 and bool((tri.ws["count"] == 0).all())  # K_b = 0; counters reset
    explicit = philox_uniforms(s["seeds"], s["steps"], K)
    assert_same(tri(s["tok"], p, q, temperature=s["temp"], uniforms=explicit), got)
    # Greedy request 4 = greedy_verify on its own (K_b = 3) rows.
    g = greedy_verify(s["tok"][4:5], p[4:5])
    assert (int(got.num_accepted[4]), int(got.next_token[4])) == (int(g.num_accepted), int(g.next_token))


@pytest.mark.parametrize("method", ["blockwise", "tokenwise"])
def test_logits_thresholds_lse_and_indexed_rows(method):
    """Logits with per-request temperature (one greedy request), top-k/top-p thresholds on every row,
    the producer's log-sum-exp given (one fused launch) or not (row pass first), rows flattened as
    [N, V] with row indices, explicit uniforms."""
    s = scenario(2)
    temp = s["temp"]
    t_rows = temp.view(-1, 1).expand(B, K + 1)
    thr_p = logit_thresholds(s["target"], t_rows, top_k=torch.tensor([0, 8, 5, 0, 3, 12]).view(-1, 1), top_p=0.9)
    thr_q = logit_thresholds(s["draft"], t_rows[:, :K], top_k=10, top_p=1.0)
    # the draft tokens must lie in the drafter's kept set: resample the ones that do not
    q = torch.softmax(s["draft"].masked_fill(s["draft"] < thr_q.unsqueeze(-1), float("-inf"))
                      / temp.clamp_min(0.1).view(-1, 1, 1), -1)
    tok = torch.multinomial(q.view(-1, V), 1, generator=torch.Generator().manual_seed(5)).view(B, K)
    tok = torch.where(s["tok"] < 0, -1, tok)
    lse_p, lse_q = row_lse(s["target"], t_rows, thr_p), row_lse(s["draft"], t_rows[:, :K], thr_q)
    # flattened rows: request b's rows start at row 5 b + 1 of an [N, V] tensor (other rows: noise)
    flat_p = torch.randn(5 * B + 4, V)
    flat_q = torch.randn(5 * B + 4, V)
    rows = 5 * torch.arange(B, dtype=torch.int32) + 1
    for j in range(K + 1):
        flat_p[rows.long() + j] = s["target"][:, j]
        if j < K:
            flat_q[rows.long() + j] = s["draft"][:, j]
    tri, ref = plans(method, "logits")
    kw = dict(temperature=temp, uniforms=s["uniforms"], target_threshold=thr_p, draft_threshold=thr_q)
    want = ref(tok, s["target"], s["draft"], target_lse=lse_p, draft_lse=lse_q, **kw)
    got = tri(tok, flat_p, flat_q, target_rows=rows, draft_rows=rows, target_lse=lse_p, draft_lse=lse_q, **kw)
    assert_same(got, want)
    assert 0 < int(want.num_accepted.sum()) < int((tok >= 0).sum())
    assert len(tri.launches(tok, flat_p, flat_q, target_rows=rows, draft_rows=rows, target_lse=lse_p,
                            draft_lse=lse_q, **kw)) == 1  # one fused launch
    fallback = tri.launches(tok, s["target"], s["draft"], **kw)
    assert [ln.kernel.__name__ for ln in fallback] == ["_lse_kernel", "_lse_kernel", "_verify_kernel"]
    assert_same(tri(tok, s["target"], s["draft"], **kw), want)  # the row pass gives the same LSE


@pytest.mark.parametrize("inputs", ["probs", "logits"])
def test_draft_vocabulary(inputs):
    """Draft rows over a draft vocabulary of 20 ids with d2t offsets: the kernel reads q through t2d and
    equals the torch backend (which scatters q to the target vocabulary); strided (sliced) target rows."""
    s = scenario(3, vd=20)
    ids = s["ids"]
    d2t = ids - torch.arange(ids.numel())
    assert torch.equal(draft_vocab_ids(d2t), ids)
    temp = s["temp"]
    if inputs == "probs":
        target = torch.softmax(s["target"] / temp.clamp_min(0.1).view(-1, 1, 1), -1)
        draft = torch.softmax(s["draft"] / temp.clamp_min(0.1).view(-1, 1, 1), -1)
    else:
        target, draft = s["target"], s["draft"]
    padded = torch.zeros(B, K + 3, V)
    padded[:, 1:K + 2] = target
    strided = padded[:, 1:]  # row stride V, batch stride (K + 3) V: not a [B * (K+1), V] view
    tri, ref = plans("hsd", inputs, d2t=d2t)
    kw = dict(temperature=temp, seeds=s["seeds"], steps=s["steps"])
    want = ref(s["tok"], target, draft, **kw)
    assert_same(tri(s["tok"], strided, draft, **kw), want)
    # the torch backend equals verify() on the scattered q rows (request 0: K_b = 3, sampled)
    q_full = torch.zeros(B, K, V).index_copy_(2, ids, torch.softmax(s["draft"] / temp.view(-1, 1, 1), -1)) \
        if inputs == "logits" else torch.zeros(B, K, V).index_copy_(2, ids, draft)
    p0 = torch.softmax(s["target"][:1] / temp[0], -1) if inputs == "logits" else target[:1]
    c, u = philox_uniforms(s["seeds"], s["steps"], K)
    r0 = verify(s["tok"][:1], q_full[:1], p0, method="hsd", uniforms=(c[:1], u[:1]), validate=False)
    assert (int(want.num_accepted[0]), int(want.next_token[0])) == (int(r0.num_accepted), int(r0.next_token))


def test_fail_closed_flags_and_caller_outputs():
    """q(x) = 0 on a draft token, an id >= V and a NaN target row: never an acceptance beyond p, and the
    flags say so; results land in caller-owned buffers."""
    s = scenario(4)
    p = torch.softmax(s["target"], -1)
    q = torch.softmax(s["draft"], -1)
    tok = s["tok"].clone()
    q[0, 0, tok[0, 0]] = 0.0  # q = 0: the limit w = 1
    p[0, 1, tok[0, 1]] = 0.0  # ... and p = 0 next: position 2 never accepted
    tok[5, 1] = V + 3  # out of range
    p[1, 1] = float("nan")
    tri, ref = plans("hsd")
    out = (torch.empty(B, dtype=torch.int64), torch.empty(B, dtype=torch.int64),
           torch.empty(B, K + 1, dtype=torch.int64), torch.empty(B, dtype=torch.int32))
    res = tri(tok, p, q, temperature=s["temp"], uniforms=(torch.zeros(B, K), s["uniforms"][1]), out=out)
    assert res.num_accepted.data_ptr() == out[0].data_ptr()
    assert int(out[0][0]) <= 1 and int(out[3][0]) & 2
    assert int(out[0][5]) <= 1 and int(out[3][5]) & 4
    assert int(out[0][1]) <= 1 and int(out[3][1]) & 1  # a NaN threshold at level 2: rejected, flagged
    assert bool((out[1] >= 0).all() & (out[1] < V).all())
    want = ref(tok, p, q, temperature=s["temp"], uniforms=(torch.zeros(B, K), s["uniforms"][1]))
    assert torch.equal(out[0][[0, 2, 3, 4]], want.num_accepted[[0, 2, 3, 4]])


def test_torch_backend_matches_per_request_reference():
    """serve_torch == a loop over requests calling verify / greedy_verify on each request's own rows."""
    s = scenario(6)
    temp = s["temp"]
    p = torch.softmax(s["target"] / temp.clamp_min(0.1).view(-1, 1, 1), -1)
    q = torch.softmax(s["draft"] / temp.clamp_min(0.1).view(-1, 1, 1), -1)
    res = serve_torch(s["tok"], p, q, method="hsd", temperature=temp, seeds=s["seeds"], steps=s["steps"])
    coins, u = philox_uniforms(s["seeds"], s["steps"], K)
    for b in range(B):
        kb = int((s["tok"][b] >= 0).sum())
        if temp[b] == 0:
            r = greedy_verify(s["tok"][b:b + 1, :kb], p[b:b + 1, :kb + 1]) if kb else None
            want = (int(r.num_accepted), int(r.next_token)) if kb else (0, int(p[b, 0].argmax()))
        elif kb == 0:
            cdf = p[b, 0].cumsum(0)
            want = (0, int((cdf <= u[b] * cdf[-1]).sum()))
        else:
            r = verify(s["tok"][b:b + 1, :kb], q[b:b + 1, :kb], p[b:b + 1, :kb + 1], method="hsd",
                       uniforms=(coins[b:b + 1, :kb], u[b:b + 1]), validate=False)
            want = (int(r.num_accepted), int(r.next_token))
        assert (int(res.num_accepted[b]), int(res.next_token[b])) == want, b


def test_philox_known_answer_and_triton_bits():
    """philox4x32 is Philox4x32-10 (Random123 known-answer vectors), and Triton's tl.philox (interpreted)
    produces the same bits for the counters the kernel uses."""
    z = torch.zeros(1, dtype=torch.int64)
    out = philox4x32(z, z, z, z, z, z)
    assert [int(t) for t in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    out = philox4x32(f, f, f, f, f, f)
    assert [int(t) for t in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    import triton
    import triton.language as tl

    @triton.jit
    def bits(seed_ptr, step_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        seed = tl.load(seed_ptr)
        step = tl.load(step_ptr)
        zero = (i * 0).to(tl.uint32)
        lo = zero + (step & 0xFFFFFFFF).to(tl.uint32)
        hi = zero + ((step >> 32) & 0xFFFFFFFF).to(tl.uint32)
        c, _, _, _ = tl.philox(seed, i.to(tl.uint32), lo, zero, hi)
        tl.store(out_ptr + i, tl.uint_to_uniform_float(c))

    seeds, steps = torch.tensor([(1 << 62) + 12345]), torch.tensor([(7 << 33) + 99])
    got = torch.empty(8)
    bits[(1,)](seeds, steps, got, N=8)
    coins, u = philox_uniforms(seeds, steps, 8)
    assert torch.equal(got, coins[0])
    assert 0.0 <= float(coins.min()) and float(coins.max()) < 1.0 and 0.0 <= float(u) < 1.0
    many = philox_uniforms(torch.arange(4000), torch.zeros(4000, dtype=torch.int64), 3)[0]
    assert abs(float(many.mean()) - 0.5) < 0.01 and len(set(many.flatten().tolist())) > 11900


def test_plan_rejects_bad_calls():
    tri = VerifyPlan(max_batch=4, max_draft=2, vocab=11, backend="torch")
    tok = torch.zeros(2, 2, dtype=torch.int64)
    p = torch.full((2, 3, 11), 1 / 11)
    seeds = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="max_batch"):
        tri(torch.zeros(5, 2, dtype=torch.int64), p, seeds=seeds, steps=seeds)
    with pytest.raises(ValueError, match="float16"):
        tri(tok, p.half(), seeds=seeds, steps=seeds)
    with pytest.raises(ValueError, match="randomness"):
        tri(tok, p)
    with pytest.raises(ValueError, match="seeds and steps"):
        tri(tok, p, seeds=seeds)
    with pytest.raises(ValueError, match="last dimension"):
        tri(tok, p[..., :10], seeds=seeds, steps=seeds)
    with pytest.raises(ValueError, match="only with inputs='logits'"):
        tri(tok, p, seeds=seeds, steps=seeds, target_lse=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="temperature: required"):
        VerifyPlan(max_batch=4, max_draft=2, vocab=11, inputs="logits", backend="torch")(tok, p, seeds=seeds, steps=seeds)
    with pytest.raises(ValueError, match="d2t maps"):
        VerifyPlan(max_batch=4, max_draft=2, vocab=11, draft_vocab=torch.tensor([0, 20]))
    with pytest.raises(ValueError, match="inputs"):
        VerifyPlan(max_batch=4, max_draft=2, vocab=11, inputs="logprobs")
    with pytest.raises(RuntimeError, match="CUDA"):
        tri.capture(tok, p, seeds=seeds, steps=seeds)
