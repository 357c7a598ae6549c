"""EAGLE-3 head folder -> Hub-ready folder that vLLM and SGLang load unchanged (and back).

``native`` (default) loads in both engines: ``config.json`` rewritten to the serving contract of
:mod:`hsd.export.layout` (``model_type: llama``, ``architectures: [LlamaForCausalLMEagle3]``, both dtype
spellings, aux ids nested and top level, both RoPE spellings, token ids from the target) and one
``model.safetensors`` with exactly the 15 serving keys, floating weights cast to the serving dtype while
``d2t`` stays int64 and ``t2d`` bool. ``speculators`` writes the twin that vLLM's speculators path (and
the ``speculators`` package) loads with ``vllm serve DIR`` alone: the decoder layer as ``layers.0.*``
and the config under ``transformer_layer_config`` / ``speculators_config``.

The weights and forward are not touched: key names, shapes, ``d2t``/``t2d`` and the forward layout of a
training head already are the engines' (``tests/export`` re-implements both engines to prove it).
Every export is written to a temporary folder, validated (:func:`hsd.export.validate.validate`) and only
then moved to ``out_dir``; a failed validation leaves nothing behind.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hsd.export import layout
from hsd.export.source import ExportError, HeadSource, read_head_folder, staged_folder
from hsd.export.target import TargetInfo, describe_target

FORMATS = ("native", "speculators")
AUX_CONVENTION = ("Hugging Face output_hidden_states indices = vLLM 'capture before layer j' "
                  "(index j = the residual stream entering decoder layer j = the output of layer j-1)")


@dataclass
class ExportResult:
    """An export that passed validation: ``folder`` (final location, or None for a dry run), the
    written file names with sizes, the validation report and the model card text."""

    folder: Path | None
    files: dict[str, int]
    report: Any
    card: str
    summary: dict[str, Any]


# -- weights ---------------------------------------------------------------------------------------------
def read_head_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``model.safetensors`` of a head folder (training, native or speculators names) -> native names.

    ExportError naming missing or unknown keys; an ``embed_tokens.weight`` copy is dropped (both engines
    use the target's embedding, and a saved copy is a known way to ship a broken head).
    """
    from safetensors.torch import load_file

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise ExportError(f"{path} is missing")
    state = {layout.native_key(k): v for k, v in load_file(str(path)).items()}
    state.pop("embed_tokens.weight", None)
    missing = [k for k in layout.EAGLE3_KEYS if k not in state]
    extra = sorted(k for k in state if k not in layout.EAGLE3_KEYS)
    if missing or extra:
        raise ExportError(f"{path}: not an EAGLE-3 head state"
                          + (f"; missing keys {missing}" if missing else "")
                          + (f"; unknown keys {extra}" if extra else ""))
    return state


def cast_for_serving(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors -> ``dtype``; ``d2t`` int64 and ``t2d`` bool whatever they were; contiguous."""
    dt = layout.SERVE_DTYPES[layout.dtype_name(dtype)]
    out = {}
    for k, v in state.items():
        want = layout.INDEX_DTYPES.get(k, dt)
        out[k] = v.detach().to(want).contiguous()
    return out


def fresh_init_state(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """The state a new head with this config gets from ``torch.manual_seed(seed)`` (what step 0 holds)."""
    from hsd.models.eagle3 import Eagle3DraftModel

    rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(seed))
        model = Eagle3DraftModel(head_config_from_exported(config))
    finally:
        torch.random.set_rng_state(rng)
    return {k: v.detach() for k, v in model.state_dict().items()}


def untrained_problems(state: dict[str, torch.Tensor], config: dict[str, Any] | None = None,
                       seed: int | None = None) -> list[str]:
    """Why these weights look like step 0 (empty when they do not).

    * the three decoder-layer norms are initialised to ones and never copied from the target: all of them
      still exactly 1.0 means no optimizer step moved them;
    * with ``config`` and ``seed``: a projection bit-equal to a fresh initialisation seeded with ``seed``.
    """
    out = []
    ones = [k for k in layout.MIDLAYER_NORMS if k in state and bool((state[k].float() == 1.0).all())]
    if len(ones) == len(layout.MIDLAYER_NORMS):
        out.append(f"{ones} are all exactly 1.0, their initial value: this head was never trained "
                   "(step 0); export a trained folder such as final/ or best/")
    if config is not None and seed is not None:
        fresh = fresh_init_state(config, seed)
        same = [k for k, v in state.items() if k not in layout.INDEX_DTYPES and k not in layout.MIDLAYER_NORMS
                and k != "norm.weight" and k in fresh and fresh[k].shape == v.shape
                and torch.equal(fresh[k].to(v.dtype), v)]
        if same:
            out.append(f"{same} are bit-equal to a fresh initialisation (torch.manual_seed({seed})): "
                       "this head was never trained (step 0)")
    return out


# -- config.json -------------------------------------------------------------------------------------------
def _fixed_fields_problems(cfg: dict[str, Any]) -> list[str]:
    defaults = {"num_hidden_layers": 1, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
                "norm_before_residual": False}
    out = []
    for key, want in defaults.items():
        if cfg.get(key, want) != want:
            out.append(f"config field {key!r} is {cfg.get(key)!r}; the serving engines need {want!r}")
    for key in ("norm_before_fc", "fc_norm", "norm_output"):
        if cfg.get(key):
            out.append(f"config field {key!r} is set; hsd-train heads do not have that layer")
    return out


def aux_ids_of(cfg: dict[str, Any]) -> list[int]:
    """Aux-layer ids of a head config dict (nested ``eagle_config``, else top level)."""
    nested = (cfg.get("eagle_config") or {}).get(layout.AUX_IDS_KEY)
    ids = nested if nested else cfg.get(layout.AUX_IDS_KEY)
    if not ids:
        raise ExportError(f"the head config records no {layout.AUX_IDS_KEY}: cannot tell which target layers it reads")
    return [int(i) for i in ids]


def native_config(head_cfg: dict[str, Any], target: TargetInfo, dtype: str) -> dict[str, Any]:
    """Native ``config.json`` (see :mod:`hsd.export.layout`) for a head config dict and its target."""
    import transformers

    cfg = head_cfg if not head_cfg.get("speculators_model_type") else _flatten_speculators(head_cfg)
    ids = aux_ids_of(cfg)
    tc = target.config
    h = int(cfg["hidden_size"])
    out: dict[str, Any] = {
        "architectures": [layout.NATIVE_ARCHITECTURE],
        "model_type": layout.NATIVE_MODEL_TYPE,
        "hidden_size": h,
        "intermediate_size": int(cfg["intermediate_size"]),
        "num_attention_heads": int(cfg["num_attention_heads"]),
        "num_key_value_heads": int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        "head_dim": int(cfg.get("head_dim") or h // int(cfg["num_attention_heads"])),
        "num_hidden_layers": 1,
        "hidden_act": cfg.get("hidden_act", "silu"),
        "rms_norm_eps": float(cfg["rms_norm_eps"]),
        "max_position_embeddings": int(cfg["max_position_embeddings"]),
        **layout.rope_fields(cfg),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": int(cfg["vocab_size"]),
        "draft_vocab_size": int(cfg.get("draft_vocab_size") or cfg["vocab_size"]),
    }
    th = cfg.get("target_hidden_size")
    if th is not None and int(th) != h:
        out["target_hidden_size"] = int(th)
    out.update({
        "bos_token_id": tc.get("bos_token_id", cfg.get("bos_token_id")),
        "eos_token_id": tc.get("eos_token_id", cfg.get("eos_token_id")),
        "pad_token_id": tc.get("pad_token_id", cfg.get("pad_token_id")),
        "torch_dtype": dtype,
        "dtype": dtype,
        "eagle_config": {"use_aux_hidden_state": True, layout.AUX_IDS_KEY: ids},
        layout.AUX_IDS_KEY: list(ids),
        "norm_before_residual": False,
        "transformers_version": transformers.__version__,
    })
    return out


def speculators_config(head_cfg: dict[str, Any], target: TargetInfo, dtype: str,
                       speculative_tokens: int) -> dict[str, Any]:
    """Speculators-format ``config.json`` (the fields vLLM's speculators path validates, and the layout
    the ``speculators`` Eagle3 converter writes, without its ``auto_map`` to a local ``config.py``)."""
    import transformers

    native = native_config(head_cfg, target, dtype)
    layer = {k: native[k] for k in (
        "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id", "head_dim", "hidden_act", "hidden_size",
        "intermediate_size", "mlp_bias", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
        "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "vocab_size")}
    layer.update(model_type="llama", torch_dtype=dtype, dtype=dtype,
                 max_position_embeddings=max(int(native["max_position_embeddings"]),
                                             int(target.config.get("max_position_embeddings") or 0)))
    if int(speculative_tokens) < 1:
        raise ExportError(f"speculative_tokens must be >= 1, got {speculative_tokens}")
    return {
        "architectures": [layout.SPECULATORS_ARCHITECTURE],
        "speculators_model_type": layout.SPECULATORS_MODEL_TYPE,
        "speculators_version": layout.SPECULATORS_VERSION,
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(speculative_tokens),
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "verifier": {"name_or_path": target.hub_id or target.reference()["name"],
                         "architectures": target.architectures or ["LlamaForCausalLM"]},
        },
        "transformer_layer_config": layer,
        "draft_vocab_size": native["draft_vocab_size"],
        "target_hidden_size": native.get("target_hidden_size"),
        layout.AUX_IDS_KEY: list(native[layout.AUX_IDS_KEY]),
        "norm_before_residual": False,  # written explicitly: the speculators path defaults it to True
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "embed_requires_grad": False,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "dtype": dtype,
        "transformers_version": transformers.__version__,
    }


def _flatten_speculators(cfg: dict[str, Any]) -> dict[str, Any]:
    """A speculators config -> the flat (native-like) field set."""
    flat = dict(cfg["transformer_layer_config"])
    for key in ("draft_vocab_size", "target_hidden_size", "norm_before_residual", "norm_before_fc", "fc_norm",
                "norm_output"):
        if key in cfg:
            flat[key] = cfg[key]
    ids = cfg.get(layout.AUX_IDS_KEY)
    flat["eagle_config"] = {"use_aux_hidden_state": True, layout.AUX_IDS_KEY: list(ids or [])}
    return flat


def head_config_from_exported(cfg: dict[str, Any]):
    """Any EAGLE-3 config dict (training, native or speculators) -> ``Eagle3Config``."""
    from hsd.models.eagle3 import Eagle3Config

    if cfg.get("model_type") == Eagle3Config.model_type:
        return Eagle3Config.from_dict(cfg)
    return Eagle3Config.from_exported(cfg)


def load_exported_eagle3(folder: str | os.PathLike, target: torch.nn.Module | None = None,
                         dtype: torch.dtype | None = None):
    """An exported (native or speculators) or training head folder -> ``Eagle3DraftModel`` in eval mode
    (``hsd.models.eagle3.load_draft``); ``dtype`` None keeps the stored floating dtype."""
    from hsd.models.eagle3 import load_draft

    return load_draft(os.fspath(folder), target, dtype=dtype or "auto").eval()


# -- the export -----------------------------------------------------------------------------------------------
def _check_against_target(cfg: dict[str, Any], target: TargetInfo, where: str) -> None:
    problems = []
    if int(cfg["vocab_size"]) != target.vocab_size:
        problems.append(f"vocab_size {cfg['vocab_size']} != the target's {target.vocab_size}")
    th = int(cfg.get("target_hidden_size") or cfg["hidden_size"])
    if th != target.hidden_size:
        problems.append(f"the head reads target states of width {th} but the target's hidden_size is "
                        f"{target.hidden_size}")
    if problems:
        raise ExportError(f"{where} does not fit target {target.name!r}: " + "; ".join(problems)
                          + " (wrong --target?)")


def export_eagle3(head: str | os.PathLike | HeadSource, out_dir: str | os.PathLike | None, *,
                  dtype: str | None = None, fmt: str = "native", target: str | TargetInfo | None = None,
                  target_hub_id: str | None = None, target_revision: str | None = None,
                  decode_report: str | os.PathLike | dict | None = None, repo_id: str | None = None,
                  num_speculative_tokens: int | None = None, overwrite: bool = False,
                  clean_process: bool = True) -> ExportResult:
    """Export one EAGLE-3 head folder (see the module docstring) and validate the result.

    ``out_dir`` None = dry run (built and validated in a temporary folder, then removed). ``target``
    defaults to the run's target; ``dtype`` to the target's serving dtype. ``repo_id`` is what the card's
    serving commands name (default: the output folder). Raises ExportError (ValidationError for a folder
    that fails validation) naming the problem; nothing is left at ``out_dir`` then.
    """
    from hsd.export import card as cards
    from hsd.export.validate import validate

    src = head if isinstance(head, HeadSource) else read_head_folder(head)
    if src.kind != "eagle3":
        raise ExportError(f"{src.folder} holds {src.kind} heads, not an EAGLE-3 head")
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out_dir).expanduser() if out_dir is not None else None
    if out is not None and out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output folder {str(out)!r} exists and is not empty (pass overwrite=True / --overwrite)")
    if out is not None and out.resolve() == src.folder:
        raise ExportError("the output folder must differ from the head folder")

    tgt = target if isinstance(target, TargetInfo) else describe_target(
        target or src.target_name or _missing_target(src), hub_id=target_hub_id,
        revision=target_revision or src.target_revision)
    cfg = src.config
    flat = cfg if not cfg.get("speculators_model_type") else _flatten_speculators(cfg)
    problems = _fixed_fields_problems(flat)
    if problems:
        raise ExportError(f"{src.folder}/config.json: " + "; ".join(problems))
    _check_against_target(flat, tgt, f"head {str(src.folder)!r}")
    ids = aux_ids_of(flat)
    recorded = src.vocab_info.get("aux_layer_ids")
    if recorded is not None and [int(i) for i in recorded] != ids:
        raise ExportError(f"aux ids disagree: config.json says {ids} but the run's draft_vocab.json says {recorded}")
    try:
        layout.check_aux_ids(ids, tgt.num_layers)
    except ValueError as err:
        raise ExportError(f"head {str(src.folder)!r}: {err}") from err

    dt = layout.dtype_name(dtype) if dtype else tgt.serve_dtype
    state = read_head_weights(src.folder)
    seed = int(src.run_config.get("seed", 0) or 0)
    stale = untrained_problems(state, flat, seed)
    if stale:
        raise ExportError(f"head {str(src.folder)!r}: " + "; ".join(stale))

    k = int(num_speculative_tokens or src.run_config.get("ttt_steps") or src.vocab_info.get("ttt_steps") or 3)
    config = (native_config(flat, tgt, dt) if fmt == "native" else speculators_config(flat, tgt, dt, k))
    served = cast_for_serving(state, dt)
    if fmt == "speculators":
        served = {layout.speculators_key(key): v for key, v in served.items()}
    report = cards.load_decode_report(decode_report) if decode_report is not None else None
    summary = cards.eagle3_summary(src, tgt, fmt=fmt, dtype=dt, aux_ids=ids, speculative_tokens=k,
                                   decode_report=report)
    ref = repo_id or (f"./{out.name}" if out is not None else "./exported-head")
    card = cards.eagle3_card(summary, ref)

    with staged_folder(out) as (tmp, files):
        _write_folder(tmp, config, served, src, summary, card)
        result = validate(tmp, target=tgt, clean_process=clean_process)
    return ExportResult(folder=out, files=files, report=result, card=card, summary=summary)


def _missing_target(src: HeadSource) -> str:
    raise ExportError(f"no target recorded for {src.folder} (no config.yaml or draft_vocab.json found next to it): "
                      "pass --target NAME_OR_DIR")


def _write_folder(folder: Path, config: dict[str, Any], state: dict[str, torch.Tensor], src: HeadSource,
                  summary: dict[str, Any], card: str) -> None:
    import json

    from safetensors.torch import save_file

    from hsd.export.card import path_free

    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    vocab = path_free(dict(src.vocab_info)) if src.vocab_info else {
        "draft_vocab_size": int(state["d2t"].numel()), "target_vocab_size": int(state["t2d"].numel())}
    (folder / "draft_vocab.json").write_text(json.dumps(vocab, indent=2) + "\n")
    (folder / layout.SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    (folder / layout.CARD_FILE).write_text(card)
