"""What a decoding run records, and the acceptance / speed metrics computed from it.

Definitions (one each, as in the research note on evaluation anchors):

* ``tau`` (acceptance length, tokens per target call): emitted tokens / target verification passes,
  prefill excluded (its token is not counted), bonus included, after cutting at EOS / max_new_tokens.
  Pooled over all rounds ("micro"); ``tau_macro`` is the mean of per-prompt tau.
* ``reach_rate[i]`` (vLLM's "per-position acceptance", unconditional): rounds with >= i accepted drafts /
  rounds that drafted >= i tokens; ``cond_rate[i] = reach_rate[i] / reach_rate[i-1]`` (EAGLE's n-alpha).
* ``accept_hist[a]``: rounds with a accepted drafts; ``draft_accept_rate``: accepted / drafted;
  ``accept_per_position``: accepted / positions verified (the accepted ones and the first rejected one),
  the maximum-likelihood per-position acceptance of an i.i.d. chain (what the planner's models take).
* With an exit stage: the same for stage 1 (draft -> exit head, ``stage1_*``) and for the final pass over
  the window (exit head -> target), plus ``tau_stage1`` (tokens kept per stage-1 pass).
* Speed: ``tokens_per_s`` = new tokens / wall time including prefill (mean of per-prompt values and
  pooled), ``ttft_ms`` (prefill + first token), ``tpot_ms`` (decode time per token after the first);
  ``tokens_per_cpu_s``: the same per CPU second of the decoding process (on a shared machine, wall time
  also counts the time other processes held the cores; CPU time does not).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from statistics import mean
from typing import Any


@dataclass
class RoundRecord:
    """One target verification pass. drafted: tokens the target verified (window length); accepted: of
    those, accepted; emitted: tokens appended (accepted + 1, cut at EOS / max_new_tokens). With an exit
    stage: stage1 = [(drafted, accepted)] per stage-1 pass of this window."""

    drafted: int
    accepted: int
    emitted: int
    stage1: list[tuple[int, int]] = field(default_factory=list)
    nodes: int = 0


@dataclass
class DecodeStats:
    """Per-prompt record. Times in seconds; ``passes`` maps tokens-per-target-pass -> [seconds, ...]."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft: float = 0.0
    wall: float = 0.0
    cpu: float = 0.0  # CPU seconds of this process over the whole generate (robust to other processes' load)
    rounds: list[RoundRecord] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    passes: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    draft_steps: int = 0
    target_calls: int = 0  # target verification passes (prefill excluded) = len(rounds) for the engine
    prefills: int = 1  # tokens that came from a prefill (one per turn), not from a verification
    stopped: str = ""  # "eos" | "length"

    @property
    def tau(self) -> float:
        """Tokens per target verification pass (the prefill's token is not counted)."""
        return max(0, self.new_tokens - self.prefills) / max(1, self.target_calls)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["times"] = dict(self.times)
        d["passes"] = {int(k): v for k, v in self.passes.items()}
        d["tau"] = self.tau
        return d


def _rates(pairs: list[tuple[int, int]], k_max: int) -> dict[str, Any]:
    """(drafted, accepted) per round -> reach/cond rates, histogram, accept rate."""
    hist = [0] * (k_max + 1)
    for _, a in pairs:
        hist[min(a, k_max)] += 1
    reach, cond = [], []
    for i in range(1, k_max + 1):
        den = sum(1 for d, _ in pairs if d >= i)
        reach.append(sum(1 for d, a in pairs if d >= i and a >= i) / den if den else None)
    prev = 1.0
    for r in reach:
        cond.append(None if r is None or not prev else r / prev)
        prev = r if r is not None else 0.0
    drafted = sum(d for d, _ in pairs)
    tried = sum(min(a + 1, d) for d, a in pairs)  # positions verified: the accepted ones and the first rejected
    return {"reach_rate": reach, "cond_rate": cond, "accept_hist": hist,
            "draft_accept_rate": sum(a for _, a in pairs) / drafted if drafted else None,
            "accept_per_position": sum(a for _, a in pairs) / tried if tried else None,
            "rounds": len(pairs), "drafted": drafted}


def summarize(records: list[DecodeStats]) -> dict[str, Any]:
    """Pooled and per-prompt-mean metrics over prompts (see the module docstring)."""
    rounds = [r for s in records for r in s.rounds]
    k_max = max([r.drafted for r in rounds] + [0])
    out: dict[str, Any] = {"prompts": len(records)}
    calls = sum(s.target_calls for s in records)
    out["tau"] = sum(max(0, s.new_tokens - s.prefills) for s in records) / calls if calls else 1.0
    out["tau_macro"] = mean(s.tau for s in records if s.target_calls) if calls else 1.0
    out["target_calls"] = calls
    out.update(_rates([(r.drafted, r.accepted) for r in rounds], k_max))
    st1 = [p for r in rounds for p in r.stage1]
    if st1:
        k1 = max(d for d, _ in st1)
        s1 = _rates(st1, k1)
        out["stage1"] = s1
        out["tau_stage1"] = sum(a + 1 for _, a in st1) / len(st1)
        out["stage1_passes_per_window"] = len(st1) / max(1, len(rounds))
    new = sum(s.new_tokens for s in records)
    wall = sum(s.wall for s in records)
    out["new_tokens"] = new
    out["wall_s"] = wall
    out["tokens_per_s"] = new / wall if wall else 0.0
    out["tokens_per_s_macro"] = mean(s.new_tokens / s.wall for s in records if s.wall) if records else 0.0
    cpu = sum(s.cpu for s in records)
    out["cpu_s"] = cpu
    out["tokens_per_cpu_s"] = new / cpu if cpu else None
    out["tokens_per_cpu_s_macro"] = mean(s.new_tokens / s.cpu for s in records if s.cpu) if cpu else None
    out["ttft_ms"] = 1e3 * mean(s.ttft for s in records) if records else 0.0
    decode_tokens = sum(max(0, s.new_tokens - s.prefills) for s in records)
    out["tpot_ms"] = 1e3 * sum(s.wall - s.ttft for s in records) / decode_tokens if decode_tokens else 0.0
    out["decode_tokens"] = decode_tokens
    times: dict[str, float] = defaultdict(float)
    for s in records:
        for k, v in s.times.items():
            times[k] += v
    out["time_breakdown_s"] = dict(times)
    passes: dict[int, list[float]] = defaultdict(list)
    for s in records:
        for n, ts in s.passes.items():
            passes[int(n)].extend(ts)
    out["target_pass_ms"] = {n: 1e3 * mean(ts) for n, ts in sorted(passes.items())}
    out["target_pass_count"] = {n: len(ts) for n, ts in sorted(passes.items())}
    steps = sum(s.draft_steps for s in records)
    out["draft_step_ms"] = 1e3 * times.get("draft", 0.0) / steps if steps else None
    out["stopped_eos"] = sum(1 for s in records if s.stopped == "eos")
    return out
