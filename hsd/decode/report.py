"""Console table and PNG plots of a decode evaluation (the JSON is the source; these only present it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _pp(rates) -> str:
    return "/".join("-" if r is None else f"{r:.2f}" for r in (rates or [])) or "-"


def print_table(entries: list[dict[str, Any]], console=None, per_source: bool = True) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title="decode: tau = tokens per target pass (prefill excluded); tok/s incl. prefill (mean of prompts)")
    for col in ("config", "tau", "per-position (uncond.)", "cond.", "accept", "tok/s", "tok/CPU-s", "TTFT ms",
                "TPOT ms", "x generate", "x gen (CPU)", "x ours AR", "greedy =", "= HF gen", "verify/1", "draft/1"):
        t.add_column(col, justify="left" if col == "config" else "right")
    for e in entries:
        t.add_row(e["name"], _f(e.get("tau")), _pp(e.get("per_position_acceptance")),
                  _pp(e.get("per_position_acceptance_conditional")), _f(e.get("draft_accept_rate")),
                  _f(e.get("tokens_per_s_macro"), "{:.1f}"), _f(e.get("tokens_per_cpu_s"), "{:.1f}"),
                  _f(e.get("ttft_ms"), "{:.0f}"), _f(e.get("tpot_ms"), "{:.0f}"), _f(e.get("speedup_vs_generate")),
                  _f(e.get("speedup_vs_generate_cpu")), _f(e.get("speedup_vs_ar")),
                  e.get("exact_match_prompts") or "-", e.get("exact_match_vs_generate_prompts") or "-",
                  _f(e.get("verify_cost_ratio")), _f(e.get("draft_cost_ratio")))
    console.print(t)
    console.print("greedy = : T = 0 outputs equal to this engine's plain greedy decoding (HF generate where it did not "
                  "run); = HF gen: equal to Hugging Face generate (other kernels; see the divergences below)")
    for line in divergence_lines(entries):
        console.print(line)
    if not per_source:
        return
    groups = sorted({g for e in entries for g in e.get("per_source", {})},
                    key=lambda g: ("gsm8k", "chat", "code", "multiturn").index(g)
                    if g in ("gsm8k", "chat", "code", "multiturn") else 9)
    t = Table(title="per source: tau / tok/s (mean of prompts) / tok per CPU-s (pooled)")
    t.add_column("config")
    for g in groups:
        n = max((e["per_source"].get(g, {}).get("prompts", 0) for e in entries), default=0)
        t.add_column(f"{g} ({n})", justify="right")
    for e in entries:
        t.add_row(e["name"], *[
            f"{_f(e['per_source'][g]['tau'])} / {_f(e['per_source'][g]['tokens_per_s_macro'], '{:.1f}')}"
            f" / {_f(e['per_source'][g].get('tokens_per_cpu_s'), '{:.1f}')}"
            if g in e.get("per_source", {}) else "-" for g in groups])
    console.print(t)


def divergence_lines(entries: list[dict[str, Any]]) -> list[str]:
    """One line per T = 0 engine configuration whose output left HF generate's: where, and the target's top-2
    logit margin there (a near-tie: the two computations rounded it differently)."""
    out = []
    for e in entries:
        divs = e.get("generate_divergences") or []
        if not divs:
            continue
        parts = [f"{d['id']}" + (f" turn {d['turn'] + 1}" if d["turn"] else "") + f" @ token {d['position']}"
                 + (f" (top-2 margin {d['margin']['margin']:.3g})" if d.get("margin") else "") for d in divs]
        out.append(f"{e['name']}: = HF generate on {e.get('exact_match_vs_generate_prompts')} prompts; first "
                   "divergences " + ", ".join(parts))
    return out


def plot_all(entries: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """per_position_acceptance.png, accept_hist.png, speed.png, tau_vs_k.png -> paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    spec = [e for e in entries if e["kind"] == "engine" and e.get("k")]

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for e in spec:
        r = e.get("per_position_acceptance") or []
        c = e.get("per_position_acceptance_conditional") or []
        xs = list(range(1, len(r) + 1))
        axes[0].plot(xs, [v if v is not None else float("nan") for v in r], marker="o", label=e["name"])
        axes[1].plot(xs, [v if v is not None else float("nan") for v in c], marker="o", label=e["name"])
    axes[0].set_title("per-position acceptance (unconditional: P(>= i accepted))")
    axes[1].set_title("per-position acceptance (conditional on i-1 accepted)")
    for ax in axes:
        ax.set_xlabel("draft position i")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    paths.append(out / "per_position_acceptance.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(spec))
    for i, e in enumerate(spec):
        h = e.get("accept_hist") or []
        tot = sum(h) or 1
        ax.bar([j + i * width for j in range(len(h))], [v / tot for v in h], width=width, label=e["name"])
    ax.set_xlabel("accepted drafts per target pass")
    ax.set_ylabel("fraction of passes")
    ax.set_title("accepted-count histogram")
    ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(out / "accept_hist.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(entries)), 5))
    names = [e["name"] for e in entries]
    vals = [e.get("tokens_per_s_macro") or 0 for e in entries]
    kinds = {"tab:gray": "Hugging Face", "tab:blue": "ours, no draft (AR)", "tab:orange": "ours, chains",
             "tab:green": "ours, trees", "tab:red": "ours, + exit stage"}
    colors = ["tab:gray" if e["kind"] != "engine" else ("tab:blue" if not e.get("k") else
              ("tab:green" if e.get("tree") else "tab:orange" if e.get("exit_layer") is None else "tab:red"))
              for e in entries]
    ax.bar(range(len(vals)), vals, color=colors)
    for temp in sorted({e["temperature"] for e in entries}):
        gen = next((e for e in entries if e["kind"] == "hf_generate" and e["temperature"] == temp), None)
        if gen:
            ax.axhline(gen["tokens_per_s_macro"], ls="--", lw=0.8, color="k")
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("tokens/s (incl. prefill, mean of prompts)")
    ax.set_title("decode speed (dashed: HF generate at each T)")
    # the colour key as a legend beside the axes, not in the title (a long title is cut at the figure's edge)
    ax.legend(handles=[Patch(color=c, label=label) for c, label in kinds.items() if c in colors],
              fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    paths.append(out / "speed.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    def nodes(e: dict) -> int:  # draft tokens the target verifies per round: K for a chain, the tree's size
        from .tree_spec import TreeSpec

        return TreeSpec.parse(e["tree"]).total_tokens if e.get("tree") else e["k"]

    fam: dict[str, list[dict]] = {}
    for e in spec:
        key = (f"T{e['temperature']:g} {e['drafter']} {'tree ' if e.get('tree') else ''}{e['method']}"
               + (f" +exit{e['exit_layer']}" if e.get("exit_layer") else ""))
        fam.setdefault(key, []).append(e)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for key, es in fam.items():
        es = sorted(es, key=nodes)
        axes[0].plot([nodes(e) for e in es], [e["tau"] for e in es], marker="o", label=key)
        axes[1].plot([nodes(e) for e in es], [e.get("speedup_vs_generate") or float("nan") for e in es], marker="o",
                     label=key)
    axes[0].set_title("tau vs draft size")
    axes[1].set_title("speed-up over HF generate vs draft size")
    for ax in axes:
        ax.set_xlabel("draft tokens per target pass (K for chains, nodes for trees)")
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "tau_vs_k.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths
