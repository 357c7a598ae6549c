"""scripts/decode.py end to end on a tiny chat target with saved heads (table, JSON keys, answer files,
plots), and the metric / planner arithmetic."""
from __future__ import annotations

import json
import random

import pytest

from hsd.decode.cli import main, select_prompts
from hsd.decode.planner import expected_tokens, three_level
from hsd.decode.prompts import Prompt
from hsd.decode.stats import DecodeStats, RoundRecord, summarize
from tests.decode import decode_fixtures as fx

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ("name", "temperature", "k", "method", "tau", "tokens_per_s", "speedup_vs_generate", "exact_match",
        "per_position_acceptance", "verify_cost_ratio")


def test_script_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.conftest import write_tiny_chat_run

    root = write_tiny_chat_run(tmp_path)
    t = fx.frozen(AutoModelForCausalLM.from_pretrained(root / "target"))
    fx.eagle3_head(t, scale=0.05).save_pretrained(tmp_path / "head")
    for layer in (2, 5):
        fx.exit_head(t, "mlp", layer).save_pretrained(tmp_path / "exits" / f"layer_{layer}")
    prompts = tmp_path / "p.jsonl"
    rows = [{"id": f"g{i}", "messages": [{"role": "user", "content": f"what is {i} plus {i}?"}], "source": "gsm8k"}
            for i in range(2)]
    rows.append({"id": "m", "source": "chatterbot/x", "messages": [{"role": "user", "content": "one two"},
                                                                  {"role": "assistant", "content": "x"},
                                                                  {"role": "user", "content": "three"}]})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    rc = main(["--target", str(root / "target"), "--head", str(tmp_path / "head"), "--exit-head",
               str(tmp_path / "exits"), "--exit-layer", "2", "--draft-model", "layers:2", "--prompts", str(prompts),
               "--max-new-tokens", "6", "--k", "2", "--temperature", "0", "1", "--method", "tokenwise", "hsd",
               "--tree", "2:2:4", "--out-dir", str(out)])
    assert rc == 0
    rep = json.loads((out / "decode.json").read_text())
    names = [e["name"] for e in rep["runs"]]
    for need in ("T0/hf_generate", "T0/ar", "T0/hf_lookup-k2", "T0/hf_assisted-k2", "T0/eagle3-k2-greedy",
                 "T0/eagle3-k2-greedy+exit2", "T1/eagle3-k2-hsd", "T1/eagle3-k2-tokenwise+exit2", "T1/model-k2-tokenwise",
                 "T0/eagle3-tree2x2n4-greedy", "T1/eagle3-tree2x2n4-rrs", "T1/eagle3-tree2x2n4-weighted"):
        assert need in names
    for e in rep["runs"]:
        assert all(k in e for k in KEYS), e["name"]
        assert set(e["per_source"]) == {"gsm8k", "multiturn"}
        if e["temperature"] == 0:
            assert e["exact_match"] == 1.0, e["name"]  # every T = 0 configuration reproduces generate()
        if e["kind"] == "engine" and e["k"]:
            assert len(e["per_position_acceptance"]) == 2 and e["verify_cost_ratio"] or e["exit_layer"]
    meta = rep["meta"]
    assert meta["precision"]["decode"] == "float32" and meta["precision"]["row_tile"] is None  # fp32: untiled (auto)
    assert meta["precision"]["head_features"] == "unknown" and meta["machine"]["precision"] == "float32"
    for e in rep["runs"]:
        if e["temperature"] == 0 and e["kind"] == "engine":
            assert e["exact_match_vs_generate"] == 1.0 and e["generate_divergences"] == []
    assert set(rep["exit_agreement"]) == {"2", "5"}
    assert rep["planner"]["best"]["T0"]["predicted_tokens_per_s"] > 0
    planned = {r["name"] for r in rep["planner"]["predicted_vs_measured"]}
    assert {"T0/eagle3-tree2x2n4-greedy", "T1/eagle3-tree2x2n4-weighted"} <= planned
    trees = [e for e in rep["runs"] if e["tree"]]
    assert len(trees) == 3 and all(e["draft_shape"] == "2:2:4" and e["verify_cost_ratio"] for e in trees)
    assert len(list((out / "answers").glob("*.jsonl"))) == len(names)
    assert all((out / f).is_file() for f in ("per_position_acceptance.png", "accept_hist.png", "speed.png",
                                              "tau_vs_k.png"))


def test_bad_tree_is_refused(capsys):
    assert main(["--tree", "4:4", "--no-hf"]) == 2
    assert "TOPK:DEPTH:TOTAL" in capsys.readouterr().err


def test_grid_without_plain_decoding():
    """--no-ar (tau-only studies) drops exactly this engine's plain-decoding runs."""
    from hsd.decode.evaluate import build_grid

    kw = dict(head=True, exit_layers=[4], draft_model=False, trees=["2:2:3"])
    full = [s.name for s in build_grid([0.0, 1.0], [3], ["tokenwise", "hsd"], ["torch"], **kw)]
    tau_only = [s.name for s in build_grid([0.0, 1.0], [3], ["tokenwise", "hsd"], ["torch"], ar=False, **kw)]
    assert {"T0/ar", "T1/ar"} <= set(full) and tau_only == [n for n in full if n not in ("T0/ar", "T1/ar")]


def test_grid_exit_drafters():
    """exit:L drafts at every --k, exit:L:K at its own K only; each alone and under the deeper stages."""
    from hsd.decode.evaluate import build_grid

    names = [s.name for s in build_grid([0.0], [2, 3], ["hsd"], ["torch"], head=False, exit_layers=[3, 6],
                                        draft_model=False, lookup=False, hf=False, exit_drafters=[4, (2, 1)])]
    assert sorted(n for n in names if "exit" in n) == sorted([
        "T0/exit4-k2-greedy", "T0/exit4-k2-greedy+exit6", "T0/exit4-k3-greedy", "T0/exit4-k3-greedy+exit6",
        "T0/exit2-k1-greedy", "T0/exit2-k1-greedy+exit3", "T0/exit2-k1-greedy+exit6"])


def test_select_prompts_spreads_over_sources():
    ps = [Prompt(f"{g}{i}", g, ["x"]) for g in ("gsm8k", "chat", "code") for i in range(5)]
    got = select_prompts(ps, 4)
    assert [p.group for p in got] == ["gsm8k", "chat", "code", "gsm8k"]


def test_tau_identity_and_rates():
    rng = random.Random(0)
    recs = []
    for _ in range(20):
        s = DecodeStats(new_tokens=1)
        for _ in range(rng.randint(1, 9)):
            a = rng.randint(0, 3)
            s.rounds.append(RoundRecord(drafted=3, accepted=a, emitted=a + 1))
            s.new_tokens += a + 1
        s.target_calls = len(s.rounds)
        s.wall = 1.0
        recs.append(s)
    out = summarize(recs)
    assert out["tau"] == pytest.approx(1 + sum(out["reach_rate"]))  # tau = 1 + sum_i P(>= i accepted)
    assert sum(out["accept_hist"]) == out["rounds"]
    r = out["reach_rate"]
    assert out["cond_rate"][1] == pytest.approx(r[1] / r[0])


def test_planner_three_level_matches_monte_carlo():
    rng = random.Random(1)
    k, n, beta, a = 2, 3, 0.6, 0.4
    tok_mc = cost_mc = 0.0
    for _ in range(40000):
        w = rounds = 0
        while w < n:
            j = 0
            while j < k and rng.random() < beta:
                j += 1
            w += j + 1
            rounds += 1
        j = 0
        while j < w and rng.random() < a:
            j += 1
        tok_mc += j + 1
        cost_mc += rounds * 1.0 + 5.0
    tok, cost = three_level(k, n, beta, a, 1.0, 5.0)
    assert tok == pytest.approx(tok_mc / 40000, rel=0.02) and cost == pytest.approx(cost_mc / 40000, rel=0.02)
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_module_demo(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from hsd.decode.__main__ import main as demo
    from tests.conftest import write_tiny_chat_run

    root = write_tiny_chat_run(tmp_path)
    t = fx.frozen(AutoModelForCausalLM.from_pretrained(root / "target"))
    fx.eagle3_head(t).save_pretrained(tmp_path / "head")
    assert demo(["--target", str(root / "target"), "--head", str(tmp_path / "head"), "--max-new-tokens", "5",
                 "--temperature", "1", "--prompt", "what is one plus two?"]) == 0
    fx.exit_head(t, "affine", 3, vd=40).save_pretrained(tmp_path / "exits" / "layer_3")
    assert demo(["--target", str(root / "target"), "--exit-head", str(tmp_path / "exits"), "--drafter", "exit:3",
                 "--max-new-tokens", "5", "--k", "2", "--prompt", "what is one plus two?"]) == 0
    assert "tau" in capsys.readouterr().out
    assert demo(["--target", str(root / "target"), "--head", str(tmp_path / "nope")]) == 2


def test_resume_reuses_finished_configurations(tmp_path, capsys):
    """An interrupted grid continues with --resume: finished configurations are loaded (same numbers), the
    missing ones run, and changed arguments are refused with one clear error."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import write_tiny_chat_run

    root = write_tiny_chat_run(tmp_path)
    t = fx.frozen(AutoModelForCausalLM.from_pretrained(root / "target"))
    fx.eagle3_head(t, scale=0.05).save_pretrained(tmp_path / "head")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "g0", "source": "gsm8k",
                                   "messages": [{"role": "user", "content": "what is 1 plus 1?"}]}) + "\n")
    out = tmp_path / "out"
    argv = ["--target", str(root / "target"), "--head", str(tmp_path / "head"), "--prompts", str(prompts),
            "--max-new-tokens", "5", "--k", "2", "--temperature", "0", "--no-hf", "--no-plots", "--out-dir", str(out)]
    assert main(argv) == 0
    first = {e["name"]: e for e in json.loads((out / "decode.json").read_text())["runs"]}
    assert len(first) >= 3
    # Interrupt after the first configuration: only its pickle survives.
    kept = sorted((out / "partial").glob("*.pkl"))
    for f in kept[1:]:
        f.unlink()
    (out / "decode.json").unlink()
    assert main([*argv, "--resume"]) == 0
    rep = json.loads((out / "decode.json").read_text())
    again = {e["name"]: e for e in rep["runs"]}
    assert set(again) == set(first)
    resumed = rep["meta"]["resumed_configurations"]
    assert len(resumed) == 1
    assert again[resumed[0]]["tokens_per_s"] == first[resumed[0]]["tokens_per_s"]  # loaded, not re-measured
    assert all(again[n]["tau"] == first[n]["tau"] for n in first)  # T = 0: the rerun ones decode the same
    capsys.readouterr()
    changed = [("3" if a == "2" and argv[i - 1] == "--k" else a) for i, a in enumerate(argv)]
    assert main([*changed, "--resume"]) == 2
    assert "k (was [2], now [3])" in capsys.readouterr().err
    assert main([*argv[:-2], "--resume"]) == 2  # --resume without --out-dir
    # A fresh run in the same folder (other arguments) drops the old run's saved configurations ...
    assert main(changed) == 0
    names = {e["name"] for e in json.loads((out / "decode.json").read_text())["runs"]}
    assert "T0/eagle3-k3-greedy" in names and "T0/eagle3-k2-greedy" not in names
    # ... so resuming it reloads exactly its own configurations.
    assert main([*changed, "--resume"]) == 0
    assert set(json.loads((out / "decode.json").read_text())["meta"]["resumed_configurations"]) == names


def test_first_divergences_and_their_margins(tmp_path):
    """Where a T = 0 output first leaves HF generate's (per prompt, first differing turn), and the target's top-2
    logit margin there, measured on the common prefix."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hsd.decode.cli import divergence_margins
    from hsd.decode.evaluate import Models, PromptResult, first_divergences
    from hsd.decode.prompts import render
    from tests.conftest import write_tiny_chat_run

    root = write_tiny_chat_run(tmp_path)
    t = fx.frozen(AutoModelForCausalLM.from_pretrained(root / "target"))
    tok = AutoTokenizer.from_pretrained(root / "target")
    prompts = [Prompt("a", "chat", ["one two"]), Prompt("b", "chat", ["three", "four"])]
    gen = [PromptResult("a", "chat", [[5, 6, 7, 8]], []), PromptResult("b", "chat", [[1, 2], [3, 4, 5]], ["x", "y"])]
    ours = [PromptResult("a", "chat", [[5, 6, 9, 8]], []), PromptResult("b", "chat", [[1, 2], [3, 4]], ["x", "y"])]
    divs = first_divergences(ours, gen)
    assert [(d["id"], d["turn"], d["position"], d["ours"], d["generate"]) for d in divs] == [
        ("a", 0, 2, 9, 7), ("b", 1, 2, None, 5)]  # b: a shorter turn 2 (stopped early)
    assert first_divergences(gen, gen) == []
    margins = divergence_margins(Models(target=t, tokenizer=tok), prompts, {"T0/hf_generate": gen, "T0/ar": ours}, [])
    ids = render(tok, prompts[0], []) + [5, 6]
    with torch.no_grad():
        top = torch.topk(t(torch.tensor([ids])).logits[0, -1].float(), 2)
    assert margins[("a", 0, 2)]["margin"] == float(top.values[0] - top.values[1]) >= 0
    assert margins[("a", 0, 2)]["top2"] == top.indices.tolist() and ("b", 1, 2) in margins


def test_row_tile_in_the_cli(tmp_path, capsys):
    """--row-tile: chains decode tiled and equal this engine's plain greedy decoding; where the gap probe says
    the tile cannot make trees exact (fp32 on this CPU class), greedy trees run untiled, flagged in the meta, in
    the entry and in a warning line."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import write_tiny_chat_run

    root = write_tiny_chat_run(tmp_path)
    t = fx.frozen(AutoModelForCausalLM.from_pretrained(root / "target"))
    fx.eagle3_head(t, scale=0.05).save_pretrained(tmp_path / "head")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "g0", "source": "gsm8k", "messages": [{"role": "user", "content": "one two"}]})
                       + "\n")
    out = tmp_path / "out"
    assert main(["--target", str(root / "target"), "--head", str(tmp_path / "head"), "--prompts", str(prompts),
                 "--max-new-tokens", "5", "--k", "2", "--temperature", "0", "--tree", "2:2:3", "--no-lookup",
                 "--row-tile", "8", "--no-plots", "--out-dir", str(out)]) == 0
    rep = json.loads((out / "decode.json").read_text())
    prec = rep["meta"]["precision"]
    assert prec["row_tile"] == 8 and prec["tree_exact"] is False and prec["greedy_trees_untiled"]
    tile = {e["name"]: e.get("row_tile") for e in rep["runs"] if e["kind"] == "engine"}
    assert tile == {"T0/ar": 8, "T0/eagle3-k2-greedy": 8, "T0/eagle3-tree2x2n3-greedy": None}
    chain = next(e for e in rep["runs"] if e["name"] == "T0/eagle3-k2-greedy")
    assert chain["exact_match"] == 1.0
    assert "greedy trees run untiled" in capsys.readouterr().out
    assert main(["--row-tile", "3", "--k", "3", "--no-hf", "--target", str(root / "target")]) == 2
    assert "row_tile >= 4" in capsys.readouterr().err


def test_script_exit_drafter_and_planner_rows(tmp_path, capsys):
    """--drafter exit:2: early-exit drafting alone and under the deeper exit stage 5 (three levels); every
    T = 0 run reproduces generate; the planner reports each exit configuration against the run without it."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import write_tiny_chat_run

    root = write_tiny_chat_run(tmp_path)
    t = fx.frozen(AutoModelForCausalLM.from_pretrained(root / "target"))
    fx.exit_head(t, "layers", 2).save_pretrained(tmp_path / "a" / "layer_2")
    fx.exit_head(t, "mlp", 5, vd=40).save_pretrained(tmp_path / "b" / "layer_5")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "g", "source": "gsm8k",
                                   "messages": [{"role": "user", "content": "what is 3 plus 4?"}]}) + "\n")
    out = tmp_path / "out"
    base = ["--target", str(root / "target"), "--exit-head", str(tmp_path / "a"), str(tmp_path / "b"),
            "--prompts", str(prompts), "--max-new-tokens", "8", "--k", "2", "--temperature", "0", "1", "--method",
            "hsd", "--no-hf", "--no-lookup", "--no-plots"]
    assert main([*base, "--drafter", "exit:2", "--exit-layer", "5", "--out-dir", str(out)]) == 0
    rep = json.loads((out / "decode.json").read_text())
    names = {e["name"]: e for e in rep["runs"]}
    assert {"T0/exit2-k2-greedy", "T0/exit2-k2-greedy+exit5", "T1/exit2-k2-hsd", "T1/exit2-k2-hsd+exit5"} <= set(names)
    assert names["T0/exit2-k2-greedy"]["exact_match"] == 1.0 and names["T0/exit2-k2-greedy+exit5"]["exact_match"] == 1.0
    rows = {r["name"]: r for r in rep["planner"]["exit"]}
    assert rows["T0/exit2-k2-greedy"]["baseline"] == "T0/ar" and rows["T0/exit2-k2-greedy"]["kind"] == "exit drafter"
    assert rows["T1/exit2-k2-hsd+exit5"]["baseline"] == "T1/exit2-k2-hsd"
    for r in rows.values():
        assert r["predicted_tpot_ms"] > 0 and r["measured_tpot_ms"] > 0 and 0 <= r["achieved_agreement"] <= 1
        assert r["breakeven_agreement"] is None or 0 <= r["breakeven_agreement"] <= 1
    assert "break-even" in capsys.readouterr().out
    assert main([*base, "--drafter", "eagle3", "--out-dir", str(tmp_path / "o2")]) == 2
    assert main([*base, "--drafter", "exit:2:x", "--out-dir", str(tmp_path / "o2")]) == 2
    assert main([*base, "--drafter", "exit:3", "--out-dir", str(tmp_path / "o3")]) == 2
    assert "no exit head for layer 3" in capsys.readouterr().err


def test_planner_exit_drafter_model_and_breakeven():
    from hsd.decode.planner import breakeven_agreement, exit_drafter

    rng = random.Random(2)
    k, a = 3, 0.45
    tok_mc = 0
    for _ in range(40000):
        j = 0
        while j < k and rng.random() < a:
            j += 1
        tok_mc += j + 1
    tok, cost = exit_drafter(k, a, 0.2, 1.3)
    assert tok == pytest.approx(tok_mc / 40000, rel=0.02) and cost == pytest.approx(3 * 0.2 + 1.3)

    def tpot(x):
        t_, c_ = exit_drafter(k, x, 0.2, 1.3)
        return c_ / t_

    need = breakeven_agreement(tpot, 1.0)
    assert tpot(need) == pytest.approx(1.0, rel=1e-6) and tpot(need - 0.01) > 1.0
    assert breakeven_agreement(tpot, 0.4) is None  # 1.9 t1 per round cannot reach 0.4 t1 per token


def _entry(name, drafter, k, *, exit_layer=None, accepted=0, tried=1, draft_ms=0.0, target_s=1.0, rounds=10,
           cpu_s=1.0, tokens=10):
    """A minimal decode.json entry (what plan() reads), at T = 0."""
    return {"name": name, "kind": "engine", "temperature": 0.0, "drafter": drafter, "k": k, "method": "greedy",
            "backend": "torch", "exit_layer": exit_layer, "exit_window": 1 if exit_layer else None, "tree": None,
            "reach_rate": [accepted / tried] * k, "accept_per_position": accepted / tried, "draft_step_ms": draft_ms,
            "target_pass_ms": {1: 100.0} if drafter == "none" else {}, "rounds": rounds,
            "time_breakdown_s": {"target": target_s, "prefill": 0.0}, "cpu_s": cpu_s, "decode_tokens": tokens}


@pytest.mark.parametrize("agreement,wins", [(0.1, False), (0.9, True)])
def test_planner_never_picks_an_exit_drafter_predicted_to_lose(agreement, wins):
    from hsd.decode.planner import plan

    ar = _entry("T0/ar", "none", 0, rounds=10, target_s=1.0, cpu_s=1.0, tokens=10)  # 100 ms per token
    tried = 100
    ex = _entry("T0/exit4-k1-greedy", "exit:4", 1, accepted=int(agreement * tried), tried=tried, draft_ms=15.0,
                rounds=10, target_s=1.2, cpu_s=1.35, tokens=10)
    out = plan(json.loads(json.dumps([ar, ex])))  # as read back from decode.json (str keys)
    row = out["exit"][0]
    assert row["baseline"] == "T0/ar" and row["achieved_agreement"] == pytest.approx(agreement)
    assert (row["breakeven_agreement"] < agreement) == wins
    assert (row["predicted_speedup_vs_baseline"] > 1) == wins
    best = out["best"]["T0"]
    assert best.get("drafter") == "exit:4" if wins else best["name"] == "T0/ar"
