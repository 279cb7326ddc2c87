"""TLS and SuperNode authentication on a real local federation (the default).

One :class:`LocalFederation` with two registered SuperNodes (TLS + SuperNode
authentication, as ``bastion run`` starts it) and, while it trains:

(a) an intruder: a real ``flower-supernode`` that trusts the CA (so TLS succeeds)
    but signs with a P-384 key that was never registered. The SuperLink refuses
    its activation; the process exits with Flower's connection-failure code, the
    SuperLink logs the refusal for exactly that public key, its key is not among
    the SuperLink's nodes, and it never shows up in the run's diagnostics;
(b) plain-text clients: a gRPC ``insecure_channel`` to the Fleet port and a plain
    HTTP request to the Control API both fail, while the same gRPC call over TLS
    reaches the server (and is refused for lacking a node signature);
(c) the run with the registered SuperNodes completes, every round with both of
    them (and only them) accepted.
"""

from __future__ import annotations

import json
import time

import grpc
import httpx
import pytest

from bastion import security
from bastion.federation import LocalFederation, flower_bin
from common.runlog import read_jsonl
from tests.integration.conftest import ROOT, tagged_processes

pytestmark = pytest.mark.integration

NODES, ROUNDS = 2, 2
REFUSED = "No SuperNode found with the given public key"  # the SuperLink's log line


def _fleet_activate(channel: grpc.Channel) -> grpc.RpcError:
    """Call Fleet.ActivateNode without node credentials; return the error it fails with."""
    from flwr.proto.fleet_pb2 import ActivateNodeRequest
    from flwr.proto.fleet_pb2_grpc import FleetStub

    with pytest.raises(grpc.RpcError) as caught:
        FleetStub(channel).ActivateNode(ActivateNodeRequest(), timeout=15)
    return caught.value


def test_tls_and_node_auth_refuse_outsiders_and_train(tmp_path, bastion_env) -> None:
    env, tag = bastion_env
    out = tmp_path / "run"
    fed = LocalFederation(
        NODES,
        tmp_path / "logs",
        torch_threads=1,
        env={k: env[k] for k in ("BASTION_TEST_TAG", "BASTION_CACHE_DIR")},
    )
    with fed:
        fed.start()
        assert fed.security is not None and not fed.insecure
        ca = fed.security.ca_cert
        control = f"{fed.host}:{fed.http_port}"
        registered = security.registered_nodes(control, ca)
        assert sorted(registered.values()) == sorted(fed.node_ids.values())
        assert len(set(fed.node_ids.values())) == NODES

        # (a) a SuperNode with a valid TLS setup but an unregistered key
        (stranger,) = security.ensure_node_keys(tmp_path / "stranger", [0])
        intruder = fed._start(
            "intruder",
            [
                flower_bin("flower-supernode"),
                "--root-certificates",
                str(ca),
                "--auth-supernode-private-key",
                str(stranger.private_key),
                "--superlink",
                f"{fed.host}:{fed.fleet_port}",
                *fed._supernode_port_args(),
                "--node-config",
                f"partition-id=0 num-partitions={NODES}",
            ],
        )
        runner = fed.submit(
            ROOT,
            {
                "num-server-rounds": ROUNDS,
                "local-steps": 5,
                "checkpoint-every": 0,
                "min-available-nodes": NODES,
                "min-train-nodes": NODES,
                "round-timeout": 60,
                "seed": 2,
                "output-dir": str(out),
            },
        )

        # (b) plain text cannot talk to the TLS ports ...
        with grpc.insecure_channel(f"{fed.host}:{fed.fleet_port}") as plain:
            assert _fleet_activate(plain).code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"http://{control}/v1/control/list-nodes", content=b"", timeout=15)
        # ... while TLS with the CA reaches the Fleet API, which then wants a signature
        creds = grpc.ssl_channel_credentials(ca.read_bytes())
        with grpc.secure_channel(f"{fed.host}:{fed.fleet_port}", creds) as tls:
            err = _fleet_activate(tls)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
        assert "authentication metadata" in str(err.details())

        deadline = time.monotonic() + 120
        while intruder.popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        intruder_code = intruder.popen.poll()
        while runner.popen.poll() is None and time.monotonic() < deadline + 300:
            assert not [p.name for p in fed.dead_processes() if p.name != "intruder"]
            time.sleep(0.5)
        assert runner.popen.poll() is not None, "the run did not finish within 7 minutes"
        nodes_after = security.registered_nodes(control, ca)
    assert tagged_processes(tag) == []

    link_log = (tmp_path / "logs" / "superlink.log").read_text(errors="replace")
    intruder_log = (tmp_path / "logs" / "intruder.log").read_text(errors="replace")
    # (a) the intruder was refused: it exited with Flower's "could not connect" code,
    # the SuperLink logged the refusal for its public key, it holds no node id
    assert intruder_code not in (None, 0), intruder_log[-3000:]
    assert "Failed to activate SuperNode" in intruder_log, intruder_log[-3000:]
    key_line = stranger.public_pem().decode().splitlines()[1]  # first base64 line
    refusals = [line for line in link_log.splitlines() if REFUSED in line]
    assert refusals and all(key_line in line for line in refusals), refusals
    assert stranger.public_pem() not in nodes_after
    assert sorted(nodes_after.values()) == sorted(fed.node_ids.values())
    assert link_log.count("[Fleet.ActivateNode] Activated node_id") == NODES
    assert "SuperNode authentication is disabled" not in link_log

    # (c) the registered SuperNodes trained every round, and nobody else did
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    assert summary["rounds"] == ROUNDS
    diags = read_jsonl(out / "diagnostics.jsonl")
    for rnd in range(1, ROUNDS + 1):
        this = {d["node_id"]: d for d in diags if d["round"] == rnd}
        assert set(this) == set(fed.node_ids.values()), this
        assert all(d["status"] == "accepted" for d in this.values()), this
