"""`bastion grid` end to end on Flower's Simulation Engine: cells, table, plots, resume."""

from __future__ import annotations

import csv
import subprocess

import pytest

from tests.integration.conftest import ROOT, bastion_exe, tagged_processes

pytestmark = pytest.mark.integration

GRID = """
[grid]
clients = 5
malicious = 1
backend = "simulation"

[base]
dataset = "digits"
num-server-rounds = 2
local-steps = 3
num-byzantine = 1
attack-knowledge = "omniscient"
checkpoint-every = 0

[axes]
attack = [{attack = "none"}, {attack = "sign-flip", label = "flip"}]
aggregator = ["mean", "krum"]
"""


def test_grid_runs_cells_writes_the_report_and_resumes(tmp_path, bastion_env):
    pytest.importorskip("ray", reason="needs the simulation extra (pip install -e '.[dev]')")
    env, tag = bastion_env
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    out = tmp_path / "out"
    cmd = [*bastion_exe(), "grid", str(grid), "--out", str(out), "--cell-timeout", "300"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "4 to run" in first.stdout and "[4/4]" in first.stdout
    with open(out / "results.csv") as fh:
        rows = {(r["attack"], r["aggregator"]): r for r in csv.DictReader(fh)}
    assert set(rows) == {(a, g) for a in ("none", "flip") for g in ("mean", "krum")}
    assert all(r["status"] == "completed" and r["rounds"] == "2" for r in rows.values())
    # the sign-flipping attacker gets weight 1/5 under the mean, and Krum leaves it out
    assert float(rows[("flip", "mean")]["mean_malicious_influence"]) == pytest.approx(0.2)
    assert float(rows[("flip", "krum")]["mean_malicious_influence"]) == 0.0
    for plot in ("accuracy_curves.png", "heatmap-all.png", "krum_selection.png"):
        assert (out / plot).stat().st_size > 5000, plot
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "4 already done, 0 to run" in again.stdout
    assert tagged_processes(tag) == []
