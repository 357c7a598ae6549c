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
