"""Train early-exit verifier heads (HiSpec-style intermediate verifiers) on a frozen target.

    hsd-train train early-exit --config configs/early_exit/smollm2-135m.yaml [--resume] [key=value ...]
    python -m train.early_exit --config configs/early_exit/smollm2-135m.yaml [--resume] [key=value ...]
    accelerate launch --config_file configs/accelerate/gpu1.yaml -m train.early_exit --config ...

One frozen-target forward per batch (no grad; bf16 on GPU, fp32 on CPU) captures ``h_l`` for every
candidate exit layer (default L/8, L/4, 3L/8, L/2) and the final logits; one head per layer (all of the
same ``head_type``) trains in a single ``nn.Module`` (:class:`EarlyExitHeads`), so the shared loop
(train/loop.py: checkpoints, resume, DeepSpeed, wandb, progress) sees one model.

Loss, per layer, on positions whose *next* token is an assistant token (the positions at which the
verifier is consulted while a response is generated): soft cross-entropy (= forward KL up to a constant)
from the head's ``p_l = softmax(logits_l / T)`` to the target's ``p_f = softmax(logits_f / T)`` at the
serving temperature ``T``; the total is the mean over layers. With a reduced draft vocabulary the
teacher is ``p_f`` restricted to it and renormalised (as for EAGLE-3).

Metrics per layer ``l`` (logged as ``train/<name>`` and ``eval/<name>``; means over positions):
* ``alpha_L<l>``: expected acceptance ``sum_x min(p_f(x), p_l(x))`` (the real p_f, not renormalised);
* ``top1_L<l>``: argmax agreement with the target; ``kl_L<l>``: KL(p_f || p_l) (to the restricted,
  renormalised teacher when a draft vocabulary is used); ``ce_L<l>``: the loss term;
* eval only: ``lens_alpha_L<l>``, ``lens_top1_L<l>``, ``lens_kl_L<l>`` for the untrained logit lens on the
  same batches, so the gain is visible in every eval record;
* derived: ``alpha_mean`` (mean over layers), ``lens_alpha_mean``, ``alpha_gain`` (= difference).
``best_metric`` is ``eval/alpha_mean`` (max) or, with ``best_layer: l``, ``eval/alpha_L<l>``.

The lens baseline is also evaluated once at setup (before any training) and written to
``<output_dir>/lens_baseline.json``. Every saved model folder and checkpoint (``best/``, ``final/``,
``checkpoints/step_<n>/``) holds ``layer_<l>/`` (one ``EarlyExitHead.from_pretrained``-able folder per
layer), ``exit_metrics.json`` (per-layer lens vs trained metrics, from the metrics saved with it) and the
plot ``exit_quality.png``.

Residual-stream rule: the target is frozen and never inside the trainable module; every training step
re-checks that no target parameter requires grad and no adapter was injected into it, and every save
checks that the target's checksum is unchanged since setup (ResidualStreamError otherwise).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from hsd.config import run_main
from hsd.models import capture as cap
from hsd.models import packing, resolve
from hsd.models.early_exit import (
    EarlyExitConfig,
    EarlyExitHead,
    ResidualStreamError,
    assert_frozen_target,
    check_exit_layer,
    default_exit_layers,
    target_checksum,
)
from train import chat_data, common, draft_vocab, loop
from train import distributed as dist_utils
from train.config import BaseTrainConfig
from train.metrics import MetricSums

# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EarlyExitTrainConfig(BaseTrainConfig):
    """Run config of the early-exit trainer (BaseTrainConfig fields plus the head's)."""

    output_dir: str = "runs/early_exit"
    exit_layers: list[int] = dataclasses.field(default_factory=list)  # [] = L/8, L/4, 3L/8, L/2 (rounded)
    head_type: Literal["affine", "lowrank", "mlp", "attn", "layers"] = "affine"  # the lens baseline is always evaluated
    rank: int = 64  # lowrank only
    lora_alpha: float = 0.0  # lowrank scaling alpha / rank; 0 = rank (scaling 1)
    intermediate_size: int = 0  # mlp only; 0 = target hidden size
    attn_num_heads: int = 0  # attn only; 0 = the target's
    attn_num_kv_heads: int = 0  # attn only; 0 = the target's
    head_layers: int = 1  # layers only: k decoder layers, initialised from the target's last k
    temperature: float = 1.0  # serving temperature T of p_f and p_l (> 0)
    draft_vocab_size: int = 0  # 0 = full target vocabulary; else the V_d most frequent assistant tokens
    target_revision: str = ""  # recorded in the heads' configs
    best_layer: int = 0  # 0: best checkpoint by eval/alpha_mean; l: by eval/alpha_L<l>
    lens_baseline: bool = True  # evaluate the logit lens on the eval set at setup

    def validate(self) -> None:
        super().validate()
        if self.head_type == "lowrank" and self.rank <= 0:
            raise ValueError(f"rank must be > 0 for head_type lowrank, got {self.rank}")
        if not (self.temperature > 0 and self.temperature != float("inf")):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        bad = [x for x in self.exit_layers if x < 1]
        if bad:
            raise ValueError(f"exit_layers must be >= 1 (number of target layers run), got {bad}")
        if len(set(self.exit_layers)) != len(self.exit_layers):
            raise ValueError(f"exit_layers must not repeat a layer, got {self.exit_layers}")
        if self.head_layers < 1:
            raise ValueError(f"head_layers must be >= 1 (decoder layers of a layers head), got {self.head_layers}")
        for name in ("draft_vocab_size", "intermediate_size", "attn_num_heads", "attn_num_kv_heads", "best_layer"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lora_alpha < 0:
            raise ValueError(f"lora_alpha must be >= 0 (0 = rank), got {self.lora_alpha}")
        if self.best_layer and self.exit_layers and self.best_layer not in self.exit_layers:
            raise ValueError(f"best_layer {self.best_layer} is not one of exit_layers {self.exit_layers}")


# ----------------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------------


def next_token_positions(attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                         position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S] bool: positions t whose next token t+1 is a (real) assistant token (of t's own conversation,
    for packed rows with ``position_ids`` [B, S] restarting at 0 per conversation)."""
    sel = torch.zeros_like(loss_mask, dtype=torch.bool)
    sel[:, :-1] = loss_mask[:, 1:].bool() & attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    if position_ids is not None:
        sel[:, :-1] &= position_ids[:, 1:] > 0
    return sel


def exit_metrics(head_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float,
                 draft_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-position loss and quality of one exit: head_logits [N, V'] vs target_logits [N, V].

    Returns [N] float32 tensors: ``ce`` (soft CE to the teacher, differentiable), ``kl`` (KL(teacher || p_l)),
    ``alpha`` (sum_x min(p_f, p_l) with the true p_f), ``top1`` (argmax p_l == argmax p_f).
    V' = V, or V_d with ``draft_ids`` [V_d] (head column j is target id draft_ids[j]); then the teacher is
    p_f restricted to draft_ids and renormalised.
    """
    t = float(temperature)
    p_f = torch.softmax(target_logits.float() / t, dim=-1)
    logq = torch.log_softmax(head_logits.float() / t, dim=-1)
    q = logq.exp()
    p_on = p_f if draft_ids is None else p_f[:, draft_ids]
    teacher = p_on if draft_ids is None else p_on / p_on.sum(-1, keepdim=True).clamp_min(1e-30)
    ce = -(teacher * logq).sum(-1)
    with torch.no_grad():
        kl = (torch.xlogy(teacher, teacher) - teacher * logq).sum(-1)
        alpha = torch.minimum(p_on, q).sum(-1)
        pick = q.argmax(-1)
        if draft_ids is not None:
            pick = draft_ids[pick]
        top1 = (pick == p_f.argmax(-1)).float()
    return {"ce": ce, "kl": kl, "alpha": alpha, "top1": top1}


def summarise(means: dict[str, float], layers: Sequence[int]) -> dict[str, dict[str, dict[str, float]]]:
    """{str(l): {"lens": {alpha, top1, kl}, "trained": {alpha, top1, kl, ce}}} from un-prefixed means."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for layer in layers:
        row: dict[str, dict[str, float]] = {}
        for kind, prefix, names in (("lens", "lens_", ("alpha", "top1", "kl")),
                                    ("trained", "", ("alpha", "top1", "kl", "ce"))):
            vals = {n: means[f"{prefix}{n}_L{layer}"] for n in names if f"{prefix}{n}_L{layer}" in means}
            if vals:
                row[kind] = vals
        out[str(layer)] = row
    return out


def plot_exit_quality(path: pathlib.Path, summary: dict[str, dict[str, dict[str, float]]], title: str) -> None:
    """exit_quality.png: alpha and top-1 agreement per exit layer, lens (= before training) vs trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(int(k) for k in summary)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric, label in ((axes[0], "alpha", "expected acceptance α = Σ min(p_f, p_l)"),
                              (axes[1], "top1", "top-1 agreement with the target")):
        for kind, style, name in (("lens", "o--", "lens (before training)"), ("trained", "s-", "trained head")):
            pts = [(layer, summary[str(layer)][kind][metric]) for layer in layers
                   if metric in summary[str(layer)].get(kind, {})]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        ax.set_xlabel("exit layer l")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1)
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# The trainable module
# ----------------------------------------------------------------------------------------------------


class EarlyExitHeads(nn.Module):
    """One :class:`EarlyExitHead` per exit layer (``heads["layer_<l>"]``), trained together."""

    def __init__(self, heads: dict[int, EarlyExitHead]):
        super().__init__()
        self.layers = sorted(heads)
        self.heads = nn.ModuleDict({f"layer_{layer}": heads[layer] for layer in self.layers})

    def head(self, layer: int) -> EarlyExitHead:
        return self.heads[f"layer_{layer}"]

    def forward(self, hidden_states: Sequence[torch.Tensor], select: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """hidden_states: one [B, S, H] per layer (order of ``self.layers``); select [B, S] bool; packed rows:
        ``position_ids`` [B, S] (attention-bearing heads then attend block-diagonally per conversation).
        Returns one [N, V'] logits tensor per layer (N = select.sum())."""
        if len(hidden_states) != len(self.layers):
            raise ValueError(f"hidden_states: expected {len(self.layers)} tensors, got {len(hidden_states)}")
        mask = None if position_ids is None else packing.block_causal_mask(position_ids)
        return tuple(self.head(layer)(h, position_ids=position_ids, attention_mask=mask, select=select).logits
                     for layer, h in zip(self.layers, hidden_states))


# ----------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------


class EarlyExitTask(loop.TrainTask):
    """TrainTask for early-exit heads (see the module docstring)."""

    best_metric = "eval/alpha_mean"
    best_mode = "max"

    def __init__(self, config: EarlyExitTrainConfig):
        super().__init__(config)
        if config.best_layer:
            self.best_metric = f"eval/alpha_L{config.best_layer}"
        self._model: EarlyExitHeads | None = None
        self.lens_metrics: dict[str, float] = {}

    # -- setup ----------------------------------------------------------------------------------------
    def setup(self, accelerator) -> None:
        self.accelerator = accelerator
        conversations = common.load_conversations(self.config)  # a bad data file fails before the target loads
        self._setup_target()
        self._train, self._eval, self.data_stats = common.load_rows(
            self.config, self.tokenizer, common.vocab_size(self.target), self.print, conversations=conversations)
        self.conversations = self._train  # the draft vocabulary counts conversations, packed or not
        self._train, self._eval, self.packing_stats = common.pack_splits(self.config, self._train, self._eval,
                                                                         self.print)
        self._setup_vocab()
        self._lens = {layer: self._make_head(layer, "lens") for layer in self.layers}
        cfg = self.config
        self.print(f"early exit: target {cfg.target} ({cap.num_layers(self.target)} layers), exit layers "
                   f"{self.layers}, head {cfg.head_type}, {len(self._train)} train / {len(self._eval)} eval conversations")
        if cfg.lens_baseline and self._eval:
            self._setup_lens_baseline()

    def _setup_target(self) -> None:
        """Frozen target and the exit layers it has (and its checksum, to prove it never changes)."""
        cfg = self.config
        if dist_utils.shards_target(self.accelerator, cfg):
            raise ValueError("shard_target=true under ZeRO-3 is not supported by the early-exit trainer (the "
                             "heads call the target's final norm and LM head directly); set shard_target=false "
                             "(target replicated per GPU, heads sharded) or use ZeRO-2")
        self.target, self.tokenizer = common.load_target(cfg, self.accelerator)
        self.pad_id = resolve.pad_id_of(self.tokenizer)
        n = cap.num_layers(self.target)
        self.layers = sorted(cfg.exit_layers) if cfg.exit_layers else default_exit_layers(n)
        for layer in self.layers:
            check_exit_layer(layer, n)
        if cfg.best_layer and cfg.best_layer not in self.layers:
            raise ValueError(f"best_layer {cfg.best_layer} is not one of the exit layers {self.layers}")
        vocab = common.vocab_size(self.target)
        if cfg.draft_vocab_size > vocab:
            raise ValueError(f"draft_vocab_size {cfg.draft_vocab_size} exceeds the target vocab {vocab}")
        self.target_checksum = target_checksum(self.target)
        if cfg.packing:
            packing.check_packed_target(self.target, vocab)
        self.precision = common.precision_record(cfg, self.accelerator, next(self.target.parameters()).dtype)
        self.print(common.precision_line(self.precision))
        self.target_layer_params = common.linear_params(cap.decoder_layers(self.target))
        self._last_sel = 0

    def _setup_vocab(self) -> None:
        cfg, vocab = self.config, common.vocab_size(self.target)
        self.vocab = None
        if cfg.draft_vocab_size:
            self.vocab, coverage = draft_vocab.build_draft_vocab(self.conversations, vocab, cfg.draft_vocab_size)
            self.print(f"draft vocab: {cfg.draft_vocab_size} of {vocab} tokens, "
                       f"coverage {coverage:.4f} of assistant tokens")

    def _setup_lens_baseline(self) -> None:
        """The untrained lens on the eval set, before any training: printed and lens_baseline.json."""
        cfg = self.config
        self.lens_metrics = self._evaluate_lens()
        lines = ", ".join(f"L{layer}: α={self.lens_metrics[f'lens_alpha_L{layer}']:.4f} "
                          f"top1={self.lens_metrics[f'lens_top1_L{layer}']:.4f}" for layer in self.layers)
        self.print(f"lens baseline (before training, eval set): {lines}")
        if self.accelerator.is_main_process:
            out = pathlib.Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "lens_baseline.json").write_text(json.dumps(
                {"layers": self.layers, "metrics": self.lens_metrics,
                 "per_layer": summarise(self.lens_metrics, self.layers)}, indent=2))

    def _make_head(self, layer: int, head_type: str) -> EarlyExitHead:
        cfg = self.config
        hcfg = EarlyExitConfig.from_target(
            self.target, layer, head_type, rank=cfg.rank if head_type == "lowrank" else 0,
            lora_alpha=cfg.lora_alpha or None, intermediate_size=cfg.intermediate_size,
            training_temperature=cfg.temperature,
            draft_vocab_size=cfg.draft_vocab_size or None, base_model_name_or_path=cfg.target,
            base_model_revision=cfg.target_revision or None, num_attention_heads=cfg.attn_num_heads,
            num_key_value_heads=cfg.attn_num_kv_heads, num_head_layers=cfg.head_layers)
        head = EarlyExitHead(hcfg)
        if self.vocab is not None:
            head.set_draft_vocab(self.vocab)
        head = head.to(self.accelerator.device).attach_target(self.target)
        return head.init_from_target(self.target) if head_type == "layers" else head

    def model(self) -> EarlyExitHeads:
        if self._model is None:
            self._model = EarlyExitHeads({layer: self._make_head(layer, self.config.head_type)
                                          for layer in self.layers})
            for head in self._model.heads.values():
                assert_frozen_target(self.target, head.config.exit_layer, head=head)
        return self._model

    def train_dataset(self):
        return self._train

    def eval_dataset(self):
        return self._eval or None

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return chat_data.collate(rows, self.pad_id)

    # -- forward pieces ---------------------------------------------------------------------------------
    def _target_pass(self, batch: dict[str, torch.Tensor]):
        """Frozen target: (h_l per exit layer [B, S, H], select [B, S], target logits at select [N, V])."""
        ids, am, pos = batch["input_ids"], batch["attention_mask"], batch.get("position_ids")
        sel = next_token_positions(am, batch["loss_mask"], pos)
        with common.target_pass_context(ids.device), torch.no_grad():
            c = cap.capture(self.target, ids, layers=self.layers, logits=False, final_hidden=True,
                            **packing.target_inputs(am, pos))
            target_logits = cap.output_logits(self.target, c.final_hidden[sel])
        return [c.hidden_states[layer] for layer in self.layers], sel, target_logits

    def _draft_ids(self, device) -> torch.Tensor | None:
        return None if self.vocab is None else self.vocab.target_ids.to(device)

    def _evaluate_lens(self) -> dict[str, float]:
        """Lens metrics over the whole eval set (this rank's shard, reduced over ranks)."""
        acc, bs = self.accelerator, self.config.batch_size
        idx = dist_utils.shard_indices(len(self._eval), acc.process_index, acc.num_processes, seed=None, drop_tail=False)
        sums = MetricSums()
        for i in range(0, len(idx), bs):
            batch = {k: v.to(acc.device) for k, v in self.collate([self._eval[j] for j in idx[i:i + bs]]).items()}
            with torch.no_grad():
                hidden, sel, target_logits = self._target_pass(batch)
                sums.add_metrics(self._lens_pairs(hidden, sel, target_logits))
        return sums.reduce(acc)

    def _lens_pairs(self, hidden, sel, target_logits) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        n = torch.tensor(float(target_logits.shape[0]))
        out = {}
        for layer, h in zip(self.layers, hidden):
            m = exit_metrics(self._lens[layer](h, select=sel).logits, target_logits, self.config.temperature,
                             self._draft_ids(h.device))
            for name in ("alpha", "top1", "kl"):
                out[f"lens_{name}_L{layer}"] = (m[name].sum(), n)
        return out

    def loss(self, model, batch):
        if model.training:
            # Residual-stream rule, every step: frozen, unadapted target (cheap: flags only).
            assert_frozen_target(self.target, max(self.layers))
        hidden, sel, target_logits = self._target_pass(batch)
        self._last_sel = int(sel.sum())
        logits = model(hidden, sel, batch.get("position_ids"))
        n_pos = target_logits.shape[0]
        n = torch.tensor(float(n_pos), device=target_logits.device)
        draft_ids = self._draft_ids(target_logits.device)
        total = 0.0
        metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        ce_sum = torch.zeros((), device=target_logits.device)
        for layer, lg in zip(self.layers, logits):
            m = exit_metrics(lg, target_logits, self.config.temperature, draft_ids)
            total = total + m["ce"].sum() / max(n_pos, 1)
            ce_sum = ce_sum + m["ce"].detach().sum()
            for name in ("ce", "kl", "alpha", "top1"):
                metrics[f"{name}_L{layer}"] = (m[name].detach().sum(), n)
        loss = total / len(self.layers)
        if not model.training:
            # eval/loss exactly position-weighted (the loop adds its own per-batch `loss` during training).
            metrics["loss"] = (ce_sum / len(self.layers), n)
            with torch.no_grad():
                metrics.update(self._lens_pairs(hidden, sel, target_logits))
        return loss, metrics

    def compute_dtype(self) -> torch.dtype:
        return common.compute_dtype(self.precision)

    def flops(self, batch: dict[str, torch.Tensor]) -> float:
        """Matmul FLOPs of the last training ``loss`` (linear layers; attention scores left out): the target
        forward over the real tokens plus its LM head on the selected rows, and per head its body's forward +
        backward (3x; every real token for ``attn``, the selected rows otherwise) and the borrowed LM head on
        the selected rows (forward + input gradient: 2x)."""
        tokens, sel = float(batch["attention_mask"].sum()), float(self._last_sel)
        tc = self.target.config
        vocab = self.config.draft_vocab_size or int(tc.vocab_size)
        out = 2.0 * (self.target_layer_params * tokens + int(tc.hidden_size) * int(tc.vocab_size) * sel)
        for head in self._model.heads.values() if self._model is not None else ():
            rows = tokens if head.config.head_type == "attn" else sel
            out += 3.0 * 2.0 * common.linear_params(head.body) * rows + 2.0 * 2.0 * int(tc.hidden_size) * vocab * sel
        return out

    def derived_metrics(self, means: dict[str, float]) -> dict[str, float]:
        out = {}
        alphas = [means[f"alpha_L{layer}"] for layer in self.layers if f"alpha_L{layer}" in means]
        if len(alphas) == len(self.layers):
            out["alpha_mean"] = sum(alphas) / len(alphas)
        lens = [means[f"lens_alpha_L{layer}"] for layer in self.layers if f"lens_alpha_L{layer}" in means]
        if len(lens) == len(self.layers):
            out["lens_alpha_mean"] = sum(lens) / len(lens)
            if "alpha_mean" in out:
                out["alpha_gain"] = out["alpha_mean"] - out["lens_alpha_mean"]
        return out

    # -- saving -------------------------------------------------------------------------------------------
    def check_target_unchanged(self) -> None:
        """ResidualStreamError if the target's weights changed since setup (or it became trainable)."""
        assert_frozen_target(self.target, max(self.layers))
        now = target_checksum(self.target)
        if now != self.target_checksum:
            raise ResidualStreamError("the target's weights changed during training (checksum mismatch): the "
                                      "target must stay frozen; its layers-1..l states are reused by the final pass")

    def _summary(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Per-layer lens vs trained numbers from logged metrics (eval preferred, else train)."""
        means = {k[len("eval/"):]: v for k, v in metrics.items() if k.startswith("eval/")}
        source = "eval"
        if not any(k.startswith("alpha_L") for k in means):
            means = {k[len("train/"):]: v for k, v in metrics.items() if k.startswith("train/")}
            source = "train"
        means = {**{k: v for k, v in self.lens_metrics.items() if k not in means}, **means}
        cfg = self.config
        return {"target": cfg.target, "target_revision": cfg.target_revision or None, "head_type": cfg.head_type,
                "exit_layers": self.layers, "temperature": cfg.temperature,
                "draft_vocab_size": cfg.draft_vocab_size or None, "step": metrics.get("step"),
                "metrics_from": source, "alpha_mean": means.get("alpha_mean"),
                "lens_alpha_mean": means.get("lens_alpha_mean"),
                "per_layer": summarise(means, self.layers)}

    def save_model(self, model, directory: pathlib.Path) -> None:
        self.check_target_unchanged()
        for layer in model.layers:
            common.save_pretrained_quietly(model.head(layer), pathlib.Path(directory) / f"layer_{layer}")
            common.write_precision(pathlib.Path(directory) / f"layer_{layer}", self.precision)
        common.write_precision(directory, self.precision)

    def on_save(self, directory: pathlib.Path, metrics: dict) -> None:
        summary = self._summary(metrics)
        directory = pathlib.Path(directory)
        (directory / "exit_metrics.json").write_text(json.dumps(summary, indent=2))
        step = metrics.get("step")
        plot_exit_quality(directory / "exit_quality.png", summary["per_layer"],
                          f"{self.config.target}: {self.config.head_type} heads, step {step} "
                          f"({summary['metrics_from']} metrics), T={self.config.temperature}")


def main(argv: Sequence[str] | None = None) -> dict:
    """`--config path.yaml [--resume] [--overwrite] [key=value ...]` (see the module docstring)."""
    return loop.main(EarlyExitTask, EarlyExitTrainConfig, argv)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
