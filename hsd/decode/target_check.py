"""The runner's self-check: does :class:`~hsd.decode.target.TargetRunner` compute the target's own forward?

The runner re-runs a Hugging Face model's layers with its own caches, masks and attention function, so a
family that does something the runner does not reproduce would decode *silently wrong*. Once per target
(and dtype / device / kernel choice) and process, before the target is used, :func:`ensure_checked` runs a
short probe through the runner and through the model's own forward and compares the next-token laws:

    prefill of 6 tokens                      (longer than every window / chunk during the probe)
    tree of 6 nodes, 3 paths of depth 3      (tree mask, positions by depth)
    commit of one path (``KVState.keep``)
    chain of 5 tokens, split at layer L // 2 (layers 0..L/2 run it as 4 tokens + a 1-token step ahead of
                                              the deep layers, which then run all 5: the exit stage's
                                              per-layer cache lengths)

Reference: one ``model(input_ids)`` forward over the tree's 3 paths (a batch of 3 x 14 tokens); the
runner runs 17 tokens in 3.5 passes' worth of layers: about one forward over 64 tokens in all. Sliding
windows and attention chunks longer than 3 positions are set to 3 for the probe (``sliding_window`` /
``attention_chunk_size`` in the config, which both the model's mask builders and the runner read;
restored afterwards), so every pass crosses a window or chunk boundary at the probe's cost, whatever
the real window (Mistral's 4096).

Measure: per pass, the max |Δ log p| between the runner's and the reference's log-softmax over the
tokens whose probability is within a factor 1000 of the row's top one (in either law; the argmax always
counts), in float64. Tolerance by dtype (:data:`TOLERANCE`): float32 runs agree to ~1e-5 on every
family tested, so the float32 check is sharp; in bf16 / fp16 two correct implementations differ by
rounding (HF's own sdpa and eager forwards by as much as the runner does), so there it catches gross
faults only. A pass beyond the tolerance, or a runner that raises, is :class:`TargetMismatch`: one line
naming the family, the pass and the deviation.
"""
from __future__ import annotations

import contextlib
import math
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .target import TargetRunner, layer_spans

# Tolerance on max |Δ log p| by the runner's dtype, from measurements (docs/target_families.md). float32:
# the runner and the HF forward agree to <= 5e-5 (26 tiny families, SmolLM2-135M); planted faults on the
# tiny families give >= 0.3. bfloat16: rounding alone moves log p by up to ~0.5 on SmolLM2-135M (the
# runner vs HF, and HF's own sdpa vs eager, alike); float16 by ~0.05. Gross faults there give 3.5-20
# (a window the model does not have, a softcap of 30 it does not apply, eager fed a boolean mask).
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.bfloat16: 1.5, torch.float16: 0.25}
PROBE_SPAN = 3  # windows / chunks longer than this are shortened to it for the probe
PREFILL, CHAIN, CHAIN_SPLIT = 6, 5, 4
TREE_PARENTS = (-1, 0, 1, 0, 3, 1)  # nodes r, a, a.a, b, b.b, a.c
TREE_PATHS = ((0, 1, 2), (0, 3, 4), (0, 1, 5))
KEEP_PATH = 1  # the committed path (r, b, b.b); the chain follows it
NEAR_TOP = math.log(1e3)


class TargetMismatch(ValueError):
    """The decode engine does not reproduce this target's forward (one line)."""


@dataclass
class CheckResult:
    """Outcome of one probe. per_pass: pass -> max |Δ log p|; error: what the runner raised, if it did."""

    family: str
    attention: str
    dtype: str
    ok: bool
    max_dlogp: float
    worst_pass: str
    tolerance: float
    per_pass: dict[str, float] = field(default_factory=dict)
    argmax_agreement: float = 1.0
    reference_tokens: int = 0
    runner_tokens: int = 0
    seconds: float = 0.0
    probe_spans: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def name(self) -> str:
        return f"{self.family} ({self.attention} attention, {self.dtype})"

    def line(self) -> str:
        """One line: the pass and its deviation, or why it failed."""
        if self.error:
            return f"target {self.name}: the decode engine cannot run this target: {self.error}"
        if not self.ok:
            return (f"target {self.name}: the decode engine does not reproduce this target's forward: "
                    f"{self.worst_pass} pass max |Δ log p| = {self.max_dlogp:.3g} > {self.tolerance:g} "
                    f"(argmax agreement {self.argmax_agreement:.2f}); refused")
        return (f"target check: {self.name}: runner = HF forward on prefill / tree / split chain + step "
                f"(max |Δ log p| {self.max_dlogp:.1e} <= {self.tolerance:g}, {self.seconds:.2f} s)")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text_configs(model: nn.Module) -> list:
    """The config objects a probe shortens windows in: the model's and its text config (the same object
    for a causal LM)."""
    cfgs = {id(model.config): model.config}
    if hasattr(model.config, "get_text_config"):
        tc = model.config.get_text_config()
        cfgs.setdefault(id(tc), tc)
    return list(cfgs.values())


@contextlib.contextmanager
def probe_spans(runner: TargetRunner, span: int = PROBE_SPAN):
    """Shorten ``sliding_window`` / ``attention_chunk_size`` to ``span`` in the model's configs and the
    runner's per-layer spans for the duration (both the model's mask builders and the runner read them);
    yields {name: (real, probe)} of what was shortened."""
    saved, changed = [], {}
    for cfg in _text_configs(runner.model):
        for name in ("sliding_window", "attention_chunk_size"):
            v = getattr(cfg, name, None)
            if isinstance(v, int) and v > span:
                saved.append((cfg, name, v))
                setattr(cfg, name, span)
                changed[name] = (v, span)
    spans = runner.spans
    try:
        runner.spans = layer_spans(runner.config, runner.num_layers)
        yield changed
    finally:
        runner.spans = spans
        for cfg, name, v in saved:
            setattr(cfg, name, v)


def _dlogp(got: Tensor, ref: Tensor) -> float:
    """max |Δ log p| over tokens within a factor 1000 of the row's top probability (either law)."""
    lg, lr = torch.log_softmax(got.double(), -1), torch.log_softmax(ref.double(), -1)
    top = torch.maximum(lg, lr)
    near = top >= top.max(-1, keepdim=True).values - NEAR_TOP
    return float((lg - lr).abs()[near].max())


def probe_tokens(vocab: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Random (prefill [PREFILL], tree nodes [len(TREE_PARENTS)], chain [CHAIN]) token ids."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (PREFILL + len(TREE_PARENTS) + CHAIN,), generator=g)
    return x[:PREFILL], x[PREFILL:-CHAIN], x[-CHAIN:]


@torch.no_grad()
def reference_logits(model: nn.Module, prefill: Tensor, nodes: Tensor, chain: Tensor, device) -> Tensor:
    """The model's own forward over the tree's paths: [len(TREE_PATHS), PREFILL + 3 + CHAIN, V] float32
    (row i = prefill + path i + the chain; only the committed path's row reads the chain's rows)."""
    ids = torch.stack([torch.cat([prefill, nodes[list(path)], chain]) for path in TREE_PATHS]).to(device)
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def runner_logits(runner: TargetRunner, prefill: Tensor, nodes: Tensor, chain: Tensor) -> dict[str, Tensor]:
    """The probe's passes through the runner (module docstring) -> {pass: [N, V] float32 logits}."""
    dev = runner.device
    st = runner.new_state(1, PREFILL + len(TREE_PARENTS) + CHAIN + 2)
    out = {"prefill": runner.run(st, tokens=prefill[None].to(dev), logit_rows=slice(None)).logits[0]}
    parents = torch.tensor([TREE_PARENTS], device=dev)
    out["tree"] = runner.run(st, tokens=nodes[None].to(dev), parents=parents, logit_rows=slice(None)).logits[0]
    st.keep(PREFILL, torch.tensor(TREE_PATHS[KEEP_PATH], device=dev))
    x, m = chain[None].to(dev), runner.num_layers // 2
    if m >= 1:  # the exit stage's pattern: the shallow layers run ahead (4 tokens, then 1), the deep ones lag
        low = [runner.run(st, tokens=x[:, :CHAIN_SPLIT], end=m).hidden,
               runner.run(st, tokens=x[:, CHAIN_SPLIT:], end=m).hidden]
        out["chain"] = runner.run(st, hidden=torch.cat(low, 1), start=m, logit_rows=slice(None)).logits[0]
    else:
        out["chain"] = torch.cat([runner.run(st, tokens=x[:, :CHAIN_SPLIT], logit_rows=slice(None)).logits[0],
                                  runner.run(st, tokens=x[:, CHAIN_SPLIT:], logit_rows=slice(None)).logits[0]])
    return out


def reference_rows(ref: Tensor) -> dict[str, Tensor]:
    """The reference rows each runner pass must equal -> {pass: [N, V]}."""
    depth = len(TREE_PATHS[0])
    node_rows: dict[int, Tensor] = {}
    for i, path in enumerate(TREE_PATHS):
        for d, node in enumerate(path):
            node_rows.setdefault(node, ref[i, PREFILL + d])
    return {"prefill": ref[0, :PREFILL], "tree": torch.stack([node_rows[j] for j in range(len(TREE_PARENTS))]),
            "chain": ref[KEEP_PATH, PREFILL + depth:]}


def probe(runner: TargetRunner, seed: int = 0) -> CheckResult:
    """Run the probe (module docstring) and return its :class:`CheckResult` (never raises for a mismatch)."""
    model = runner.model
    attention = str(getattr(runner.config, "_attn_implementation", None) or "default")
    tol = TOLERANCE.get(runner.dtype, TOLERANCE[torch.bfloat16])
    res = CheckResult(family=runner.family, attention=attention, dtype=str(runner.dtype).replace("torch.", ""),
                      ok=False, max_dlogp=float("nan"), worst_pass="", tolerance=tol)
    t0 = time.perf_counter()
    tokens = probe_tokens(runner.vocab_size, seed)
    try:
        with probe_spans(runner) as changed:
            res.probe_spans = {k: list(v) for k, v in changed.items()}
            ref = reference_logits(model, *tokens, runner.device)
            got = runner_logits(runner, *tokens)
    except Exception as err:  # any failure of the runner on this target is a refusal, in one line
        res.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
        res.seconds = time.perf_counter() - t0
        return res
    want = reference_rows(ref)
    res.per_pass = {k: _dlogp(got[k], want[k]) for k in got}
    res.worst_pass = max(res.per_pass, key=res.per_pass.get)
    res.max_dlogp = res.per_pass[res.worst_pass]
    agree = [float((got[k].argmax(-1) == want[k].argmax(-1)).float().mean()) * len(got[k]) for k in got]
    res.argmax_agreement = sum(agree) / sum(len(got[k]) for k in got)
    res.ok = bool(res.max_dlogp <= tol)
    res.reference_tokens = int(ref.shape[0] * ref.shape[1])
    res.runner_tokens = sum(int(t.numel()) for t in tokens)
    res.seconds = time.perf_counter() - t0
    return res


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(dtype, device, kernels): result}


def ensure_checked(runner: TargetRunner) -> CheckResult:
    """The probe's result for ``runner``'s target, run once per model, dtype, device and kernel choice in a
    process; raises :class:`TargetMismatch` (one line) when the runner does not reproduce the target."""
    key = (runner.dtype, str(runner.device), runner.cpu_kernels, getattr(runner, "rows", None))  # rows: a tile
    per_model = _CHECKED.setdefault(runner.model, {})
    if key not in per_model:
        per_model[key] = probe(runner)
    res = per_model[key]
    if not res.ok:
        raise TargetMismatch(res.line())
    return res


def check_target(model: nn.Module, cpu_kernels: bool = False) -> CheckResult:
    """The probe's result for ``model`` (cached like :func:`ensure_checked`), never raising for a mismatch:
    for callers that warn instead of refusing (training, export). ``cpu_kernels=False`` leaves the
    model's weight layout alone."""
    from .target import UnsupportedTarget

    try:
        runner = TargetRunner(model, cpu_kernels=cpu_kernels, check=False)
    except UnsupportedTarget as err:
        cfg = getattr(model, "config", None)
        return CheckResult(family=str(getattr(cfg, "model_type", type(model).__name__)),
                           attention=str(getattr(cfg, "_attn_implementation", None) or "default"),
                           dtype=str(next(model.parameters()).dtype).replace("torch.", ""), ok=False,
                           max_dlogp=float("nan"), worst_pass="", tolerance=float("nan"), error=str(err))
    try:
        return ensure_checked(runner)
    except TargetMismatch:
        return _CHECKED[model][(runner.dtype, str(runner.device), runner.cpu_kernels, None)]


def engine_warning(result: CheckResult | dict[str, Any], goes_on: str = "training and export go on") -> str | None:
    """None when the check passed; else one warning line for the commands that go on anyway (training,
    export: the head may be served by vLLM or SGLang). ``result``: a CheckResult or a :data:`RECORD` dict."""
    ok, line = (result.ok, result.line()) if isinstance(result, CheckResult) else (result.get("ok"), result.get("line"))
    if ok:
        return None
    return f"warning: {line}. `hsd-train decode` will refuse this target; {goes_on} (serve the head with vLLM or SGLang)"


RECORD = "target_check.json"  # written by `hsd-train train` next to the run, read by `hsd-train export`


def write_record(folder, result: CheckResult, target: str) -> None:
    """Record ``result`` for ``target`` (the name the trainer was given) in ``folder/target_check.json``."""
    import json
    from pathlib import Path

    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    (path / RECORD).write_text(json.dumps({"target": str(target), **result.as_dict(), "line": result.line()},
                                          indent=1, default=str))


def read_record(folder, levels: int = 3) -> dict[str, Any] | None:
    """The nearest ``target_check.json`` at ``folder`` or up to ``levels`` folders above it, or None."""
    import json
    from pathlib import Path

    start = Path(folder).resolve()
    for d in [start, *list(start.parents)[:levels]]:
        if (d / RECORD).is_file():
            try:
                return json.loads((d / RECORD).read_text())
            except (OSError, ValueError):
                return None
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m hsd.decode.target_check --target NAME [--dtype float32] [--device cpu]``: check a target
    before decoding with it; prints the check's line (and its JSON with ``--json``); exit 0 when the decode
    engine reproduces it, 2 when it refuses it."""
    import argparse
    import json
    import os
    import sys

    ap = argparse.ArgumentParser(prog="python -m hsd.decode.target_check", description=main.__doc__.split("\n")[0])
    ap.add_argument("--target", required=True, help="short name, model folder or Hub id")
    ap.add_argument("--dtype", default="float32", help="float32 (the sharp check), bfloat16, float16 or auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--attn-implementation", help="load the target with this attention implementation")
    ap.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hsd.machine import machine_info, machine_line
    from hsd.models.resolve import load_target

    try:
        model, _ = load_target(args.target, dtype=args.dtype, device=args.device)
        if args.attn_implementation:
            model.set_attn_implementation(args.attn_implementation)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    res = check_target(model)
    print(res.line() if res.ok else f"error: {res.line()}", file=sys.stdout if res.ok else sys.stderr)
    print(machine_line(machine_info(args.device, next(model.parameters()).dtype)))
    if args.json:
        print(json.dumps({**res.as_dict(), "machine": machine_info(args.device, next(model.parameters()).dtype)},
                         indent=1, default=str))
    return 0 if res.ok else 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
