"""Model cards (``README.md`` with Hub YAML metadata) and the path-free training summary they are made from.

``*_summary`` gathers, from a :class:`~hsd.export.source.HeadSource` and the target, everything a card
states (and writes it to ``training_summary.json`` in the exported folder, so a card can be re-rendered
and audited); ``*_card`` renders it. Nothing here holds a local path: data files are reduced to their
names, the target to its Hub id (or short name) and revision.

A ``scripts/decode.py`` JSON report (``--decode-report``) adds measured acceptance: one row per entry of
its ``runs`` list, which must carry at least :data:`DECODE_RUN_KEYS`.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from hsd.export.source import ExportError, HeadSource
from hsd.export.target import TargetInfo

DECODE_RUN_KEYS = ("name", "temperature", "k", "method", "tau", "tokens_per_s", "speedup_vs_generate",
                   "exact_match", "per_position_acceptance", "verify_cost_ratio")
TRAINING_KEYS = ("seed", "lr", "batch_size", "grad_accum", "num_epochs", "max_steps", "warmup_ratio", "min_lr_ratio",
                 "weight_decay", "max_grad_norm", "max_length", "overflow", "eval_fraction", "mixed_precision",
                 "target_dtype", "ttt_steps", "step_weight", "draft_vocab_size", "init_from_target", "features",
                 "head_type", "rank", "temperature", "exit_layers", "packing")
SIMULATED_KEYS = ("eval/sim_accept_len", "eval/sim_accept_len_cond", "eval/sim_accept_len_alpha")


# -- helpers -----------------------------------------------------------------------------------------------
def path_free(value: Any) -> Any:
    """Replace absolute paths (strings starting with ``/`` or ``~``) by their last component, recursively."""
    if isinstance(value, dict):
        return {k: path_free(v) for k, v in value.items()}
    if isinstance(value, list):
        return [path_free(v) for v in value]
    if isinstance(value, str) and value.startswith(("/", "~")) and len(value) > 1:
        return Path(value).name
    if isinstance(value, str) and value.startswith("feature cache /"):
        return "feature cache " + Path(value[len("feature cache "):]).name
    return value


def hsd_commit() -> str | None:
    """git commit of the hsd-train checkout this code runs from (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def load_decode_report(report: str | os.PathLike | dict) -> dict[str, Any]:
    """A ``scripts/decode.py`` JSON report (path or dict) -> dict; ExportError naming a missing key."""
    if not isinstance(report, dict):
        path = Path(report)
        if not path.is_file():
            raise ExportError(f"decode report {str(path)!r} does not exist")
        try:
            report = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ExportError(f"decode report {str(path)!r} is not JSON: {err}") from err
    runs = report.get("runs") if isinstance(report, dict) else None
    if not isinstance(runs, list) or not runs:
        raise ExportError("decode report has no 'runs' list (expected the JSON written by scripts/decode.py)")
    for i, run in enumerate(runs):
        missing = [k for k in DECODE_RUN_KEYS if k not in run]
        if missing:
            raise ExportError(f"decode report runs[{i}] ({run.get('name', '?')}) lacks {missing}")
    return report


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_fmt(v, 2) for v in x) + "]"
    return str(x)


def _hp(x: Any) -> str:
    """A hyper-parameter as written in a config: yes/no, 0.002, 4."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _training(src: HeadSource) -> dict[str, Any]:
    cfg = src.run_config
    out = {k: cfg[k] for k in TRAINING_KEYS if k in cfg}
    if "data" in cfg:
        out["data"] = [Path(str(d)).name for d in (cfg["data"] or [])]
    out["step"] = src.step
    if src.run_info.get("total_steps") is not None:
        out["total_steps"] = int(src.run_info["total_steps"])
    for k in ("train_rows", "eval_rows", "world_size", "device", "trainable_params", "machine"):
        if k in src.run_info:
            out[k] = src.run_info[k]
    if cfg.get("packing"):  # the loop's rows are packed rows of several conversations
        for k in ("train_rows", "eval_rows"):
            if k in out:
                out[k.replace("_rows", "_packed_rows")] = out.pop(k)
    return path_free(out)


def _precision(src: HeadSource) -> dict[str, Any] | None:
    """How the head was trained, from its precision.json: the dtype of the target features it learned from
    (a head serves best on features of that precision), the head's autocast and where it ran."""
    p = src.precision
    if not p:
        return None
    return {"feature_dtype": p.get("feature_dtype"), "mixed_precision": p.get("mixed_precision"),
            "master_weights": p.get("master_weights"), "hardware": (p.get("probe") or {}).get("hardware"),
            "bf16_speedup": p.get("bf16_speedup")}


def _precision_text(s: dict[str, Any]) -> str:
    p = s.get("training_precision")
    if not p:
        return "not recorded (a head saved before hsd-train wrote precision.json)"
    return (f"target features {p['feature_dtype']}, head autocast {p['mixed_precision']}, "
            f"{p.get('master_weights') or 'float32'} master weights (serve it on {p['feature_dtype']} target features "
            "for the acceptance measured here)")


def _common(src: HeadSource, target: TargetInfo, fmt: str, dtype: str) -> dict[str, Any]:
    return {
        "exported_by": "hsd-train",
        "hsd_train_commit": hsd_commit(),
        "exported_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "format": fmt,
        "dtype": dtype,
        "source_folder": src.folder.name,
        "target": target.reference(),
        "training": _training(src),
        "feature_dtype": src.precision.get("feature_dtype"),
        "training_precision": _precision(src),
    }


# -- EAGLE-3 -------------------------------------------------------------------------------------------------
def eagle3_summary(src: HeadSource, target: TargetInfo, *, fmt: str, dtype: str, aux_ids: list[int],
                   speculative_tokens: int, decode_report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Path-free record of an EAGLE-3 export (written as training_summary.json; the card's only input)."""
    from hsd.export.eagle3 import AUX_CONVENTION

    cfg = src.config
    n = target.num_layers
    vi = src.vocab_info
    out = _common(src, target, fmt, dtype)
    out.update({
        "kind": "eagle3",
        "architecture": {"hidden_size": cfg.get("hidden_size"), "intermediate_size": cfg.get("intermediate_size"),
                         "num_attention_heads": cfg.get("num_attention_heads"),
                         "num_key_value_heads": cfg.get("num_key_value_heads"), "head_dim": cfg.get("head_dim"),
                         "vocab_size": cfg.get("vocab_size"), "draft_vocab_size": cfg.get("draft_vocab_size")},
        "aux_layer_ids": list(aux_ids),
        "aux_layer_ids_convention": AUX_CONVENTION,
        "aux_layer_outputs": [i - 1 for i in aux_ids],
        "num_target_layers": n,
        "draft_vocab": {"size": cfg.get("draft_vocab_size"), "target_vocab_size": cfg.get("vocab_size"),
                        "coverage": vi.get("coverage"), "coverage_of": vi.get("coverage_of"),
                        "data_stats": vi.get("data_stats")},
        "speculative_tokens": int(speculative_tokens),
        "held_out_metrics": {k: v for k, v in src.metrics.items() if k.startswith("eval/")},
        "decode_report": decode_report,
    })
    out["training"].setdefault("ttt_steps", vi.get("ttt_steps"))
    return path_free(out)


def _load_snippet(repo_ref: str, import_line: str, call: str, sub: str = "") -> str:
    """Python lines loading the head from ``repo_ref`` (a Hub repo id, downloaded first, or a local folder),
    optionally its subfolder ``sub``; ``call`` names the path as ``{path}``."""
    if repo_ref.startswith((".", "/", "~")) or repo_ref.count("/") != 1:
        path = repr(f"{repo_ref}/{sub}" if sub else repo_ref)
        return f"{import_line}\n" + call.format(path=path) + "\n"
    path = f'f"{{folder}}/{sub}"' if sub else "folder"
    return (f"from huggingface_hub import snapshot_download\n{import_line}\n"
            f"folder = snapshot_download({repo_ref!r})\n" + call.format(path=path) + "\n")


def _yaml_list(name: str, values: list[str]) -> str:
    return f"{name}:\n" + "".join(f"- {v}\n" for v in values)


def _front_matter(s: dict[str, Any], tags: list[str]) -> str:
    t = s["target"]
    lines = ["---\n"]
    if t.get("hub_id"):
        lines.append(f"base_model: {t['hub_id']}\n")
    if t.get("licence"):
        lines.append(f"license: {t['licence']}\n")
    lines.append("pipeline_tag: text-generation\n")
    lines.append(_yaml_list("tags", tags))
    lines.append("---\n")
    return "".join(lines)


def _decode_table(report: dict[str, Any] | None) -> str:
    if not report:
        return ("No decoding run was attached to this export. Measure τ with `scripts/decode.py` and re-export "
                "with `--decode-report REPORT.json` to add it here.\n")
    head = ("| configuration | T | k | method | τ | tokens/s | speedup vs generate | exact match | "
            "per-position acceptance | verify cost ratio |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = "".join(f"| {r['name']} | {_fmt(r['temperature'], 2)} | {r['k']} | {r['method']} | {_fmt(r['tau'])} | "
                   f"{_fmt(r['tokens_per_s'], 1)} | {_fmt(r['speedup_vs_generate'], 2)} | {_fmt(r['exact_match'])} | "
                   f"{_fmt(r['per_position_acceptance'])} | {_fmt(r['verify_cost_ratio'], 2)} |\n"
                   for r in report["runs"])
    meta = report.get("meta") if isinstance(report.get("meta"), dict) else {}
    ctx = []
    if isinstance(meta.get("prompts"), dict):
        ctx.append("prompts " + ", ".join(f"{k} {v}" for k, v in meta["prompts"].items()))
    for key, label in (("max_new_tokens", "max new tokens"), ("batch_size", "batch size"),
                       ("draft_shape", "drafts"), ("platform", "machine"), ("torch_threads", "torch threads"),
                       ("git_commit", "hsd-train")):
        if meta.get(key) not in (None, ""):
            ctx.append(f"{label} {meta[key]}")
    ctx += [f"{k} = {v}" for k, v in sorted(report.items()) if isinstance(v, (str, int, float, bool))]
    where = "Measured with hsd-train's `scripts/decode.py`" + (" (" + "; ".join(ctx) + ")" if ctx else "") + ".\n\n"
    return where + head + rows + ("\nτ is the mean number of tokens committed per target verification step "
                                  "(accepted draft tokens + the target's own token).\n")


def eagle3_card(s: dict[str, Any], repo_ref: str) -> str:
    """README.md for an EAGLE-3 export from its summary (:func:`eagle3_summary`); ``repo_ref`` = the Hub
    repo id (or folder) the serving commands name."""
    t, tr, dv = s["target"], s["training"], s["draft_vocab"]
    arch = s["architecture"]
    target_ref = t.get("hub_id") or t.get("name")
    k = s["speculative_tokens"]
    dtype = s["dtype"]
    ids = s["aux_layer_ids"]
    n = s["num_target_layers"]
    held = s.get("held_out_metrics") or {}
    tags = ["speculative-decoding", "eagle3", "draft-model", "hsd-train"]
    if s["format"] == "speculators":
        tags.append("speculators")
    out = [_front_matter(s, tags)]
    out.append(f"# EAGLE-3 draft head for {target_ref}\n\n")
    out.append(f"A one-layer EAGLE-3 draft head ({dtype}) that proposes tokens for **{target_ref}** in speculative "
               f"decoding, trained with [hsd-train](https://github.com/hsd-train/hsd-train). "
               f"Format: **{s['format']}** "
               + ("(`LlamaForCausalLMEagle3`: loads unchanged in vLLM and SGLang)." if s["format"] == "native" else
                  "(speculators `Eagle3Speculator`: `vllm serve` loads it without flags).") + "\n\n")
    out.append("| | |\n|---|---|\n")
    rev = t.get("revision")
    rev_txt = (f"`{rev}`" + (" (sha256 of the weight files trained against)" if t.get("revision_kind") ==
                             "weights-sha256" else " (commit)")) if rev else "not recorded"
    rows = [
        ("Target (verifier)", f"`{target_ref}`"),
        ("Target revision", rev_txt),
        ("Target layers N", n),
        ("Aux hidden-state ids", f"`{ids}` (outputs of decoder layers {s['aux_layer_outputs']})"),
        ("Draft vocabulary", f"{dv['size']} of {dv['target_vocab_size']} tokens"
         + (f", coverage {_fmt(dv['coverage'], 4)} of {dv.get('coverage_of') or 'training tokens'}"
            if dv.get("coverage") is not None else "")),
        ("Head size", f"hidden {arch['hidden_size']}, {arch['num_attention_heads']} heads / "
                      f"{arch['num_key_value_heads']} KV heads × {arch['head_dim']}, MLP {arch['intermediate_size']}"),
        ("Weights dtype", dtype),
        ("Trained", f"step {tr.get('step')}" + (f" of {tr['total_steps']}" if tr.get("total_steps") else "")
         + (f", {tr['num_epochs']} epochs" if tr.get("num_epochs") else "")
         + (f", K = {tr['ttt_steps']} training-time-test steps" if tr.get("ttt_steps") else "")),
        ("Exported by", f"hsd-train {s.get('hsd_train_commit') or ''}".strip() + f", {s['exported_at']}"),
    ]
    if tr.get("machine"):  # where it was trained (runs from before the machine was recorded have none)
        from hsd.machine import machine_line

        rows.insert(-1, ("Trained on", machine_line(tr["machine"]) + f" × {tr.get('world_size') or 1} process(es)"))
    out.extend(f"| {a} | {b} |\n" for a, b in rows)
    if t.get("weights_note"):
        out.append(f"\nNote: the target weights used in training were {t['weights_note']}.\n")

    out.append("\n## Serve it\n\n")
    if s["format"] == "native":
        spec = json.dumps({"method": "eagle3", "model": repo_ref, "num_speculative_tokens": k})
        out.append("vLLM:\n\n```bash\n"
                   f"vllm serve {target_ref} --dtype {dtype} \\\n  --speculative-config '{spec}'\n```\n\n")
        out.append("SGLang (a chain of " f"{k} draft tokens):\n\n```bash\n"
                   f"python -m sglang.launch_server --model-path {target_ref} --dtype {dtype} \\\n"
                   f"  --speculative-algorithm EAGLE3 --speculative-draft-model-path {repo_ref} \\\n"
                   f"  --speculative-num-steps {k} --speculative-eagle-topk 1 --speculative-num-draft-tokens {k + 1}\n"
                   "```\n\n")
        out.append("The aux ids are written explicitly (in `eagle_config` and at the top level of `config.json`). "
                   "SGLang releases from before 2026-05-16 shift explicit ids by one layer (sglang PR #25454); use "
                   "a later release.\n\n")
    else:
        out.append("vLLM (the speculators config names the verifier and the number of draft tokens):\n\n"
                   f"```bash\nvllm serve {repo_ref}\n```\n\n")
    out.append("hsd-train:\n\n```python\n" + _load_snippet(repo_ref, "from hsd.export import load_exported_eagle3",
                                                          "head = load_exported_eagle3({path}, target=target_model)")
               + "```\n\n")

    out.append("## Aux layer convention\n\n")
    out.append(f"`eagle_aux_hidden_state_layer_ids` = `{ids}` are Hugging Face `output_hidden_states` indices "
               "(index 0 = token embeddings; index j = the residual stream entering decoder layer j, i.e. the "
               "output of layer j-1), which is vLLM's \"capture before layer j\". The head concatenates the three "
               "states in this (ascending) order before `fc`. They are portable: 2 ≤ id ≤ N-1 "
               f"with N = {n}.\n\n")

    out.append("## Acceptance\n\n")
    sim = held.get("eval/sim_accept_len")
    if sim is not None:
        steps = tr.get("ttt_steps") or "K"
        parts = [f"**{_fmt(sim)}** from per-step top-1 accuracy"]
        if held.get("eval/sim_accept_len_cond") is not None:
            parts.append(f"{_fmt(held['eval/sim_accept_len_cond'])} expected accepted greedy drafts (conditional "
                         "accuracies, T = 0)")
        if held.get("eval/sim_accept_len_alpha") is not None:
            parts.append(f"{_fmt(held['eval/sim_accept_len_alpha'])} from the soft acceptance α (T = 1)")
        accs = [_fmt(held[f"eval/acc_{i}"]) for i in range(64) if f"eval/acc_{i}" in held]
        out.append(f"Held-out simulated acceptance (teacher-forced on the training run's "
                   f"{tr.get('eval_rows', '')} held-out conversations, step {tr.get('step')}, a chain of {steps} "
                   "drafts; accepted draft tokens per step, bonus token excluded, so add 1 for a simulated τ): "
                   + "; ".join(parts) + "."
                   + (f" Per-step top-1 accuracy: {', '.join(accs)}." if accs else "") + "\n\n")
    else:
        out.append("No held-out simulated acceptance was recorded with this head.\n\n")
    out.append("Measured decoding:\n\n" + _decode_table(s.get("decode_report")) + "\n")

    out.append("## Training\n\n")
    ds = dv.get("data_stats") or {}
    data = tr.get("data") or []
    out.append(f"- Data: {', '.join(f'`{d}`' for d in data) or 'n/a'}"
               + (f" ({ds.get('rows')} conversations, {ds.get('tokens')} tokens, {ds.get('assistant_tokens')} "
                  f"assistant tokens; max length {ds.get('max_length')}, {ds.get('truncated', 0)} truncated, "
                  f"{ds.get('dropped_too_long', 0)} dropped)" if ds else "") + "\n")
    out.append("- Draft vocabulary: the most frequent assistant tokens of the training split (ties by id).\n")
    keys = [("lr", "learning rate"), ("batch_size", "batch size"), ("grad_accum", "gradient accumulation"),
            ("num_epochs", "epochs"), ("ttt_steps", "training-time-test steps K"), ("step_weight", "step weight γ"),
            ("max_length", "max length"), ("seed", "seed"), ("init_from_target", "lm_head and norm initialised from the target:")]
    out.append("- Hyper-parameters: " + ", ".join(f"{label} {_hp(tr[k])}" for k, label in keys if k in tr) + "\n")
    out.append(f"- Steps: {tr.get('step')}" + (f" of {tr['total_steps']}" if tr.get("total_steps") else "")
               + (f" on {tr['train_rows']} training / {tr['eval_rows']} held-out conversations"
                  if tr.get("train_rows") else "")
               + (f" on {tr['train_packed_rows']} training / {tr['eval_packed_rows']} held-out packed rows"
                  if tr.get("train_packed_rows") else "") + "\n")
    out.append(f"- Precision: {_precision_text(s)}\n\n")

    out.append("## Licence\n\n")
    lic = t.get("licence")
    out.append(f"The head's `lm_head` and `norm` start from the target's weights and its training data come from "
               f"the target, so it is a derivative of {target_ref}: "
               + (f"it carries the target's licence, **{lic}**." if lic else
                  "the target's licence terms apply (not recorded here: check the target's model card).") + "\n\n")
    out.append("## Files\n\n- `config.json`, `model.safetensors`: the head (" + dtype + "; `d2t` int64, `t2d` bool; "
               "no `embed_tokens`: engines share the target's)\n- `draft_vocab.json`: draft vocabulary record\n"
               "- `training_summary.json`: everything this card states, machine-readable\n")
    return "".join(out)


# -- early exit ------------------------------------------------------------------------------------------------
def early_exit_summary(src: HeadSource, target: TargetInfo, *, dtype: str, layers: list[int],
                       per_layer: dict[str, Any], head_type: str, temperature: float | None) -> dict[str, Any]:
    out = _common(src, target, "early_exit", dtype)
    out.update({"kind": "early_exit", "head_type": head_type, "exit_layers": list(layers),
                "temperature": temperature, "num_target_layers": target.num_layers, "per_layer": per_layer,
                "metrics_from": src.exit_metrics.get("metrics_from")})
    return path_free(out)


def early_exit_card(s: dict[str, Any], repo_ref: str) -> str:
    """README.md for exported early-exit heads (measured α per exit layer, loading code)."""
    t, tr = s["target"], s["training"]
    target_ref = t.get("hub_id") or t.get("name")
    out = [_front_matter(s, ["speculative-decoding", "early-exit", "hsd-train"])]
    out.append(f"# Early-exit verifier heads for {target_ref}\n\n")
    out.append(f"{s['head_type']} heads on layers {s['exit_layers']} of {target_ref} (N = {s['num_target_layers']} "
               "layers): each turns the target's hidden state after layer l into a next-token distribution through "
               "the target's own final norm and LM head (borrowed, not shipped). Trained with "
               "[hsd-train](https://github.com/hsd-train/hsd-train) as HiSpec-style intermediate verifiers; they "
               "are loaded by hsd-train's decoder, not by vLLM or SGLang.\n\n")
    rev = t.get("revision")
    out.append(f"- Target: `{target_ref}`, revision " + (f"`{rev}`" if rev else "not recorded")
               + (" (sha256 of the weight files trained against)" if t.get("revision_kind") == "weights-sha256" else "")
               + "\n")
    out.append(f"- Weights dtype: {s['dtype']}; serving temperature the heads were trained at: "
               f"{_fmt(s.get('temperature'), 2)}\n")
    out.append(f"- Training precision: {_precision_text(s)}\n")
    out.append(f"- Trained: step {tr.get('step')}" + (f" of {tr['total_steps']}" if tr.get("total_steps") else "")
               + (f"; data {', '.join(f'`{d}`' for d in tr.get('data') or [])}" if tr.get("data") else "") + "\n\n")
    if t.get("weights_note"):
        out.append(f"Note: the target weights used in training were {t['weights_note']}.\n\n")
    out.append("## Measured acceptance per exit layer\n\n")
    out.append(f"α = E[Σ_x min(p_final(x), p_l(x))] on held-out positions ({s.get('metrics_from') or 'eval'} "
               "metrics), against the untrained logit lens on the same positions.\n\n")
    out.append("| exit layer | α (head) | α (lens) | top-1 (head) | top-1 (lens) |\n|---|---|---|---|---|\n")
    for layer in s["exit_layers"]:
        m = s["per_layer"].get(str(layer)) or s["per_layer"].get(layer) or {}
        head, lens = m.get("trained") or {}, m.get("lens") or {}
        out.append(f"| {layer} | {_fmt(head.get('alpha'))} | {_fmt(lens.get('alpha'))} | {_fmt(head.get('top1'))} | "
                   f"{_fmt(lens.get('top1'))} |\n")
    out.append("\n## Load\n\n```python\n" + _load_snippet(
        repo_ref, "from hsd.models.early_exit import load_head",
        "head = load_head({path}, target_model)  # one folder per exit layer", sub=f"layer_{s['exit_layers'][0]}")
               + "```\n\n`target_reference.json` names the target these heads belong to.\n\n")
    lic = t.get("licence")
    out.append("## Licence\n\n" + (f"Derived from {target_ref}; carries its licence, **{lic}**.\n" if lic else
                                   f"Derived from {target_ref}; the target's licence terms apply.\n"))
    return "".join(out)
