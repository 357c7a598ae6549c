"""``python -m hsd.decode --target smollm2-135m --head PATH --prompt "..."``: decode one prompt and print the
text and its acceptance statistics (a demo of the library; ``scripts/decode.py`` evaluates prompt sets)."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hsd.decode", description=__doc__.split(":")[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--head", help="EAGLE-3 head folder (default: no drafter, plain decoding)")
    ap.add_argument("--exit-head", nargs="+", help="early-exit head folder(s) (or folders of layer_<l>/ heads)")
    ap.add_argument("--exit-layer", type=int, help="exit stage: which layer_<l> head verifies (default: the "
                                                   "shallowest; with --drafter exit:L only when given)")
    ap.add_argument("--drafter", help="exit:L = draft with target layers 1..L + the exit head of layer L")
    ap.add_argument("--draft-model", help="HF draft model folder / Hub id, or layers:N")
    ap.add_argument("--lookup", action="store_true", help="draft by prompt lookup instead")
    ap.add_argument("--prompt", default="What is 12 times 7? Explain briefly.")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--method", default="auto")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--exit-window", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from hsd.models.resolve import load_target

    from . import (
        DecodeConfig,
        Eagle3Drafter,
        ExitDrafter,
        ExitStage,
        ModelDrafter,
        PromptLookupDrafter,
        SpeculativeDecoder,
        summarize,
    )
    from .evaluate import exit_drafter_layer
    from .loading import load_draft_model, load_eagle3, load_exit_heads
    from .prompts import Prompt, render

    try:
        cfg = DecodeConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, k=args.k,
                           method=args.method, backend=args.backend, exit_window=args.exit_window,
                           max_new_tokens=args.max_new_tokens)
        target, tok = load_target(args.target)
        drafter = None
        l1 = exit_drafter_layer(args.drafter) if args.drafter else None
        if args.drafter and l1 is None:
            raise ValueError(f"--drafter {args.drafter!r}: expected exit:L")
        if l1 is not None:
            if not args.exit_head:
                raise ValueError("--drafter exit:L needs --exit-head")
            drafter = ExitDrafter(load_exit_heads(args.exit_head, target, [l1])[l1])
        elif args.head:
            drafter = Eagle3Drafter(load_eagle3(args.head, target))
        elif args.draft_model:
            drafter = ModelDrafter(load_draft_model(args.draft_model, target, tok)[0], int(target.config.vocab_size))
        elif args.lookup:
            drafter = PromptLookupDrafter()
        stage = None
        if args.exit_head and (l1 is None or args.exit_layer):
            heads = load_exit_heads(args.exit_head, target, [args.exit_layer] if args.exit_layer else None)
            stage = ExitStage(heads[min(heads)], int(target.config.num_hidden_layers))
        dec = SpeculativeDecoder(target, drafter, stage, cfg)
        ids = torch.tensor([render(tok, Prompt("cli", "cli", [args.prompt]), [])])
        res = dec.generate(ids, seed=args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(tok.decode(res.new_tokens[0], skip_special_tokens=True))
    s = summarize([res.stats])
    print(f"\n[{res.stats.new_tokens} tokens, tau {s['tau']:.2f}, per-position {s['reach_rate']}, "
          f"{s['tokens_per_s']:.1f} tok/s, TTFT {s['ttft_ms']:.0f} ms]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
