"""Train an EAGLE-3 draft head on a frozen target (online: the target runs in the training process).

    hsd-train train eagle3 --config configs/eagle3/smollm2-135m.yaml [--resume] [key=value ...]
    python -m train.eagle3 --config configs/eagle3/smollm2-135m.yaml [--resume] [key=value ...]
    accelerate launch [--config_file configs/accelerate/<x>.yaml] -m train.eagle3 --config configs/eagle3/<run>.yaml

Per batch: one frozen-target forward captures the token embeddings (hidden-state index 0), the three
aux hidden states ``eagle_aux_hidden_state_layer_ids`` (default ``[2, N//2, N-3]``) and the final hidden
state; the target's LM head runs only on the rows whose next token is an assistant token (the teacher
rows). The head then unrolls ``ttt_steps`` training-time-test steps (train/ttt.py documents alignment,
attention, loss and metrics). ``best/`` is chosen on held-out ``eval/sim_accept_len`` (max).

Set-up (every rank), in order: the data files read and checked (train.common.load_conversations, so a bad
file fails before the target loads); the target + tokenizer (train.common.load_target; fp32 on CPU, bf16 on
GPU unless ``target_dtype``) and the head config from it (``Eagle3Config.from_target``); the
conversations (train.common.load_rows: chat template, assistant mask, truncate/drop counted, seeded
eval split); the draft vocabulary from the *training* split's assistant tokens (train.draft_vocab;
coverage printed and written to ``<output_dir>/draft_vocab.json`` and next to every saved head).
``init_from_target`` starts ``lm_head`` from the target's LM-head rows of the draft vocabulary and
``norm`` from its final norm (much faster early training); ``init_from`` warm-starts from a saved head
(its vocabulary is kept).

``cache_target: true`` keeps, per conversation, the target's outputs (features, embeddings and the compact
teacher: draft-vocab logits, full-vocab logsumexp and argmax) in memory after the conversation's first
pass, so later epochs and evaluations skip the target: exact (same dtype), for small single-machine runs
(the CPU config). Memory ~ tokens * 16 * H_t bytes (fp32) + assistant tokens * 4 * Vd bytes. Not with a
ZeRO-3-sharded target (its ranks must run every forward together).

Feature source (``features``): ``online`` (default; the target runs every batch) or ``offline``: read the
aux and final hidden states from ``feature_cache_dir`` written by ``scripts/cache_hidden_states.py``
(train.feature_cache); the target is still loaded, for its token embeddings and its LM head (teacher
logits from the cached final hidden state). The cache's rows are the data (``data`` is not read); its
meta must match the target (vocabulary, tokenizer size, hidden size, layer count) and the aux ids.

Bad input raises ValueError before any training: aux ids that are not portable (exactly 3, strictly ascending,
2 <= id <= N-1: ``hsd.export.layout.check_aux_ids``; vLLM or SGLang would capture other layers or none), a
tokenizer larger than
the target vocabulary or data ids outside it, ``draft_vocab_size`` > target vocab, an ``init_from`` head
for another vocabulary/shape, data without conversations or assistant turns (train.chat_data).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hsd.config import run_main
from hsd.export.layout import check_aux_ids
from hsd.models import capture as cap
from hsd.models import packing, resolve
from hsd.models.eagle3 import Eagle3Config, Eagle3DraftModel, default_aux_layer_ids
from train import chat_data, common, draft_vocab, loop, ttt
from train import distributed as dist_utils
from train.config import BaseTrainConfig
from train.feature_cache import FeatureCache, collate_features


@dataclasses.dataclass
class Eagle3TrainConfig(BaseTrainConfig):
    """Run config of the EAGLE-3 trainer (BaseTrainConfig fields plus the head's and TTT's)."""

    output_dir: str = "runs/eagle3"
    lr: float = 1e-4
    ttt_steps: int = 7  # K unrolled draft steps
    step_weight: float = 0.8  # gamma: loss weight of step k is gamma**k
    draft_vocab_size: int = 32000  # Vd most frequent assistant tokens (must be <= target vocab)
    aux_layer_ids: list[int] = dataclasses.field(default_factory=list)  # [] = [2, N//2, N-3] (HF indices)
    attention: Literal["auto", "sdpa", "reference"] = "auto"  # fastest per device; same numbers (train/ttt.py)
    init_from_target: bool = True  # lm_head <- target LM-head rows of the draft vocab, norm <- final norm
    init_from: str = ""  # folder of a saved head to warm-start from (weights and draft vocabulary)
    intermediate_size: int = 0  # head MLP size; 0 = the target's
    cache_target: bool = False  # keep each conversation's target outputs in RAM after its first pass
    features: Literal["online", "offline"] = "online"  # offline: read feature_cache_dir (scripts/cache_hidden_states.py)
    feature_cache_dir: str = ""
    target_revision: str = ""  # recorded in draft_vocab.json for provenance

    # Neither changes the numbers (attention paths agree to float rounding; the cache is exact).
    resume_mutable: ClassVar[frozenset[str]] = BaseTrainConfig.resume_mutable | {"attention", "cache_target"}

    def validate(self) -> None:
        super().validate()
        if self.ttt_steps < 1:
            raise ValueError(f"ttt_steps must be >= 1, got {self.ttt_steps}")
        if not self.step_weight > 0:
            raise ValueError(f"step_weight must be > 0, got {self.step_weight}")
        if self.draft_vocab_size < 1:
            raise ValueError(f"draft_vocab_size must be >= 1, got {self.draft_vocab_size}")
        if self.aux_layer_ids:  # the rules that need no target (exactly 3, ascending, >= 2); [] = the default
            check_aux_ids(self.aux_layer_ids)
        if self.features == "offline" and not self.feature_cache_dir:
            raise ValueError("features=offline needs feature_cache_dir (written by scripts/cache_hidden_states.py)")
        if self.features == "offline" and self.cache_target:
            raise ValueError("cache_target is for features=online (offline features are already cached)")
        if self.features == "offline" and self.packing:
            raise ValueError("packing=true is for features=online (a feature cache holds one conversation per row); "
                             "set packing=false")
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

    def forward(self, features: torch.Tensor, embeds: torch.Tensor, rows: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """-> per-step draft logits [N_k, Vd] at ``ttt.step_rows(rows, k, position_ids)`` (packed rows:
        ``position_ids`` [B, S])."""
        return ttt.ttt_unroll(self.draft, features, embeds, rows, self.steps, self.attention,
                              position_ids=position_ids)


class Eagle3Task(loop.TrainTask):
    """TrainTask for EAGLE-3 heads (see the module docstring)."""

    best_metric = "eval/sim_accept_len"
    best_mode = "max"

    def __init__(self, config: Eagle3TrainConfig):
        super().__init__(config)
        self._model: Eagle3TTTModel | None = None
        self.vocab_info: dict[str, Any] = {}
        self._conversations = None  # cfg.data, read before the target (setup) and rendered after it

    # -- set-up -----------------------------------------------------------------------------------------
    def setup(self, accelerator) -> None:
        self.accelerator = accelerator
        # data first: a bad file is reported before the target loads (offline: the cache's rows are the data)
        self._conversations = common.load_conversations(self.config) if self.config.features != "offline" else None
        self._setup_target()
        self._setup_rows()
        self._setup_vocab()

    def _setup_target(self) -> None:
        """Target, tokenizer, feature source and the head config (aux ids checked against the target)."""
        cfg: Eagle3TrainConfig = self.config
        self.target, self.tokenizer = common.load_target(cfg, self.accelerator)
        self.pad_id = resolve.pad_id_of(self.tokenizer)
        vocab = common.vocab_size(self.target)
        if cfg.draft_vocab_size > vocab:
            raise ValueError(f"draft_vocab_size ({cfg.draft_vocab_size}) is larger than the target vocabulary "
                             f"({vocab})")
        aux_ids = list(cfg.aux_layer_ids) or None
        self.features = None
        if cfg.features == "offline":
            self.features = FeatureCache(cfg.feature_cache_dir, dtype=common.target_dtype(cfg))
            aux_ids = self._check_feature_cache(self.features.meta, aux_ids)
        overrides = {"intermediate_size": cfg.intermediate_size} if cfg.intermediate_size else {}
        n_layers = cap.num_layers(self.target)  # portable ids (the same layers in vLLM and SGLang), before any data work
        check_aux_ids(aux_ids or default_aux_layer_ids(n_layers), n_layers)
        self.head_config = Eagle3Config.from_target(self.target.config, cfg.draft_vocab_size, aux_ids, **overrides)
        self.aux_ids = self.head_config.aux_layer_ids
        self.capture_ids = list(self.aux_ids)
        self.init_head = self._load_init_head(vocab) if cfg.init_from else None
        if cfg.cache_target and dist_utils.shards_target(self.accelerator, cfg):
            raise ValueError("cache_target=true cannot be used with a ZeRO-3-sharded target (shard_target=true): "
                             "every rank must run each target forward together")
        self.cache: dict[int, tuple] | None = {} if cfg.cache_target else None
        if cfg.packing:
            packing.check_packed_target(self.target, vocab)
        if self.features is not None:
            store = str(self.features.meta.get("dtype", "float32"))
            feature_dtype = store if store in ("bfloat16", "float16") else self.features.meta.get("compute_dtype", store)
        else:
            feature_dtype = next(self.target.parameters()).dtype
        self.precision = common.precision_record(cfg, self.accelerator, feature_dtype)
        self.print(common.precision_line(self.precision))
        self.target_layer_params = common.linear_params(cap.decoder_layers(self.target))
        self.target_ran, self._last_rows = False, 0

    def _setup_rows(self) -> None:
        cfg: Eagle3TrainConfig = self.config
        rows, stats = (None, None)
        if self.features is not None:  # the cache's rows are the data
            rows, stats = self.features.token_rows(cfg.max_length, cfg.overflow)
        self._train, self._eval, self.data_stats = common.load_rows(
            cfg, self.tokenizer, common.vocab_size(self.target), self.print, rows, stats, self._conversations)
        self._conversations = None  # rendered into rows; not kept
        self.conversations = self._train  # the draft vocabulary counts conversations, packed or not
        self._train, self._eval, self.packing_stats = common.pack_splits(cfg, self._train, self._eval, self.print)

    def _setup_vocab(self) -> None:
        """Draft vocabulary (from the training split, or the warm-start head's) and draft_vocab.json."""
        cfg: Eagle3TrainConfig = self.config
        vocab = common.vocab_size(self.target)
        if self.init_head is not None:
            self.vocab = self.init_head.draft_vocab.to("cpu")
            coverage = draft_vocab.coverage(draft_vocab.token_counts(self.conversations, vocab), self.vocab)
        else:
            self.vocab, coverage = draft_vocab.build_draft_vocab(self.conversations, vocab, cfg.draft_vocab_size)
        self.vocab_info = {
            "target": cfg.target, "target_revision": cfg.target_revision or None, "target_vocab_size": vocab,
            "draft_vocab_size": self.vocab.size, "coverage": coverage,
            "coverage_of": "assistant tokens of the training split",
            "aux_layer_ids": self.aux_ids,
            "aux_layer_ids_convention": "Hugging Face output_hidden_states indices = vLLM 'capture before layer j'",
            "ttt_steps": cfg.ttt_steps, "step_weight": cfg.step_weight,
            "data": list(cfg.data) if self.features is None else f"feature cache {cfg.feature_cache_dir}",
            "data_stats": dict(self.data_stats),
            "packing": dict(self.packing_stats) or None,
        }
        self.print(f"draft vocab: {self.vocab.size} of {vocab} tokens, coverage {coverage:.4f} of assistant "
                   f"tokens; aux layers {self.aux_ids} of {cap.num_layers(self.target)}")
        if self.accelerator.is_main_process:
            out = pathlib.Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "draft_vocab.json").write_text(json.dumps(self.vocab_info, indent=2))

    def _check_feature_cache(self, meta: dict, aux_ids: list[int] | None) -> list[int]:
        """ValueError unless the offline cache was written for this target/tokenizer; returns the aux ids."""
        cfg: Eagle3TrainConfig = self.config
        tc = self.target.config
        tc = tc.get_text_config() if hasattr(tc, "get_text_config") else tc
        where = f"feature cache {cfg.feature_cache_dir!r} (target {meta.get('target')!r})"
        facts = {"vocab_size": int(tc.vocab_size), "hidden_size": int(tc.hidden_size),
                 "num_target_layers": cap.num_layers(self.target), "tokenizer_size": len(self.tokenizer)}
        for key, want in facts.items():
            if key in meta and int(meta[key]) != want:
                raise ValueError(f"{where} has {key}={meta[key]} but target {cfg.target!r} has {want} "
                                 "(tokenizer/vocab or model mismatch)")
        layers = [int(i) for i in meta["layers"]]
        if aux_ids is not None and list(aux_ids) != layers:
            raise ValueError(f"aux_layer_ids {list(aux_ids)} differ from the layers {layers} stored in {where}")
        if str(meta.get("target")) != str(cfg.target):
            self.print(f"note: {where} names another target string than {cfg.target!r}; sizes match")
        return layers

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

    # -- model / data -----------------------------------------------------------------------------------
    def model(self) -> Eagle3TTTModel:
        if self._model is None:
            cfg: Eagle3TrainConfig = self.config
            draft = Eagle3DraftModel(self.head_config).set_draft_vocab(self.vocab)
            if self.init_head is not None:
                draft.load_state_dict(self.init_head.state_dict())
                self.print(f"head initialised from {cfg.init_from}")
            elif cfg.init_from_target:
                done = self._init_from_target(draft)
                names = {"lm_head": "lm_head <- target LM-head rows", "norm": "norm <- target final norm"}
                self.print("head init: " + (", ".join(names[n] for n in done)
                                            or "random (shapes differ from the target's)"))
            self._model = Eagle3TTTModel(draft, cfg.ttt_steps, cfg.attention)
        return self._model

    def _init_from_target(self, draft: Eagle3DraftModel) -> list[str]:
        """``draft.init_from_target`` with the target's LM head and final norm (gathered under ZeRO-3
        sharding: every rank calls this)."""
        head_w = cap.lm_head(self.target).weight
        norm_w = getattr(cap.final_norm(self.target), "weight", None)
        gather = contextlib.nullcontext()
        if dist_utils.shards_target(self.accelerator, self.config):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p for p in (head_w, norm_w) if p is not None],
                                                       modifier_rank=None)
        with gather:
            return draft.init_from_target(head_w, norm_w)

    def train_dataset(self):
        return self._train

    def eval_dataset(self):
        return self._eval or None

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = chat_data.collate(rows, self.pad_id)
        if all("row_id" in r for r in rows):
            batch["row_id"] = torch.tensor([int(r["row_id"]) for r in rows], dtype=torch.long)
        return batch

    # -- loss ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def target_pass(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, ttt.TTTTargets]:
        """Frozen target (or a cache) -> (features [B, S, 3H_t], token embeddings [B, S, H], teacher targets)."""
        ids, am, pos = batch["input_ids"], batch["attention_mask"], batch.get("position_ids")
        rows = ttt.teacher_rows(batch["loss_mask"], am, pos)
        row_ids = batch.get("row_id")
        keys = [int(r) for r in row_ids] if (self.cache is not None and row_ids is not None) else None
        self.target_ran = False
        if keys is not None and all(k in self.cache for k in keys):
            return self._from_cache(keys, ids.shape, rows, pos)
        if self.features is not None:
            return self._from_feature_cache(batch, rows)
        self.target_ran = True
        with common.target_pass_context(ids.device):
            c = cap.capture(self.target, ids, layers=self.capture_ids, logits=False, final_hidden=True,
                            **packing.target_inputs(am, pos))
            features = torch.cat([c.hidden_states[i] for i in self.aux_ids], dim=-1)
            embeds = self.token_embeddings(ids)
            parts = ttt.teacher_parts(cap.output_logits(self.target, c.final_hidden[rows]), self.vocab)
        if keys is not None:
            lengths, counts = am.sum(1).tolist(), rows.sum(1).tolist()
            start = 0
            for b, key in enumerate(keys):
                sl = slice(start, start + counts[b])
                start += counts[b]
                self.cache[key] = (features[b, :lengths[b]].clone(), embeds[b, :lengths[b]].clone(),
                                   parts.logits_draft[sl].clone(), parts.logsumexp[sl].clone(), parts.top1[sl].clone())
        return features, embeds, ttt.targets_from_parts(parts, rows, self.vocab, pos)

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, S] -> the head's token inputs [B, S, H]: a plain lookup in the target's embedding matrix, as
        the head computes them when it decodes (``Eagle3DraftModel.embed``) and as vLLM / SGLang do. Not the
        embedding *module*'s output, which some families scale (Gemma 3's scaled word embedding); a head
        trained on scaled inputs would be served unscaled ones."""
        return F.embedding(ids, self.target.get_input_embeddings().weight)

    def _from_feature_cache(self, batch: dict[str, torch.Tensor], rows: torch.Tensor):
        """Offline: cached aux/final hidden states, the target's embeddings and LM head (teacher rows only)."""
        ids = batch["input_ids"]
        if "row_id" not in batch:
            raise ValueError("features=offline batches need row_id (use Eagle3Task.collate)")
        cached = collate_features([self.features[int(r)] for r in batch["row_id"]], self.pad_id)
        s = ids.shape[1]  # cached rows are whole conversations; the batch holds at most max_length of each
        aux, final = cached["aux_hidden"][:, :s].to(ids.device), cached["final_hidden"][:, :s].to(ids.device)
        with common.target_pass_context(ids.device):
            embeds = self.token_embeddings(ids)
            parts = ttt.teacher_parts(cap.output_logits(self.target, final[rows]), self.vocab)
        return aux, embeds, ttt.targets_from_parts(parts, rows, self.vocab)

    def _from_cache(self, keys: list[int], shape, rows: torch.Tensor, pos: torch.Tensor | None):
        entries = [self.cache[k] for k in keys]
        f0, e0 = entries[0][0], entries[0][1]
        features = f0.new_zeros(*shape, f0.shape[-1])
        embeds = e0.new_zeros(*shape, e0.shape[-1])
        for b, (f, e, *_rest) in enumerate(entries):
            features[b, : f.shape[0]] = f
            embeds[b, : e.shape[0]] = e
        parts = ttt.TeacherParts(*(torch.cat([ent[i] for ent in entries]) for i in (2, 3, 4)))
        return features, embeds, ttt.targets_from_parts(parts, rows, self.vocab, pos)

    def compute_dtype(self) -> torch.dtype:
        return common.compute_dtype(self.precision)

    def flops(self, batch: dict[str, torch.Tensor]) -> float:
        """Matmul FLOPs of the last training ``loss`` (linear layers; attention scores left out): the target
        forward over the real tokens and its LM head on the teacher rows when the target ran (not when a
        cache served the batch), and the head's forward + backward (3x forward): ``fc`` on every real token,
        the layer K times, its LM head on the scored rows of each step (at most the teacher rows)."""
        tokens, rows = float(batch["attention_mask"].sum()), float(self._last_rows)
        c = self.head_config
        out = 0.0
        if self.target_ran:
            out += 2.0 * (self.target_layer_params * tokens + c.hidden_size * c.vocab_size * rows)
        layer = (c.hidden_size * 2 * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
                 + c.num_attention_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
        head = c.fc_input_size * c.hidden_size * tokens + self.config.ttt_steps * (
            layer * tokens + c.hidden_size * c.draft_vocab_size * rows)
        return out + 3.0 * 2.0 * head

    def loss(self, model, batch):
        features, embeds, targets = self.target_pass(batch)
        self._last_rows = int(targets.rows.sum())
        step_logits = model(features, embeds, targets.rows, targets.positions)
        return ttt.ttt_loss(step_logits, targets, self.vocab, self.config.step_weight)

    def derived_metrics(self, means: dict[str, float]) -> dict[str, float]:
        out = ttt.derived_metrics(means, self.config.ttt_steps)
        losses = [means.get(f"loss_{k}") for k in range(self.config.ttt_steps)]
        if all(v is not None for v in losses):
            out["ttt_loss"] = sum(self.config.step_weight ** k * v for k, v in enumerate(losses))
        return out

    # -- saving ---------------------------------------------------------------------------------------------
    def save_model(self, model, directory: pathlib.Path) -> None:
        draft = model.draft if isinstance(model, Eagle3TTTModel) else model
        common.save_pretrained_quietly(draft, directory)
        (pathlib.Path(directory) / "draft_vocab.json").write_text(json.dumps(self.vocab_info, indent=2))
        common.write_precision(directory, self.precision)


def main(argv: Sequence[str] | None = None) -> dict:
    """`--config path.yaml [--resume] [--overwrite] [key=value ...]` (see the module docstring)."""
    return loop.main(Eagle3Task, Eagle3TrainConfig, argv)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
