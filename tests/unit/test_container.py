"""The containers' entry points (bastion.container): partitions, node config, TLS, runner."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
from cryptography import x509

from attacks.selection import malicious_partitions
from bastion import container as c
from common.config import ConfigError, NodeConfig, RunConfig, overlay, parse_overrides

ROOT = Path(__file__).resolve().parents[2]


def app_defaults() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


# ------------------------------------------------------------------ layout
@pytest.mark.parametrize(("honest", "malicious", "external"), [(3, 1, 0), (5, 3, 2), (0, 2, 0)])
def test_partitions_of_all_roles_cover_every_id_once(honest, malicious, external) -> None:
    layout = c.Layout(honest, malicious, external, seed=4)
    ids = [p for role in ("honest", "malicious", "external") for p in layout.partitions(role)]
    assert sorted(ids) == list(range(honest + malicious + external))
    assert len(layout.partitions("honest")) == honest
    # the same partitions `bastion run --malicious M --seed S` makes malicious
    assert layout.partitions("malicious") == malicious_partitions(honest + malicious, malicious, 4)
    assert layout.partitions("external") == tuple(range(honest + malicious, layout.total))


def test_layout_reads_the_environment_and_names_a_bad_variable() -> None:
    layout = c.Layout.from_env({"BASTION_HONEST": "2", "BASTION_MALICIOUS": "0"})
    assert (layout.honest, layout.malicious, layout.external, layout.total) == (2, 0, 0, 2)
    assert c.Layout.from_env({}) == c.Layout(3, 1, 0, 0)
    with pytest.raises(ConfigError, match=r"BASTION_MALICIOUS: value '-1'.*integer >= 0"):
        c.Layout.from_env({"BASTION_MALICIOUS": "-1"})
    with pytest.raises(ConfigError, match=r"BASTION_HONEST: value 'three'"):
        c.Layout.from_env({"BASTION_HONEST": "three"})
    with pytest.raises(ConfigError, match="at least 1 SuperNode"):
        c.Layout.from_env({"BASTION_HONEST": "0", "BASTION_MALICIOUS": "0"})
    with pytest.raises(ConfigError, match=r"BASTION_TLS: value 'maybe'"):
        c.env_flag({"BASTION_TLS": "maybe"}, "BASTION_TLS", True)
    assert c.env_flag({"BASTION_TLS": "off"}, "BASTION_TLS", True) is False


# -------------------------------------------------------------- slot claims
def test_each_claim_gets_a_different_partition_until_none_is_left(tmp_path) -> None:
    fds = []
    try:
        got = []
        for _ in range(3):
            pid, fd = c.claim_partition(tmp_path, (4, 7, 9), "node")
            got.append(pid)
            fds.append(fd)
        assert got == [4, 7, 9]
        with pytest.raises(c.NoFreePartition, match=r"\[4, 7, 9\].*BASTION_HONEST"):
            c.claim_partition(tmp_path, (4, 7, 9), "node")
        os.close(fds.pop(1))  # the holder of partition 7 dies: 7 is free again
        pid, fd = c.claim_partition(tmp_path, (4, 7, 9), "again")
        fds.append(fd)
        assert pid == 7
        assert (tmp_path / "partition-7.lock").read_text().startswith("again ")
    finally:
        for fd in fds:
            os.close(fd)


def test_a_claim_survives_exec_and_ends_with_the_process(tmp_path) -> None:
    # what the supernode entry point does: claim, mark inheritable, exec another program
    code = (
        "import os, sys; from pathlib import Path; from bastion import container as c\n"
        "pid, fd = c.claim_partition(Path(sys.argv[1]), (0,), 'child')\n"
        "os.set_inheritable(fd, True)\n"
        "os.execvp(sys.executable, [sys.executable, '-c', "
        "'import sys; print(\"held\", flush=True); sys.stdin.read()'])\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(c.NoFreePartition):
            c.claim_partition(tmp_path, (0,), "parent")
    finally:
        child.communicate("", timeout=30)
    pid, fd = c.claim_partition(tmp_path, (0,), "parent")
    os.close(fd)
    assert pid == 0


# -------------------------------------------------------------- node config
def test_honest_and_malicious_node_configs() -> None:
    layout = c.Layout(3, 2)
    honest = c.node_config(layout, "honest", 1, {})
    assert honest == {"partition-id": 1, "num-partitions": 5, "role": "honest"}
    env = {"BASTION_ATTACK": "alie", "BASTION_ATTACK_CONFIG": "attack-z=1.5 attack-data=full"}
    bad = c.node_config(layout, "malicious", 3, env)
    node = NodeConfig.from_flat(bad)
    mine = overlay(RunConfig(), node)  # what the node runs with: its keys over the run's
    assert node.role == "malicious" and mine.attack == "alie" and mine.attack_z == 1.5
    assert mine.attack_data == "full" and node.num_colluders == 2
    assert mine.collusion_dir == str(c.COLLUSION_DIR)
    extra = c.node_config(layout, "honest", 0, {"BASTION_NODE_CONFIG": "data-dir='/data' dp=true"})
    assert extra["data-dir"] == "/data" and extra["dp"] is True


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"BASTION_ATTACK_CONFIG": "attack-epsilom=1"}, r"ATTACK_CONFIG.*'attack-epsilom'"),
        ({"BASTION_NODE_CONFIG": "partition-id=3"}, r"BASTION_NODE_CONFIG.*'partition-id'"),
        ({"BASTION_ATTACK": "teleport"}, r"'attack'.*teleport"),
        ({"BASTION_ATTACK_CONFIG": "attack-sigma=-1"}, r"attack-sigma"),
    ],
)
def test_bad_node_config_is_refused_with_the_variable_and_key(env, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment):
        c.node_config(c.Layout(3, 1), "malicious", 0, env)


def test_commands_parse_with_the_installed_flower() -> None:
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    link = _parse_args_run_superlink().parse_args(c.superlink_command(tls=True)[1:])
    assert not link.insecure and link.ssl_certfile.endswith("server.crt")
    assert link.enable_supernode_auth  # only registered keys may join
    assert link.fleet_api_address == "0.0.0.0:9092" and link.port == 9093
    plain = _parse_args_run_superlink().parse_args(c.superlink_command(tls=False)[1:])
    assert plain.insecure and not plain.enable_supernode_auth
    cfg = c.node_config(c.Layout(3, 1), "honest", 2, {})
    warm = c.supernode_command("superlink:9092", True, cfg, c.node_key_file(2))
    assert warm[:3] == ["bastion", "supernode", "--"]  # the warm launcher by default
    node = _parse_args_run_supernode().parse_args(warm[3:])
    assert node.root_certificates.endswith("ca.crt") and not node.insecure
    assert node.auth_supernode_private_key == str(c.NODE_KEYS_DIR / "node-2.key")
    assert parse_overrides(node.node_config) == cfg
    plain = c.supernode_command("superlink:9092", False, cfg, c.node_key_file(2), "flower")
    assert plain[0] == "flower-supernode"
    node = _parse_args_run_supernode().parse_args(plain[1:])
    assert node.insecure and node.auth_supernode_private_key is None
    with pytest.raises(ConfigError, match="BASTION_LAUNCHER: value 'cold'"):
        c.supernode_command("superlink:9092", False, cfg, None, "cold")


def test_insecure_switch() -> None:
    assert c.insecure_mode({}) is False
    assert c.insecure_mode({"BASTION_INSECURE": "1", "BASTION_TLS": ""}) is True
    assert c.insecure_mode({"BASTION_TLS": "1"}) is False
    # the old switch must not silently mean "secure" or "insecure"
    with pytest.raises(ConfigError, match=r"BASTION_TLS: value '0' .* BASTION_INSECURE"):
        c.insecure_mode({"BASTION_TLS": "0"})
    with pytest.raises(ConfigError, match="BASTION_INSECURE: value 'maybe'"):
        c.insecure_mode({"BASTION_INSECURE": "maybe"})


# ------------------------------------------------------------- certificates
def test_subject_alternative_names() -> None:
    assert c.parse_sans("superlink, 10.0.0.5 DNS:edge.example.org IP:::1 dns.local") == [
        "DNS:superlink",
        "IP:10.0.0.5",
        "DNS:edge.example.org",
        "IP:::1",
        "DNS:dns.local",
    ]
    for bad in ("IP:host.example", "bad_name", "-x.org"):
        with pytest.raises(ConfigError, match="BASTION_TLS_SANS"):
            c.parse_sans(bad)


def test_certs_command_for_hosts_without_compose(tmp_path, capsys) -> None:
    assert c.main(["certs", "--out", str(tmp_path), "--san", "edge.example.org"]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "superlink" / "server.crt").read_bytes())
    cert.verify_directly_issued_by(
        x509.load_pem_x509_certificate((tmp_path / "supernode" / "ca.crt").read_bytes())
    )
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"superlink", "localhost", "edge.example.org"} <= set(
        names.get_values_for_type(x509.DNSName)
    )
    assert c.main(["certs", "--out", str(tmp_path), "--san", "bad_name"]) == 2
    assert "--san: value 'bad_name'" in capsys.readouterr().err


def _serve_tls_once(tls_dir: Path) -> tuple[int, threading.Thread]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_dir / "server.crt", tls_dir / "server.key")
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        with srv, ctx.wrap_socket(srv, server_side=True) as tls:
            try:
                conn, _ = tls.accept()
            except ssl.SSLError:  # the client refused the certificate
                return
            conn.sendall(b"ok")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


def test_certificates_work_for_tls_clients_and_are_reused(tmp_path) -> None:
    ca, server, trust = tmp_path / "ca", tmp_path / "tls", tmp_path / "trust"
    sans = c.parse_sans("superlink localhost 127.0.0.1")
    first = c.ensure_certificates(ca, server, trust, sans)
    assert (first.ca, first.server) == ("created", "created")
    assert (trust / "ca.crt").read_bytes() == (ca / "ca.crt").read_bytes()
    assert oct((server / "server.key").stat().st_mode & 0o777) == "0o600"

    # a TLS client that trusts only the CA accepts the server under its compose name
    port, thread = _serve_tls_once(server)
    client = ssl.create_default_context(cafile=str(trust / "ca.crt"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client.wrap_socket(raw, server_hostname="superlink") as tls,
    ):
        assert tls.recv(2) == b"ok"
    thread.join(timeout=10)
    # ... and refuses it under a name the certificate does not carry
    port, thread = _serve_tls_once(server)
    with (
        pytest.raises(ssl.SSLCertVerificationError),
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
    ):
        client.wrap_socket(raw, server_hostname="elsewhere.example.org")
    thread.join(timeout=10)

    before = {p.name: p.read_bytes() for p in [*server.iterdir(), *ca.iterdir()]}
    again = c.ensure_certificates(ca, server, trust, sans)
    assert (again.ca, again.server) == ("reused", "reused")
    assert before == {p.name: p.read_bytes() for p in [*server.iterdir(), *ca.iterdir()]}

    # a new name: new server certificate, same CA (edge devices keep their ca.crt)
    wider = c.ensure_certificates(ca, server, trust, [*sans, "DNS:edge.example.org"])
    assert (wider.ca, wider.server) == ("reused", "created")
    assert (ca / "ca.crt").read_bytes() == before["ca.crt"]
    cert = x509.load_pem_x509_certificate((server / "server.crt").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(before["ca.crt"]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "edge.example.org" in names.get_values_for_type(x509.DNSName)

    # an expired CA is never replaced silently: an error that says what to remove
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3651)
    with pytest.raises(ConfigError, match=r"CA certificate .* expired"):
        c.ensure_certificates(ca, server, trust, sans, now=later)
    assert (ca / "ca.crt").read_bytes() == before["ca.crt"]


# ------------------------------------------------------------------- runner
def test_runner_run_config(tmp_path) -> None:
    defaults = app_defaults()
    layout = c.Layout(3, 1, external=1)
    env = {"BASTION_ROUNDS": "2", "BASTION_RUN_CONFIG": "local-steps=5 aggregator='trimmed-mean'"}
    over = c.runner_run_config(layout, env, tmp_path / "r", defaults)
    assert over["num-server-rounds"] == 2 and over["local-steps"] == 5
    assert over["aggregator"] == "trimmed-mean"  # BASTION_RUN_CONFIG has the last word
    assert over["min-available-nodes"] == over["min-train-nodes"] == 5
    assert over["num-byzantine"] == 1 and over["output-dir"] == str(tmp_path / "r")
    RunConfig.from_flat(defaults | over)
    with pytest.raises(ConfigError, match="BASTION_RUN_NAME"):
        c.runner_run_config(layout, {"BASTION_RUN_CONFIG": "output-dir='/x'"}, tmp_path, defaults)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rounds'\]"):
        c.runner_run_config(layout, {"BASTION_RUN_CONFIG": "rounds=3"}, tmp_path, defaults)
    with pytest.raises(ConfigError, match="aggregator"):
        c.runner_run_config(layout, {"BASTION_AGGREGATOR": "average"}, tmp_path, defaults)


def test_run_names(tmp_path) -> None:
    assert c.run_name({"BASTION_RUN_NAME": "ci"}, "digits", tmp_path) == "ci"
    for bad in ("a/b", "latest", ".."):
        with pytest.raises(ConfigError, match="BASTION_RUN_NAME"):
            c.run_name({"BASTION_RUN_NAME": bad}, "digits", tmp_path)
    name = c.run_name({}, "digits", tmp_path)
    assert name.endswith("-digits")
    (tmp_path / name).mkdir()
    assert c.run_name({}, "digits", tmp_path) != name


def test_flwr_connection_file() -> None:
    tls = tomllib.loads(c.flwr_connection_toml("superlink:9093", True, Path("/t/ca.crt")))
    assert tls["superlink"]["default"] == "compose"
    assert tls["superlink"]["compose"] == {
        "address": "superlink:9093",
        "root-certificates": "/t/ca.crt",
        "insecure": False,
    }
    plain = tomllib.loads(c.flwr_connection_toml("superlink:9093", False, Path("/t/ca.crt")))
    assert plain["superlink"]["compose"] == {"address": "superlink:9093", "insecure": True}


def test_results_folder_ownership(tmp_path) -> None:
    gid = os.getgid()
    folder = tmp_path / "results"
    folder.mkdir(mode=0o755)
    if os.geteuid() == 0:
        # made by the engine (root-owned): handed to the runtime user
        c.prepare_results(folder, (4242, gid))
        assert folder.stat().st_uid == 4242
        runtime = (4343, gid)
    else:
        runtime = (os.getuid() + 1, gid)
    # owned by someone else and not writable for the runtime user: a clear error
    with pytest.raises(ConfigError, match=r"belongs to uid .* BASTION_UID"):
        c.prepare_results(folder, runtime)
    folder.chmod(0o777)
    c.prepare_results(folder, runtime)  # world-writable: fine


def test_probe_and_cli_errors(capsys) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        up = f"127.0.0.1:{srv.getsockname()[1]}"
        assert c.probe([up]) == []
        assert c.main(["probe", up]) == 0
    assert c.probe([up], timeout=1) == [up]
    assert c.main(["probe", up]) == 1
    assert c.main(["supernode", "--role", "honest"], env={"BASTION_HONEST": "x"}) == 2
    assert "BASTION_HONEST: value 'x'" in capsys.readouterr().err


def test_an_edge_node_takes_an_external_partition_trains_honestly_on_one_thread(
    tmp_path, monkeypatch
) -> None:
    ran: list[tuple[list[str], dict]] = []
    monkeypatch.setattr(c, "SLOTS_DIR", tmp_path / "slots")
    monkeypatch.setattr(c, "_exec", lambda cmd, env: ran.append((cmd, dict(env))) or 0)
    env = {"BASTION_HONEST": "3", "BASTION_MALICIOUS": "1", "BASTION_EXTERNAL_NODES": "2"}
    env |= {"BASTION_INSECURE": "1", "BASTION_TORCH_THREADS": ""}
    assert c.cmd_supernode("edge", env) == 0
    assert c.cmd_supernode("edge", env) == 0  # the second edge replica (the first holds 4)
    configs = [parse_overrides(cmd[cmd.index("--node-config") + 1]) for cmd, _ in ran]
    assert [cfg["partition-id"] for cfg in configs] == [4, 5]
    assert all(cfg["role"] == "honest" and cfg["num-partitions"] == 6 for cfg in configs)
    assert all(node_env["BASTION_TORCH_THREADS"] == "1" for _, node_env in ran)
    # an honest compose node on the same host gets cores / nodes threads, not 1
    c.cmd_supernode("honest", env)
    expected = max(1, (os.cpu_count() or 1) // 4)
    assert ran[-1][1]["BASTION_TORCH_THREADS"] == str(expected)
    with pytest.raises(c.NoFreePartition):  # a third edge replica: no external id left
        c.cmd_supernode("edge", env)
    with pytest.raises(ConfigError, match=r"BASTION_EXTERNAL_NODES: value 0 .*edge"):
        c.cmd_supernode("edge", env | {"BASTION_EXTERNAL_NODES": "0"})


def test_the_healthcheck_probe_answers_and_imports_nothing_heavy() -> None:
    """``python -m bastion.probe`` (every compose healthcheck) exits 0 only when all
    addresses accept connections, and loads no third-party package: on an emulated
    arm64 node importing ``bastion.container`` outlasted the healthcheck's timeout."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        up = f"127.0.0.1:{srv.getsockname()[1]}"
        code = (
            "import sys, runpy; sys.argv = ['probe', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('bastion.probe', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    heavy = {'torch', 'flwr', 'pydantic', 'numpy', 'common'} & set(sys.modules)\n"
            "    print(e.code, sorted(heavy))\n"
        )
        ok = subprocess.run([sys.executable, "-c", code, up], capture_output=True, text=True)
        assert ok.stdout.split("\n")[0] == "0 []", ok
    bad = subprocess.run(
        [sys.executable, "-m", "bastion.probe", up, "127.0.0.1:1"], capture_output=True, text=True
    )
    assert bad.returncode == 1 and up in bad.stderr and "127.0.0.1:1" in bad.stderr
    assert subprocess.run([sys.executable, "-m", "bastion.probe"]).returncode == 2
