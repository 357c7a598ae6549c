"""The main job: train an EAGLE-3 head and early-exit heads, export, decode, write report.md.

    hsd-train quickstart --output-dir runs/quickstart/smollm2-135m [--config configs/quickstart/smollm2-135m.yaml]
        [--estimate-only] [key=value ...]

Each step is an existing command, called here as a library function with the arguments printed in
``report.md`` (so every step can be rerun alone):

1. ``hsd-train train eagle3 --config ... --resume output_dir=DIR/eagle3``
2. ``hsd-train train early-exit --config ... --resume output_dir=DIR/early_exit``
3. ``hsd-train export DIR/eagle3/final --out DIR/export/eagle3`` (validated inside the exporter)
4. ``hsd-train decode --head DIR/export/eagle3 --exit-head DIR/early_exit/final --out-dir DIR/decode ...``
5. ``DIR/report.md`` from ``DIR/decode/decode.json`` and the decode plots; ``DIR/main_job.log`` holds the
   lines the job itself printed (not the stages' logs or progress bars).

``python scripts/readme_results.py DIR`` copies that log and the report's results table into README.md
between its ``main-job`` markers (``update_readme``), so the README's numbers are generated, not typed.

Running it again reuses what is finished: a training stage whose ``final/`` was written with the same
config is not retrained (an interrupted one resumes from its last checkpoint), the export is kept when the
head did not change, and the decode run continues with ``--resume`` (finished configurations are loaded).
Sizes live in ``configs/quickstart/*.yaml`` (typed and validated like every run config; unknown keys are
refused). ``trees`` adds draft-tree configurations; ``decode_extra_args`` goes to the decode command unchanged.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsd.config import config_diff, config_to_dict, load_config, program_name
from hsd.decode.config import DecodeConfig

DEFAULT_CONFIG = "configs/quickstart/smollm2-135m.yaml"
# keys that may differ between a finished run's saved config and this one without making it a different run
_REUSE_IGNORED = frozenset({"output_dir", "log_every", "eval_every", "save_every", "keep_last", "report_to",
                            "run_name", "resume", "overwrite", "wandb_project", "attention", "cache_target"})


@dataclass
class QuickstartConfig:
    """Sizes of the main job (``configs/quickstart/smollm2-135m.yaml``)."""

    output_dir: str = "runs/quickstart/smollm2-135m"
    eagle3_config: str = "configs/eagle3/smollm2-135m.yaml"
    eagle3_overrides: list[str] = field(default_factory=list)
    early_exit_config: str = "configs/early_exit/smollm2-135m.yaml"
    early_exit_overrides: list[str] = field(default_factory=list)
    export_dtype: str = "bfloat16"
    prompts: list[str] = field(default_factory=lambda: ["data/prompts_eval.jsonl"])
    num_prompts: int = 3  # spread over the sources (hsd.decode.cli.select_prompts); 0 = all
    max_new_tokens: int = 48
    temperatures: list[float] = field(default_factory=lambda: [0.0, 1.0])
    k: list[int] = field(default_factory=lambda: [3])
    methods: list[str] = field(default_factory=lambda: ["tokenwise", "hsd"])
    trees: list[str] = field(default_factory=list)  # draft trees "TOPK:DEPTH:TOTAL" decoded next to the chains
    exit_drafters: list[int] = field(default_factory=list)  # exit layers to draft from (--drafter exit:L)
    exit_draft_k: int = 0  # draft length of the exit drafters (0 = each of k; else --drafter exit:L:K)
    exit_stage: bool = True  # decode EAGLE-3 chains with the exit stage too (False: --no-exit-stage)
    decode_extra_args: list[str] = field(default_factory=list)
    threads: int = 1
    # EAGLE-3 data size by the precision training runs in here (hsd.precision decides what auto means): the
    # first N conversations of the eagle3 config's data (0 = the config's own max_conversations)
    eagle3_conversations: int = 0
    eagle3_conversations_bf16: int = 0
    eagle3_seconds_per_step: float = 4.2  # measured per optimizer step of the eagle3 config, fp32 training
    eagle3_seconds_per_step_bf16: float = 0.0  # the same with bf16 features + autocast (0: use the fp32 figure)
    early_exit_seconds_per_step: float = 2.5
    decode_tokens_per_s: float = 10.0
    setup_seconds: float = 30.0  # per training stage: target load, data, end-of-run evaluation
    # The costs and sizes above were measured on a machine whose fp32 matmul peak (hsd.precision.matmul_peak_flops,
    # `threads` threads) was reference_gflops. > 0: the job measures this machine's peak once (pinned in
    # <output_dir>/speed.json, so reruns size alike), divides the costs by the speed ratio and scales the EAGLE-3
    # conversations by it (within 0.5x..2x). 0: the figures are used as they are.
    reference_gflops: float = 0.0
    # > 0: the EAGLE-3 data size is also capped so that the whole job's estimate (at the measured speed) stays
    # within this many minutes: on a slow or busy machine the fixed stages (decoding, early exit) take a larger share
    budget_minutes: float = 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not self.output_dir:
            raise ValueError("output_dir must not be empty")
        if self.export_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"export_dtype must be bfloat16, float16 or float32, got {self.export_dtype!r}")
        if any(layer < 1 for layer in self.exit_drafters):
            raise ValueError(f"exit_drafters must list exit layers >= 1, got {self.exit_drafters}")
        if self.exit_draft_k < 0:
            raise ValueError(f"exit_draft_k must be >= 0 (0 = each of k), got {self.exit_draft_k}")
        for name in ("num_prompts", "threads", "eagle3_conversations", "eagle3_conversations_bf16",
                     "eagle3_seconds_per_step_bf16", "reference_gflops", "budget_minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.k or min(self.k) < 1:
            raise ValueError(f"k must list draft lengths >= 1, got {self.k}")
        if not self.temperatures or min(self.temperatures) < 0:
            raise ValueError(f"temperatures must list values >= 0, got {self.temperatures}")
        bad = [m for m in self.methods if m not in ("tokenwise", "blockwise", "hsd")]
        if bad or not self.methods:
            raise ValueError(f"methods must list verifiers among tokenwise, blockwise, hsd, got {self.methods}")
        from hsd.decode.tree_spec import TreeSpec

        for tree in self.trees:
            try:
                TreeSpec.parse(tree)
            except ValueError as err:
                raise ValueError(f"trees: {err}") from None
        if self.setup_seconds < 0:
            raise ValueError(f"setup_seconds must be >= 0, got {self.setup_seconds}")
        for name in ("eagle3_seconds_per_step", "early_exit_seconds_per_step", "decode_tokens_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass
class Stage:
    """One training stage: the trainer's ``main``, its config class and the argv that runs it."""

    name: str  # "eagle3" | "early_exit"
    command: str  # hsd-train words
    main: Callable[[Sequence[str] | None], Any]
    config_cls: type
    config_path: str
    overrides: list[str]

    @property
    def argv(self) -> list[str]:
        return ["--config", self.config_path, "--resume", *self.overrides]

    def load(self) -> Any:
        """The stage's validated run config (bad keys fail here, before anything runs)."""
        return load_config(self.config_cls, self.config_path, self.overrides)

    def shell(self) -> str:
        return f"hsd-train {self.command} " + shlex.join(self.argv)


@dataclass
class TrainingPrecision:
    """How the EAGLE-3 stage trains on this machine (the trainer's own decision, made here first to size it)."""

    feature_dtype: str  # the target's dtype: "float32" / "bfloat16" / "float16"
    mixed_precision: str  # the head's autocast: "no" / "bf16" / "fp16"
    bf16: bool  # any of them bf16: the bf16 size and cost figures apply
    why: str  # one line: the measured decision behind "auto"


def training_precision(cfg: Any) -> TrainingPrecision:
    """What ``target_dtype`` and ``mixed_precision`` of a trainer config mean on this machine (``auto``: the
    measured decision of hsd.precision, the same call the trainer makes)."""
    import torch

    from hsd.precision import bf16_speedup, precision_probe
    from train import common
    from train.distributed import resolve_mixed_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    feature = common.dtype_name(common.target_dtype(cfg))
    mixed = resolve_mixed_precision(cfg, warn=lambda _msg: None)
    probe, ratio = precision_probe(device), bf16_speedup(device)
    measured = f"bf16 matmuls measured {ratio:.2f}x fp32 speed" if ratio is not None else ""
    reason = probe.reason if probe.batch_speedup is None else ""  # an override or a GPU says so; else the ratio
    why = f"auto = {probe.dtype} on {probe.hardware}: " + "; ".join(p for p in (reason, measured) if p)
    return TrainingPrecision(feature, mixed, "bfloat16" in (feature, {"bf16": "bfloat16"}.get(mixed)), why)


SPEED_RANGE = (0.5, 2.0)  # how far the measured speed may move the EAGLE-3 data size


@dataclass
class MachineSpeed:
    """This machine's fp32 matmul peak against the one the config's costs were measured on."""

    gflops: float | None  # measured here (None: no reference configured, nothing measured)
    reference_gflops: float
    ratio: float  # gflops / reference, clipped to SPEED_RANGE (1.0 without a reference)
    pinned: bool = False  # read back from speed.json (an earlier run of this job)

    def line(self) -> str:
        if self.gflops is None:
            return "speed: costs and data size as configured (no reference_gflops)"
        return (f"speed: this machine's fp32 matmul peak {self.gflops:.1f} GFLOP/s, {self.ratio:.2f}x the "
                f"{self.reference_gflops:.1f} GFLOP/s the costs were measured at"
                + (" (pinned by the first run: speed.json)" if self.pinned else "")
                + "; costs and the EAGLE-3 data size scaled by it")


def speed_ratio(gflops: float, reference_gflops: float) -> float:
    """gflops / reference, clipped to :data:`SPEED_RANGE`."""
    lo, hi = SPEED_RANGE
    return min(hi, max(lo, gflops / reference_gflops))


def machine_speed(qc: QuickstartConfig, out: Path) -> MachineSpeed:
    """Measure (or read back from ``out/speed.json``) this machine's speed against ``qc.reference_gflops``."""
    if not qc.reference_gflops:
        return MachineSpeed(None, 0.0, 1.0)
    pinned = out / "speed.json"
    if pinned.is_file():
        rec = json.loads(pinned.read_text())
        if rec.get("reference_gflops") == qc.reference_gflops:
            return MachineSpeed(rec["gflops"], qc.reference_gflops, speed_ratio(rec["gflops"], qc.reference_gflops),
                                pinned=True)
    import torch

    from hsd.precision import matmul_peak_flops

    # a 1 s budget: the best of ~25 large matmuls (a 0.25 s one swings 49-78 GFLOP/s on one CPU, this 71-78)
    gflops = matmul_peak_flops("cuda" if torch.cuda.is_available() else "cpu", torch.float32, budget_s=1.0) / 1e9
    return MachineSpeed(gflops, qc.reference_gflops, speed_ratio(gflops, qc.reference_gflops))


def pin_speed(speed: MachineSpeed, out: Path) -> None:
    """Record the measured speed so that reruns of the job size (and so reuse) alike."""
    if speed.gflops is not None and not speed.pinned:
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.json").write_text(json.dumps({"gflops": speed.gflops,
                                                    "reference_gflops": speed.reference_gflops}) + "\n")


def eagle3_step_seconds(qc: QuickstartConfig, bf16: bool) -> float:
    """The configured cost of one EAGLE-3 step in the precision it trains in here (at the reference speed)."""
    return qc.eagle3_seconds_per_step_bf16 if bf16 and qc.eagle3_seconds_per_step_bf16 else qc.eagle3_seconds_per_step


def eagle3_size_overrides(qc: QuickstartConfig, bf16: bool, speed: float = 1.0) -> list[str]:
    """``max_conversations=N`` for the EAGLE-3 stage by precision and measured speed (none when the quickstart
    leaves it 0)."""
    n = qc.eagle3_conversations_bf16 if bf16 and qc.eagle3_conversations_bf16 else qc.eagle3_conversations
    return [f"max_conversations={max(1, round(n * speed))}"] if n else []


def budget_conversations(qc: QuickstartConfig, n: int, steps: int, est: dict[str, float], bf16: bool,
                         speed: float) -> int | None:
    """The most EAGLE-3 conversations whose whole-job estimate fits ``qc.budget_minutes``: ``n`` conversations
    plan ``steps`` steps, the steps scale with the conversations, ``est`` is the estimate per stage at this
    ``speed``. None when no budget is set or nothing is known to scale."""
    if not qc.budget_minutes or not n or not steps:
        return None
    fixed = sum(v for k, v in est.items() if k != "eagle3") + (qc.setup_seconds if est.get("eagle3") else 0.0)
    seconds_per_conversation = steps / n * eagle3_step_seconds(qc, bf16) / speed
    return max(1, math.floor((60 * qc.budget_minutes - fixed) / seconds_per_conversation))


def training_stages(qc: QuickstartConfig, out: Path, eagle3_sizing: Sequence[str] = ()) -> list[Stage]:
    """The two training stages, writing under ``out/eagle3`` and ``out/early_exit``; ``eagle3_sizing``
    (``eagle3_size_overrides``) goes before the config's own ``eagle3_overrides``, which win."""
    from train import eagle3, early_exit

    return [Stage("eagle3", "train eagle3", eagle3.main, eagle3.Eagle3TrainConfig, qc.eagle3_config,
                  [*eagle3_sizing, *qc.eagle3_overrides, f"output_dir={out / 'eagle3'}"]),
            Stage("early_exit", "train early-exit", early_exit.main, early_exit.EarlyExitTrainConfig,
                  qc.early_exit_config, [*qc.early_exit_overrides, f"output_dir={out / 'early_exit'}"])]


def finished_run(cfg: Any) -> bool:
    """True when ``cfg.output_dir/final`` was written by a run of this same config (same steps too).

    A finished run of another config is refused (ValueError) rather than silently reused or replaced."""
    saved_path = Path(cfg.output_dir) / "final" / "config.yaml"
    if not saved_path.is_file():
        return False
    import yaml

    saved = yaml.safe_load(saved_path.read_text()) or {}
    diff = config_diff(saved, config_to_dict(cfg), ignore=_REUSE_IGNORED)
    if not diff:
        return True
    if set(diff) <= {"max_steps", "num_epochs"}:
        return False  # more (or fewer) steps asked: the trainer resumes from the last checkpoint
    lines = "; ".join(f"{k}: saved {a!r} != now {b!r}" for k, (a, b) in sorted(diff.items()))
    raise ValueError(f"{cfg.output_dir} holds a finished run of another config ({lines}); use another "
                     "--output-dir or delete that folder")


_PLANNED: dict[str, int] = {}  # planned_steps per config content (packing tokenizes the whole data set)


def planned_steps(cfg: Any) -> int:
    """Optimizer steps a run config asks for: max_steps, else epochs x batches of its training rows (its data
    files' rows, the first max_conversations of them; with packing the packed rows, counted exactly by
    tokenizing and packing them as the trainer will). Remembered per config content within the process."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    key = json.dumps(config_to_dict(cfg), sort_keys=True, default=str)
    if key not in _PLANNED:
        _PLANNED[key] = _count_steps(cfg)
    return _PLANNED[key]


def _count_steps(cfg: Any) -> int:
    if getattr(cfg, "packing", False):
        train_rows = len(_packed_train_rows(cfg))
    else:
        rows = 0
        for name in cfg.data:
            path = Path(name)
            rows += sum(1 for line in path.open(encoding="utf-8") if line.strip()) if path.is_file() else 0
        if getattr(cfg, "max_conversations", 0):
            rows = min(rows, cfg.max_conversations)
        train_rows = rows - math.ceil(rows * cfg.eval_fraction)
    return cfg.num_epochs * max(1, train_rows // (cfg.batch_size * cfg.grad_accum))


def _packed_train_rows(cfg: Any) -> list[dict]:
    """The packed training rows the trainer will build from ``cfg`` (tokenizer only, no weights)."""
    from hsd.models import resolve
    from train import common

    tok = resolve.load_tokenizer(cfg.target)
    train, held_out, _ = common.load_rows(cfg, tok, len(tok), say=lambda _msg: None)
    return common.pack_splits(cfg, train, held_out, say=lambda _msg: None)[0]


def decode_configurations(qc: QuickstartConfig, exit_layers: int) -> int:
    """Configurations the decode grid holds (as ``hsd.decode.evaluate.build_grid`` builds it; exit drafters
    counted alone, the three-level ones under deeper stages are not: a bound for the estimate)."""
    n = 0
    stages = exit_layers if qc.exit_stage else 0
    for t in qc.temperatures:
        meths = 1 if t == 0 else len(qc.methods)
        drafters = len(qc.exit_drafters) * (1 if qc.exit_draft_k else len(qc.k))
        n += 2 + len(qc.k) * (2 + meths * (1 + stages)) + meths * drafters  # generate, ar; per K lookup x2,
        # head (+ exit stages); exit drafters
        tree_meths = 1 if t == 0 else len({m == "tokenwise" for m in qc.methods})  # rrs / weighted
        n += len(qc.trees) * tree_meths
    return n


def estimate_seconds(qc: QuickstartConfig, stages: list[Stage], cfgs: list[Any], reused: list[bool],
                     bf16: bool = False, speed: float = 1.0) -> dict[str, float]:
    """Seconds per stage, from the configured steps and the measured per-step costs of the config (the EAGLE-3
    cost of the precision it trains in here), divided by this machine's measured ``speed`` ratio."""
    rate = {"eagle3": eagle3_step_seconds(qc, bf16) / speed, "early_exit": qc.early_exit_seconds_per_step / speed}
    est = {s.name: 0.0 if done else qc.setup_seconds + planned_steps(c) * rate[s.name]
           for s, c, done in zip(stages, cfgs, reused)}
    layers = len(getattr(cfgs[1], "exit_layers", []) or [4])
    prompts = qc.num_prompts or 50
    est["export"] = 20.0
    est["decode"] = 30.0 + decode_configurations(qc, layers) * prompts * qc.max_new_tokens / (qc.decode_tokens_per_s
                                                                                              * speed)
    return est


def run_stage(stage: Stage, cfg: Any) -> tuple[bool, dict]:
    """Train (or resume) unless finished; returns (reused, final metrics)."""
    final = Path(cfg.output_dir) / "final"
    reused = finished_run(cfg)
    if not reused:
        stage.main(stage.argv)
    metrics_path = final / "metrics.json"
    return reused, json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}


def export_stage(head: Path, out: Path, dtype: str, target: str, reuse: bool) -> tuple[bool, list[str]]:
    """Export and validate the EAGLE-3 head into ``out`` (kept when ``reuse`` and already there)."""
    record = out.parent / "validation.json"
    if reuse and (out / "config.json").is_file() and record.is_file():
        return True, json.loads(record.read_text())["checks"]
    from hsd.export import export_head

    result = export_head(head, out, dtype=dtype, target=target, overwrite=True)
    checks = list(result.report.checks)
    record.write_text(json.dumps({"folder": str(result.folder), "checks": checks, "notes": list(result.report.notes)},
                                 indent=1))
    return False, checks


def decode_argv(qc: QuickstartConfig, target: str, head: Path, exit_head: Path, out: Path) -> list[str]:
    """Arguments of ``hsd-train decode`` for the main job's grid (+ ``decode_extra_args``)."""
    argv = ["--target", target, "--head", str(head), "--exit-head", str(exit_head), "--prompts", *qc.prompts,
            "--num-prompts", str(qc.num_prompts), "--max-new-tokens", str(qc.max_new_tokens),
            "--temperature", *map(str, qc.temperatures), "--k", *map(str, qc.k), "--method", *qc.methods,
            "--out-dir", str(out)]
    if qc.trees:
        argv += ["--tree", *qc.trees]
    if qc.exit_drafters:
        sfx = f":{qc.exit_draft_k}" if qc.exit_draft_k else ""
        argv += ["--drafter", *[f"exit:{layer}{sfx}" for layer in qc.exit_drafters]]
    if not qc.exit_stage:
        argv += ["--no-exit-stage"]
    if qc.threads:
        argv += ["--threads", str(qc.threads)]
    return argv + list(qc.decode_extra_args)


def _same_decode_run(out: Path, argv: list[str]) -> bool:
    """True when ``out`` holds a (finished or interrupted) decode run of these same arguments."""
    from hsd.decode import cli as decode_cli

    try:
        decode_cli.load_partial(out, decode_cli.build_parser().parse_args(argv))
    except (ValueError, OSError):
        return False
    return True


def decode_stage(argv: list[str], out: Path, resume: bool) -> tuple[bool, dict]:
    """Run the decode command, continuing a finished or interrupted run of the same arguments when ``resume``;
    returns (continued, the decode JSON)."""
    from hsd.decode import cli as decode_cli

    continued = resume and _same_decode_run(out, argv)
    if continued:
        argv = [*argv, "--resume"]
    elif out.exists():
        shutil.rmtree(out)  # measured with an older head or other arguments: start over
    if decode_cli.main(argv) != 0:
        raise ValueError(f"decode failed (arguments: {shlex.join(argv)})")
    return continued, json.loads((out / "decode.json").read_text())


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


RESULTS_HEADING = "## Results (generated from decode/decode.json)"  # report.md; readme_block finds the table by it


def results_table(entries: list[dict]) -> list[str]:
    """Markdown rows, one per decode configuration, from ``decode.json``'s ``runs``."""
    rows = ["| configuration | T | K / tree | verifier | exit layer | τ | tok/s | × HF generate | exact match (T=0) "
            "| = HF generate (T=0) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        if e.get("tree"):  # the verify_tree method the run's method maps to (greedy / rrs / weighted)
            verifier = DecodeConfig(temperature=e["temperature"], method=e["method"], tree=e["tree"]).tree_method
        else:
            verifier = e.get("method") if e.get("kind") == "engine" and e.get("k") else ""
        rows.append(f"| `{e['name']}` | {e['temperature']:g} | {e.get('tree') or e.get('k') or ''} | {verifier or ''} | "
                    f"{e.get('exit_layer') or ''} | {_fmt(e.get('tau'))} | {_fmt(e.get('tokens_per_s_macro'), '.1f')} | "
                    f"{_fmt(e.get('speedup_vs_generate'))} | {_fmt(e.get('exact_match'))} | "
                    f"{_fmt(e.get('exact_match_vs_generate'))} |")
    return rows


def best_head_entry(entries: list[dict], temperature: float) -> dict | None:
    """The EAGLE-3 chain (without the exit stage) with the highest τ at ``temperature``."""
    heads = [e for e in entries if e["name"].split("/")[-1].startswith("eagle3") and e["temperature"] == temperature
             and not e.get("exit_layer")]
    return max(heads, key=lambda e: e.get("tau") or 0.0, default=None)


def headline_lines(decode: dict) -> list[str]:
    """The report's first lines: the measured speed-up against HF generate in the same precision, and which
    precision decoded and why (``decode.json``'s meta; the machine is the report's ``MACHINE_PREFIX`` line)."""
    entries = decode["runs"]
    prec = decode.get("meta", {}).get("precision") or {}
    out = []
    for temp in sorted({e["temperature"] for e in entries}):
        best = max((e for e in entries if e["temperature"] == temp and e.get("kind") == "engine"
                    and e.get("speedup_vs_generate")), key=lambda e: e["speedup_vs_generate"], default=None)
        if best:
            out.append(f"**T = {temp:g}: x{best['speedup_vs_generate']:.2f} vs HF generate** ({best['name']}, "
                       f"{best['tokens_per_s_macro']:.1f} tok/s; HF generate in the same precision, "
                       f"{prec.get('hf_generate', '?')})")
    if prec:
        tile = prec.get("row_tile")
        out.append(f"Precision: decode {prec.get('decode')} ({(prec.get('decision') or {}).get('reason')}); row tile "
                   + (f"{tile} (greedy speculative = plain greedy bit for bit)" if tile else "off")
                   + f"; the head was trained on {prec.get('head_features', 'unknown')} target features"
                   + (" (differs from the decode precision)" if prec.get("head_features_differ") else "") + ".")
    return out  # the machine line follows (write_report, MACHINE_PREFIX)


def best_exit(decode: dict) -> dict | None:
    """The exit configuration (planner ``exit`` rows) with the largest measured speed-up against the run
    without it, or None when none ran."""
    rows = [r for r in (decode.get("planner") or {}).get("exit", []) if r.get("measured_speedup_vs_baseline")]
    return max(rows, key=lambda r: r["measured_speedup_vs_baseline"], default=None)


def exit_line(decode: dict) -> str:
    """One line: the best exit configuration with its numbers, or why the exit stage is left out."""
    r = best_exit(decode)
    if r is None:
        return "early exit: no exit configuration was decoded (no exit head / exit layer in the grid)"
    need = r.get("breakeven_agreement")
    need_s = f"{need:.3f}" if need is not None else "unreachable"
    nums = (f"{r['name']} x{r['measured_speedup_vs_baseline']:.2f} vs {r['baseline']} (predicted "
            f"x{r['predicted_speedup_vs_baseline'] or float('nan'):.2f}), agreement {r['achieved_agreement']:.3f}, "
            f"break-even {need_s}")
    if r["measured_speedup_vs_baseline"] > 1.0:
        return f"early exit: best {nums}"
    return f"early exit: left out (no exit configuration beats the run without it); best {nums}"


def exit_table(decode: dict) -> list[str]:
    """Markdown rows, one per exit configuration: the run it must beat, speed-up predicted / measured, the
    agreement reached and the agreement it needs to break even (planner arithmetic, measured costs)."""
    rows = (decode.get("planner") or {}).get("exit", [])
    if not rows:
        return []
    out = ["| exit configuration | kind | against | × predicted | × measured | agreement | break-even |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['kind']} | {r['baseline']} | {_fmt(r.get('predicted_speedup_vs_baseline'))} | "
                   f"{_fmt(r.get('measured_speedup_vs_baseline'))} | {_fmt(r.get('achieved_agreement'), '.3f')} | "
                   f"{_fmt(r.get('breakeven_agreement'), '.3f') or 'unreachable'} |")
    return out


def summary_lines(entries: list[dict], export_dir: Path, head_dir: Path, report: Path) -> list[str]:
    """The five lines printed at the end: τ, speed-up, where the head is, how to push it, the report."""
    g, s = best_head_entry(entries, 0.0), best_head_entry(entries, 1.0)
    tau = ", ".join(f"T={e['temperature']:g} {e['name'].split('/')[-1]} τ {e['tau']:.2f}" for e in (g, s) if e)
    fast = max(entries, key=lambda e: e.get("speedup_vs_generate") or 0.0, default=None)
    speed = (f"{fast['name']} x{fast['speedup_vs_generate']:.2f} vs HF generate "
             f"({fast['tokens_per_s_macro']:.1f} tok/s)" if fast and fast.get("speedup_vs_generate") else "n/a")
    head_speed = ", ".join(f"{e['name']} x{e['speedup_vs_generate']:.2f}" for e in (g, s)
                           if e and e.get("speedup_vs_generate"))
    return [f"tau (tokens per target pass) of the head: {tau or 'n/a'}",
            f"speed-up vs HF generate: head {head_speed or 'n/a'}; fastest configuration {speed}",
            f"head: {export_dir} (validated, Hub layout; trained head in {head_dir})",
            f"push: hsd-train export {head_dir} --out {export_dir} --overwrite --push-to-hub REPO_ID",
            f"report: {report}"]


def precision_lines(tp: TrainingPrecision, cfg: Any, qc: QuickstartConfig) -> list[str]:
    """What the EAGLE-3 stage trains in and on, and why (printed by the job and written to its report)."""
    n = cfg.max_conversations
    other = qc.eagle3_conversations if tp.bf16 else qc.eagle3_conversations_bf16
    data = (f"the first {n} conversations of {', '.join(map(str, cfg.data))}" if n
            else f"all of {', '.join(map(str, cfg.data))}")
    size_why = ("the bf16 size: bf16 is fast here" if tp.bf16 and qc.eagle3_conversations_bf16
                else "the fp32 size: bf16 is not faster here" if qc.eagle3_conversations_bf16 else "the config's size")
    pack = f", packed into rows of <= {cfg.max_length} tokens" if getattr(cfg, "packing", False) else ""
    return [f"precision: EAGLE-3 trains on {tp.feature_dtype} target features with head autocast "
            f"{tp.mixed_precision} (target_dtype={cfg.target_dtype}, mixed_precision={cfg.mixed_precision}; {tp.why})",
            f"data: EAGLE-3 trains on {data}{pack} ({size_why}"
            + (f"; {other} on a machine where the other precision applies" if other and other != n else "") + ")"]


def training_lines(metrics: dict[str, dict]) -> list[str]:
    """One line per training stage with its held-out headline metrics (acceptance, accuracy, alpha)."""
    keep = ("acc_0", "accept", "alpha_mean", "top1_")
    out = []
    for stage, m in metrics.items():
        shown = {k: v for k, v in m.items() if k.startswith("eval/") and any(w in k for w in keep)}
        out.append(f"- {stage} (step {m.get('step')}): " + (", ".join(f"{k[5:]} {v:.3f}" for k, v in shown.items()
                                                                      if isinstance(v, (int, float))) or "no eval"))
    return out


MACHINE_PREFIX = "Machine: "  # report.md's machine line (hsd.machine.machine_line); readme_block copies it


def write_report(path: Path, decode: dict, commands: dict[str, str], artefacts: dict[str, Path],
                 stage_notes: dict[str, str], checks: list[str], metrics: dict[str, dict], machine: str = "",
                 training_notes: Sequence[str] = ()) -> None:
    """``report.md``: the machine, results table, plots, the command of each step, where every artefact is."""
    entries = decode["runs"]
    meta = decode.get("meta", {})
    plots = sorted(path.parent.glob("decode/*.png"))
    lines = ["# Main job report", "", *[ln + "  " for ln in headline_lines(decode)], "",
             f"Target `{meta.get('target')}`, prompts {meta.get('prompts')}, {meta.get('max_new_tokens')} new tokens, "
             f"{meta.get('torch_threads')} torch thread(s), started {meta.get('started')}, "
             f"finished {meta.get('finished')}.", "",
             *([MACHINE_PREFIX + machine, ""] if machine else []),
             RESULTS_HEADING, "", *results_table(entries), "",
             "τ = tokens emitted per target pass; T = 0 rows use greedy verification and must reproduce "
             "`generate()` exactly (exact match 1.00).", ""]
    if decode.get("exit_agreement"):
        lines += ["Exit heads on the target's greedy outputs: " + ", ".join(
            f"layer {k}: top-1 {v['top1_agreement']:.3f}, alpha(T=1) {v['alpha_T1']:.3f}"
            for k, v in decode["exit_agreement"].items()), ""]
    if exit_table(decode):
        lines += ["## Early exit", "", exit_line(decode), "", *exit_table(decode), "",
                  "Speed-ups are decode time per token (stage clock) against the run without the exit configuration; "
                  "break-even = the agreement at which the planner's model of this configuration, with its measured "
                  "costs, matches that run's measured speed.", ""]
    if plots:
        lines += ["## Plots", "", *[f"![{p.stem}](decode/{p.name})" for p in plots], ""]
    lines += ["## Training (held-out metrics at the end of each run)", "",
              *[f"- {note}" for note in training_notes], *training_lines(metrics), "",
              "## Steps (each its own command)", ""]
    for name, cmd in commands.items():
        lines += [f"{name} ({stage_notes.get(name, 'ran')}):", "", "```", cmd, "```", ""]
    lines += ["## Export validation", "", *[f"- ok {c}" for c in checks], "", "## Artefacts", "",
              *[f"- {k}: `{v}`" for k, v in artefacts.items()], ""]
    path.write_text("\n".join(lines))


def job_machine_line(cfg: Any) -> str:
    """Where the job runs (``hsd.machine.machine_line``), with the training precision ``cfg.target_dtype``
    resolves to here (``auto`` is measured once per process by ``hsd.precision`` and reused by the stages)."""
    import torch

    from hsd.machine import machine_info, machine_line
    from hsd.models.resolve import parse_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return machine_line(machine_info(device, parse_dtype(cfg.target_dtype, device)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program_name(), description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"quickstart YAML (default {DEFAULT_CONFIG})")
    p.add_argument("--output-dir", help="where everything goes (default: the config's output_dir)")
    p.add_argument("--estimate-only", action="store_true", help="print the plan and the time estimate, run nothing")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the quickstart config")
    return p


def _say(msg: str, printed: list[str]) -> None:
    """Print one line of the job's own output and keep it for DIR/main_job.log."""
    print(msg, flush=True)
    printed.append(msg)


README_BEGIN = "<!-- main-job:begin"
README_END = "<!-- main-job:end -->"


def readme_block(out: Path) -> list[str]:
    """The README's generated block: what the main job in ``out`` printed and its report's results table."""
    log, report = out / "main_job.log", out / "report.md"
    for f in (log, report):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: run the main job (make run / hsd-train quickstart) first")
    lines = report.read_text().splitlines()
    header = next((ln for ln in lines if ln.startswith("Target ")), "")
    machine = next((ln for ln in lines if ln.startswith(MACHINE_PREFIX)), None)
    try:
        start = lines.index(RESULTS_HEADING) + 2
    except ValueError:
        raise ValueError(f"{report} has no results section (not a main-job report?)") from None
    stop = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [f"{README_BEGIN} (generated by `python scripts/readme_results.py {out}`; do not edit) -->",
            "", "What the main job printed (its own lines; the stages' logs and progress bars left out):", "", "```text",
            *log.read_text().splitlines(), "```", "", f"Its results ({report}): {header}", "",
            *([machine, ""] if machine else []), *lines[start:stop], "", README_END]


def update_readme(out: Path, readme: Path = Path("README.md")) -> None:
    """Replace the block between the ``main-job`` markers in ``readme`` with ``readme_block(out)``."""
    block, text = readme_block(out), readme.read_text().splitlines()
    begin = [i for i, ln in enumerate(text) if ln.startswith(README_BEGIN)]
    end = [i for i, ln in enumerate(text) if ln == README_END]
    if len(begin) != 1 or len(end) != 1 or end[0] < begin[0]:
        raise ValueError(f"{readme} needs exactly one '{README_BEGIN} ... -->' line followed by one "
                         f"'{README_END}' line")
    new = text[:begin[0]] + block + text[end[0] + 1:]
    readme.write_text("\n".join(new) + "\n")


def readme_main(argv: Sequence[str] | None = None) -> int:
    """``scripts/readme_results.py OUT [--readme README.md]``."""
    p = argparse.ArgumentParser(prog="readme_results.py", description=update_readme.__doc__)
    p.add_argument("out", type=Path, help="the main job's output folder (holds report.md and main_job.log)")
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    args = p.parse_args(argv)
    update_readme(args.out, args.readme)
    print(f"updated {args.readme} from {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the main job (see the module docstring); bad input raises ValueError (one line via run_main)."""
    args = build_parser().parse_args(argv)
    printed: list[str] = []
    say = functools.partial(_say, printed=printed)
    overrides = [*args.overrides, *([f"output_dir={args.output_dir}"] if args.output_dir else [])]
    qc = load_config(QuickstartConfig, args.config, overrides)
    out = Path(qc.output_dir)
    if qc.threads:  # before any measurement: the speed and precision probes run with the threads training uses
        import torch

        torch.set_num_threads(qc.threads)
    plain = training_stages(qc, out)[0].load()  # the EAGLE-3 config before sizing: its precision settings
    tp = training_precision(plain)
    speed = machine_speed(qc, out)
    stages = training_stages(qc, out, eagle3_size_overrides(qc, tp.bf16, speed.ratio))
    cfgs = [s.load() for s in stages]  # every config checked before anything runs
    n = cfgs[0].max_conversations
    # the budget cap: from the whole plan as if nothing were finished (a rerun, with the speed pinned, sizes alike)
    fresh = estimate_seconds(qc, stages, cfgs, [False] * len(stages), tp.bf16, speed.ratio)
    cap = budget_conversations(qc, n, planned_steps(cfgs[0]), fresh, tp.bf16, speed.ratio)
    capped = cap is not None and cap < n  # the fixed stages take more of the budget on a slow or busy machine
    if capped:
        stages = training_stages(qc, out, [f"max_conversations={cap}"])
        cfgs = [s.load() for s in stages]
    for name in qc.prompts:
        if not Path(name).is_file():
            raise FileNotFoundError(f"prompt file not found: {name!r}")
    reused = [finished_run(c) for c in cfgs]
    est = estimate_seconds(qc, stages, cfgs, reused, tp.bf16, speed.ratio)
    notes_precision = [*precision_lines(tp, cfgs[0], qc),
                       speed.line() + (f"; capped at {cap} conversations to fit the {qc.budget_minutes:g}-minute budget"
                                       if capped else "")]
    say(f"main job -> {out}; estimated {sum(est.values()) / 60:.1f} min on this CPU ("
         + ", ".join(f"{k} {v / 60:.1f}" + (" (finished: reused)" if v == 0 else "") for k, v in est.items())
         + "; from the configured steps x measured costs in " + args.config + ")")
    machine = job_machine_line(cfgs[0])
    say(f"machine: {machine}")
    for line in notes_precision:
        say(line)
    if args.estimate_only:
        return 0
    pin_speed(speed, out)
    out.mkdir(parents=True, exist_ok=True)
    t0, notes, commands, metrics = time.perf_counter(), {}, {}, {}
    for i, (stage, cfg) in enumerate(zip(stages, cfgs), 1):
        say(f"[{i}/5] {stage.shell()}")
        was_reused, metrics[stage.name] = run_stage(stage, cfg)
        notes[f"{i}. train {stage.name}"] = "reused: finished earlier" if was_reused else "trained"
        commands[f"{i}. train {stage.name}"] = stage.shell()
        say(f"      {'reused finished run' if was_reused else 'trained'}: {cfg.output_dir}/final "
             f"({time.perf_counter() - t0:.0f} s elapsed)")
    head, exits, export_dir = out / "eagle3" / "final", out / "early_exit" / "final", out / "export" / "eagle3"
    commands["3. export"] = (f"hsd-train export {head} --out {export_dir} --dtype {qc.export_dtype} "
                             f"--target {cfgs[0].target} --overwrite")
    say(f"[3/5] {commands['3. export']}")
    export_reused, checks = export_stage(head, export_dir, qc.export_dtype, cfgs[0].target, reuse=reused[0])
    notes["3. export"] = "reused: head unchanged" if export_reused else "exported and validated"
    say(f"      {notes['3. export']}: {export_dir} ({len(checks)} checks passed)")
    dargv = decode_argv(qc, cfgs[0].target, export_dir, exits, out / "decode")
    commands["4. decode"] = "hsd-train decode " + shlex.join(dargv)
    say(f"[4/5] {commands['4. decode']}")
    continued, decode = decode_stage(dargv, out / "decode", resume=all(reused) and export_reused)
    notes["4. decode"] = "continued (finished configurations reused)" if continued else "ran"
    for line in headline_lines(decode)[-3:]:
        if line.startswith(("Precision", "Machine")):
            say(f"      {line}")
    report = out / "report.md"
    whole = ["--config", args.config, "--output-dir", str(out), *args.overrides]
    commands["5. report (the whole job)"] = "hsd-train quickstart " + shlex.join(whole)
    notes["5. report (the whole job)"] = "reruns reuse every finished step"
    artefacts = {"EAGLE-3 head (trained)": head, "EAGLE-3 head (exported, Hub layout)": export_dir,
                 "early-exit heads": exits, "export validation": out / "export" / "validation.json",
                 "decode JSON": out / "decode" / "decode.json", "decode answers": out / "decode" / "answers",
                 "training logs": out / "eagle3" / "metrics.jsonl"}
    write_report(report, decode, commands, artefacts, notes, checks, metrics, machine, notes_precision)
    say(f"[5/5] wrote {report} ({(time.perf_counter() - t0) / 60:.1f} min)")
    for line in summary_lines(decode["runs"], export_dir, head, report):
        say(f"  {line}")
    say(f"  {exit_line(decode)}")
    (out / "main_job.log").write_text("\n".join(printed) + "\n")
    return 0


if __name__ == "__main__":
    from hsd.config import run_main

    sys.exit(run_main(main))
