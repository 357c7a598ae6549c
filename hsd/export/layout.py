"""The serving contract, as data: what vLLM and SGLang read from an EAGLE-3 head folder.

Everything an exporter writes and a validator checks is stated here once: the exact weight key set, the
shapes each key must have (derived from ``config.json``, never from a model object), the config fields
and the values both engines need, the two RoPE spellings, the aux-layer-id rule and the speculators
twin's names. ``eagle3.py`` writes folders from it, ``validate.py`` checks folders against it.

Aux-layer ids are Hugging Face ``output_hidden_states`` indices (index 0 = token embeddings, index ``j``
= residual stream entering decoder layer ``j``), which is vLLM's "capture before layer j". They are
*portable* -- captured as the same physical tensors by vLLM and SGLang -- when there are exactly three,
strictly ascending (hence unique), and ``2 <= id <= N - 1`` for a target of ``N`` decoder layers:
0 and a first id of 1 are shifted by one layer in SGLang (which adds 1 to explicit ids whose first id
is 1), ``N`` is never captured by SGLang (its layer loop ends first), and ``fc`` reads the states in
layer-loop (ascending) order in both engines.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

# -- weights --------------------------------------------------------------------------------------------
EAGLE3_KEYS: tuple[str, ...] = (
    "fc.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
)
"""Exactly the keys of a native EAGLE-3 ``model.safetensors`` (no ``model.``/``draft.`` prefix, no
``embed_tokens``: both engines share the target's embedding)."""

INDEX_DTYPES: dict[str, torch.dtype] = {"d2t": torch.int64, "t2d": torch.bool}
"""Non-floating tensors keep these dtypes whatever the export dtype (bf16 cannot hold large token ids)."""

MIDLAYER_NORMS = ("midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
                  "midlayer.post_attention_layernorm.weight")
"""Norms initialised to ones and never copied from the target: all ones = the head was never trained."""

SERVE_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                                        "float32": torch.float32}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}

# -- config.json (native format: loads in vLLM and SGLang) -------------------------------------------------
NATIVE_MODEL_TYPE = "llama"
NATIVE_ARCHITECTURE = "LlamaForCausalLMEagle3"
ENGINE_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "vllm": ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM"),
    "sglang": ("LlamaForCausalLMEagle3",),
}
AUX_IDS_KEY = "eagle_aux_hidden_state_layer_ids"

NATIVE_FIXED: dict[str, Any] = {
    "model_type": NATIVE_MODEL_TYPE,
    "architectures": [NATIVE_ARCHITECTURE],
    "num_hidden_layers": 1,            # SGLang refuses more than one draft layer
    "tie_word_embeddings": False,      # True would make lm_head = embed_tokens in SGLang
    "attention_bias": False,           # SGLang builds qkv without bias: biases would be dropped silently
    "mlp_bias": False,
    "norm_before_residual": False,     # residual = un-normed fused state (vLLM's speculators path defaults True)
}
"""Fields whose value is fixed by the serving contract."""

NATIVE_REQUIRED: tuple[str, ...] = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "rms_norm_eps", "hidden_act", "max_position_embeddings", "vocab_size", "draft_vocab_size",
    "rope_theta", "rope_scaling", "rope_parameters", "torch_dtype", "dtype", "eagle_config", AUX_IDS_KEY,
    "bos_token_id", "eos_token_id",
)
"""Fields a native config.json must carry (``rope_scaling`` may be null: plain RoPE in the 4.x spelling)."""

TRAINING_ONLY_FIELDS = ("_name_or_path", "transformers_version", "initializer_range", "use_cache")

# -- speculators twin (vLLM's speculators path: ``vllm serve DIR`` without flags) --------------------------
SPECULATORS_ARCHITECTURE = "Eagle3Speculator"
SPECULATORS_MODEL_TYPE = "eagle3"
SPECULATORS_VERSION = "0.9.0"
"""The speculators release whose config layout the twin follows (its Eagle3 converter writes the same)."""


def speculators_key(native_key: str) -> str:
    """Native key -> speculators key: the decoder layer lives in ``layers.0`` (vLLM maps both)."""
    return "layers.0." + native_key[len("midlayer."):] if native_key.startswith("midlayer.") else native_key


def native_key(key: str) -> str:
    """Speculators key -> native key (inverse of :func:`speculators_key`)."""
    return "midlayer." + key[len("layers.0."):] if key.startswith("layers.0.") else key


SPECULATORS_KEYS: tuple[str, ...] = tuple(speculators_key(k) for k in EAGLE3_KEYS)

# -- files ----------------------------------------------------------------------------------------------------
SUMMARY_FILE = "training_summary.json"
CARD_FILE = "README.md"
EAGLE3_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "draft_vocab.json", SUMMARY_FILE, CARD_FILE)
"""What an exported EAGLE-3 folder holds, and all that is uploaded (never config.yaml: local paths)."""
EARLY_EXIT_TOP_FILES: tuple[str, ...] = ("target_reference.json", "exit_metrics.json", SUMMARY_FILE, CARD_FILE)
EARLY_EXIT_LAYER_FILES: tuple[str, ...] = ("config.json", "model.safetensors")


def curated_files(names: Iterable[str]) -> list[str]:
    """The subset of relative file names (``/``-separated) that belongs in an upload, sorted."""
    out = []
    for name in names:
        parts = name.split("/")
        if len(parts) == 1 and (name in EAGLE3_FILES or name in EARLY_EXIT_TOP_FILES):
            out.append(name)
        elif len(parts) == 2 and parts[0].startswith("layer_") and parts[0][6:].isdigit() \
                and parts[1] in EARLY_EXIT_LAYER_FILES:
            out.append(name)
    return sorted(out)


# -- shapes from config.json ---------------------------------------------------------------------------------
def eagle3_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Expected shape of every native key, from a config dict (native or training spelling).

    fc [H, 3*H_t]; q [nh*d, 2H]; k, v [nkv*d, 2H]; o [H, nh*d]; gate, up [I, H]; down [H, I]; norms [H];
    lm_head [Vd, H]; d2t [Vd]; t2d [V]. ``H_t`` = ``target_hidden_size`` when present, else ``H``.
    """
    h = int(cfg["hidden_size"])
    ht = int(cfg.get("target_hidden_size") or h)
    nh, nkv = int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    d = int(cfg.get("head_dim") or h // nh)
    inter = int(cfg["intermediate_size"])
    v = int(cfg["vocab_size"])
    vd = int(cfg.get("draft_vocab_size") or v)
    return {
        "fc.weight": (h, 3 * ht),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.self_attn.q_proj.weight": (nh * d, 2 * h),
        "midlayer.self_attn.k_proj.weight": (nkv * d, 2 * h),
        "midlayer.self_attn.v_proj.weight": (nkv * d, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, nh * d),
        "midlayer.post_attention_layernorm.weight": (h,),
        "midlayer.mlp.gate_proj.weight": (inter, h),
        "midlayer.mlp.up_proj.weight": (inter, h),
        "midlayer.mlp.down_proj.weight": (h, inter),
        "norm.weight": (h,),
        "lm_head.weight": (vd, h),
        "d2t": (vd,),
        "t2d": (v,),
    }


# -- aux-layer ids --------------------------------------------------------------------------------------------
def check_aux_ids(ids: Sequence[int], num_layers: int | None = None) -> list[int]:
    """ValueError unless ``ids`` are portable aux-layer ids for a target of ``num_layers`` decoder layers.

    Exactly 3, integers, strictly ascending (so unique), ``2 <= id <= N - 1`` (see the module docstring).
    With ``num_layers`` None only the rules that do not depend on N are checked. Returns the ids as ints.
    """
    ids = list(ids)
    if len(ids) != 3:
        raise ValueError(f"aux_layer_ids must name exactly 3 hidden-state indices (fc reads 3 * hidden), got {ids}")
    if any(isinstance(i, bool) or int(i) != i for i in ids):
        raise ValueError(f"aux_layer_ids must be integers, got {ids}")
    ids = [int(i) for i in ids]
    if num_layers is not None:
        n = int(num_layers)
        missing = [i for i in ids if not 0 <= i <= n]
        if missing:
            raise ValueError(f"aux_layer_ids {missing} do not exist in the target: it has {n} layers, so hidden-state "
                             f"indices are in [0, {n}] (and portable ones in [2, {n - 1}])")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise ValueError(f"aux_layer_ids {ids} are not portable: they must be strictly ascending and unique "
                         "(vLLM and SGLang concatenate the captured states in layer order)")
    if ids[0] < 2:
        raise ValueError(f"aux_layer_ids {ids} are not portable: every id must be >= 2 (0 is the embedding "
                         "output and SGLang shifts explicit ids by one layer when the first id is 1)")
    if num_layers is not None and ids[-1] > int(num_layers) - 1:
        raise ValueError(f"aux_layer_ids {ids} are not portable: every id must be <= N - 1 = {int(num_layers) - 1} "
                         f"(the target has N = {int(num_layers)} layers; SGLang never captures index N)")
    return ids


# -- RoPE: one record, both spellings -------------------------------------------------------------------------
def rope_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``rope_theta``, ``rope_scaling`` (transformers 4; None for plain RoPE) and ``rope_parameters``
    (transformers 5) describing the same RoPE, from a config dict written in either spelling."""
    params: dict[str, Any] = {}
    for src in (cfg.get("rope_scaling"), cfg.get("rope_parameters")):
        if isinstance(src, Mapping):
            params.update(copy.deepcopy(dict(src)))
    if "type" in params:
        params.setdefault("rope_type", params["type"])
        params.pop("type")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    params["rope_theta"] = float(10000.0 if theta is None else theta)
    params.setdefault("rope_type", "default")
    legacy = {k: v for k, v in params.items() if k != "rope_theta"}
    scaling = None if legacy.get("rope_type") == "default" and len(legacy) == 1 else legacy
    return {"rope_theta": params["rope_theta"], "rope_scaling": scaling, "rope_parameters": params}


def dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """Canonical dtype name ("bfloat16", "float16", "float32") or None; ValueError for anything else."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        for name, dt in SERVE_DTYPES.items():
            if dt == dtype:
                return name
        raise ValueError(f"dtype must be one of {sorted(SERVE_DTYPES)}, got {dtype}")
    name = str(dtype).removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in SERVE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(SERVE_DTYPES)}, got {dtype!r}")
    return name
