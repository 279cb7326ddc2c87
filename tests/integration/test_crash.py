"""Crash safety over real Flower processes: a killed ServerApp resumes from its last
checkpoint; a killed SuperNode is named, its round goes on without it, and it rejoins
with the client momentum it had kept.

One secure federation (TLS, SuperNode authentication: every node has a registered key
and so a fixed node id) of three SuperNodes serves both tests. Processes are killed
with SIGKILL, so nothing gets a chance to clean up: the ServerApp writes no summary,
the SuperNode never tells the SuperLink that it leaves.

Flower 1.39 timings these tests rely on (docs/RELIABILITY.md): a SuperNode heartbeats
every 17.5-22.5 s and the SuperLink counts it online until 2 x 30 s after its last
heartbeat, so a killed node turns offline 37.5-60 s after the kill; a message to an
offline node gets an error reply from the SuperLink (NODE_UNAVAILABLE).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from bastion.federation import LocalFederation
from tests.integration.conftest import ROOT, running_federation

pytestmark = pytest.mark.integration

NUM_NODES = 3


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[LocalFederation]:
    """A running secure federation of three SuperNodes; every process is gone after."""
    base = tmp_path_factory.mktemp("crash")
    env = {
        "BASTION_CACHE_DIR": str(base / "cache"),
        "BASTION_STATE_DIR": str(base / "state"),  # the nodes' client momentum
    }
    with running_federation(base / "logs", NUM_NODES, env=env, torch_threads=1) as fed:
        yield fed


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(what: str, check: Callable[[], bool], fed: LocalFederation, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; logs in {fed.log_dir}")
        if [p for p in fed.dead_processes() if p.name == "superlink"]:
            pytest.fail(f"the SuperLink died; see {fed.log_dir / 'superlink.log'}")
        time.sleep(0.1)


def _started_after(pid: int, when: float) -> bool:
    """Whether process ``pid`` started after wall-clock time ``when`` (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time since boot
    boot = time.time() - float(Path("/proc/uptime").read_text().split()[0])
    return boot + ticks / os.sysconf("SC_CLK_TCK") > when


def _finish(fed: LocalFederation, runner, out: Path, timeout: float = 300) -> dict:
    runner.popen.wait(timeout=timeout)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", (fed.log_dir / "flwr-run.log").read_text()[-3000:]
    return summary


# ------------------------------------------------------------------ ServerApp crash
SERVER_RUN = {
    "num-server-rounds": 2,
    "local-steps": 3,
    "batch-size": 32,
    "seed": 1,
    "server-momentum": 0.9,  # round 2 moves by 0.9 x round 1's step + its own: v must survive
    "checkpoint-every": 1,
    "round-timeout": 120.0,
    "min-available-nodes": NUM_NODES,
    "min-train-nodes": NUM_NODES,
}


def test_killed_serverapp_resumes_from_its_last_checkpoint(federation, tmp_path) -> None:
    """Round 1 is done and checkpointed, round 2 is in flight: SIGKILL the ServerApp,
    submit the run again with ``resume = true``. It continues with round 2 in the same
    folder and ends with the model an uninterrupted run (the reference, run on the same
    nodes at the same time as the resumed one) ends with."""
    fed = federation
    out, ref, k = tmp_path / "crashed", tmp_path / "reference", 1
    fed.submit(ROOT, SERVER_RUN | {"output-dir": str(out)})
    # round k's row is written and round k + 1's ClientApps (started since) train
    _wait_for(f"round {k}", lambda: len(_rows(out / "metrics.jsonl")) == k + 1, fed, 300)
    row_k = _rows(out / "metrics.jsonl")[k]["time"]
    _wait_for(
        f"round {k + 1} in flight",
        lambda: any(_started_after(p, row_k) for p in fed.clientapp_pids()),
        fed,
        timeout=120,
    )
    (serverapp,) = fed.serverapp_pids()
    os.kill(serverapp, signal.SIGKILL)
    killed_at = time.time()
    before = _rows(out / "metrics.jsonl")
    diags_before = _rows(out / "diagnostics.jsonl")
    _wait_for("the ServerApp to die", lambda: serverapp not in fed.serverapp_pids(), fed, 10)
    # the round in flight never reached its checkpoint: it is the work lost
    assert sorted(p.name for p in (out / "checkpoints").glob("round-*.pt")) == [
        f"round-{r:04d}.pt" for r in range(1, k + 1)
    ]
    assert [r["round"] for r in before] == list(range(k + 1))
    assert not (out / "summary.json").exists()  # SIGKILL: no chance to write one

    resumed_run = fed.submit(ROOT, SERVER_RUN | {"output-dir": str(out), "resume": True})
    reference_run = fed.submit(ROOT, SERVER_RUN | {"output-dir": str(ref)})
    reference = _finish(fed, reference_run, ref)
    resumed = _finish(fed, resumed_run, out)
    assert resumed["resumed_from"] == [k] and resumed["rounds"] == SERVER_RUN["num-server-rounds"]
    assert not list(out.glob("previous-*"))  # continued in place, not set aside

    rows = _rows(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]  # every round exactly once
    assert rows[: k + 1] == before  # the rows before the crash are kept as written
    # the resumed ServerApp wrote round k + 1 on: only the round in flight was lost
    assert all(r["time"] > killed_at for r in rows[k + 1 :])
    assert all(r["num_accepted"] == NUM_NODES for r in rows[1:])
    diags = _rows(out / "diagnostics.jsonl")
    assert diags[: len(diags_before)] == [d for d in diags_before if d["round"] <= k]
    assert [sum(d["round"] == r for d in diags) for r in (1, 2)] == [NUM_NODES] * 2

    # Clients seed their training by round and partition, and the server restored the
    # model, the velocity and the round counter: the resumed run computes what the
    # uninterrupted one did, up to the order replies arrive in (float32 sums).
    final = torch.load(out / "checkpoints" / "round-0002.pt", weights_only=True)
    expect = torch.load(ref / "checkpoints" / "round-0002.pt", weights_only=True)
    after_1 = torch.load(ref / "checkpoints" / "round-0001.pt", weights_only=True)["model"]
    step = max(float((expect["model"][n] - v).abs().max()) for n, v in after_1.items())
    diff = max(float((final["model"][n] - v).abs().max()) for n, v in expect["model"].items())
    print(
        f"\n[crash] ServerApp: resumed vs uninterrupted model max |diff| {diff:.3g} (round 2 "
        f"moved it by up to {step:.3g}); kill -> resumed round {k + 1} done: "
        f"{rows[k + 1]['time'] - killed_at:.1f} s"
    )
    assert step > 1e-3 and diff < 1e-5
    torch.testing.assert_close(
        final["strategy"]["velocity"], expect["strategy"]["velocity"], rtol=1e-5, atol=1e-6
    )
    assert resumed["final_accuracy"] == pytest.approx(reference["final_accuracy"], abs=0.01)


# ------------------------------------------------------------------ SuperNode crash
ROUND_TIMEOUT = 33.0  # < 37.5 s: the kill round times out before the SuperLink knows
NODE_RUN = {
    "num-server-rounds": 4,
    "local-steps": 3,
    "seed": 2,
    "round-timeout": ROUND_TIMEOUT,
    # a round waits until all three nodes are online and trains on all three, so the
    # restarted node is in round 4 (FedAvg sizes its sample by the nodes online when the
    # round starts, before it waits for min-available-nodes: with min-train-nodes = 2,
    # round 4 would sample 2 of 3)
    "min-available-nodes": NUM_NODES,
    "min-train-nodes": NUM_NODES,
    # every node replies with its momentum (client.momentum): the victim's must survive
    "client-momentum": 0.5,
}


def _momentum(fed: LocalFederation, partition_id: int) -> dict:
    """The state file of ``partition_id``'s client momentum (this module's only run
    with client momentum, so the only file of that partition)."""
    state = Path(fed.env["BASTION_STATE_DIR"])
    (path,) = state.glob(f"momentum-run-*-partition-{partition_id}.pt")
    return torch.load(path, weights_only=True)


def test_killed_supernode_is_named_skipped_and_rejoins_with_its_momentum(
    federation, tmp_path
) -> None:
    """Round 2: the node is killed while it trains; the round closes after round-timeout
    on the other two, naming the dead node ("no reply") by node id and partition id.
    Round 3 starts while the SuperLink still counts it online (< 37.5 s after the kill,
    the earliest it can turn offline) and lasts until it turns offline (<= 60 s after
    the kill, before round 3's own timeout): the SuperLink answers for it with an error
    reply, which names the SuperLink, not the node; the server maps it back to the node.
    The node is then restarted with its arguments and key, keeps its node id and is
    accepted in round 4, where it continues the client momentum it kept on disk: its
    state file counts one more round than before the kill (a lost state would start
    again at t = 1), and its round-4 update is that file's ``m / (1 - beta^t)``."""
    fed, victim = federation, 1
    node_id = fed.node_ids[victim]  # node authentication: the id belongs to the key
    out = tmp_path / "run"
    runner = fed.submit(ROOT, NODE_RUN | {"output-dir": str(out)})

    _wait_for("round 1", lambda: len(_rows(out / "metrics.jsonl")) == 2, fed, timeout=300)
    row_1 = _rows(out / "metrics.jsonl")[1]["time"]

    def victim_training() -> bool:  # its round-2 ClientApp is running
        group = set(fed.supernode_group(victim))
        return any(_started_after(p, row_1) for p in set(fed.clientapp_pids()) & group)

    _wait_for("round 2 in flight on the victim", victim_training, fed, timeout=120)
    killed = fed.kill_supernode(victim)
    killed_at = time.time()
    assert len(killed) >= 3  # the SuperNode, its SuperExec and the ClientApp (+ supervisor)

    def unavailable() -> bool:
        return any(
            d["reason"].startswith("node unavailable") for d in _rows(out / "diagnostics.jsonl")
        )

    _wait_for("the SuperLink to report the node offline", unavailable, fed, timeout=150)
    detected_at = time.time()
    before = _momentum(fed, victim)  # round 1's, or round 2's if it was killed after saving
    assert (before["t"], before["round"]) in ((1, 1), (2, 2))
    fed.restart_supernode(victim, timeout=60)
    rejoined_at = time.time()
    summary = _finish(fed, runner, out)
    assert summary["rounds"] == 4

    diags = _rows(out / "diagnostics.jsonl")
    by_round = {r: {d["node_id"]: d for d in diags if d["round"] == r} for r in (1, 2, 3, 4)}
    assert by_round[1][node_id]["partition_id"] == victim  # what it reported while alive
    for rnd in (2, 3):
        dead = by_round[rnd][node_id]
        assert dead["status"] == "rejected" and dead["no_reply"] is True
        assert dead["partition_id"] == victim  # remembered: the dead cannot say it
        others = [d for n, d in by_round[rnd].items() if n != node_id]
        assert len(others) == 2 and all(d["status"] == "accepted" for d in others)
    assert by_round[2][node_id]["reason"] == "no reply within round-timeout"
    reason = by_round[3][node_id]["reason"]
    assert reason.startswith("node unavailable (SuperLink reported it offline")
    assert "error code 5" in reason  # Flower's ErrorCode.NODE_UNAVAILABLE
    assert 1 not in by_round[3]  # not filed under the SuperLink's own node id
    # back under the same node id, and training again
    assert by_round[4][node_id]["status"] == "accepted"
    assert by_round[4][node_id]["partition_id"] == victim
    assert len(by_round[4]) == NUM_NODES

    rows = {r["round"]: r for r in _rows(out / "metrics.jsonl")}
    assert rows[2]["round_seconds"] >= ROUND_TIMEOUT  # waited the full timeout for it
    assert (rows[2]["num_accepted"], rows[2]["num_rejected"]) == (2, 1)
    assert (rows[3]["num_accepted"], rows[3]["num_rejected"]) == (2, 1)
    assert (rows[4]["num_accepted"], rows[4]["num_rejected"]) == (3, 0)
    link_log = (fed.log_dir / "superlink.log").read_text()
    assert link_log.count(f"Activated node_id={node_id}\n") == 2  # started, restarted

    # The restarted node continued its momentum: one round more than before the kill,
    # and what it sent in round 4 is global + the bias-corrected m of its file.
    beta, after = NODE_RUN["client-momentum"], _momentum(fed, victim)
    assert (after["t"], after["round"], after["beta"]) == (before["t"] + 1, 4, beta)
    sent = torch.cat([m.reshape(-1) for m in after["m"].values()]) / (1 - beta ** after["t"])
    norm = by_round[4][node_id]["update_norm"]
    assert float(sent.norm()) == pytest.approx(norm, rel=1e-4)
    for other in set(range(NUM_NODES)) - {victim}:  # trained in every round
        assert (_momentum(fed, other)["t"], _momentum(fed, other)["round"]) == (4, 4)
    print(
        f"\n[crash] SuperNode kill -> SuperLink reports it offline: {detected_at - killed_at:.1f} s"
        f" (round 2: {rows[2]['round_seconds']:.1f} s, round 3: {rows[3]['round_seconds']:.1f} s);"
        f" restart -> activated: {rejoined_at - detected_at:.1f} s"
    )
