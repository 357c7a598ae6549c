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
Exit drafter (target layers 1..l + exit head draft K tokens, the target verifies from the buffered h_l):
``time = K * c_step + c_final + c_other``, ``tokens = sum_{j<=K} a^j``.
Every exit configuration (``exit_rows``) is reported with its predicted and measured speed, the
configuration it must beat (the same run without it: the same drafter without the exit stage, or plain
decoding for an exit drafter), the agreement it reached and the agreement at which it would break even;
the best configuration is the one predicted fastest, so an exit configuration predicted to lose against
the run without it is never picked.
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


def plan(entries: list[dict[str, Any]], precision: str | None = None) -> dict[str, Any]:
    """Predicted vs measured decode speed of every engine configuration, and the best predicted setting per
    temperature (chain K in 1..K_max, a measured tree, exit stage on/off and its window), from the costs
    measured in the run (``precision``: the precision they were measured in, recorded with the choice).

    Exit configurations (an exit stage after any drafter, early-exit drafters) are rows of ``"exit"``
    (:func:`exit_rows`: predicted vs measured, break-even vs achieved agreement) and candidates like the rest.

    Returns {"predicted_vs_measured": [...], "best": {T: candidate}, "chain_vs_tree": {T: {...}},
    "costs": {T: {"precision", "pass_ms", "draft_step_ms", "other_ms"}}, "exit": [...]}."""
    out: dict[str, Any] = {"predicted_vs_measured": [], "best": {}, "chain_vs_tree": {}, "costs": {},
                           "exit": []}
    temps = sorted({e["temperature"] for e in entries})
    for temp in temps:
        es = [e for e in entries if e["temperature"] == temp and e["kind"] == "engine"]
        ar = next((e for e in es if e["drafter"] == "none"), None)
        t1 = {int(n): ms for n, ms in ar["target_pass_ms"].items()}.get(1) if ar else None  # JSON keys are str
        if not t1:
            continue
        passes: dict[int, float] = {1: t1}
        for e in es:
            if e["exit_layer"] is None and not is_exit_drafter(e):  # full passes only
                for n, ms in e["target_pass_ms"].items():
                    passes.setdefault(int(n), ms)
        other = max(0.0, (_decode_ms_per_token(ar) or t1) - t1)  # per-round bookkeeping outside the target pass
        cands = [{"name": f"T{temp:g}/ar", "shape": "none", "k": 0, "exit_layer": None,
                  "predicted_tpot_ms": t1 + other}]
        for e in es:
            if e["drafter"] == "none" or not e["k"] or is_exit_drafter(e):
                continue
            if e.get("tree"):
                row, cand = tree_candidate(e, other)
                new = [cand]
            elif e["exit_layer"] is None:
                row, new = chain_candidates(e, passes, t1, other)
            else:  # an exit stage (after any drafter): see exit_rows
                continue
            out["predicted_vs_measured"].append(row)
            cands += new
        rows, exit_cands = exit_rows(es, temp, passes, other, t1)
        out["exit"].extend(rows)
        out["predicted_vs_measured"].extend({"name": r["name"], "predicted_tpot_ms": r["predicted_tpot_ms"],
                                             "measured_tpot_ms": r["measured_tpot_ms"]} for r in rows)
        cands += exit_cands
        best = min(cands, key=lambda c: c["predicted_tpot_ms"])
        best["predicted_tokens_per_s"] = 1e3 / best["predicted_tpot_ms"]
        best["predicted_speedup_vs_ar"] = (t1 + other) / best["predicted_tpot_ms"]
        best["precision"] = precision
        tn = f"T{temp:g}"
        out["best"][tn] = best
        chains = [c for c in cands if c.get("shape") == "chain" and c.get("exit_layer") is None]
        trees = [c for c in cands if c.get("shape") == "tree"]
        bc = min(chains, key=lambda c: c["predicted_tpot_ms"], default=None)
        bt = min(trees, key=lambda c: c["predicted_tpot_ms"], default=None)
        out["chain_vs_tree"][tn] = {
            "chain": bc, "tree": bt,
            "choice": None if not (bc or bt) else ("tree" if bt and (not bc or bt["predicted_tpot_ms"]
                                                                     < bc["predicted_tpot_ms"]) else "chain")}
        out["costs"][tn] = {"precision": precision, "pass_ms": dict(sorted(passes.items())), "other_ms": other,
                            "draft_step_ms": next((e.get("draft_step_ms") for e in es if e.get("draft_step_ms")), None)}
    return out


# ------------------------------------------------------------------------------------------ exit stages
# Early-exit configurations (kept apart from the chain / tree choices above). Costs in any one unit (ms or
# t1 = one 1-token target step); agreement a = per-position acceptance toward the target (i.i.d.).


def exit_drafter(k: int, a: float, c_step: float, c_final: float) -> tuple[float, float]:
    """Early-exit self-drafting (layers 1..l + exit head draft, the target verifies): (expected tokens,
    expected cost) per round of k drafts, each draft step costing ``c_step`` (layers 1..l over one token +
    the head) and the verification ``c_final`` (the last draft through layers 1..l, layers l+1..L over the
    k + 1 buffered rows, the LM head)."""
    return expected_tokens(a, k), k * c_step + c_final


def breakeven_agreement(cost_per_token, reference: float, lo: float = 0.0, hi: float = 0.9999) -> float | None:
    """The smallest agreement a in [lo, hi] at which ``cost_per_token(a)`` (decreasing in a) reaches
    ``reference`` (the cost per token of the configuration to beat); None when even ``hi`` loses."""
    if cost_per_token(hi) > reference:
        return None
    if cost_per_token(lo) <= reference:
        return lo
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost_per_token(mid) > reference else (lo, mid)
    return hi


def is_exit_drafter(e: dict) -> bool:
    return str(e.get("drafter", "")).startswith("exit:")


def per_position(rates: dict | None) -> float:
    """Per-position acceptance of an entry's rates (MLE of an i.i.d. chain; older JSON: accepted/drafted)."""
    rates = rates or {}
    v = rates.get("accept_per_position")
    return float(v if v is not None else rates.get("draft_accept_rate") or 0.0)


def _baseline(es: list[dict], e: dict) -> dict | None:
    """The run without the exit configuration: plain decoding for an exit drafter alone, else the same
    drafter, K, verifier and backend without the exit stage."""
    if e["exit_layer"] is None:
        return next((b for b in es if b["drafter"] == "none"), None)
    return next((b for b in es if b["drafter"] == e["drafter"] and b["k"] == e["k"] and b.get("method") == e.get("method")
                 and b.get("backend") == e.get("backend") and b["exit_layer"] is None and not b.get("tree")), None)


def exit_rows(es: list[dict], temp: float, passes: dict[int, float], other: float,
              t1: float) -> tuple[list[dict], list[dict]]:
    """Per exit configuration measured at ``temp`` (``es``: that temperature's engine entries): predicted vs
    measured ms per token, the run it must beat, achieved vs break-even agreement; plus the planner
    candidates (other K / windows predicted from the same measured costs and agreement)."""
    rows, cands = [], []
    for e in es:
        if e["exit_layer"] is None and not is_exit_drafter(e):
            continue
        k, rounds = e["k"], max(1, e.get("rounds") or 1)
        tb = e.get("time_breakdown_s") or {}
        c_f = 1e3 * tb.get("target", 0.0) / rounds
        c_d = e.get("draft_step_ms") or 0.0
        a = per_position(e)
        base = _baseline(es, e)
        if e["exit_layer"] is None:  # exit drafter: layers 1..l + head per draft step, then the final pass
            kind = "exit drafter"

            def tpot(x, kk=k, c_final=c_f, c_d=c_d):
                tok, ms = exit_drafter(kk, x, c_d, c_final + other)
                return ms / tok

            for kk in range(1, max(k, max(passes) - 1) + 1):  # final pass scaled like full passes of kk+1 vs k+1
                scale = (_interp(passes, kk + 1) or t1) / (_interp(passes, k + 1) or t1)
                cands.append({"name": f"{e['drafter']} K={kk} ({e['method']})", "shape": "exit", "k": kk,
                              "exit_layer": None, "drafter": e["drafter"], "predicted_tpot_ms": tpot(a, kk, c_f * scale)})
        else:  # exit stage after a drafter (EAGLE-3, a model, an exit drafter...)
            kind = "exit stage"
            st = e.get("stage1") or {}
            beta = per_position(st)
            c_s = 1e3 * tb.get("stage1", 0.0) / max(1, st.get("rounds") or 1)
            n = e.get("exit_window") or 1

            def tpot(x, kk=k, nn=n, beta=beta, c_d=c_d, c_s=c_s, c_f=c_f):
                tok, ms = three_level(kk, nn, beta, x, kk * c_d + c_s, c_f + other)
                return ms / tok

            for kk in range(1, k + 1):
                for nn in range(1, 5):
                    cands.append({"name": f"{e['drafter']} K={kk} + exit {e['exit_layer']} window {nn}", "shape": "exit", "k": kk,
                                  "exit_layer": e["exit_layer"], "exit_window": nn, "drafter": e["drafter"],
                                  "predicted_tpot_ms": tpot(a, kk, nn)})
        measured = _decode_ms_per_token(e)
        base_ms = _decode_ms_per_token(base) if base else None
        pred = tpot(a)
        rows.append({"name": e["name"], "kind": kind, "temperature": temp, "drafter": e["drafter"], "k": k,
                     "exit_layer": e["exit_layer"], "baseline": base["name"] if base else None,
                     "achieved_agreement": a, "stage1_agreement": per_position(e.get("stage1")) if e.get("stage1") else None,
                     "breakeven_agreement": breakeven_agreement(tpot, base_ms) if base_ms else None,
                     "predicted_tpot_ms": pred, "measured_tpot_ms": measured, "baseline_measured_tpot_ms": base_ms,
                     "predicted_speedup_vs_baseline": base_ms / pred if base_ms else None,
                     "measured_speedup_vs_baseline": base_ms / measured if base_ms and measured else None})
    return rows, cands
