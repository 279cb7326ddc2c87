"""Certificates and SuperNode key pairs (bastion.security) and the ``bastion keys`` command."""

from __future__ import annotations

import datetime as dt
import os
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bastion import security as s
from bastion.cli import main as bastion_main
from common.config import ConfigError


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o777)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def open_umask():
    """A umask that would leave new files world-readable: modes must not depend on it."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_default_names_and_parsing() -> None:
    names = s.default_sans(["10.77.0.1", "superlink.example.org", "IP:::1"])
    assert names[:2] == ["DNS:localhost", "IP:127.0.0.1"]
    assert {"IP:10.77.0.1", "DNS:superlink.example.org", "IP:::1"} <= set(names)
    host = socket.gethostname()
    if host and all(part for part in host.split(".")):
        assert f"DNS:{host.lower()}" in names
    assert s.parse_sans("a.example, a.example 127.0.0.1") == ["DNS:a.example", "IP:127.0.0.1"]
    for bad in ("IP:not-an-ip", "under_score", "-lead.example"):
        with pytest.raises(ConfigError, match=r"--san: value"):
            s.parse_sans(bad)


def test_server_certificate_names_chain_and_private_key_modes(tmp_path, open_umask) -> None:
    sans = s.default_sans(["10.77.0.1", "superlink.example.org"])
    files = s.ensure_federation_files(tmp_path, 2, sans)
    ca = _cert(tmp_path / "ca" / "ca.crt")
    server = _cert(tmp_path / "superlink" / "server.crt")
    server.verify_directly_issued_by(ca)  # raises when the chain is broken
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "superlink.example.org"} <= set(names.get_values_for_type(x509.DNSName))
    assert {str(a) for a in names.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "10.77.0.1",
    }
    assert set(files.certificates.sans) == set(sans)
    # every copy of the CA certificate is the CA's
    for copy in (tmp_path / "superlink" / "ca.crt", files.ca_cert):
        assert copy.read_bytes() == (tmp_path / "ca" / "ca.crt").read_bytes()
    # private keys: owner only, even under umask 0; certificates and public keys readable
    private = [tmp_path / "ca" / "ca.key", tmp_path / "superlink" / "server.key"]
    private += [k.private_key for k in files.nodes]
    assert {_mode(p) for p in private} == {"0o600"}
    assert {_mode(k.public_key) for k in files.nodes} == {"0o644"}
    assert _mode(tmp_path / "superlink" / "server.crt") == "0o644"


def test_node_keys_are_p384_in_the_formats_flower_reads(tmp_path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    keys = s.ensure_node_keys(tmp_path, [0, 5])
    assert [(k.index, k.state) for k in keys] == [(0, "created"), (5, "created")]
    assert [k.private_key.name for k in keys] == ["node-0.key", "node-5.key"]
    for key in keys:
        # what flower-supernode --auth-supernode-private-key does with the file
        private = serialization.load_ssh_private_key(key.private_key.read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        # what `flwr supernode register <pub>` sends equals what the node presents
        sent = try_load_public_key(key.public_key)
        assert sent == public_key_to_bytes(private.public_key()) == key.public_pem()
    assert keys[0].public_pem() != keys[1].public_pem()  # distinct identities
    with pytest.raises(s.SecurityError, match="bastion-node"):
        s.public_key_pem(tmp_path / "bastion-node-missing.pub")


def test_files_are_reused_and_never_silently_replaced(tmp_path) -> None:
    first = s.ensure_federation_files(tmp_path, 2, s.default_sans())
    assert (first.certificates.ca, first.certificates.server) == ("created", "created")
    before = _snapshot(tmp_path)
    again = s.ensure_federation_files(tmp_path, 2, s.default_sans())
    assert (again.certificates.ca, again.certificates.server) == ("reused", "reused")
    assert [k.state for k in again.nodes] == ["reused", "reused"]
    assert _snapshot(tmp_path) == before
    # more nodes: the old pairs stay, one new pair
    more = s.ensure_federation_files(tmp_path, 3, s.default_sans())
    assert [k.state for k in more.nodes] == ["reused", "reused", "created"]
    assert all(_snapshot(tmp_path)[n] == b for n, b in before.items())
    # a lost .pub is rebuilt from the private key (same identity)
    pub = more.nodes[0].public_key
    pem = more.nodes[0].public_pem()
    pub.unlink()
    assert s.ensure_node_keys(tmp_path / "nodes", [0])[0].public_pem() == pem

    ca_key = (tmp_path / "ca" / "ca.key").read_bytes()
    # half a CA is an error, not a new CA
    (tmp_path / "ca" / "ca.crt").unlink()
    with pytest.raises(s.SecurityError, match=r"ca\.key exists without its partner"):
        s.ensure_federation_files(tmp_path, 3, s.default_sans())
    assert (tmp_path / "ca" / "ca.key").read_bytes() == ca_key


def test_an_expired_ca_is_an_error_and_a_stale_server_certificate_is_reissued(tmp_path) -> None:
    ca, server, trust = tmp_path / "ca", tmp_path / "superlink", tmp_path / "trust"
    sans = s.parse_sans("localhost 127.0.0.1")
    s.ensure_certificates(ca, server, trust, sans)
    ca_before = (ca / "ca.crt").read_bytes()
    # the server certificate (825 days) nears its end: re-issued by the same CA
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=820)
    renewed = s.ensure_certificates(ca, server, trust, sans, now=later)
    assert (renewed.ca, renewed.server) == ("reused", "created")
    assert (ca / "ca.crt").read_bytes() == ca_before
    _cert(server / "server.crt").verify_directly_issued_by(_cert(ca / "ca.crt"))
    # past the CA's end: an error naming the folder, and nothing is replaced
    expired = dt.datetime.now(dt.UTC) + dt.timedelta(days=3651)
    with pytest.raises(s.SecurityError, match=r"expired .* remove"):
        s.ensure_certificates(ca, server, trust, sans, now=expired)
    assert (ca / "ca.crt").read_bytes() == ca_before


def test_a_node_key_of_the_wrong_kind_is_refused_not_overwritten(tmp_path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "node-0.key"
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    path.write_bytes(data)
    with pytest.raises(s.SecurityError, match="not a NIST EC key"):
        s.ensure_node_keys(tmp_path, [0])
    assert path.read_bytes() == data


def test_flwr_connection_file() -> None:
    import tomllib

    tls = tomllib.loads(s.flwr_connection_toml("local", "127.0.0.1:9093", Path("/c/ca.crt")))
    assert tls["superlink"] == {
        "default": "local",
        "local": {"address": "127.0.0.1:9093", "root-certificates": "/c/ca.crt", "insecure": False},
    }
    plain = tomllib.loads(s.flwr_connection_toml("local", "127.0.0.1:9093", None))
    assert plain["superlink"]["local"] == {"address": "127.0.0.1:9093", "insecure": True}


def test_flags_parse_with_the_installed_flower(tmp_path) -> None:
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    files = s.ensure_federation_files(tmp_path, 2, s.default_sans())
    link = _parse_args_run_superlink().parse_args(files.superlink_args())
    assert link.enable_supernode_auth and not link.insecure
    assert Path(link.ssl_keyfile) == tmp_path / "superlink" / "server.key"
    node = _parse_args_run_supernode().parse_args(files.supernode_args(1))
    assert Path(node.auth_supernode_private_key) == tmp_path / "nodes" / "node-1.key"
    assert Path(node.root_certificates) == files.ca_cert and not node.insecure
    with pytest.raises(s.SecurityError, match="node index 7"):
        files.supernode_args(7)


def test_bastion_keys_command(tmp_path, capsys) -> None:
    out = tmp_path / "keys"
    assert bastion_main(["keys", "--out", str(out), "--nodes", "2", "--san", "10.0.0.5"]) == 0
    text = capsys.readouterr().out
    for path in ("ca/ca.crt", "superlink/server.key", "nodes/node-0.key", "nodes/node-1.pub"):
        assert str(out / path) in text and (out / path).is_file()
    assert f"flwr supernode register {out / 'nodes' / 'node-1.pub'} bastion" in text
    assert "--enable-supernode-auth" in text and "--auth-supernode-private-key" in text
    names = _cert(out / "superlink" / "server.crt").extensions
    ips = names.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.0.0.5" in {str(a) for a in ips.get_values_for_type(x509.IPAddress)}
    assert bastion_main(["keys", "--out", str(out), "--san", "bad_name"]) == 2
    assert "--san: value 'bad_name'" in capsys.readouterr().err


def test_bastion_run_is_secure_unless_told_otherwise() -> None:
    from bastion.cli import make_parser
    from bastion.federation import LocalFederation

    assert make_parser().parse_args(["run"]).insecure is False
    assert make_parser().parse_args(["run", "--insecure"]).insecure is True
    assert LocalFederation.__dataclass_fields__["insecure"].default is False
