"""DP-SGD over a real loopback federation: ``bastion run`` with ``dp = true``.

Three SuperNodes train digits with DP-SGD (Abadi et al., 2016; Opacus, Yousefpour et
al., 2021) for two rounds; each node's whole-run epsilon (RDP accounting, Mironov,
2017) must reach the server's diagnostics and grow from round 1 to round 2.
"""

from __future__ import annotations

import json

import pytest

from client.privacy import PrivacyLedger
from tests.integration.conftest import run_bastion, tagged_processes

pytestmark = pytest.mark.integration


def test_dp_federation_reports_each_nodes_growing_epsilon(tmp_path, bastion_env):
    env, tag = bastion_env
    env["BASTION_STATE_DIR"] = str(tmp_path / "state")
    out = tmp_path / "run"
    proc = run_bastion(
        [
            "--clients",
            "3",
            "--rounds",
            "2",
            "--seed",
            "2",
            "--output-dir",
            str(out),
            "--run-config",
            "dp=true local-steps=3 dp-noise-multiplier=1.0 dp-delta=1e-5",
        ],
        env,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert tagged_processes(tag) == []  # every process bastion started is gone

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert summary["dp_delta"] == 1e-5 and summary["max_epsilon"] > 0

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["round"] >= 1]
    assert [r["num_accepted"] for r in trained] == [3, 3]
    assert 0 < trained[0]["max_dp_epsilon"] < trained[1]["max_dp_epsilon"]
    assert summary["max_epsilon"] == trained[1]["max_dp_epsilon"]
    assert all(r["train_loss"] is None for r in trained)  # DP replies carry no train loss

    diags = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    assert len(diags) == 6 and all(d["status"] == "accepted" for d in diags)
    eps = {(d["partition_id"], d["round"]): d["dp_epsilon"] for d in diags}
    for pid in range(3):
        assert 0 < eps[pid, 1] < eps[pid, 2]
    assert max(eps.values()) == summary["max_epsilon"]
    assert (out / "privacy_epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Each node's ledger survived its ClientApp processes: two rounds of 3 steps each,
    # and the epsilon it reported in round 2 is the ledger's whole-run epsilon.
    ledgers = sorted((tmp_path / "state").glob("privacy-run-*-partition-*.json"))
    assert len(ledgers) == 3
    for path in ledgers:
        ledger = PrivacyLedger(path)
        assert [(e.round, e.steps, e.noise_multiplier) for e in ledger.entries] == [
            (1, 3, 1.0),
            (2, 3, 1.0),
        ]
        pid = int(path.stem.rsplit("-", 1)[1])
        assert ledger.epsilon(1e-5) == pytest.approx(eps[pid, 2], rel=1e-12)
