"""Planner: from measured acceptance and measured stage costs, pick K, the exit stage and its window.

Pure arithmetic over the entries ``scripts/decode.py`` writes (no models). Costs are in milliseconds as
measured in the same run; acceptance is taken as measured per position (chains: the chance that draft i
is accepted does not depend on how many drafts follow it, so the per-position rates of a K = 5 run also
predict K = 1..5).

Two-level (draft -> target), per round: ``time = K * c_draft + c_pass(K + 1) + c_other``,
``tokens = 1 + sum_{i<=K} reach_i``.
Three-level (draft -> exit head -> target), per window, i.i.d. acceptance: stage-1 rounds of ``K`` drafts
(acceptance ``beta`` per position toward p_l, cost ``K * c_draft + c_stage1``) until the window holds
``>= N`` tokens, then one final pass (cost ``c_final``) that accepts each window position with the
exit head's agreement ``a``: the renewal-reward ratio of the research note (exact under i.i.d.).
Trees (measured shapes only: a tree's acceptance does not extrapolate to other shapes), per round:
``time = c_draft_round + c_pass(N + 1) + c_verify_round + c_other``, ``tokens = 1 + sum_depth reach_d``.
"""
from __future__ import annotations

from typing import Any


def expected_tokens(alpha: float, w: int) -> float:
    """Tokens emitted by one verification of w i.i.d. tokens accepted w.p. alpha (incl. the bonus)."""
    return float(w + 1) if alpha >= 1.0 else (1.0 - alpha ** (w + 1)) / (1.0 - alpha)


def three_level(k: int, n: int, beta: float, a: float, c_round: float, c_final: float) -> tuple[float, float]:
    """(expected tokens per window, expected ms per window) for K drafts per stage-1 round, window >= n."""
    inc = {j + 1: (beta ** j * (1 - beta) if j < k else beta ** k) for j in range(k + 1)}
    dist, win, rounds = {0: 1.0}, {}, 0.0
    while dist:
        nxt: dict[int, float] = {}
        for s, ps in dist.items():
            rounds += ps
            for x, px in inc.items():
                d = win if s + x >= n else nxt
                d[s + x] = d.get(s + x, 0.0) + ps * px
        dist = nxt
    tokens = sum(p * expected_tokens(a, w) for w, p in win.items())
    return tokens, rounds * c_round + c_final


def _interp(table: dict[int, float], n: int) -> float | None:
    if not table:
        return None
    if n in table:
        return table[n]
    keys = sorted(table)
    lo = max([k for k in keys if k < n], default=None)
    hi = min([k for k in keys if k > n], default=None)
    if lo is None:
        return table[hi]
    if hi is None:
        return table[lo]
    return table[lo] + (table[hi] - table[lo]) * (n - lo) / (hi - lo)


def _decode_ms_per_token(e: dict) -> float | None:
    """Measured decode time per token on the stage timers' clock: process CPU time when the run timed its
    stages with it (``cpu_s`` and a "prefill" stage time present), else wall time (``tpot_ms``)."""
    tb = e.get("time_breakdown_s") or {}
    n = e.get("decode_tokens") or (e.get("new_tokens", 0) - e.get("prompts", 0))
    if e.get("cpu_s") and "prefill" in tb and n:
        return 1e3 * (e["cpu_s"] - tb["prefill"]) / n
    return e.get("tpot_ms") or None


def chain_candidates(e: dict, passes: dict[int, float], t1: float, other: float) -> tuple[dict, list[dict]]:
    """A measured chain run -> (its predicted-vs-measured row, candidates K = 1..K_run): per round
    ``K * c_draft + c_pass(K + 1) + c_other`` over ``1 + sum_{i<=K} reach_i`` tokens, the pass costs measured in
    this run (so in its precision)."""
    k, reach = e["k"], [r or 0.0 for r in e["reach_rate"]]
    c_d = e.get("draft_step_ms") or 0.0

    def tpot(kk: int) -> float:
        return (kk * c_d + (_interp(passes, kk + 1) or t1) + other) / (1 + sum(reach[:kk]))

    row = {"name": e["name"], "predicted_tpot_ms": tpot(k), "measured_tpot_ms": _decode_ms_per_token(e)}
    cands = [{"name": f"{e['drafter']} K={kk} ({e['method']})", "shape": "chain", "k": kk, "exit_layer": None,
              "drafter": e["drafter"], "predicted_tpot_ms": tpot(kk)} for kk in range(1, len(reach) + 1)]
    return row, cands


def tree_candidate(e: dict, other: float) -> tuple[dict, dict]:
    """A measured tree run -> (its predicted-vs-measured row, one candidate): per round the measured draft +
    target pass + verify time, over ``1 + sum_depth reach_d`` tokens (measured shapes only: a tree's acceptance
    does not extrapolate to other shapes)."""
    rounds = max(1, e.get("rounds") or 1)
    tb = e.get("time_breakdown_s") or {}
    per_round = 1e3 * (tb.get("draft", 0.0) + tb.get("target", 0.0) + tb.get("verify", 0.0)) / rounds
    pred = (per_round + other) / (1 + sum(r or 0.0 for r in e["reach_rate"]))
    row = {"name": e["name"], "predicted_tpot_ms": pred, "measured_tpot_ms": _decode_ms_per_token(e)}
    return row, {"name": f"{e['drafter']} tree {e['tree']} ({e['method']})", "shape": "tree", "k": e["k"],
                 "tree": e["tree"], "exit_layer": None, "drafter": e["drafter"], "predicted_tpot_ms": pred}


def exit_candidates(e: dict, other: float) -> tuple[dict, list[dict]]:
    """A measured exit-stage run -> (its predicted-vs-measured row, candidates K x window 1..4)."""
    k = e["k"]
    c_d = e.get("draft_step_ms") or 0.0
    st = e.get("stage1") or {}
    beta = (st.get("draft_accept_rate") or 0.0)
    a = e.get("draft_accept_rate") or 0.0
    n1 = max(1, st.get("rounds") or 1)
    c_s = 1e3 * e["time_breakdown_s"].get("stage1", 0.0) / n1
    rounds = max(1, e.get("rounds") or 1)
    c_f = 1e3 * e["time_breakdown_s"].get("target", 0.0) / rounds
    n = e.get("exit_window") or 1
    tok, ms = three_level(k, n, beta, a, k * c_d + c_s, c_f + other)
    row = {"name": e["name"], "predicted_tpot_ms": ms / tok, "measured_tpot_ms": _decode_ms_per_token(e)}
    cands = []
    for kk in range(1, k + 1):
        for nn in range(1, 5):
            tk, m = three_level(kk, nn, beta, a, kk * c_d + c_s, c_f + other)
            cands.append({"name": f"{e['drafter']} K={kk} + exit {e['exit_layer']} window {nn}", "shape": "chain",
                          "k": kk, "exit_layer": e["exit_layer"], "exit_window": nn, "drafter": e["drafter"],
                          "predicted_tpot_ms": m / tk})
    return row, cands


def plan(entries: list[dict[str, Any]], precision: str | None = None) -> dict[str, Any]:
    """Predicted vs measured decode speed of every engine configuration, and the best predicted setting per
    temperature (chain K in 1..K_max, a measured tree, exit stage on/off and its window), from the costs
    measured in the run (``precision``: the precision they were measured in, recorded with the choice).

    Returns {"predicted_vs_measured": [...], "best": {T: candidate}, "chain_vs_tree": {T: {...}},
    "costs": {T: {"precision", "pass_ms", "draft_step_ms", "other_ms"}}}."""
    out: dict[str, Any] = {"predicted_vs_measured": [], "best": {}, "chain_vs_tree": {}, "costs": {}}
    temps = sorted({e["temperature"] for e in entries})
    for temp in temps:
        es = [e for e in entries if e["temperature"] == temp and e["kind"] == "engine"]
        ar = next((e for e in es if e["drafter"] == "none"), None)
        t1 = ar["target_pass_ms"].get(1) if ar else None
        if not t1:
            continue
        passes: dict[int, float] = {1: t1}
        for e in es:
            if e["exit_layer"] is None:
                for n, ms in e["target_pass_ms"].items():
                    passes.setdefault(int(n), ms)
        other = max(0.0, (_decode_ms_per_token(ar) or t1) - t1)  # per-round bookkeeping outside the target pass
        cands = [{"name": f"T{temp:g}/ar", "shape": "none", "k": 0, "exit_layer": None,
                  "predicted_tpot_ms": t1 + other}]
        for e in es:
            if e["drafter"] == "none" or not e["k"]:
                continue
            if e.get("tree"):
                row, cand = tree_candidate(e, other)
                new = [cand]
            elif e["exit_layer"] is None:
                row, new = chain_candidates(e, passes, t1, other)
            else:
                row, new = exit_candidates(e, other)
            out["predicted_vs_measured"].append(row)
            cands += new
        best = min(cands, key=lambda c: c["predicted_tpot_ms"])
        best["predicted_tokens_per_s"] = 1e3 / best["predicted_tpot_ms"]
        best["predicted_speedup_vs_ar"] = (t1 + other) / best["predicted_tpot_ms"]
        best["precision"] = precision
        tn = f"T{temp:g}"
        out["best"][tn] = best
        chains = [c for c in cands if c["shape"] == "chain" and c["exit_layer"] is None]
        trees = [c for c in cands if c["shape"] == "tree"]
        bc = min(chains, key=lambda c: c["predicted_tpot_ms"], default=None)
        bt = min(trees, key=lambda c: c["predicted_tpot_ms"], default=None)
        out["chain_vs_tree"][tn] = {
            "chain": bc, "tree": bt,
            "choice": None if not (bc or bt) else ("tree" if bt and (not bc or bt["predicted_tpot_ms"]
                                                                     < bc["predicted_tpot_ms"]) else "chain")}
        out["costs"][tn] = {"precision": precision, "pass_ms": dict(sorted(passes.items())), "other_ms": other,
                            "draft_step_ms": next((e.get("draft_step_ms") for e in es if e.get("draft_step_ms")), None)}
    return out
