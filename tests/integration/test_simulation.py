"""The Bastion app on Flower's Simulation Engine (Ray backend), via ``bastion.simulation``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bastion.simulation as simulation
from bastion.federation import processes_in_groups, tagged_groups
from bastion.simulation import (
    RAY_MISSING_MESSAGE,
    SimulationUnavailableError,
    federation_config,
    ray_available,
    run_simulation,
)
from task.federated import PartitionSpec, load_client_data
from tests.integration.conftest import ROOT, describe_processes, tagged_processes

pytestmark = pytest.mark.integration

needs_ray = pytest.mark.skipif(
    not ray_available(),
    reason="ray is not installed; install the simulation extra: pip install -e '.[simulation]'",
)

NUM_CLIENTS = 6
TEST_FRACTION = 0.5  # not the default 0.2: shows the run config reaches every ClientApp


def test_without_ray_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(simulation, "ray_available", lambda: False)
    with pytest.raises(SimulationUnavailableError, match=r"pip install -e '\.\[simulation\]'"):
        run_simulation(num_supernodes=2, run_config={}, output_dir=tmp_path / "run")
    assert "simulation extra" in RAY_MISSING_MESSAGE
    assert not (tmp_path / "run").exists()  # failed before anything started


def test_federation_config_keys_and_checks():
    assert federation_config(25, cpus_per_client=1, gpus_per_client=0.25, ray_num_cpus=4) == {
        "num-supernodes": 25,
        "backend": "ray",
        "client-resources-num-cpus": 1,
        "client-resources-num-gpus": 0.25,
        "verbose": False,
        "init-args-num-cpus": 4,
    }
    with pytest.raises(ValueError, match="num_supernodes"):
        federation_config(0)
    with pytest.raises(TypeError, match="integer"):
        federation_config(4, cpus_per_client=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gpus_per_client"):
        federation_config(4, gpus_per_client=-1.0)


@needs_ray
def test_six_virtual_supernodes_train_digits_and_nothing_is_left_running(tmp_path, bastion_env):
    env, tag = bastion_env
    out = tmp_path / "run"
    seen: list[int] = []
    groups: set[int] = set()  # process groups of the simulation, noted while it runs

    def on_round(row: dict) -> None:
        seen.append(row["round"])
        groups.update(tagged_groups("BASTION_TEST_TAG", tag))

    result = run_simulation(
        num_supernodes=NUM_CLIENTS,
        run_config={
            "num-server-rounds": 2,
            "local-steps": 5,
            "seed": 1,
            "local-test-fraction": TEST_FRACTION,
            "min-available-nodes": NUM_CLIENTS,
            "min-train-nodes": NUM_CLIENTS,
        },
        output_dir=out,
        cpus_per_client=1,
        env=env,
        timeout=400,
        on_round=on_round,
    )
    flwr_log = (result.log_dir / "flwr-run.log").read_text(errors="replace")
    assert result.exit_code == 0, f"{result.error}\n{flwr_log[-4000:]}"
    # Every process of the simulation (SuperLink, SuperExec, flwr-simulation, Ray's
    # GCS, raylet, agents and actors) inherited the test's tag and is gone, and so is
    # every member of their process groups (a Ray agent's environment can hide the tag).
    left = tagged_processes(tag) + processes_in_groups(groups)
    assert groups and left == [], describe_processes(left)
    assert result.output_dir == out.resolve() and seen == [0, 1, 2]

    summary = json.loads((out / "summary.json").read_text())
    assert summary == result.summary
    assert summary["status"] == "completed"
    assert summary["rounds"] == 2 and summary["num_clients"] == NUM_CLIENTS
    # Chance is 0.1 on ten classes.
    assert summary["final_accuracy"] > 0.3
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.15

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["num_accepted"] == NUM_CLIENTS and r["num_rejected"] == 0 for r in rows[1:])

    diags = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    assert len(diags) == 2 * NUM_CLIENTS
    assert all(d["status"] == "accepted" for d in diags)
    assert len({d["node_id"] for d in diags}) == NUM_CLIENTS
    # Flower's simulation sets partition-id / num-partitions for each virtual node,
    # and the ClientApps split their data with the run config given here.
    assert {d["partition_id"] for d in diags} == set(range(NUM_CLIENTS))
    spec = PartitionSpec(
        dataset="digits",
        num_partitions=NUM_CLIENTS,
        partitioner="iid",
        seed=1,
        alpha=0.5,
        classes_per_partition=2,
        test_fraction=TEST_FRACTION,
    )
    for d in diags:
        expected = len(load_client_data(spec, d["partition_id"]).train)
        assert d["num_examples"] == expected
    assert json.loads((out / "config.json").read_text())["local-test-fraction"] == TEST_FRACTION


@needs_ray
def test_interrupt_stops_ray_and_every_flower_process(tmp_path, bastion_env):
    env, tag = bastion_env
    code = (
        "import signal\n"
        "from pathlib import Path\n"
        "from bastion.simulation import run_simulation\n"
        # a caller where Ctrl-C works (a shell's background job would inherit SIG_IGN)
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "run_simulation(num_supernodes=4, run_config={'num-server-rounds': 1000, "
        f"'local-steps': 5}}, output_dir=Path({str(tmp_path / 'run')!r}), timeout=600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 300
        while not _actors(tag):  # Ray is up and the ClientApp actors exist
            assert proc.poll() is None, "the simulation ended before it was interrupted"
            assert time.monotonic() < deadline, "no ClientApp actor started within 300 s"
            time.sleep(0.5)
        groups = tagged_groups("BASTION_TEST_TAG", tag)  # the caller's (pytest's) excluded
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = tagged_processes(tag) + processes_in_groups(groups)
    assert groups and left == [], f"still running after the interrupt:\n{describe_processes(left)}"


def _actors(tag: str) -> list[int]:
    found = []
    for pid in tagged_processes(tag):
        try:
            if b"ClientAppActor" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def test_module_does_not_import_ray():
    """``bastion.simulation`` imports without Ray, so the CLI can report the missing extra."""
    code = "import sys, bastion.simulation; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env=dict(os.environ))
