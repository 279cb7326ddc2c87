"""Malicious SuperNodes over a real loopback gRPC federation, one of each attack.

The nodes are made malicious the deployment way, by their own ``--node-config``
(``role="malicious" attack=...``); the honest nodes get no extra configuration.
Each attack must leave its signature in the run's ``diagnostics.jsonl``.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from tests.integration.conftest import run_local_federation, tagged_processes

pytestmark = pytest.mark.integration

SIGMA = 200.0
NODES: dict[int, dict[str, object]] = {
    0: {"role": "malicious", "attack": "ipm", "attack-epsilon": 2.0, "attack-knowledge": "own"},
    1: {"role": "malicious", "attack": "sign-flip", "attack-knowledge": "own"},
    2: {"role": "malicious", "attack": "label-flip"},
    3: {"role": "malicious", "attack": "gaussian", "attack-sigma": SIGMA},
    4: {"role": "malicious", "attack": "scaling", "attack-scale": 10.0, "attack-knowledge": "own"},
    # two colluding pairs, each with its own side channel
    5: {"role": "malicious", "attack": "alie", "attack-z": 1.0, "num-colluders": 2},
    6: {"role": "malicious", "attack": "alie", "attack-z": 1.0, "num-colluders": 2},
    7: {"role": "malicious", "attack": "mimic", "num-colluders": 2},
    8: {"role": "malicious", "attack": "mimic", "num-colluders": 2},
    # 9, 10, 11: honest, no node config beyond their partition
}
NUM_NODES = 12


def test_one_malicious_node_of_each_kind_shows_in_the_diagnostics(tmp_path, bastion_env):
    nodes = {pid: dict(cfg) for pid, cfg in NODES.items()}
    for pid in (5, 6):
        nodes[pid]["collusion-dir"] = str(tmp_path / "alie-channel")
    for pid in (7, 8):
        nodes[pid]["collusion-dir"] = str(tmp_path / "mimic-channel")
    out, _ = run_local_federation(
        tmp_path,
        bastion_env,
        NUM_NODES,
        {
            "num-server-rounds": 1,
            "local-steps": 5,
            "aggregator": "median",
            "min-available-nodes": NUM_NODES,
            "min-train-nodes": NUM_NODES,
        },
        timeout=420,
        node_config=nodes,
    )

    diags = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    by_pid = {d["partition_id"]: d for d in diags}
    assert sorted(by_pid) == list(range(NUM_NODES))
    assert all(d["status"] == "accepted" for d in diags)
    assert {p for p, d in by_pid.items() if d["malicious"]} == set(NODES)
    honest = [by_pid[p] for p in (9, 10, 11)]
    honest_norm = statistics.median(d["update_norm"] for d in honest)
    honest_cos = [d["cosine_to_aggregate"] for d in honest]
    assert min(honest_cos) > 0.3  # the median stays with the honest direction

    # IPM with eps = 2 and only its own estimate: -2 x an honest update
    assert by_pid[0]["cosine_to_aggregate"] < 0
    assert 1.2 * honest_norm < by_pid[0]["update_norm"] < 3.5 * honest_norm
    # sign flip: -1 x an honest update
    assert by_pid[1]["cosine_to_aggregate"] < 0
    assert 0.5 * honest_norm < by_pid[1]["update_norm"] < 2 * honest_norm
    # label flip trains towards other labels: less aligned than any honest node
    assert by_pid[2]["cosine_to_aggregate"] < min(honest_cos)
    # gaussian: norm sigma * sqrt(d), no direction
    dim = _model_dim(out)
    assert by_pid[3]["update_norm"] == pytest.approx(SIGMA * math.sqrt(dim), rel=0.05)
    # (not exactly 0: as one of 12 values per coordinate it moves the median a rank)
    assert abs(by_pid[3]["cosine_to_aggregate"]) < 0.25
    # scaling: 10 x an honest update
    assert 5 * honest_norm < by_pid[4]["update_norm"] < 20 * honest_norm
    assert by_pid[4]["cosine_to_aggregate"] > 0
    # colluders send identical vectors (same norm and cosine to the aggregate)
    for a, b in ((5, 6), (7, 8)):
        assert by_pid[a]["update_norm"] == pytest.approx(by_pid[b]["update_norm"], rel=1e-6)
        assert by_pid[a]["cosine_to_aggregate"] == pytest.approx(
            by_pid[b]["cosine_to_aggregate"], rel=1e-6
        )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["num_malicious_accepted"] == len(NODES)


def _model_dim(run_dir: Path) -> int:
    import torch

    ckpt = torch.load(run_dir / "checkpoints" / "round-0001.pt", weights_only=False)
    return sum(int(v.numel()) for v in ckpt["model"].values())


def test_omniscient_attackers_are_refused_on_a_real_federation(tmp_path, bastion_env):
    env, tag = bastion_env
    from tests.integration.conftest import run_bastion

    out = tmp_path / "run"
    res = run_bastion(
        [
            "--clients",
            "3",
            "--malicious",
            "1",
            "--attack",
            "ipm",
            "--output-dir",
            str(out),
            "--run-config",
            'attack-knowledge="omniscient"',
        ],
        env,
        timeout=120,
    )
    assert res.returncode == 2
    assert "simulation-only research mode" in res.stderr and "attack-knowledge" in res.stderr
    assert not (out / "logs").exists() and tagged_processes(tag) == []
