"""Benchmark one EAGLE-3 training step (K-step TTT) against one frozen-target forward on the same batch.

    python scripts/bench_train.py                       # CPU: SmolLM2-135M-shaped random target, fp32
    python scripts/bench_train.py --preset tiny         # seconds, for a smoke check
    python scripts/bench_train.py --preset llama3-8b    # GPU: Llama-3.1-8B-shaped random weights, bf16

Timed pieces (median of --iters after --warmup), all on the same [batch, seq_len] batch of random ids:
* ``target_forward``: a plain frozen-target forward with full logits (the cost every online trainer pays);
* ``target_capture``: what train/eagle3.py actually runs on the target (hooks for the 3 aux states and the
  embeddings, final norm, LM head only on the teacher rows) plus the teacher construction;
* ``head_step``: the head's training step given those features: TTT unroll (K steps), loss, backward,
  AdamW step.
Printed: tokens/s of each, ``ratio = head_step / target_forward`` (the issue's number; goal <= 1.0x at 8B
scale), ``online_ratio = (target_capture + head_step) / target_forward`` and the analytic matmul-FLOP
ratio (linear layers only) that a compute-bound device approaches. ``--assistant-fraction``
sets the share of positions with an assistant next token (teacher rows); real chat data is ~0.5-0.8.
Weights are random (speed only); with a GPU the step runs under bf16 autocast with fp32 master weights.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hsd.models import capture as cap
from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel
from train import ttt

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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="target shape (default: llama3-8b on a GPU, smollm2-135m on the CPU)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=7, help="TTT steps K")
    p.add_argument("--draft-vocab", type=int, default=None)
    p.add_argument("--attention", choices=sorted(ttt.ATTENTION), default="auto")
    p.add_argument("--assistant-fraction", type=float, default=1.0)
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
    if a.threads:
        torch.set_num_threads(a.threads)
    target_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target = build_target(preset, device, target_dtype)
    n_layers = cap.num_layers(target)

    head = Eagle3DraftModel(Eagle3Config.from_target(target.config, vd)).to(device)
    used = torch.sort(torch.randperm(target.config.vocab_size)[:vd]).values
    head.set_draft_vocab(used - torch.arange(vd))
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4, betas=(0.9, 0.95))
    aux = head.config.aux_layer_ids
    layers = sorted({0, *aux})

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, target.config.vocab_size, (batch, seq_len), generator=g).to(device)
    attn = torch.ones_like(ids)
    loss_mask = (torch.rand(batch, seq_len, generator=g) < a.assistant_fraction).long().to(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    vocab = head.draft_vocab

    def target_forward():
        with torch.no_grad():
            return target(input_ids=ids, attention_mask=attn).logits

    state = {}

    def target_capture():
        with torch.no_grad():
            c = cap.capture(target, ids, attn, layers=layers, logits=False, final_hidden=True)
            rows = ttt.teacher_rows(loss_mask, attn)
            row_logits = cap.output_logits(target, c.final_hidden[rows])
            state["features"] = torch.cat([c.hidden_states[i] for i in aux], -1)
            state["embeds"] = c.hidden_states[0]
            state["targets"] = ttt.build_targets(row_logits, rows, vocab)

    def head_step():
        with autocast:
            logits = ttt.ttt_unroll(head, state["features"], state["embeds"], state["targets"].rows, a.steps,
                                    a.attention)
            loss, _ = ttt.ttt_loss(logits, state["targets"], vocab)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_fwd = timed(target_forward, a.iters, a.warmup, device)
    t_cap = timed(target_capture, a.iters, a.warmup, device)
    t_head = timed(head_step, a.iters, a.warmup, device)
    tokens = batch * seq_len
    n_head = sum(p.numel() for p in head.parameters())
    res = {
        "preset": preset, "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(), "batch": batch, "seq_len": seq_len, "ttt_steps": a.steps,
        "draft_vocab": vd, "attention": a.attention, "assistant_fraction": a.assistant_fraction,
        "target_layers": n_layers, "target_params": sum(p.numel() for p in target.parameters()),
        "head_params": n_head, "target_forward_s": t_fwd, "target_capture_s": t_cap, "head_step_s": t_head,
        "target_forward_tok_s": tokens / t_fwd, "head_step_tok_s": tokens / t_head,
        "online_step_tok_s": tokens / (t_cap + t_head),
        "ratio": t_head / t_fwd, "online_ratio": (t_cap + t_head) / t_fwd,
        "matmul_flop_ratio": matmul_flop_ratio(target, head, a.steps, a.assistant_fraction),
    }
    print(f"{preset} on {res['device']} ({res['threads']} threads): batch {batch} x {seq_len} tokens, K={a.steps}, "
          f"Vd={vd}, attention={a.attention}, assistant fraction {a.assistant_fraction}")
    print(f"  target forward (full logits) {t_fwd * 1e3:9.1f} ms  {tokens / t_fwd:10.0f} tok/s")
    print(f"  target capture + teacher     {t_cap * 1e3:9.1f} ms  {tokens / t_cap:10.0f} tok/s")
    print(f"  head training step (K={a.steps})   {t_head * 1e3:9.1f} ms  {tokens / t_head:10.0f} tok/s")
    print(f"  ratio head step / target forward = {res['ratio']:.2f}x;  online step (capture + head) / target "
          f"forward = {res['online_ratio']:.2f}x")
    print(f"  analytic matmul-FLOP ratio head step / target forward = {res['matmul_flop_ratio']:.2f}x "
          "(linear layers only)")
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
