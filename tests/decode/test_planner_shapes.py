"""The planner's chain-vs-tree choice from measured costs (hsd.decode.planner): a tree wins when its measured
round buys enough extra tokens, a chain when the tree's pass costs too much; the costs and their precision are
recorded with the choice."""
from __future__ import annotations

from hsd.decode.planner import plan


def entries(tree_target_s: float) -> list[dict]:
    ar = {"name": "T0/ar", "temperature": 0.0, "kind": "engine", "drafter": "none", "k": 0, "exit_layer": None,
          "target_pass_ms": {1: 50.0}, "tpot_ms": 52.0, "reach_rate": []}
    chain = {"name": "T0/eagle3-k3-greedy", "temperature": 0.0, "kind": "engine", "drafter": "eagle3", "k": 3,
             "method": "greedy", "exit_layer": None, "tree": None, "target_pass_ms": {4: 60.0},
             "reach_rate": [0.6, 0.35, 0.2], "draft_step_ms": 4.0, "tpot_ms": 40.0}
    tree = {"name": "T0/eagle3-tree4x4n16-greedy", "temperature": 0.0, "kind": "engine", "drafter": "eagle3", "k": 4,
            "method": "greedy", "exit_layer": None, "tree": "4:4:16", "target_pass_ms": {17: 1e3 * tree_target_s / 10},
            "reach_rate": [0.8, 0.6, 0.45, 0.3], "rounds": 10, "tpot_ms": 35.0,
            "time_breakdown_s": {"draft": 0.15, "target": tree_target_s, "verify": 0.01}}
    return [ar, chain, tree]


def test_chain_vs_tree_choice_follows_measured_costs():
    cheap = plan(entries(0.7), precision="bfloat16")  # tree round 86 ms for 3.15 tokens: 27 ms/token
    assert cheap["chain_vs_tree"]["T0"]["choice"] == "tree" and cheap["best"]["T0"]["shape"] == "tree"
    assert cheap["best"]["T0"]["precision"] == "bfloat16" and cheap["costs"]["T0"]["pass_ms"][4] == 60.0
    dear = plan(entries(2.0), precision="float32")  # tree round 216 ms: 69 ms/token, chains win
    cvt = dear["chain_vs_tree"]["T0"]
    assert cvt["choice"] == "chain" and dear["best"]["T0"]["shape"] == "chain"
    assert cvt["tree"]["predicted_tpot_ms"] > cvt["chain"]["predicted_tpot_ms"]
    assert {r["name"] for r in dear["predicted_vs_measured"]} == {"T0/eagle3-k3-greedy", "T0/eagle3-tree4x4n16-greedy"}
