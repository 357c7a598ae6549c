"""Train an EAGLE-3 draft head on a frozen target (online: the target runs in the training process).

    python -m train.eagle3 --config configs/eagle3/smollm2-135m.yaml [--resume] [key=value ...]
    accelerate launch [--config_file configs/accelerate/<x>.yaml] train/eagle3.py --config configs/eagle3/<run>.yaml

Per batch: one frozen-target forward captures the token embeddings (hidden-state index 0), the three
aux hidden states ``eagle_aux_hidden_state_layer_ids`` (default ``[2, N//2, N-3]``) and the final hidden
state; the target's LM head runs only on the rows whose next token is an assistant token (the teacher
rows). The head then unrolls ``ttt_steps`` training-time-test steps (train/ttt.py documents alignment,
attention, loss and metrics). ``best/`` is chosen on held-out ``eval/sim_accept_len`` (max).

Set-up (every rank): target + tokenizer (hsd.models.resolve; fp32 on CPU, bf16 on GPU unless
``target_dtype``), conversations (train.chat_data: chat template, assistant mask, truncate/drop counted),
seeded eval split (``eval_fraction``), draft vocabulary from the *training* split's assistant tokens
(train.draft_vocab; coverage printed and written to ``<output_dir>/draft_vocab.json`` and next to every
saved head), head config from the target (``Eagle3Config.from_target``). ``init_from_target`` starts
``lm_head`` from the target's LM-head rows of the draft vocabulary and ``norm`` from its final norm
(much faster early training); ``init_from`` warm-starts from a saved head (its vocabulary is kept).

``cache_target: true`` keeps, per conversation, the target's outputs (features, embeddings and the compact
teacher: draft-vocab logits, full-vocab logsumexp and argmax) in memory after the conversation's first
pass, so later epochs and evaluations skip the target: exact (same dtype), for small single-machine runs
(the CPU config). Memory ~ tokens * 16 * H_t bytes (fp32) + assistant tokens * 4 * Vd bytes. Not with a
ZeRO-3-sharded target (its ranks must run every forward together).

Bad input raises ValueError before any training: aux ids the target does not have, a tokenizer larger than
the target vocabulary or data ids outside it, ``draft_vocab_size`` > target vocab, an ``init_from`` head
for another vocabulary/shape, data without conversations or assistant turns (train.chat_data).
Feature source (``features``): ``online`` (default; the target runs every batch) or ``offline``: read the
aux and final hidden states from ``feature_cache_dir`` written by ``scripts/cache_hidden_states.py``
(train.feature_cache); the target is still loaded, for its token embeddings and its LM head (teacher
logits from the cached final hidden state). The cache's rows are the data (``data`` is not read); its
meta must match the target (vocabulary, tokenizer size, hidden size, layer count) and the aux ids.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from typing import Any, ClassVar

if __package__ in (None, ""):  # `accelerate launch train/eagle3.py`: put the repo root on sys.path
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from hsd.models import capture as cap  # noqa: E402
from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel  # noqa: E402
from train import ttt  # noqa: E402
from train.chat_data import split_rows  # noqa: E402
from train.config import BaseTrainConfig  # noqa: E402
from train.loop import TrainTask, main  # noqa: E402


@dataclasses.dataclass
class Eagle3TrainConfig(BaseTrainConfig):
    """Run config of the EAGLE-3 trainer (BaseTrainConfig fields plus the head's and TTT's)."""

    output_dir: str = "runs/eagle3"
    lr: float = 1e-4
    ttt_steps: int = 7  # K unrolled draft steps
    step_weight: float = 0.8  # gamma: loss weight of step k is gamma**k
    draft_vocab_size: int = 32000  # Vd most frequent assistant tokens (must be <= target vocab)
    aux_layer_ids: list[int] = dataclasses.field(default_factory=list)  # [] = [2, N//2, N-3] (HF indices)
    attention: str = "auto"  # auto (fastest per device) | sdpa | reference  (same numbers; train/ttt.py)
    init_from_target: bool = True  # lm_head <- target LM-head rows of the draft vocab, norm <- final norm
    init_from: str = ""  # folder of a saved head to warm-start from (weights and draft vocabulary)
    intermediate_size: int = 0  # head MLP size; 0 = the target's
    cache_target: bool = False  # keep each conversation's target outputs in RAM after its first pass
    features: str = "online"  # online | offline (read feature_cache_dir, see scripts/cache_hidden_states.py)
    feature_cache_dir: str = ""

    # Neither changes the numbers (attention paths agree to float rounding; the cache is exact).
    resume_mutable: ClassVar[frozenset[str]] = BaseTrainConfig.resume_mutable | {"attention", "cache_target"}
    target_revision: str = ""  # recorded in draft_vocab.json for provenance

    def validate(self) -> None:
        super().validate()
        if self.ttt_steps < 1:
            raise ValueError(f"ttt_steps must be >= 1, got {self.ttt_steps}")
        if not self.step_weight > 0:
            raise ValueError(f"step_weight must be > 0, got {self.step_weight}")
        if self.draft_vocab_size < 1:
            raise ValueError(f"draft_vocab_size must be >= 1, got {self.draft_vocab_size}")
        if self.attention not in ttt.ATTENTION:
            raise ValueError(f"attention must be one of {sorted(ttt.ATTENTION)}, got {self.attention!r}")
        if self.aux_layer_ids and len(self.aux_layer_ids) != 3:
            raise ValueError(f"aux_layer_ids must list exactly 3 hidden-state indices (or be empty for the "
                             f"default), got {self.aux_layer_ids}")
        if any(i < 0 for i in self.aux_layer_ids):
            raise ValueError(f"aux_layer_ids must be >= 0, got {self.aux_layer_ids}")
        if self.features not in ("online", "offline"):
            raise ValueError(f"features must be 'online' or 'offline', got {self.features!r}")
        if self.features == "offline" and not self.feature_cache_dir:
            raise ValueError("features=offline needs feature_cache_dir (written by scripts/cache_hidden_states.py)")
        if self.features == "offline" and self.cache_target:
            raise ValueError("cache_target is for features=online (offline features are already cached)")
        if self.intermediate_size < 0:
            raise ValueError(f"intermediate_size must be >= 0 (0 = the target's), got {self.intermediate_size}")


class Eagle3TTTModel(nn.Module):
    """The trainable module the loop sees: the draft head plus its TTT unroll as ``forward``."""

    def __init__(self, draft: Eagle3DraftModel, steps: int, attention: str):
        super().__init__()
        self.draft = draft
        self.config = draft.config  # DeepSpeed "auto" bucket sizes read config.hidden_size
        self.steps = steps
        self.attention = attention

    def forward(self, features: torch.Tensor, embeds: torch.Tensor, rows: torch.Tensor) -> list[torch.Tensor]:
        """-> per-step draft logits [N_k, Vd] at ``ttt.step_rows(rows, k)``."""
        return ttt.ttt_unroll(self.draft, features, embeds, rows, self.steps, self.attention)


def _vocab_of(config: Any) -> int:
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(tc.vocab_size)


class Eagle3Task(TrainTask):
    """TrainTask for EAGLE-3 heads (see the module docstring)."""

    best_metric = "eval/sim_accept_len"
    best_mode = "max"

    def __init__(self, config: Eagle3TrainConfig):
        super().__init__(config)
        self._model: Eagle3TTTModel | None = None
        self.vocab_info: dict[str, Any] = {}

    # -- set-up -----------------------------------------------------------------------------------------
    def setup(self, accelerator) -> None:
        from hsd.models import resolve
        from train import chat_data, draft_vocab
        from train import distributed as dist_utils

        cfg: Eagle3TrainConfig = self.config
        self.accelerator = accelerator
        with dist_utils.target_init_context(accelerator, cfg):
            target, tok = resolve.load_target(cfg.target, dtype=dist_utils.target_dtype(cfg), device="cpu")
        vocab = _vocab_of(target.config)
        if len(tok) > vocab:
            raise ValueError(f"tokenizer of {cfg.target!r} has {len(tok)} tokens but the target's vocabulary is "
                             f"{vocab}: tokenizer/vocab mismatch")
        if cfg.draft_vocab_size > vocab:
            raise ValueError(f"draft_vocab_size ({cfg.draft_vocab_size}) is larger than the target vocabulary "
                             f"({vocab})")
        overrides = {"intermediate_size": cfg.intermediate_size} if cfg.intermediate_size else {}
        aux_ids = list(cfg.aux_layer_ids) or None
        self.features = None
        if cfg.features == "offline":
            from train.feature_cache import FeatureCache

            self.features = FeatureCache(cfg.feature_cache_dir, dtype=dist_utils.target_dtype(cfg))
            aux_ids = self._check_feature_cache(self.features.meta, target, tok, aux_ids)
        # Validates the aux ids against the target (ValueError naming them) before any data work.
        self.head_config = Eagle3Config.from_target(target.config, cfg.draft_vocab_size, aux_ids, **overrides)
        self.aux_ids = self.head_config.aux_layer_ids
        self.capture_ids = sorted({0, *self.aux_ids})  # index 0 = token embeddings (the head's inputs)
        self.init_head = self._load_init_head(vocab) if cfg.init_from else None

        if cfg.cache_target and dist_utils.shards_target(accelerator, cfg):
            raise ValueError("cache_target=true cannot be used with a ZeRO-3-sharded target (shard_target=true): "
                             "every rank must run each target forward together")
        self.cache: dict[int, tuple] | None = {} if cfg.cache_target else None
        engine = dist_utils.prepare_frozen_target(accelerator, target, cfg)
        self.target = getattr(engine, "module", engine)  # ZeRO-3: hooks on the partitioned modules gather
        self.tokenizer = tok
        self.pad_id = chat_data.pad_id_of(tok)

        if self.features is None:
            conversations = chat_data.load_conversations(list(cfg.data))
            tds, stats = chat_data.tokenize_dataset(tok, conversations, max_length=cfg.max_length,
                                                    overflow=cfg.overflow)
            rows = [{"input_ids": list(r["input_ids"]), "loss_mask": list(r["loss_mask"])} for r in tds]
        else:
            rows, stats = self._feature_cache_rows()
        top = max(max(r["input_ids"]) for r in rows)
        if top >= vocab:
            raise ValueError(f"data token id {top} is outside the target vocabulary of {vocab} "
                             "(tokenizer/vocab mismatch between data and target)")
        kept = [r for r in rows if sum(r["loss_mask"][1:]) > 0]  # a teacher row needs an assistant token at t>=1
        for i, r in enumerate(kept):
            r.setdefault("row_id", i)  # key of the in-RAM target cache (offline: the feature-cache row)
        stats["dropped_no_teacher_row"] = len(rows) - len(kept)
        if not kept:
            raise ValueError(f"data {cfg.data}: no conversation has an assistant token to predict ({stats})")
        self._train, self._eval = split_rows(kept, cfg.eval_fraction, cfg.seed)
        self.data_stats = stats
        self._print(f"data: {stats['rows']} conversations, kept {len(kept)} (truncated {stats['truncated']}, "
                    f"dropped {stats['dropped_too_long']} longer than max_length={cfg.max_length}, "
                    f"{stats['dropped_no_assistant'] + stats['dropped_no_teacher_row']} without assistant tokens); "
                    f"{len(self._train)} train / {len(self._eval)} eval")

        if self.init_head is not None:
            self.vocab = self.init_head.draft_vocab.to("cpu")
            coverage = draft_vocab.coverage(draft_vocab.token_counts(self._train, vocab), self.vocab)
        else:
            self.vocab, coverage = draft_vocab.build_draft_vocab(
                self._train, target_vocab_size=vocab, draft_vocab_size=cfg.draft_vocab_size)
        self.vocab_info = {
            "target": cfg.target, "target_revision": cfg.target_revision or None, "target_vocab_size": vocab,
            "draft_vocab_size": self.vocab.size, "coverage": coverage,
            "coverage_of": "assistant tokens of the training split",
            "aux_layer_ids": self.aux_ids,
            "aux_layer_ids_convention": "Hugging Face output_hidden_states indices = vLLM 'capture before layer j'",
            "ttt_steps": cfg.ttt_steps, "step_weight": cfg.step_weight,
            "data": list(cfg.data) if self.features is None else f"feature cache {cfg.feature_cache_dir}",
            "data_stats": {k: v for k, v in stats.items()},
        }
        self._print(f"draft vocab: {self.vocab.size} of {vocab} tokens, coverage {coverage:.4f} of assistant "
                    f"tokens; aux layers {self.aux_ids} of {cap.num_layers(self.target)}")
        if accelerator.is_main_process:
            out = pathlib.Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "draft_vocab.json").write_text(json.dumps(self.vocab_info, indent=2))
        self._init_tensors = self._target_init_tensors() if (cfg.init_from_target and self.init_head is None) else None

    def _print(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            print(msg, flush=True)

    def _check_feature_cache(self, meta: dict, target, tok, aux_ids: list[int] | None) -> list[int]:
        """ValueError unless the offline cache was written for this target/tokenizer; returns the aux ids."""
        cfg: Eagle3TrainConfig = self.config
        tc = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
        where = f"feature cache {cfg.feature_cache_dir!r} (target {meta.get('target')!r})"
        facts = {"vocab_size": int(tc.vocab_size), "hidden_size": int(tc.hidden_size),
                 "num_target_layers": cap.num_layers(target), "tokenizer_size": len(tok)}
        for key, want in facts.items():
            if key in meta and int(meta[key]) != want:
                raise ValueError(f"{where} has {key}={meta[key]} but target {cfg.target!r} has {want} "
                                 "(tokenizer/vocab or model mismatch)")
        layers = [int(i) for i in meta["layers"]]
        if aux_ids is not None and list(aux_ids) != layers:
            raise ValueError(f"aux_layer_ids {list(aux_ids)} differ from the layers {layers} stored in {where}")
        if str(meta.get("target")) != str(cfg.target):
            self._print(f"note: {where} names another target string than {cfg.target!r}; sizes match")
        return layers

    def _feature_cache_rows(self) -> tuple[list[dict], dict]:
        """input_ids/loss_mask of every cached conversation (no hidden states read), with max_length applied."""
        from safetensors import safe_open

        from train.feature_cache import shard_name

        cfg: Eagle3TrainConfig = self.config
        fc = self.features
        rows: list[dict] = []
        stats = dict(rows=0, kept=0, truncated=0, dropped_too_long=0, dropped_no_assistant=0, tokens=0,
                     assistant_tokens=0, max_length=cfg.max_length, overflow=cfg.overflow,
                     source=f"feature cache {cfg.feature_cache_dir}")
        for k in range(int(fc.meta["num_shards"])):
            with safe_open(str(fc.directory / shard_name(k)), framework="pt") as h:
                ids, mask, offsets = h.get_tensor("input_ids"), h.get_tensor("loss_mask"), h.get_tensor("offsets")
            for r in range(offsets.numel() - 1):
                a, b = int(offsets[r]), int(offsets[r + 1])
                stats["rows"] += 1
                row = {"row_id": k * fc.shard_size + r, "input_ids": ids[a:b].tolist(),
                       "loss_mask": mask[a:b].long().tolist()}
                if len(row["input_ids"]) > cfg.max_length:
                    if cfg.overflow == "drop":
                        stats["dropped_too_long"] += 1
                        continue
                    row["input_ids"], row["loss_mask"] = row["input_ids"][:cfg.max_length], row["loss_mask"][:cfg.max_length]
                    stats["truncated"] += 1
                if not any(row["loss_mask"]):
                    stats["dropped_no_assistant"] += 1
                    continue
                stats["kept"] += 1
                stats["tokens"] += len(row["input_ids"])
                stats["assistant_tokens"] += sum(row["loss_mask"])
                rows.append(row)
        if not rows:
            raise ValueError(f"feature cache {cfg.feature_cache_dir!r}: no conversation left ({stats})")
        return rows, stats

    def _load_init_head(self, vocab: int) -> Eagle3DraftModel:
        cfg: Eagle3TrainConfig = self.config
        head = Eagle3DraftModel.from_pretrained(cfg.init_from)
        hc, want = head.config, self.head_config
        if hc.vocab_size != vocab:
            raise ValueError(f"init_from {cfg.init_from!r} was trained for a vocabulary of {hc.vocab_size} tokens "
                             f"but the target has {vocab} (tokenizer/vocab mismatch)")
        if hc.draft_vocab_size != cfg.draft_vocab_size:
            raise ValueError(f"init_from {cfg.init_from!r} has draft_vocab_size {hc.draft_vocab_size} but the run "
                             f"asks for {cfg.draft_vocab_size}")
        for name in ("hidden_size", "fc_input_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            if getattr(hc, name) != getattr(want, name):
                raise ValueError(f"init_from {cfg.init_from!r} has {name}={getattr(hc, name)} but this target/run "
                                 f"needs {getattr(want, name)}")
        if hc.aux_layer_ids != want.aux_layer_ids:
            raise ValueError(f"init_from {cfg.init_from!r} reads aux layers {hc.aux_layer_ids} but this run uses "
                             f"{want.aux_layer_ids}")
        return head

    @torch.no_grad()
    def _target_init_tensors(self) -> dict[str, torch.Tensor]:
        """CPU copies of the target's LM-head rows of the draft vocab [Vd, H] and final-norm weight [H]."""
        from train import distributed as dist_utils

        head_w = cap.lm_head(self.target).weight
        norm_w = getattr(cap.final_norm(self.target), "weight", None)
        params = [p for p in (head_w, norm_w) if p is not None]
        if dist_utils.shards_target(self.accelerator, self.config):
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        else:
            import contextlib

            ctx = contextlib.nullcontext()
        with ctx:
            rows = head_w[self.vocab.target_ids.to(head_w.device)].float().cpu().clone()
            norm = norm_w.float().cpu().clone() if norm_w is not None else None
        return {"lm_head_rows": rows, "norm": norm}

    # -- model / data -----------------------------------------------------------------------------------
    def build_draft(self) -> Eagle3DraftModel:
        draft = Eagle3DraftModel(self.head_config)
        draft.set_draft_vocab(self.vocab)
        if self.init_head is not None:
            draft.load_state_dict(self.init_head.state_dict())
            self._print(f"head initialised from {self.config.init_from}")
        elif self._init_tensors is not None:
            t = self._init_tensors
            with torch.no_grad():
                done = []
                if tuple(t["lm_head_rows"].shape) == tuple(draft.lm_head.weight.shape):
                    draft.lm_head.weight.copy_(t["lm_head_rows"])
                    done.append("lm_head <- target LM-head rows")
                if t["norm"] is not None and tuple(t["norm"].shape) == tuple(draft.norm.weight.shape):
                    draft.norm.weight.copy_(t["norm"])
                    done.append("norm <- target final norm")
            self._print("head init: " + (", ".join(done) or "random (shapes differ from the target's)"))
        return draft

    def model(self) -> Eagle3TTTModel:
        if self._model is None:
            self._model = Eagle3TTTModel(self.build_draft(), self.config.ttt_steps, self.config.attention)
        return self._model

    def train_dataset(self):
        return self._train

    def eval_dataset(self):
        return self._eval or None

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        from train import chat_data

        batch = chat_data.collate(rows, self.pad_id)
        if all("row_id" in r for r in rows):
            batch["row_id"] = torch.tensor([int(r["row_id"]) for r in rows], dtype=torch.long)
        return batch

    # -- loss ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def target_pass(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, ttt.TTTTargets]:
        """Frozen target (or the cache) -> (features [B, S, 3H_t], token embeddings [B, S, H], teacher targets)."""
        ids, am = batch["input_ids"], batch["attention_mask"]
        rows = ttt.teacher_rows(batch["loss_mask"], am)
        row_ids = batch.get("row_id")
        keys = [int(r) for r in row_ids] if (self.cache is not None and row_ids is not None) else None
        if keys is not None and all(k in self.cache for k in keys):
            return self._from_cache(keys, ids.shape, rows)
        if self.features is not None:
            return self._from_feature_cache(batch, rows)
        c = cap.capture(self.target, ids, am, layers=self.capture_ids, logits=False, final_hidden=True)
        features = torch.cat([c.hidden_states[i] for i in self.aux_ids], dim=-1)
        embeds = c.hidden_states[0]
        parts = ttt.teacher_parts(cap.lm_head(self.target)(c.final_hidden[rows]), self.vocab)
        if keys is not None:
            lengths, counts = am.sum(1).tolist(), rows.sum(1).tolist()
            start = 0
            for b, key in enumerate(keys):
                sl = slice(start, start + counts[b])
                start += counts[b]
                self.cache[key] = (features[b, :lengths[b]].clone(), embeds[b, :lengths[b]].clone(),
                                   parts.logits_draft[sl].clone(), parts.logsumexp[sl].clone(), parts.top1[sl].clone())
        return features, embeds, ttt.targets_from_parts(parts, rows, self.vocab)

    def _from_feature_cache(self, batch: dict[str, torch.Tensor], rows: torch.Tensor):
        """Offline: cached aux/final hidden states, the target's embeddings and LM head (teacher rows only)."""
        ids = batch["input_ids"]
        if "row_id" not in batch:
            raise ValueError("features=offline batches need row_id (use Eagle3Task.collate)")
        cached = [self.features[int(r)] for r in batch["row_id"]]
        b, s = ids.shape
        aux = torch.zeros(b, s, cached[0]["aux_hidden"].shape[-1], dtype=cached[0]["aux_hidden"].dtype)
        final = torch.zeros(b, s, cached[0]["final_hidden"].shape[-1], dtype=cached[0]["final_hidden"].dtype)
        for i, row in enumerate(cached):
            n = min(s, row["aux_hidden"].shape[0], int(batch["attention_mask"][i].sum()))
            aux[i, :n], final[i, :n] = row["aux_hidden"][:n], row["final_hidden"][:n]
        aux, final = aux.to(ids.device), final.to(ids.device)
        embeds = self.target.get_input_embeddings()(ids)
        parts = ttt.teacher_parts(cap.lm_head(self.target)(final[rows]), self.vocab)
        return aux, embeds, ttt.targets_from_parts(parts, rows, self.vocab)

    def _from_cache(self, keys: list[int], shape, rows: torch.Tensor):
        entries = [self.cache[k] for k in keys]
        f0, e0 = entries[0][0], entries[0][1]
        features = f0.new_zeros(*shape, f0.shape[-1])
        embeds = e0.new_zeros(*shape, e0.shape[-1])
        for b, (f, e, *_rest) in enumerate(entries):
            features[b, : f.shape[0]] = f
            embeds[b, : e.shape[0]] = e
        parts = ttt.TeacherParts(*(torch.cat([ent[i] for ent in entries]) for i in (2, 3, 4)))
        return features, embeds, ttt.targets_from_parts(parts, rows, self.vocab)

    def loss(self, model, batch):
        features, embeds, targets = self.target_pass(batch)
        step_logits = model(features, embeds, targets.rows)
        return ttt.ttt_loss(step_logits, targets, self.vocab, self.config.step_weight)

    def derived_metrics(self, means: dict[str, float]) -> dict[str, float]:
        out = ttt.derived_metrics(means, self.config.ttt_steps)
        losses = [means.get(f"loss_{k}") for k in range(self.config.ttt_steps)]
        if all(v is not None for v in losses):
            out["ttt_loss"] = sum(self.config.step_weight ** k * v for k, v in enumerate(losses))
        return out

    # -- saving ---------------------------------------------------------------------------------------------
    def save_model(self, model, directory: pathlib.Path) -> None:
        from transformers.utils import logging as hf_logging

        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        draft = model.draft if isinstance(model, Eagle3TTTModel) else model
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            draft.save_pretrained(directory, safe_serialization=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        (directory / "draft_vocab.json").write_text(json.dumps(self.vocab_info, indent=2))


if __name__ == "__main__":
    main(Eagle3Task, Eagle3TrainConfig)
