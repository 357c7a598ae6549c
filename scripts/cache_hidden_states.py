"""Write the frozen target's features for offline EAGLE-3 training, as resumable safetensors shards.

For every tokenized conversation it stores the aux hidden states (HF ``output_hidden_states`` indices,
default ``[2, N//2, N-3]``, concatenated [S, 3H]) and the final post-norm hidden state [S, H]; teacher
logits are recomputed from the latter with the target's LM head, so the V-wide logits never hit the disk.
Shards of ``--shard-size`` rows are written to a temporary file and renamed, so a killed run resumes
by skipping finished shards; ``meta.json`` pins the settings and a rerun with different ones is refused.
Read the result with ``train.feature_cache.FeatureCache``.

    python scripts/cache_hidden_states.py data/smollm2_chat.jsonl --model smollm2-135m --out runs/features
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from hsd.config import run_main

_STORE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_shard(model, rows: list[dict], layers: list[int], store: torch.dtype, batch_size: int,
                pad_id: int, path: Path) -> int:
    """Capture ``rows`` (sorted by length into right-padded batches) and save one shard; returns tokens."""
    from safetensors.torch import save_file

    from hsd.models.capture import capture
    from train.chat_data import collate

    per_row: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    for b in range(0, len(order), batch_size):
        idx = order[b: b + batch_size]
        batch = collate([rows[i] for i in idx], pad_id)
        dev = next(model.parameters()).device
        cap = capture(model, batch["input_ids"].to(dev), batch["attention_mask"].to(dev), layers=layers,
                      logits=False, final_hidden=True)
        aux = torch.cat([cap.hidden_states[j] for j in layers], dim=-1)
        for k, i in enumerate(idx):
            n = len(rows[i]["input_ids"])
            per_row[i] = (aux[k, :n].to("cpu", store), cap.final_hidden[k, :n].to("cpu", store))
    lengths = [len(r["input_ids"]) for r in rows]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.long)
    tensors = {
        "input_ids": torch.cat([torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows]),
        "loss_mask": torch.cat([torch.as_tensor(r["loss_mask"], dtype=torch.int8) for r in rows]),
        "aux_hidden": torch.cat([a for a, _ in per_row]).contiguous(),
        "final_hidden": torch.cat([f for _, f in per_row]).contiguous(),
        "offsets": offsets,
    }
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return int(offsets[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="+", help="conversation files or Hub datasets")
    ap.add_argument("--out", required=True, help="cache folder")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, nargs="*", default=None,
                    help="HF hidden-state indices, in the order their features are concatenated (default 2 N//2 N-3)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--overflow", choices=["truncate", "drop"], default="truncate")
    ap.add_argument("--shard-size", type=int, default=64, help="conversations per shard")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--store-dtype", choices=sorted(_STORE), default="bfloat16")
    ap.add_argument("--dtype", default="auto", help="target compute dtype")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N conversations (0 = all)")
    args = ap.parse_args(argv)

    from tqdm.auto import tqdm

    from hsd.models import resolve
    from hsd.models.capture import num_layers, validate_layers
    from hsd.models.eagle3 import default_aux_layer_ids
    from train import chat_data
    from train.feature_cache import META, shard_name

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shard_size < 1 or args.batch_size < 1:
        raise SystemExit("--shard-size and --batch-size must be >= 1")
    model, tok = resolve.load_target(args.model, dtype=args.dtype, device=args.device)
    layers = list(args.layers) if args.layers else default_aux_layer_ids(num_layers(model))
    validate_layers(model, layers)
    ds = chat_data.load_conversations(args.data)
    if args.limit:
        ds = ds.select(range(min(args.limit, len(ds))))
    tds, stats = chat_data.tokenize_dataset(tok, ds, max_length=args.max_length, overflow=args.overflow)
    rows = [{"input_ids": r["input_ids"], "loss_mask": r["loss_mask"]} for r in tds]
    n_shards = -(-len(rows) // args.shard_size)
    meta = {
        "target": str(args.model), "layers": layers, "hidden_size": int(model.config.hidden_size),
        "num_target_layers": num_layers(model), "vocab_size": int(model.config.vocab_size),
        "tokenizer_size": len(tok), "pad_token_id": resolve.pad_id_of(tok),
        "dtype": args.store_dtype, "compute_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "shard_size": args.shard_size, "num_rows": len(rows), "num_shards": n_shards,
        "data": [str(d) for d in args.data], "max_length": args.max_length, "overflow": args.overflow,
        "limit": args.limit, "tokenize_stats": stats,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        diff = sorted(k for k in meta if k in old and old[k] != meta[k])  # keys an older cache lacks: not compared
        if diff:
            raise SystemExit(f"{out} holds a cache made with different settings ({', '.join(diff)}); "
                             f"use another --out or delete it")
    else:
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")

    todo = [k for k in range(n_shards) if not (out / shard_name(k)).is_file()]
    print(f"{len(rows)} conversations in {n_shards} shards; {n_shards - len(todo)} done, {len(todo)} to write; "
          f"layers {layers}, store {args.store_dtype}")
    start, tokens = time.time(), 0
    for k in tqdm(todo, desc="shards", unit="shard"):
        chunk = rows[k * args.shard_size: (k + 1) * args.shard_size]
        tokens += write_shard(model, chunk, layers, _STORE[args.store_dtype], args.batch_size,
                              meta["pad_token_id"], out / shard_name(k))
    secs = max(time.time() - start, 1e-9)
    print(f"wrote {len(todo)} shards ({tokens} tokens) to {out} in {secs:.0f} s ({tokens / secs:.0f} tok/s)")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
