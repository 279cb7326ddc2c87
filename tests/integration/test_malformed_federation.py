"""The malformed-reply corpus over a real loopback gRPC federation.

Three honest SuperNodes and two with node config ``role = "malformed"``
(partitions 3 and 4) train digits with the ``mean`` aggregator, the least robust
rule (one accepted NaN or 1e30 update would ruin the model). By the rule in
:mod:`client.malformed` the two malformed nodes send, between them, every kind of
the corpus once in ``ceil(K / 2)`` rounds. Each must show in ``diagnostics.jsonl``
as rejected for its kind's reason (the patterns of the unit tests), every round
must aggregate exactly the three honest nodes, and the model must stay finite and
learn.

A sixth SuperNode (partition 5) has ``role = "fuzz"``: every round it sends its
honest reply with one ``.npy`` header byte-mutated (seeded; it logs the
mutation). Each of its replies must be rejected with a bounded reason or accepted
(a header mutation that changes nothing the parser reads: the values are honest);
nothing it sends may stop the ServerApp.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from client.malformed import KIND_NAMES, kind_for_round
from strategies.validation import MAX_REASON_CHARS
from tests.integration.conftest import run_local_federation
from tests.unit.test_malformed import EXPECTED_REASONS

pytestmark = pytest.mark.integration

NUM_NODES = 6
HONEST = (0, 1, 2)
MALFORMED = (3, 4)  # consecutive partition ids: together they cover the corpus
FUZZ = 5
ROUNDS = math.ceil(len(KIND_NAMES) / 2)
MAX_REPLY_BYTES = 2**20
LOG_LINE = re.compile(
    r"malformed node (?P<node>\d+) \(partition (?P<pid>\d+)\), round (?P<round>\d+): "
    r"sends kind '(?P<kind>[a-z0-9-]+)'"
)
FUZZ_LINE = re.compile(
    r"fuzz node (?P<node>\d+) \(partition (?P<pid>\d+)\), round (?P<round>\d+): "
    r"array '(?P<array>[a-z0-9.]+)': (?P<what>.*)"
)


def test_every_malformed_kind_is_rejected_over_a_real_federation(tmp_path, bastion_env):
    out, summary = run_local_federation(
        tmp_path,
        bastion_env,
        NUM_NODES,
        {
            "num-server-rounds": ROUNDS,
            "local-steps": 5,
            "aggregator": "mean",
            "min-available-nodes": NUM_NODES,
            "min-train-nodes": NUM_NODES,
            "round-timeout": 60.0,
            "max-reply-bytes": MAX_REPLY_BYTES,
        },
        timeout=480,
        node_config={pid: {"role": "malformed"} for pid in MALFORMED} | {FUZZ: {"role": "fuzz"}},
    )
    assert summary["rounds"] == ROUNDS

    # Ground truth from the malformed nodes' own logs; it must follow the documented rule.
    sent: dict[tuple[int, int], str] = {}  # (round, node id) -> kind
    node_of: dict[int, int] = {}  # partition id -> node id
    for pid in MALFORMED:
        log_text = (tmp_path / "logs" / f"supernode-{pid}.log").read_text()
        for m in LOG_LINE.finditer(log_text):
            assert int(m["pid"]) == pid
            assert m["kind"] == kind_for_round(KIND_NAMES, int(m["round"]), pid)
            node_of[pid] = int(m["node"])
            sent[int(m["round"]), int(m["node"])] = m["kind"]
    assert len(sent) == len(MALFORMED) * ROUNDS
    assert set(sent.values()) == set(KIND_NAMES)  # every kind was sent
    fuzzed = {
        int(m["round"]): (int(m["node"]), m["what"])
        for m in FUZZ_LINE.finditer((tmp_path / "logs" / f"supernode-{FUZZ}.log").read_text())
    }
    assert sorted(fuzzed) == list(range(1, ROUNDS + 1))  # a mutated reply every round
    fuzz_node = {node for node, _ in fuzzed.values()}.pop()

    diags = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    by_round: dict[int, list[dict]] = {}
    for d in diags:
        by_round.setdefault(d["round"], []).append(d)
    assert sorted(by_round) == list(range(1, ROUNDS + 1))
    fuzz_outcomes: dict[str, int] = {}
    for server_round, nodes in by_round.items():
        accepted = [d for d in nodes if d["status"] == "accepted"]
        rejected = {d["node_id"]: d for d in nodes if d["status"] == "rejected"}
        assert len(nodes) == NUM_NODES, server_round
        # the three honest nodes were aggregated, and the fuzz node only if its
        # mutation left the header saying what it said
        honest = sorted(d["partition_id"] for d in accepted if d["node_id"] != fuzz_node)
        assert honest == list(HONEST), server_round
        assert set(node_of.values()) <= set(rejected), server_round
        for node_id, diag in rejected.items():
            if node_id == fuzz_node:
                assert diag["reason"] and len(diag["reason"]) <= MAX_REASON_CHARS + 40
                continue
            kind = sent[server_round, node_id]
            assert re.search(EXPECTED_REASONS[kind], diag["reason"]), (kind, diag["reason"])
            if "limit" in re.compile(EXPECTED_REASONS[kind]).groupindex:
                limit = re.search(EXPECTED_REASONS[kind], diag["reason"])["limit"]
                assert int(limit) == MAX_REPLY_BYTES
        outcome = "rejected" if fuzz_node in rejected else "accepted"
        fuzz_outcomes[outcome] = fuzz_outcomes.get(outcome, 0) + 1
    print(f"\nfuzz node over gRPC, {ROUNDS} mutated replies: {fuzz_outcomes}")
    assert fuzz_outcomes.get("rejected", 0) > 0

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    assert all(math.isfinite(r["central_accuracy"]) for r in rows)
    for row in rows[1:]:
        assert (row["num_accepted"], row["num_rejected"]) in ((3, 3), (4, 2))
        assert row["aggregation_error"] is None
    # chance is 0.1 on ten classes
    assert summary["final_accuracy"] > 0.8
    assert summary["final_accuracy"] > rows[0]["central_accuracy"] + 0.5

    ckpt = torch.load(out / "checkpoints" / f"round-{ROUNDS:04d}.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
