"""Rewrite every assistant turn of a conversation file with the target model itself (local transformers).

Draft heads trained on the target's own outputs accept more, so the bundled data is regenerated this way.
Any conversation file ``train.chat_data.load_conversations`` reads works as input (prompt-only files
too): system and user turns are kept, each assistant turn is (re)generated from the conversation so
far, in order (multi-turn conversations take several rounds). Generation is batched with left padding;
the output JSONL gets one ``{"id", "messages", "source", "finished"}`` row per completed conversation,
appended and flushed as soon as it is done, so an interrupted run resumes where it stopped (rows whose
id is already in the output are skipped). ``finished[k]`` is False when reply k hit --max-new-tokens.

    python scripts/regenerate_data.py data/prompts_train.jsonl --out data/smollm2_chat.jsonl \\
        --model smollm2-135m --max-new-tokens 128                           # greedy (the default)

Speed: ``--dtype auto`` is the one measured precision decision (``hsd.precision``: bf16 where bf16 matmuls are
faster than fp32 on this device, e.g. CPUs with AMX-BF16 and GPUs; fp32 on an AVX2-only CPU), printed with the
measured ratio and the machine line. ``--batch-size 0`` (the default) picks the batch that fits
(:func:`auto_batch_size`): as many rows as a quarter of the free memory holds for their KV caches and logits,
capped where a bigger batch stops paying (:data:`MAX_AUTO_BATCH`). The end prints reply tokens/s.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import deque
from pathlib import Path

import torch

from hsd.config import run_main

# Auto batch size caps: beyond these a bigger batch no longer raises tokens/s (CPU: matmuls are compute-bound
# from a few dozen rows on; GPU: a 135M-8B model's decode step stays memory-bound up to a few hundred rows).
MAX_AUTO_BATCH = {"cpu": 64, "cuda": 256}


def conversation_id(row: dict) -> str:
    """A stable id: the row's own ``id`` if the input has one, else a hash of its non-assistant turns."""
    if row.get("id"):
        return str(row["id"])
    keep = [(m["role"], m["content"]) for m in row["messages"] if m["role"] != "assistant"]
    return hashlib.sha1(json.dumps(keep, ensure_ascii=False).encode()).hexdigest()[:16]


def read_inputs(paths: list[str]) -> list[dict]:
    """Rows ``{"id", "messages", "source"}`` from conversation files (ids read from the raw rows)."""
    from train import chat_data

    rows = []
    for path in paths:
        ds = chat_data.load_conversations([path], require_assistant=False)
        raw_ids = _raw_ids(path, len(ds))
        for i, r in enumerate(ds):
            row = {"messages": r["messages"], "source": r["source"], "id": raw_ids[i] if raw_ids else None}
            row["id"] = conversation_id(row)
            if any(m["role"] == "user" for m in row["messages"]):
                rows.append(row)
    return rows


def _raw_ids(path: str, n: int) -> list | None:
    """The ``id`` column of a local JSONL file when every row has one (else None: hash ids are used)."""
    p = Path(path)
    if not (p.is_file() and p.suffix == ".jsonl"):
        return None
    ids = [json.loads(line).get("id") for line in p.read_text().splitlines() if line.strip()]
    if len(ids) != n or any(i is None for i in ids) or len(set(ids)) != n:
        return None
    return ids


def drop_cut_line(out: Path) -> None:
    """Remove a last line without a newline (a write cut by a kill), so that appending starts cleanly."""
    if not out.exists() or out.stat().st_size == 0:
        return
    data = out.read_bytes()
    if not data.endswith(b"\n"):
        with open(out, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def done_ids(out: Path) -> set[str]:
    if not out.exists():
        return set()
    ids = set()
    for line in out.read_text().splitlines():
        if line.strip():
            try:
                ids.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a kill: that conversation is generated again
    return ids


class Job:
    """One conversation being regenerated: ``prefix`` so far, the user/system turns still to come."""

    def __init__(self, row: dict):
        self.row = row
        msgs = row["messages"]
        first_user = next(i for i, m in enumerate(msgs) if m["role"] == "user")
        self.prefix = [m for m in msgs[: first_user + 1] if m["role"] != "assistant"]
        self.rest = [m for m in msgs[first_user + 1:] if m["role"] != "assistant"]
        self.finished: list[bool] = []

    def advance(self, reply: str, finished: bool) -> bool:
        """Add the reply and the next user turn(s); True when the conversation needs no more replies."""
        self.prefix.append({"role": "assistant", "content": reply})
        self.finished.append(finished)
        while self.rest and self.rest[0]["role"] != "user":
            self.prefix.append(self.rest.pop(0))
        if self.rest:
            self.prefix.append(self.rest.pop(0))
            return False
        return True


@torch.no_grad()
def generate_batch(model, tok, convs: list[list[dict]], args) -> list[tuple[str, bool]]:
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
    sample = args.temperature > 0
    out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=sample,
                         temperature=args.temperature if sample else None, top_p=args.top_p if sample else None,
                         top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[:, enc["input_ids"].shape[1]:]
    results = []
    for row in new.tolist():
        stop = tok.eos_token_id in row
        if stop:
            row = row[: row.index(tok.eos_token_id)]
        results.append((tok.decode(row, skip_special_tokens=True).strip(), stop))
    return results


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``: the GPU's free memory, else the host's MemAvailable (/proc/meminfo)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def auto_batch_size(config, dtype: torch.dtype, max_tokens: int, device: torch.device,
                    free_bytes: int | None = None) -> int:
    """Rows per generate call that fit: a quarter of the free memory over one row's KV cache for ``max_tokens``
    (prompt + reply) plus its fp32 logits, capped by :data:`MAX_AUTO_BATCH` (at least 1)."""
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads)
    head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)
    size = torch.empty((), dtype=dtype).element_size()
    per_row = 2 * int(tc.num_hidden_layers) * heads * head_dim * size * max_tokens + 4 * int(tc.vocab_size)
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    return max(1, min(MAX_AUTO_BATCH.get(device.type, 64), free // 4 // per_row))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="conversation files (json/jsonl/parquet, ShareGPT or OpenAI rows)")
    ap.add_argument("--out", required=True, help="output JSONL (appended to; existing ids are skipped)")
    ap.add_argument("--model", default="smollm2-135m", help="short name, local folder or Hub id")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=0, help="rows per generate call (0: auto_batch_size)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="only the first N conversations (0 = all)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--overwrite", action="store_true", help="start the output file afresh")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default). On a CPU shared with other jobs, 1 is often "
                         "several times faster than 2 (OpenMP threads spin while waiting for each other)")
    args = ap.parse_args(argv)

    from tqdm.auto import tqdm

    from hsd.models import resolve

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = read_inputs(args.inputs)
    if args.limit:
        rows = rows[: args.limit]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.overwrite and out.exists():
        out.unlink()
    drop_cut_line(out)
    skip = done_ids(out)
    todo = [Job(r) for r in rows if r["id"] not in skip]
    print(f"{len(rows)} conversations, {len(rows) - len(todo)} already in {out}, {len(todo)} to generate")
    if not todo:
        return
    model, tok = resolve.load_target(args.model, dtype=args.dtype, device=args.device)
    tok.padding_side = "left"  # generation continues from the right end of every row
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    from hsd.machine import machine_info, machine_line
    from hsd.precision import bf16_speedup, precision_probe

    dev, dtype = torch.device(args.device), next(model.parameters()).dtype
    ratio = bf16_speedup(dev)
    print(f"{machine_line(machine_info(dev, dtype))}; --dtype {args.dtype}: {str(dtype).removeprefix('torch.')} "
          f"(auto = {precision_probe(dev).dtype} here" + (f", bf16 matmuls measured {ratio:.2f}x fp32 speed)" if
                                                          ratio is not None else ")"))
    if args.batch_size < 1:
        longest = max(len(tok(tok.apply_chat_template(j.prefix + j.rest, tokenize=False),
                              add_special_tokens=False)["input_ids"]) for j in todo)
        args.batch_size = auto_batch_size(model.config, dtype, longest + args.max_new_tokens * (1 + max(
            sum(m["role"] == "user" for m in j.rest) for j in todo)), dev)
        print(f"batch size {args.batch_size} (auto: fits a quarter of the free memory, at most "
              f"{MAX_AUTO_BATCH.get(dev.type, 64)} on {dev.type})")

    n_replies = sum(1 + sum(m["role"] == "user" for m in j.rest) for j in todo)
    bar = tqdm(total=n_replies, desc="replies", unit="reply")
    queue = deque(todo)
    start, new_tokens, written = time.time(), 0, 0
    with open(out, "a") as fh:
        while queue:
            # group by source, then prompt length: similar reply lengths and less left padding per batch
            pending = sorted(queue, key=lambda j: (j.row["source"].split("/")[0],
                                                   len(tok.apply_chat_template(j.prefix, tokenize=False))))
            queue.clear()
            for b in range(0, len(pending), args.batch_size):
                batch = pending[b: b + args.batch_size]
                replies = generate_batch(model, tok, [j.prefix for j in batch], args)
                for job, (reply, stop) in zip(batch, replies):
                    new_tokens += len(tok(reply, add_special_tokens=False)["input_ids"])
                    if job.advance(reply, stop):
                        fh.write(json.dumps({"id": job.row["id"], "messages": job.prefix,
                                             "source": job.row["source"], "finished": job.finished},
                                            ensure_ascii=False) + "\n")
                        fh.flush()
                        written += 1
                    else:
                        queue.append(job)
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{new_tokens / (time.time() - start):.1f}")
    bar.close()
    secs = time.time() - start
    print(f"wrote {written} conversations to {out}: {new_tokens} reply tokens in {secs:.0f} s "
          f"({new_tokens / secs:.1f} tok/s), greedy={args.temperature == 0}, max_new_tokens={args.max_new_tokens}")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
