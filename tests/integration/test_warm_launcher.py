"""The warm launcher over real processes (``bastion supernode``; bastion.warm_exec).

A real SuperLink and two SuperNodes on loopback (gRPC Fleet API), each started as
``bastion run`` starts them: ``python -m bastion.supernode`` supervising Flower's
SuperNode and a warm SuperExec. A probe Flower App (``probe_app/``) reports, from
each ClientApp task, the process it ran in. The tests show that

* each task runs in a new child forked from the node's warm SuperExec, which had
  torch imported before the task started (no torch import per task);
* a run shipping a new app version is served the new code by the same warm parent;
* a task that crashes, and one that hangs past the task timeout, are answered with
  an error reply the ServerApp receives (with the reason), and the next round is
  served;
* a warm SuperExec that dies is started again by its supervisor and serves the next
  run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.federation import LocalFederation
from tests.integration.conftest import running_federation

pytestmark = pytest.mark.integration

PROBE = Path(__file__).resolve().parent / "probe_app"
TASK_TIMEOUT = 8.0


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[LocalFederation]:
    base = tmp_path_factory.mktemp("warm")
    # insecure: this test is about processes; test_security covers TLS and node keys
    with running_federation(base / "logs", 2, insecure=True, task_timeout=TASK_TIMEOUT) as fed:
        yield fed


def _probe(fed: LocalFederation, app: Path, out: Path, rounds: int, **cfg: object) -> list[dict]:
    """Run the probe app for ``rounds`` rounds; return its rows (one per node and round)."""
    fed.submit(app, {"out": str(out), "rounds": rounds, "nodes": 2, **cfg})
    deadline = time.monotonic() + 240
    while True:
        rows = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
        if len(rows) >= 2 * rounds:
            return rows
        if time.monotonic() > deadline:
            pytest.fail(
                f"the probe run wrote {len(rows)} of {2 * rounds} rows; logs in {fed.log_dir}"
            )
        time.sleep(0.2)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_tasks_fork_from_a_warm_parent_and_a_new_app_version_is_loaded(
    federation: LocalFederation, tmp_path: Path
) -> None:
    fed = federation
    rows = _probe(fed, PROBE, tmp_path / "v1.jsonl", rounds=2)
    assert all("error" not in r for r in rows), rows
    assert {r["tag"] for r in rows} == {"v1"}
    # torch was imported by the parent, before the task imported the app
    assert all(r["torch_preloaded"] for r in rows)
    by_node: dict[int, list[dict]] = {}
    for r in rows:
        by_node.setdefault(r["partition"], []).append(r)
    assert sorted(by_node) == [0, 1]
    parents = {}
    for partition, node_rows in by_node.items():
        assert len({r["pid"] for r in node_rows}) == 2  # a new child per task
        (parent,) = {r["ppid"] for r in node_rows}  # the same warm parent
        assert "bastion.warm_exec" in _cmdline(parent)
        assert parent in fed.supernode_group(partition)
        parents[partition] = parent
    assert len(set(parents.values())) == 2  # one warm parent per SuperNode

    # the same parents serve a new app version: the tasks run the new code
    v2 = tmp_path / "probe_v2"
    shutil.copytree(PROBE, v2)
    client = v2 / "probe" / "client.py"
    client.write_text(client.read_text().replace('TAG = "v1"', 'TAG = "v2"'))
    manifest = v2 / "pyproject.toml"
    manifest.write_text(manifest.read_text().replace('version = "1.0.0"', 'version = "1.0.1"'))
    rows = _probe(fed, v2, tmp_path / "v2.jsonl", rounds=1)
    assert {r["tag"] for r in rows} == {"v2"}
    assert {r["partition"]: r["ppid"] for r in rows} == parents


def test_crashed_and_hung_tasks_are_answered_and_the_next_round_is_served(
    federation: LocalFederation, tmp_path: Path
) -> None:
    rows = _probe(
        federation,
        PROBE,
        tmp_path / "faults.jsonl",
        rounds=2,
        **{"crash-partition": 0, "hang-partition": 1, "fail-round": 1},
    )
    first = [r for r in rows if r["round"] == 1]
    reasons = sorted(r.get("error", "") for r in first)
    assert len(reasons) == 2
    assert "killed by signal SIGKILL" in reasons[0]
    assert f"task timeout of {TASK_TIMEOUT:g} s" in reasons[1]
    second = [r for r in rows if r["round"] == 2]
    assert sorted(r["partition"] for r in second if "error" not in r) == [0, 1]


def test_a_dead_warm_parent_is_restarted_and_serves_the_next_run(
    federation: LocalFederation, tmp_path: Path
) -> None:
    fed = federation
    (parent,) = [p for p in fed.supernode_group(0) if "bastion.warm_exec" in _cmdline(p)]
    os.kill(parent, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        parents = [p for p in fed.supernode_group(0) if "bastion.warm_exec" in _cmdline(p)]
        if parents and parents != [parent]:
            break
        assert time.monotonic() < deadline, "the warm SuperExec was not started again"
        time.sleep(0.2)
    rows = _probe(fed, PROBE, tmp_path / "after.jsonl", rounds=1)
    node0 = [r for r in rows if r.get("partition") == 0]
    assert node0 and node0[0]["ppid"] == parents[0]


def test_the_plain_flower_launcher_still_runs_a_new_process_per_task(tmp_path: Path) -> None:
    """``launcher="flower"`` (``bastion run --launcher flower``, ``BASTION_LAUNCHER=flower``)
    is Flower's stock path: each task is a fresh ``flwr-clientapp`` process started by
    Flower's SuperExec, with no torch loaded before the app."""
    with running_federation(tmp_path / "logs", 2, insecure=True, launcher="flower") as fed:
        rows = _probe(fed, PROBE, tmp_path / "plain.jsonl", rounds=1)
    assert all("error" not in r for r in rows), rows
    assert not any(r["torch_preloaded"] for r in rows)
