"""Benchmark EAGLE-3 training on this machine: fp32 vs bf16 and padded vs packed batches, in one run.

    python scripts/bench_train.py                       # CPU: SmolLM2-135M-shaped random target, both precisions
    python scripts/bench_train.py --dtypes float32      # skip bf16 (an AVX2-only CPU emulates it ~25-50x slower)
    python scripts/bench_train.py --preset tiny         # seconds, for a smoke check
    python scripts/bench_train.py --preset llama3-8b    # GPU: Llama-3.1-8B-shaped random weights

It first prints the machine (``hsd.machine``) and its bf16 capability (``hsd.precision``: the measured bf16/fp32
matmul speed ratio and what ``auto`` means here). Then, per precision (``float32``: fp32 target and head;
``bfloat16``: bf16 target weights, so bf16 features, and CPU/GPU bf16 autocast for the head with fp32 master
weights and an fp32 loss, as ``target_dtype: bfloat16`` + ``mixed_precision: bf16`` train):

1. one random batch [batch, seq_len], median of --iters after --warmup:
   * ``target_forward``: a plain frozen-target forward with full logits (the cost every online trainer pays);
   * ``target_capture``: what train/eagle3.py runs on the target (hooks for the 3 aux states and the
     embeddings, final norm, LM head only on the teacher rows) plus the teacher construction;
   * ``head_step``: the head's training step given those features: TTT unroll (K steps), loss, backward, AdamW;
   and ``online_step = target_capture + head_step``;
2. real conversation lengths and assistant masks (``--data``, ``--conversations`` rows drawn at random and
   shuffled as the trainer's batches are, tokenized with the target's chat template; token ids are random): the online step over all of them as padded batches of
   ``--batch`` conversations (each as wide as its longest) and packed (train/packing.py: rows of
   ``--max-length`` tokens, attention block-diagonal per conversation), ``--packed-batch`` rows per batch;
   ``--repeats`` passes per mode, alternated, the fastest kept.
   Printed: useful tokens/s (assistant tokens, no padding, no prompt: what a head learns from) and the share
   of computed positions that are real tokens.

Ratios are measured in this one run on this one machine: packed / padded useful tokens/s per precision, and
bf16 / fp32 speed of the online step. ``--json`` writes everything with ``machine_info``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from hsd.machine import machine_info, machine_line
from hsd.models import capture as cap
from hsd.models import packing as pk
from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel
from hsd.precision import bf16_speedup, precision_probe
from train import chat_data, ttt
from train.packing import fill_stats, pack_rows

PRESETS = {
    # SmolLM2-135M-Instruct's shape (30 layers, GQA 9/3, tied embeddings)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192),
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                 max_position_embeddings=2048),
    # Llama-3.1-8B-Instruct's shape
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                      rope_theta=500000.0, max_position_embeddings=131072),
}
DEFAULTS = {"smollm2-135m": dict(batch=2, seq_len=384, draft_vocab=8192),
            "tiny": dict(batch=2, seq_len=128, draft_vocab=1024),
            "llama3-8b": dict(batch=1, seq_len=2048, draft_vocab=32000)}


def build_target(preset: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    kw = dict(PRESETS[preset])
    theta = kw.pop("rope_theta", 10000.0)
    try:
        cfg = LlamaConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta})
    except TypeError:  # transformers 4.x
        cfg = LlamaConfig(**kw, rope_theta=theta)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random init directly in the target dtype, on the device
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False)


def matmul_flop_ratio(target, head, steps: int, assistant_fraction: float) -> float:
    """Analytic (linear layers only, no attention) FLOPs of a head training step / a target forward, per token.

    Target forward: every weight matrix except the input embedding (LM head included). Head: fc once, then per
    TTT step the layer's projections + the LM head on the teacher rows, times 3 for forward + backward."""
    emb = target.get_input_embeddings().weight
    tied = target.get_output_embeddings().weight is emb
    t = sum(p.numel() for n, p in target.named_parameters() if p.ndim == 2) - (0 if tied else emb.numel())
    layer = sum(p.numel() for p in head.midlayer.parameters() if p.ndim == 2)
    h = head.fc.weight.numel() + steps * (layer + assistant_fraction * head.lm_head.weight.numel())
    return 3 * h / t


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def conversation_rows(data: str, tokenizer: str, n: int, max_length: int, vocab: int) -> list[dict]:
    """``n`` conversations of ``data`` drawn and ordered at random (seed 0), as the trainer's shuffled batches
    meet them, rendered with ``tokenizer``'s chat template (lengths and assistant masks of real chat data);
    token ids replaced by random ids below ``vocab``."""
    from hsd.models import resolve

    tok = resolve.load_tokenizer(tokenizer)
    ds = chat_data.load_conversations([data])
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
    ds = ds.select(order)
    tds, _ = chat_data.tokenize_dataset(tok, ds, max_length=max_length)
    g = torch.Generator().manual_seed(0)
    return [{"row_id": i, "input_ids": torch.randint(0, vocab, (len(r["input_ids"]),), generator=g).tolist(),
             "loss_mask": list(r["loss_mask"])} for i, r in enumerate(tds)]


class Online:
    """One precision's target + head + optimizer, and the online training step on a batch."""

    def __init__(self, preset: str, device: torch.device, dtype: torch.dtype, vd: int, steps: int, attention: str):
        self.device, self.steps, self.attention = device, steps, attention
        self.target = build_target(preset, device, dtype)
        torch.manual_seed(0)
        self.head = Eagle3DraftModel(Eagle3Config.from_target(self.target.config, vd)).to(device)
        used = torch.sort(torch.randperm(self.target.config.vocab_size)[:vd]).values
        self.head.set_draft_vocab(used - torch.arange(vd))
        self.head.train()
        self.opt = torch.optim.AdamW(self.head.parameters(), lr=1e-4, betas=(0.9, 0.95))
        self.aux = self.head.config.aux_layer_ids
        self.layers = sorted({0, *self.aux})
        self.vocab = self.head.draft_vocab
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16
                         else contextlib.nullcontext())

    def capture(self, batch: dict) -> tuple:
        ids, am, pos = batch["input_ids"], batch["attention_mask"], batch.get("position_ids")
        with torch.no_grad():
            c = cap.capture(self.target, ids, layers=self.layers, logits=False, final_hidden=True,
                            **pk.target_inputs(am, pos))
            rows = ttt.teacher_rows(batch["loss_mask"], am, pos)
            row_logits = cap.output_logits(self.target, c.final_hidden[rows])
            return (torch.cat([c.hidden_states[i] for i in self.aux], -1), c.hidden_states[0],
                    ttt.build_targets(row_logits, rows, self.vocab, pos))

    def head_step(self, features, embeds, targets) -> None:
        with self.autocast:
            logits = ttt.ttt_unroll(self.head, features, embeds, targets.rows, self.steps, self.attention,
                                    position_ids=targets.positions)
            loss, _ = ttt.ttt_loss(logits, targets, self.vocab)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self, batch: dict) -> None:
        self.head_step(*self.capture(batch))


def random_batch(online: Online, batch: int, seq_len: int, assistant_fraction: float) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, online.target.config.vocab_size, (batch, seq_len), generator=g)
    lm = (torch.rand(batch, seq_len, generator=g) < assistant_fraction).long()
    return {k: v.to(online.device) for k, v in
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": lm}.items()}


def over_data(online: Online, rows: list[dict], per_batch: int, warmup: int, cached: bool = False) -> dict:
    """The online step over every row of ``rows`` (conversations, or packed rows) in batches of ``per_batch``;
    the first ``warmup`` batches are run once more, untimed, before. ``cached``: the head step alone, on
    target outputs captured beforehand (untimed), as ``cache_target`` trains after the first epoch."""
    batches = [{k: v.to(online.device) for k, v in chat_data.collate(rows[i:i + per_batch], 0).items()}
               for i in range(0, len(rows), per_batch)]
    parts = [online.capture(b) for b in batches] if cached else None

    def run(i: int) -> None:
        online.head_step(*parts[i]) if cached else online.step(batches[i])

    for i in range(min(warmup, len(batches))):
        run(i)
    sync(online.device)
    t0 = time.perf_counter()
    for i in range(len(batches)):
        run(i)
    sync(online.device)
    secs = time.perf_counter() - t0
    useful = sum(int(b["loss_mask"].sum()) for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    computed = sum(b["input_ids"].numel() for b in batches)
    return {"seconds": secs, "batches": len(batches), "useful_tokens": useful, "tokens": real,
            "computed_positions": computed, "fill": real / computed, "useful_tok_s": useful / secs,
            "tok_s": real / secs, "ms_per_batch": 1e3 * secs / len(batches)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="target shape (default: llama3-8b on a GPU, smollm2-135m on the CPU)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="precisions to compare (comma-separated)")
    p.add_argument("--batch", type=int, default=None, help="random batch rows; padded batches (conversations)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=5, help="TTT steps K")
    p.add_argument("--draft-vocab", type=int, default=None)
    p.add_argument("--attention", choices=sorted(ttt.ATTENTION), default="auto")
    p.add_argument("--assistant-fraction", type=float, default=1.0, help="random batch: share of teacher rows")
    p.add_argument("--data", default="data/smollm2_chat.jsonl", help="conversations for padded vs packed ('' = skip)")
    p.add_argument("--tokenizer", default="smollm2-135m", help="chat template / tokenizer for --data")
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--max-length", type=int, default=512, help="truncation, and the packed row length")
    p.add_argument("--packed-batch", type=int, default=0,
                   help="packed rows per batch (0: about as many tokens per batch as the padded batches hold)")
    p.add_argument("--cached", action="store_true",
                   help="also time the head step alone on cached target outputs (cache_target after epoch 1)")
    p.add_argument("--repeats", type=int, default=2, help="passes over the data per mode (alternated; fastest kept)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: leave as is)")
    p.add_argument("--json", default="", help="also write the result to this file")
    a = p.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    preset = a.preset or ("llama3-8b" if device.type == "cuda" else "smollm2-135m")
    d = DEFAULTS[preset]
    batch, seq_len = a.batch or d["batch"], a.seq_len or d["seq_len"]
    vd = a.draft_vocab or d["draft_vocab"]
    dtypes = [x.strip() for x in a.dtypes.split(",") if x.strip()]
    bad = [x for x in dtypes if x not in DTYPES]
    if bad or not dtypes:
        raise SystemExit(f"--dtypes: expected float32 and/or bfloat16, got {a.dtypes!r}")
    if a.threads:
        torch.set_num_threads(a.threads)
    info = machine_info(device)
    probe, speedup = precision_probe(device), bf16_speedup(device)
    print(machine_line(info))
    print(f"bf16 here: matmul {speedup:.2f}x fp32 speed at 128 rows; auto = {probe.dtype} ({probe.reason})"
          if speedup is not None else f"bf16 here: {probe.reason}; auto = {probe.dtype}")
    rows = packed = None
    if a.data:
        rows = conversation_rows(a.data, a.tokenizer, a.conversations, a.max_length, PRESETS[preset]["vocab_size"])
        packed = pack_rows(rows, a.max_length)
        mean_len = sum(len(r["input_ids"]) for r in rows) / len(rows)
        packed_batch = a.packed_batch or max(1, round(batch * mean_len / a.max_length))
        fs = fill_stats(rows, packed, batch)
        print(f"data: {len(rows)} conversations of {a.data} ({fs['tokens']} tokens, mean {mean_len:.0f}); padded "
              f"batches of {batch} conversations, packed: {len(packed)} rows of <= {a.max_length} tokens, "
              f"{packed_batch} per batch")
    res: dict = {"preset": preset, "machine": info, "probe": probe.as_dict(), "bf16_speedup": speedup,
                 "batch": batch, "seq_len": seq_len, "ttt_steps": a.steps, "draft_vocab": vd,
                 "attention": a.attention, "assistant_fraction": a.assistant_fraction, "runs": {}}
    for name in dtypes:
        online = Online(preset, device, DTYPES[name], vd, a.steps, a.attention)
        rb = random_batch(online, batch, seq_len, a.assistant_fraction)
        state = {}

        def target_forward(online=online, rb=rb):
            with torch.no_grad():
                return online.target(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"]).logits

        def target_capture(online=online, rb=rb, state=state):
            state["parts"] = online.capture(rb)

        def head_step(online=online, state=state):
            online.head_step(*state["parts"])

        t_fwd = timed(target_forward, a.iters, a.warmup, device)
        t_cap = timed(target_capture, a.iters, a.warmup, device)
        t_head = timed(head_step, a.iters, a.warmup, device)
        tokens = batch * seq_len
        run = {"target_forward_s": t_fwd, "target_capture_s": t_cap, "head_step_s": t_head,
               "online_step_s": t_cap + t_head, "online_step_tok_s": tokens / (t_cap + t_head),
               "ratio": t_head / t_fwd, "online_ratio": (t_cap + t_head) / t_fwd,
               "matmul_flop_ratio": matmul_flop_ratio(online.target, online.head, a.steps, a.assistant_fraction)}
        print(f"{name}: {preset}, random batch {batch} x {seq_len}, K={a.steps}, Vd={vd}, attention={a.attention}")
        print(f"  target forward (full logits) {t_fwd * 1e3:9.1f} ms  {tokens / t_fwd:10.0f} tok/s")
        print(f"  target capture + teacher     {t_cap * 1e3:9.1f} ms  {tokens / t_cap:10.0f} tok/s")
        print(f"  head training step (K={a.steps})   {t_head * 1e3:9.1f} ms  {tokens / t_head:10.0f} tok/s")
        print(f"  online step (capture + head) {(t_cap + t_head) * 1e3:9.1f} ms  {run['online_step_tok_s']:10.0f} tok/s;"
              f" head step / target forward {run['ratio']:.2f}x (analytic matmul FLOPs {run['matmul_flop_ratio']:.2f}x)")
        if rows is not None:
            modes = [("padded", rows, batch, False), ("packed", packed, packed_batch, False)]
            if a.cached:
                modes += [("padded_cached", rows, batch, True), ("packed_cached", packed, packed_batch, True)]
            for i in range(a.repeats):  # alternated, fastest kept: a busy machine's drift hits both modes alike
                for mode, data_rows, per, cached in modes:
                    r = over_data(online, data_rows, per, a.warmup if i == 0 else 0, cached)
                    if mode not in run or r["seconds"] < run[mode]["seconds"]:
                        run[mode] = r
            for mode, *_ in modes:
                r = run[mode]
                print(f"  {mode:13s} {len(rows)} conversations: {r['batches']:3d} batches, {r['fill']:.0%} real "
                      f"positions, {r['ms_per_batch']:8.1f} ms/batch, {r['useful_tok_s']:8.1f} useful tok/s")
            run["packed_over_padded"] = run["packed"]["useful_tok_s"] / run["padded"]["useful_tok_s"]
            print(f"  packing: {run['packed_over_padded']:.2f}x useful tokens/s")
            if a.cached:
                run["packed_over_padded_cached"] = (run["packed_cached"]["useful_tok_s"]
                                                    / run["padded_cached"]["useful_tok_s"])
                print(f"  packing, head step alone (cached target): {run['packed_over_padded_cached']:.2f}x")
        res["runs"][name] = run
        del online
    if {"float32", "bfloat16"} <= set(res["runs"]):
        f, b = res["runs"]["float32"], res["runs"]["bfloat16"]
        res["bf16_over_fp32"] = {"online_step": f["online_step_s"] / b["online_step_s"],
                                 "target_capture": f["target_capture_s"] / b["target_capture_s"],
                                 "head_step": f["head_step_s"] / b["head_step_s"]}
        for mode in ("padded", "packed"):
            if mode in f and mode in b:
                res["bf16_over_fp32"][f"{mode}_useful_tok_s"] = b[mode]["useful_tok_s"] / f[mode]["useful_tok_s"]
        print("bf16 / fp32 speed: " + ", ".join(f"{k} {v:.2f}x" for k, v in res["bf16_over_fp32"].items()))
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
