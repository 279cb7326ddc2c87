"""A federation across "hosts" without Docker: Linux network namespaces on one machine.

The SuperLink and three SuperNodes each live in a network namespace of their own
with their own address (10.77.0.1; 10.77.0.11-13), joined by veth pairs to a
bridge in a fourth, "switch", namespace (:mod:`tests.integration.netns`). All four
are real Flower processes talking gRPC (Fleet API) over that LAN.

During round 2 the test unplugs one SuperNode's cable at the switch
(``ip link set <port> down``). The ServerApp must close that round after
``round-timeout`` with the node recorded as "no reply within round-timeout" and
the others accepted, and go on; once the cable is back, the same SuperNode (same
node id, same process) must be accepted again.

Needs root and iproute2: without them it is skipped with a reason that says what is
missing. As root with iproute2 it must run: if the kernel refuses the namespaces
(a container without CAP_SYS_ADMIN / CAP_NET_ADMIN) it fails, naming why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from typing import Any

import pytest

from common.runlog import read_jsonl
from tests.integration.conftest import ROOT, tagged_processes
from tests.integration.netns import (
    NetnsFederation,
    Topology,
    netns_prerequisites_missing,
    netns_unavailable_reason,
)

pytestmark = pytest.mark.integration

NUM_NODES = 3
CUT = 1  # the SuperNode whose cable is pulled during round 2
# Rounds after the cut one: enough for the node to come back even when the SuperLink
# marked it offline meanwhile and its heartbeat is in back-off (up to ~25 s).
ROUNDS = 6
# Long enough for a healthy node's round on a busy 2-core machine (a fresh ClientApp
# process per message, torch import included: measured here up to 18 s for the
# first round under the background load); shorter than the 37.5 s after which the
# SuperLink at the earliest marks a silent node offline (Flower 1.39: heartbeats
# every 17.5-22.5 s, offline 2 x 30 s after the last), so the cut round ends by
# this timeout and not by Flower's "node unavailable" error reply.
ROUND_TIMEOUT = 30.0
HOSTS = ("superlink", *(f"node{i}" for i in range(NUM_NODES)))
ACTIVATED = "[Fleet.ActivateNode] Activated node_id"  # the SuperLink's log line


def _wait(
    what: str,
    done: Callable[[], bool],
    timeout: float,
    fed: NetnsFederation,
    runner_must_live: bool = True,
) -> float:
    """Poll ``done`` until true; fail at once when a Flower process died. Returns seconds."""
    start = time.monotonic()
    while not done():
        dead = fed.dead_processes()
        if runner_must_live:
            dead += [
                p for p in fed.processes if p.name == "flwr-run" and p.popen.poll() is not None
            ]
        if dead:
            tails = "\n".join(f"--- {p.name}:\n{fed.log_of(p.name)[-2500:]}" for p in dead)
            pytest.fail(f"while waiting for {what}: {[p.name for p in dead]} exited\n{tails}")
        if time.monotonic() - start > timeout:
            logs = "\n".join(f"--- {p.name}:\n{fed.log_of(p.name)[-1500:]}" for p in fed.processes)
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
        time.sleep(0.05)
    return time.monotonic() - start


def _node_id(fed: NetnsFederation, pid: int) -> int | None:
    found = re.search(r"SuperNode ID: (\d+)", fed.log_of(f"supernode-{pid}"))
    return int(found.group(1)) if found else None


def test_cut_link_round_times_out_without_the_node_and_it_rejoins(tmp_path, bastion_env):
    missing = netns_prerequisites_missing()
    if missing is not None:
        pytest.skip(f"builds a LAN of Linux network namespaces: {missing}")
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.fail(f"this test builds a LAN of Linux network namespaces and cannot: {reason}")
    env, tag = bastion_env
    out = tmp_path / "run"
    topo = Topology(HOSTS)
    fed: NetnsFederation | None = None
    timeline: dict[str, float] = {}
    leaked: dict[str, list[int]] = {}
    try:
        topo.create()
        fed = federation = NetnsFederation(
            topo,
            tmp_path / "logs",
            torch_threads=1,
            env={k: env[k] for k in ("BASTION_TEST_TAG", "BASTION_CACHE_DIR")},
        )
        fed.start()
        _wait(
            "all SuperNodes to activate",
            lambda: (
                federation.log_of("superlink").count(ACTIVATED) == NUM_NODES
                and all(_node_id(federation, i) is not None for i in range(NUM_NODES))
            ),
            90,
            fed,
            runner_must_live=False,
        )
        ids = {i: _node_id(fed, i) for i in range(NUM_NODES)}
        cut_id = ids[CUT]
        # Each SuperNode reaches the SuperLink from its own address, over the bridge.
        peers = topo.tcp_peers("superlink", NetnsFederation.FLEET_PORT)
        node_addresses = {topo.hosts[f"node{i}"].address for i in range(NUM_NODES)}
        assert set(peers) == node_addresses, peers
        # The Fleet API is bound to the SuperLink host's own address (not loopback).
        assert topo.is_listening(
            "superlink", topo.hosts["superlink"].address, NetnsFederation.FLEET_PORT
        )

        runner = fed.submit(
            ROOT,
            {
                "num-server-rounds": ROUNDS,
                "round-timeout": ROUND_TIMEOUT,
                "min-available-nodes": 2,
                "min-train-nodes": 2,
                "local-epochs": 1,
                "checkpoint-every": 0,
                "seed": 3,
                "output-dir": str(out),
            },
        )
        metrics = out / "metrics.jsonl"
        start = time.monotonic()
        # Round 1's row is written right before round 2's messages go out: pull the
        # cable now, seconds before the node could have fetched, trained and replied.
        _wait("round 1", lambda: any(r["round"] == 1 for r in read_jsonl(metrics)), 150, fed)
        topo.set_link(f"node{CUT}", up=False)
        timeline["cut"] = time.monotonic() - start
        assert not topo.link_is_up(f"node{CUT}")
        waited = _wait(
            "round 2 without the cut node",
            lambda: any(r["round"] == 2 for r in read_jsonl(metrics)),
            ROUND_TIMEOUT + 60,
            fed,
        )
        timeline["round 2 closed"] = time.monotonic() - start
        topo.set_link(f"node{CUT}", up=True)
        timeline["reconnected"] = time.monotonic() - start
        assert topo.link_is_up(f"node{CUT}")
        _wait("the run to finish", lambda: runner.popen.poll() is not None, 300, fed, False)
        timeline["finished"] = time.monotonic() - start
        # The cut SuperNode survived the outage (no process of the federation died).
        assert fed.dead_processes() == []
        link_log = fed.log_of("superlink")
    finally:
        if fed is not None:
            fed.stop()
        leaked = topo.pids()  # anything Flower left inside the namespaces
        topo.destroy()
    # Nothing is left behind: processes, namespaces (and with them bridge and veths).
    assert leaked == {}
    assert topo.leftovers() == []
    assert tagged_processes(tag) == []

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    assert summary["rounds"] == ROUNDS
    rows = {r["round"]: r for r in read_jsonl(out / "metrics.jsonl")}
    by_round: dict[int, dict[int, dict[str, Any]]] = {}
    for d in read_jsonl(out / "diagnostics.jsonl"):
        by_round.setdefault(d["round"], {})[d["node_id"]] = d
    accepted = {
        rnd: {n for n, d in nodes.items() if d["status"] == "accepted"}
        for rnd, nodes in by_round.items()
    }
    others = {ids[i] for i in range(NUM_NODES) if i != CUT}
    # what happened to the cut node, round by round (the failure messages show it)
    story = {
        rnd: (
            by_round[rnd][cut_id]["status"] + ": " + by_round[rnd][cut_id]["reason"]
            if cut_id in by_round[rnd]
            else "not sampled"
        )
        + f" ({rows[rnd]['round_seconds']:.1f} s round)"
        for rnd in sorted(by_round)
    }
    print(f"timeline (s since flwr run): {timeline}\ncut node by round: {story}")

    # Round 1: every host took part.
    assert accepted[1] == set(ids.values()), story
    # Round 2: the cut node is recorded as missing, the others are accepted, and
    # the round closed at round-timeout (it neither hung nor ended early).
    assert by_round[2][cut_id]["status"] == "rejected", story
    assert by_round[2][cut_id]["reason"] == "no reply within round-timeout", story
    assert accepted[2] == others, story
    assert rows[2]["num_accepted"] == NUM_NODES - 1 and rows[2]["num_rejected"] == 1
    assert ROUND_TIMEOUT <= rows[2]["round_seconds"] < ROUND_TIMEOUT + 10, story
    assert waited < ROUND_TIMEOUT + 30
    # Later rounds go on: the connected nodes are accepted in every one of them.
    assert all(others <= accepted[rnd] for rnd in range(3, ROUNDS + 1)), story
    # Cable back in: the same SuperNode (same node id, same process: it was never
    # activated again) is accepted again in a later round.
    assert any(cut_id in accepted[rnd] for rnd in range(3, ROUNDS + 1)), story
    assert link_log.count(ACTIVATED) == NUM_NODES


def test_without_root_or_iproute2_it_skips_naming_what_is_needed(
    monkeypatch, tmp_path, bastion_env
) -> None:
    """Not root, or no ``ip``/``ss``: a skip whose reason says what to get, never a failure."""
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/sbin/{name}")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception) as skipped:
        test_cut_link_round_times_out_without_the_node_and_it_rejoins(tmp_path, bastion_env)
    assert "need root" in str(skipped.value) and "uid 1000" in str(skipped.value)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception) as skipped:
        test_cut_link_round_times_out_without_the_node_and_it_rejoins(tmp_path, bastion_env)
    assert "ip and ss not found: install iproute2" in str(skipped.value)
