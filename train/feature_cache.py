"""Read an offline feature cache written by ``scripts/cache_hidden_states.py``.

Layout of a cache folder:
- ``meta.json``: target, aux ``layers`` (HF ``output_hidden_states`` indices, in the order their
  features are concatenated), ``hidden_size``, ``dtype``, ``shard_size``, ``num_rows``, ``num_shards``,
  tokenizer/vocab facts and the tokenization stats;
- ``shard_00000.safetensors`` ...: the rows ``[k * shard_size, (k+1) * shard_size)`` concatenated along
  tokens: ``input_ids`` [T] int64, ``loss_mask`` [T] int8, ``aux_hidden`` [T, len(layers) * H],
  ``final_hidden`` [T, H] (post-final-norm, the LM head input: teacher logits are
  ``lm_head(final_hidden)``, never stored), ``offsets`` [R + 1] int64 (row r = tokens offsets[r]:offsets[r+1]).

``FeatureCache`` is a map-style ``torch.utils.data.Dataset`` yielding, per conversation,
``input_ids`` [S] long, ``loss_mask`` [S] long, ``aux_hidden`` [S, 3H] and ``final_hidden`` [S, H]
(float32 unless asked otherwise); ``collate_features`` right-pads a list of them; ``token_rows`` lists
the token ids and masks of every row without reading hidden states (what a trainer splits and batches).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

META = "meta.json"


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    if not path.is_file():
        raise ValueError(f"{directory!r} is not a feature cache (no {META}); write one with "
                         f"scripts/cache_hidden_states.py")
    return json.loads(path.read_text())


class FeatureCache(torch.utils.data.Dataset):
    """Rows of a finished feature cache (see the module doc); ``dtype`` is the float type returned."""

    def __init__(self, directory: str | Path, dtype: torch.dtype = torch.float32):
        self.directory = Path(directory)
        self.meta = read_meta(directory)
        self.dtype = dtype
        self.shard_size = int(self.meta["shard_size"])
        self.num_rows = int(self.meta["num_rows"])
        missing = [shard_name(k) for k in range(int(self.meta["num_shards"]))
                   if not (self.directory / shard_name(k)).is_file()]
        if missing:
            raise ValueError(f"feature cache {str(directory)!r} is incomplete: {len(missing)} shard(s) missing "
                             f"(first: {missing[0]}); rerun scripts/cache_hidden_states.py to finish it")
        self._open: dict[int, Any] = {}
        self._offsets: dict[int, list[int]] = {}

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self):  # open file handles stay in each DataLoader worker
        state = dict(self.__dict__)
        state["_open"], state["_offsets"] = {}, {}
        return state

    def _shard(self, k: int):
        if k not in self._open:
            from safetensors import safe_open

            handle = safe_open(str(self.directory / shard_name(k)), framework="pt")
            self._open[k] = handle
            self._offsets[k] = handle.get_tensor("offsets").tolist()
        return self._open[k], self._offsets[k]

    def token_rows(self, max_length: int, overflow: str = "truncate") -> tuple[list[dict], dict[str, Any]]:
        """``[{"row_id", "input_ids", "loss_mask"}]`` of every cached conversation (no hidden state read), with
        ``max_length`` applied as ``overflow`` says ("truncate" or "drop"), and the counts of
        ``train.chat_data.tokenize_dataset``. ValueError when no row is left."""
        stats = dict(rows=0, kept=0, truncated=0, dropped_too_long=0, dropped_no_assistant=0, tokens=0,
                     assistant_tokens=0, max_length=max_length, overflow=overflow,
                     source=f"feature cache {self.directory}")
        rows: list[dict] = []
        for k in range(int(self.meta["num_shards"])):
            handle, offsets = self._shard(k)
            ids, mask = handle.get_tensor("input_ids"), handle.get_tensor("loss_mask")
            for r in range(len(offsets) - 1):
                a, b = offsets[r], offsets[r + 1]
                stats["rows"] += 1
                row = {"row_id": k * self.shard_size + r, "input_ids": ids[a:b].tolist(),
                       "loss_mask": mask[a:b].long().tolist()}
                if len(row["input_ids"]) > max_length:
                    if overflow == "drop":
                        stats["dropped_too_long"] += 1
                        continue
                    row["input_ids"], row["loss_mask"] = row["input_ids"][:max_length], row["loss_mask"][:max_length]
                    stats["truncated"] += 1
                if not any(row["loss_mask"]):
                    stats["dropped_no_assistant"] += 1
                    continue
                stats["kept"] += 1
                stats["tokens"] += len(row["input_ids"])
                stats["assistant_tokens"] += sum(row["loss_mask"])
                rows.append(row)
        if not rows:
            raise ValueError(f"feature cache {str(self.directory)!r}: no conversation left ({stats})")
        return rows, stats

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += self.num_rows
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} out of range for a cache of {self.num_rows} rows")
        k, r = divmod(index, self.shard_size)
        handle, offsets = self._shard(k)
        a, b = offsets[r], offsets[r + 1]
        return {
            "input_ids": handle.get_slice("input_ids")[a:b].long(),
            "loss_mask": handle.get_slice("loss_mask")[a:b].long(),
            "aux_hidden": handle.get_slice("aux_hidden")[a:b].to(self.dtype),
            "final_hidden": handle.get_slice("final_hidden")[a:b].to(self.dtype),
        }


def collate_features(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad cached rows -> input_ids/attention_mask/loss_mask [B, S] long, aux_hidden [B, S, 3H],
    final_hidden [B, S, H] (zeros at padding)."""
    if not rows:
        raise ValueError("rows is empty")
    B, S = len(rows), max(int(r["input_ids"].numel()) for r in rows)
    aux_w, hid = rows[0]["aux_hidden"].shape[-1], rows[0]["final_hidden"].shape[-1]
    dt = rows[0]["aux_hidden"].dtype
    out = {
        "input_ids": torch.full((B, S), int(pad_id), dtype=torch.long),
        "attention_mask": torch.zeros((B, S), dtype=torch.long),
        "loss_mask": torch.zeros((B, S), dtype=torch.long),
        "aux_hidden": torch.zeros((B, S, aux_w), dtype=dt),
        "final_hidden": torch.zeros((B, S, hid), dtype=dt),
    }
    for i, r in enumerate(rows):
        n = int(r["input_ids"].numel())
        out["input_ids"][i, :n] = r["input_ids"]
        out["attention_mask"][i, :n] = 1
        out["loss_mask"][i, :n] = r["loss_mask"]
        out["aux_hidden"][i, :n] = r["aux_hidden"]
        out["final_hidden"][i, :n] = r["final_hidden"]
    return out
