"""A local federation never hands out one port twice, even when the OS offers it again."""

from __future__ import annotations

import shutil

from bastion import federation


def test_ports_are_distinct_when_the_os_offers_a_port_again(tmp_path, monkeypatch) -> None:
    # free_port closes its probe socket, so the OS may offer the same port again before
    # the process it went to has bound it (CI saw two SuperNodes get one port)
    offered = iter([5000, 5000, 5001, 5001, 5002, 5000, 5003])
    monkeypatch.setattr(federation, "free_port", lambda host="127.0.0.1": next(offered))
    fed = federation.LocalFederation(num_supernodes=2, log_dir=tmp_path / "logs", insecure=True)
    try:
        supernodes = [int(fed._supernode_port_args()[1]) for _ in range(2)]
        ports = [fed.http_port, fed.fleet_port, *supernodes]
        assert ports == [5000, 5001, 5002, 5003]
    finally:
        shutil.rmtree(fed.flwr_home, ignore_errors=True)
