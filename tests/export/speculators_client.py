"""Run an exported EAGLE-3 head with vLLM's ``speculators`` package (0.9.0): its converter and its model.

Runs inside the isolated environment ``make speculators-env`` creates (``.venv-speculators``: speculators
with the transformers it pins); it imports neither ``hsd`` nor ``tests``. Used by
``tests/export/test_speculators_client.py`` through a subprocess:

    .venv-speculators/bin/python tests/export/speculators_client.py FOLDER TARGET_DIR INPUTS OUTPUT \\
        [--convert WORK_DIR]

FOLDER: an export. ``--convert``: FOLDER is a native export; run speculators' ``Eagle3Converter`` on it
(into WORK_DIR) first, as a user of the speculators path would, then load the converted folder.
Otherwise FOLDER is a speculators-format export, loaded directly. TARGET_DIR: the target's local folder
(the verifier: speculators reads its config and token embedding from it, as vLLM takes them from the
served target). INPUTS: safetensors with ``hidden_states`` [1, T, 3H] (the three captured target states,
concatenated), ``input_ids`` [1, T] (row t's token), ``position_ids`` [1, T] and optionally ``document_ids``
[1, T] (several sequences packed into one row, attention kept within each). OUTPUT: safetensors with
``logits`` [1, T, Vd] (step 0, draft vocabulary) and ``draft_tokens`` [1, T] (their argmax, draft ids),
plus a JSON line on stdout with what was loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("target_dir")
    p.add_argument("inputs")
    p.add_argument("output")
    p.add_argument("--convert", metavar="WORK_DIR")
    a = p.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from safetensors.torch import load_file, save_file
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig

    folder = a.folder
    info = {"speculators_folder": folder}
    if a.convert:
        from speculators.convert.eagle import Eagle3Converter

        with open(os.path.join(a.folder, "config.json")) as fh:
            native = json.load(fh)
        ids = native.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids")
        folder = os.path.join(a.convert, "converted")
        Eagle3Converter().convert(a.folder, folder, base_model=a.target_dir, validate=True,
                                  eagle_aux_hidden_state_layer_ids=ids)
        info["speculators_folder"] = folder

    config = Eagle3SpeculatorConfig.from_pretrained(folder)
    # vLLM serves the draft next to the target it names; offline, the verifier is the local target folder
    config.speculators_config.verifier.name_or_path = a.target_dir
    config.transformer_layer_config._attn_implementation = "eager"  # flex attention needs a compiler on CPU
    model = Eagle3DraftModel.from_pretrained(folder, config=config).eval()
    # speculators 0.9.0 + transformers 5.19: from_pretrained fills the (not saved) embed_tokens with zeros
    # instead of leaving it NaN, so its "load the verifier's embedding when NaN" step is skipped. vLLM
    # shares the target's embedding; reproduce that through the package's own loader.
    info["embed_tokens_after_load"] = "zeros" if not bool(model.embed_tokens.weight.any()) else "set"
    with torch.no_grad():
        model.embed_tokens.weight.fill_(float("nan"))
    model.load_verifier_weights()
    info.update(dtype=str(model.fc.weight.dtype), aux_ids=list(model.config.eagle_aux_hidden_state_layer_ids or []),
                norm_before_residual=bool(model.config.norm_before_residual),
                draft_vocab_size=int(model.config.draft_vocab_size),
                d2t_sum=int(model.d2t.sum()) if model.d2t is not None else None,
                nan_params=[n for n, t in model.state_dict().items()
                            if t.is_floating_point() and bool(torch.isnan(t).any())
                            and n not in ("verifier_lm_head.weight",)])

    x = load_file(a.inputs)
    captured = {}
    model.lm_head.register_forward_hook(lambda _m, _i, out: captured.setdefault("logits", out.detach()))
    dtype = model.fc.weight.dtype
    with torch.no_grad():
        tokens = model(hidden_states=x["hidden_states"].to(dtype), input_ids=x["input_ids"],
                       document_ids=x.get("document_ids", torch.zeros_like(x["input_ids"])),
                       position_ids=x["position_ids"], ttt_steps=1)
    save_file({"logits": captured["logits"].float().contiguous(), "draft_tokens": tokens[0].contiguous()}, a.output)
    print("@@" + json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
