"""Tiny random targets of every common decoder family (8 layers, hidden 32, vocab 96), built from their
`transformers` configs: what the target-family tests share.

Windows and chunks are 4 positions and caps are low so that every feature binds within a few tokens:
a test pass crosses window / chunk boundaries, softcaps saturate. ``initializer_range`` 0.3 gives peaked
next-token laws (T = 0 decoding is not decided by near-ties).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

WINDOW = 4
SOFTCAP = 2.0
_FULL = ["full_attention"] * 8


@dataclass(frozen=True)
class Family:
    """A test target: transformers ``model_type``, config overrides, the attention implementation to load
    with (None = the family's default) and what the decode engine must do with it."""

    model_type: str
    overrides: dict = field(default_factory=dict)
    attn: str | None = None
    note: str = ""


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", note="untied LM head"),
    "llama_tied": Family("llama", {"tie_word_embeddings": True}, note="tied LM head"),
    "llama_eager": Family("llama", attn="eager", note="loaded with attn_implementation='eager'"),
    "qwen2": Family("qwen2", note="qkv bias"),
    "qwen3": Family("qwen3", {"head_dim": 8}, note="q/k norm"),
    "qwen3_moe": Family("qwen3_moe", {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
                                      "moe_intermediate_size": 16}, note="MoE"),
    "mistral_window": Family("mistral", {"head_dim": 8, "sliding_window": WINDOW}, note="sliding_window 4"),
    "mixtral": Family("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, note="MoE, no window"),
    "mixtral_window": Family("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2,
                                         "sliding_window": WINDOW}, note="sliding_window 4"),
    "phi3": Family("phi3", note="fused qkv, no window"),
    "phi3_window": Family("phi3", {"sliding_window": WINDOW}, note="sliding_window 4"),
    "starcoder2_window": Family("starcoder2", {"sliding_window": WINDOW}, note="sliding_window 4"),
    "olmo2": Family("olmo2", note="post-norms, q/k norm"),
    "gemma": Family("gemma", {"head_dim": 8}, note="sqrt(H) embedding scale"),
    "gemma2": Family("gemma2", {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": WINDOW,
                                "attn_logit_softcapping": SOFTCAP, "final_logit_softcapping": SOFTCAP},
                     note="sliding/full layers, attention and final softcaps"),
    "gemma2_full": Family("gemma2", {"head_dim": 8, "query_pre_attn_scalar": 8, "layer_types": _FULL,
                                     "attn_logit_softcapping": SOFTCAP, "final_logit_softcapping": SOFTCAP},
                          note="every layer full attention"),
    "gemma3_text": Family("gemma3_text", {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": WINDOW,
                                          "final_logit_softcapping": SOFTCAP},
                          note="5 local : 1 global layers, local RoPE base, final softcap"),
    "gemma3_text_full": Family("gemma3_text", {"head_dim": 8, "query_pre_attn_scalar": 8, "layer_types": _FULL},
                               note="every layer full attention"),
    "granite": Family("granite", {"embedding_multiplier": 4.0, "logits_scaling": 0.5,
                                  "residual_multiplier": 0.5, "attention_multiplier": 0.25},
                      note="embedding multiplier, logits scaling"),
    "smollm3": Family("smollm3", note="NoPE every 4th layer"),
    "glm4_moe": Family("glm4_moe", {"head_dim": 8, "n_routed_experts": 4, "num_experts_per_tok": 2,
                                    "moe_intermediate_size": 16, "partial_rotary_factor": 0.5},
                       note="MoE, partial RoPE"),
    "gpt_oss": Family("gpt_oss", {"head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 2,
                                  "sliding_window": WINDOW}, note="sinks, sliding/full layers"),
    "gpt_oss_full": Family("gpt_oss", {"head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 2,
                                       "layer_types": _FULL}, note="every layer full attention"),
    "llama4_text": Family("llama4_text", {"head_dim": 8, "attention_chunk_size": WINDOW, "num_local_experts": 2,
                                          "intermediate_size_mlp": 64, "interleave_moe_layer_step": 2},
                          note="chunked attention 4, NoPE layers, MoE"),
    "deepseek_v3": Family("deepseek_v3", {"num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 24,
                                          "qk_rope_head_dim": 4, "qk_nope_head_dim": 8, "v_head_dim": 8,
                                          "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                                          "first_k_dense_replace": 2, "n_group": 1, "topk_group": 1},
                          note="MLA (compressed latent cache)"),
}


def config(name: str, vocab: int = 96, num_layers: int = 8, **overrides):
    """The transformers config of ``FAMILIES[name]``."""
    from transformers import AutoConfig

    fam = FAMILIES[name]
    kw = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    kw.update(fam.overrides)
    if "layer_types" in kw:
        kw["layer_types"] = list(kw["layer_types"])[:num_layers]
    kw.update(overrides)
    return AutoConfig.for_model(fam.model_type, **kw)


def build(name: str, vocab: int = 96, num_layers: int = 8, seed: int = 0, **overrides):
    """A tiny random frozen float32 target of family ``name`` (eval mode, no EOS in its generation config)."""
    from transformers import AutoModelForCausalLM

    fam = FAMILIES[name]
    cfg = config(name, vocab, num_layers, **overrides)
    torch.manual_seed(seed)
    kw = {"attn_implementation": fam.attn} if fam.attn else {}
    model = AutoModelForCausalLM.from_config(cfg, **kw).float().eval()
    model.requires_grad_(False)
    model.generation_config.eos_token_id = None
    return model


def status_table(names: list[str] | None = None, new_tokens: int = 12) -> list[dict]:
    """Measure each family as the tests do: the self-check (float32) and T = 0 chain / tree / exit-stage
    decoding against ``generate``. Rows for docs/target_families.md."""
    from hsd.decode import DecodeConfig, SpeculativeDecoder
    from hsd.decode.target_check import check_target
    from tests.decode import decode_fixtures as fx

    rows = []
    for name in names or list(FAMILIES):
        t = build(name)
        res = check_target(t)
        row = {"name": name, "model_type": FAMILIES[name].model_type, "attention": res.attention,
               "note": FAMILIES[name].note, "check": "pass" if res.ok else "refused", "max_dlogp": res.max_dlogp,
               "line": res.line()}
        if res.ok:
            ids = fx.prompt(96, 7)
            ref = fx.hf_greedy(t, ids, new_tokens)
            for label, tree, exit_head in (("chain", None, None), ("tree", "2:2:4", None), ("exit", None, "mlp")):
                dec = SpeculativeDecoder(t, fx.drafter("eagle3", t, scale=0.05), fx.exit_stage(t, exit_head, 3))
                cfg = DecodeConfig(k=3, tree=tree, exit_window=2, max_new_tokens=new_tokens, eos_token_id=[])
                row[label] = bool(torch.equal(dec.generate(ids, config=cfg).new_tokens, ref))
        rows.append(row)
    return rows


if __name__ == "__main__":  # PYTHONPATH=. python -m tests.decode.families: the table of docs/target_families.md
    import sys

    from transformers.utils import logging as hf_logging

    from hsd.machine import machine_info, machine_line

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    print("| test target | model_type | attention | what it exercises | self-check (fp32) max abs dlogp | "
          "T=0 chain / tree / exit = generate |")
    print("|---|---|---|---|---|---|")
    for r in status_table(sys.argv[1:] or None):
        t0 = " / ".join("yes" if r.get(k) else "NO" for k in ("chain", "tree", "exit")) if r["check"] == "pass" else "-"
        print(f"| {r['name']} | {r['model_type']} | {r['attention']} | {r['note']} | {r['check']} "
              f"{r['max_dlogp']:.1e} | {t0} |")
    print(machine_line(machine_info("cpu", torch.float32)))
