"""Reputation over a real loopback gRPC federation: a loud attacker is quarantined.

Three honest SuperNodes and one that sends gaussian noise (sigma = 200, Blanchard
et al. 2017's "gaussian" Byzantine node) train under the coordinate-wise median
with quarantine on. The noise node is far from the aggregate in round 1, so its
suspicion crosses the threshold at once; it must then get no instruction in
rounds 2 and 3 (quarantine-rounds = 2), come back in round 4, and be the only
node the run's summary, ``reputation.json`` and ``reputation.png`` name.
"""

from __future__ import annotations

import json

import pytest

from common.runlog import read_jsonl
from tests.integration.conftest import run_local_federation

pytestmark = pytest.mark.integration

NUM_NODES = 4
ATTACKER = 3
THRESHOLD = 0.6


def test_far_away_node_is_quarantined_for_its_rounds_and_comes_back(tmp_path, bastion_env):
    out, summary = run_local_federation(
        tmp_path,
        bastion_env,
        NUM_NODES,
        {
            "num-server-rounds": 4,
            "local-steps": 5,
            "aggregator": "median",
            "min-available-nodes": NUM_NODES,
            "min-train-nodes": NUM_NODES - 1,
            "quarantine-threshold": THRESHOLD,
            "quarantine-rounds": 2,
            "reputation-decay": 0.3,
            "reputation-weight-far": 1.0,
        },
        timeout=400,
        node_config={ATTACKER: {"role": "malicious", "attack": "gaussian", "attack-sigma": 200.0}},
    )

    diags = read_jsonl(out / "diagnostics.jsonl")
    partition_of = {d["node_id"]: d["partition_id"] for d in diags if d["partition_id"] is not None}
    attacker = next(n for n, p in partition_of.items() if p == ATTACKER)
    by_round: dict[int, dict[int, dict]] = {}
    for d in diags:
        by_round.setdefault(d["round"], {})[d["node_id"]] = d
    story = {
        r: {n: (d["status"], d["suspicion"]) for n, d in v.items()} for r, v in by_round.items()
    }

    # round 1: everyone trains; the noise node ends above the threshold, the others well below
    assert by_round[1][attacker]["status"] == "accepted", story
    assert by_round[1][attacker]["suspicion"] >= THRESHOLD, story
    honest = [n for n in partition_of if n != attacker]
    assert all(by_round[r][n]["suspicion"] < THRESHOLD for r in by_round for n in honest), story
    # rounds 2-3: left out (a "quarantined" row, no reply from it), the round goes on
    for rnd in (2, 3):
        assert by_round[rnd][attacker]["status"] == "quarantined", story
        assert {n for n, d in by_round[rnd].items() if d["status"] == "accepted"} == set(honest)
    # round 4: the quarantine is over and it is asked again
    assert by_round[4][attacker]["status"] == "accepted", story

    rows = {r["round"]: r for r in read_jsonl(out / "metrics.jsonl")}
    assert rows[1]["newly_quarantined_nodes"] == [attacker]
    assert rows[2]["quarantined_nodes"] == rows[3]["quarantined_nodes"] == [attacker]
    assert rows[4]["quarantined_nodes"] == []
    assert rows[2]["num_replies"] == NUM_NODES - 1
    assert summary["nodes_quarantined"] == [attacker]

    report = {e["node_id"]: e for e in json.loads((out / "reputation.json").read_text())}
    assert report[attacker]["malicious"] and report[attacker]["rounds_quarantined"] == [2, 3]
    assert all(report[n]["rounds_quarantined"] == [] for n in honest)
    assert (out / "reputation.png").read_bytes().startswith(b"\x89PNG")
