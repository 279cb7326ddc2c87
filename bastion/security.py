"""TLS certificates and SuperNode identities for a Bastion federation.

One implementation, used by ``bastion keys``, :class:`bastion.federation.LocalFederation`
(``bastion run``) and the compose ``setup``/``register`` services
(:mod:`bastion.container`):

* a certificate authority (:func:`ensure_ca`) and a SuperLink server certificate
  signed by it for the names and addresses SuperNodes use to reach the SuperLink
  (:func:`ensure_certificates`);
* one NIST P-384 key pair per SuperNode (:func:`ensure_node_keys`), the identity
  Flower's SuperNode authentication checks (``flower-supernode
  --auth-supernode-private-key``);
* registration of the SuperNodes' public keys with a running SuperLink through its
  Control API, with Flower's own client (:func:`register_nodes`, what ``flwr supernode
  register`` does), idempotent: a key that is already registered keeps its node id.

Files of a folder made by :func:`ensure_federation_files` (``bastion keys --out DIR``)::

    DIR/ca/ca.key, ca.crt                         the CA (keep ca.key offline/private)
    DIR/superlink/server.key, server.crt, ca.crt  flower-superlink --ssl-keyfile/--ssl-certfile/
                                                  --ssl-ca-certfile
    DIR/supernode/ca.crt                          flower-supernode --root-certificates,
                                                  flwr's root-certificates
    DIR/nodes/node-<i>.key, node-<i>.pub          SuperNode i's private key (OpenSSH format,
                                                  --auth-supernode-private-key) and public key
                                                  (OpenSSH format, flwr supernode register)

Existing files are reused on later calls. A CA is never replaced silently: an
expired, unreadable or half-present CA is an error that says which files to remove.
Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import ConfigError

log = logging.getLogger(__name__)

#: the curve of SuperNode identities (Flower accepts NIST curves; P-384 is its default)
NODE_KEY_CURVE = "secp384r1"
#: certificates (server, and a warning for the CA) count as expiring this long before the end
RENEW_MARGIN = dt.timedelta(days=30)


class SecurityError(ConfigError):
    """A certificate, key or registration problem, with what to do about it."""


# ------------------------------------------------------------------ names (SANs)
def parse_sans(text: str, source: str = "--san") -> list[str]:
    """Subject alternative names from ``"name,1.2.3.4,DNS:host,IP:::1"`` (comma/space separated).

    Returns them as ``DNS:...`` / ``IP:...`` strings, without duplicates, in order; a
    bare value is an IP address when it parses as one, otherwise a DNS name (lower
    case). ``source`` names the setting in error messages.
    """
    out: list[str] = []
    for item in text.replace(",", " ").split():
        upper = item.upper()
        kind, value = "", item
        if upper.startswith(("DNS:", "IP:")):
            kind, _, value = item.partition(":")
            kind = kind.upper()
        if kind == "IP" or (not kind and _is_ip(value)):
            if not _is_ip(value):
                raise SecurityError(
                    f"{source}: value {item!r} is not allowed; "
                    "allowed: an IPv4/IPv6 address after 'IP:'"
                )
            entry = f"IP:{ipaddress.ip_address(value)}"
        else:
            if not value or not all(part and _dns_label(part) for part in value.split(".")):
                raise SecurityError(
                    f"{source}: value {item!r} is not allowed; "
                    "allowed: host names (letters, digits, '-', '*.' prefix) or IP addresses"
                )
            entry = f"DNS:{value.lower()}"
        if entry not in out:
            out.append(entry)
    return out


def default_sans(extra: Iterable[str] = ()) -> list[str]:
    """``localhost``, ``127.0.0.1``, this host's name, then ``extra`` (names or addresses)."""
    names = ["localhost", "127.0.0.1"]
    host = socket.gethostname()
    if host and all(part and _dns_label(part) for part in host.split(".")):
        names.append(host)
    return parse_sans(" ".join([*names, *extra]))


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _dns_label(label: str) -> bool:
    return label == "*" or (
        len(label) <= 63
        and all(c.isalnum() or c == "-" for c in label)
        and not label.startswith("-")
        and not label.endswith("-")
    )


# ------------------------------------------------------------------------ files
def _write(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Write ``data`` to ``path`` atomically with ``mode`` (and ``owner`` when root)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # the umask may have narrowed it
    if owner is not None and os.geteuid() == 0:
        os.chown(tmp, *owner)
    os.replace(tmp, path)


def _chown(paths: Iterable[Path], owner: tuple[int, int] | None) -> None:
    if owner is not None and os.geteuid() == 0:
        for path in paths:
            os.chown(path, *owner)


# -------------------------------------------------------------------------- CA
@dataclass(frozen=True)
class CertificateReport:
    """What :func:`ensure_certificates` did (``created``/``reused`` per file set) and
    the names the SuperLink certificate carries."""

    ca: str
    server: str
    sans: tuple[str, ...]


def ensure_ca(
    ca_dir: Path, *, now: dt.datetime | None = None, days: int = 3650
) -> tuple[Any, Any, str]:
    """The CA in ``ca_dir`` (``ca.key`` 0600 + ``ca.crt``): ``(key, certificate, state)``.

    ``state`` is ``"created"`` when the folder had neither file (RSA-3072 key,
    SHA-256, valid ``days``), else ``"reused"``. Never replaces an existing CA: a
    lone key or certificate, an unreadable or mismatched pair, or an expired CA
    raises :class:`SecurityError` naming the files (remove them to start a new CA,
    which every SuperNode then has to trust again). A CA that expires within 30
    days is kept and logged as a warning.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = now or dt.datetime.now(dt.UTC)
    key_path, crt_path = ca_dir / "ca.key", ca_dir / "ca.crt"
    have = [p for p in (key_path, crt_path) if p.exists()]
    if len(have) == 2:
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(crt_path.read_bytes())
        except ValueError as exc:
            raise SecurityError(
                f"CA files {key_path} / {crt_path} cannot be read ({exc}); fix them or remove "
                "both to make a new CA (every SuperNode must then get the new ca.crt)"
            ) from exc
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if key.public_key().public_bytes(der, pub) != cert.public_key().public_bytes(der, pub):
            raise SecurityError(
                f"CA key {key_path} does not belong to the certificate {crt_path}; restore the "
                "right pair or remove both to make a new CA"
            )
        if cert.not_valid_after_utc <= now:
            raise SecurityError(
                f"CA certificate {crt_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                f"remove {ca_dir} to make a new CA, then give every SuperNode the new ca.crt"
            )
        if cert.not_valid_after_utc <= now + RENEW_MARGIN:
            log.warning(
                "CA certificate %s expires on %s: plan a new CA (remove %s) and hand out its "
                "ca.crt",
                crt_path,
                f"{cert.not_valid_after_utc:%Y-%m-%d}",
                ca_dir,
            )
        return key, cert, "reused"
    if have:
        raise SecurityError(
            f"{have[0]} exists without its partner ({'ca.crt' if have[0] == key_path else 'ca.key'}"
            f") in {ca_dir}; restore it, or remove {have[0]} to make a new CA"
        )
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bastion federation CA")])
    cert = (
        _certificate_builder(name, name, key.public_key(), now, days, ca=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _private_pem(key), 0o600)
    _write(crt_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return key, cert, "created"


def _certificate_builder(
    subject: Any, issuer: Any, public_key: Any, now: dt.datetime, days: int, *, ca: bool
) -> Any:
    """A certificate builder with what the CA and the server certificate share.

    Validity from five minutes before ``now`` (clock skew) for ``days``; basic
    constraints and key usage (both critical) of a CA that signs only end-entity
    certificates (``ca=True``: path length 0, certificate and CRL signing) or of a TLS
    server (``ca=False``: digital signature and key encipherment).
    """
    from cryptography import x509

    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=not ca,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


def _private_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _general_names(sans: Sequence[str]) -> list[Any]:
    from cryptography import x509

    out: list[Any] = []
    for s in sans:
        if s.startswith("IP:"):
            out.append(x509.IPAddress(ipaddress.ip_address(s[3:])))
        elif s.startswith("DNS:"):
            out.append(x509.DNSName(s[4:]))
        else:
            raise SecurityError(
                f"subject alternative name {s!r} is not allowed; allowed: 'DNS:name' or "
                "'IP:address' (parse_sans makes them)"
            )
    return out


def ensure_certificates(
    ca_dir: Path,
    server_dir: Path,
    trust_dir: Path,
    sans: Sequence[str],
    *,
    owner: tuple[int, int] | None = None,
    now: dt.datetime | None = None,
    ca_days: int = 3650,
    server_days: int = 825,
) -> CertificateReport:
    """Make (or keep) a CA and a SuperLink server certificate for ``sans``.

    Files: ``ca_dir/ca.key`` + ``ca.crt`` (:func:`ensure_ca`); ``server_dir/server.key``
    + ``server.crt`` + ``ca.crt`` (the SuperLink's ``--ssl-keyfile``/``--ssl-certfile``/
    ``--ssl-ca-certfile``); ``trust_dir/ca.crt`` (SuperNodes' ``--root-certificates``,
    ``flwr``'s ``root-certificates``). The server certificate (RSA-3072, SHA-256,
    ``server_days``) is re-issued by the same CA when it does not chain to the CA,
    expires within 30 days or lacks one of ``sans`` (``DNS:name`` / ``IP:addr``
    strings, see :func:`parse_sans`); its common name is the first of ``sans``.
    ``owner`` (uid, gid) gets the server key and certificate when run as root, so that
    a SuperLink running as that user can read them; the CA key stays with the caller.
    """
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not sans:
        raise SecurityError("sans: an empty list is not allowed; allowed: at least one name")
    now = now or dt.datetime.now(dt.UTC)
    ca_key, ca_cert, ca_state = ensure_ca(ca_dir, now=now, days=ca_days)
    pem = serialization.Encoding.PEM
    ca_pem = ca_cert.public_bytes(pem)
    wanted = list(dict.fromkeys(sans))
    general = _general_names(wanted)
    crt_path, key_path = server_dir / "server.crt", server_dir / "server.key"
    reissue = True
    if crt_path.exists() and key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(crt_path.read_bytes())
            cert.verify_directly_issued_by(ca_cert)
            have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            reissue = (
                cert.not_valid_after_utc <= now + RENEW_MARGIN
                or cert.not_valid_before_utc > now
                or any(g not in have for g in general)
            )
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            reissue = True
    if reissue:
        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        cn = wanted[0].partition(":")[2]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (
            _certificate_builder(
                subject, ca_cert.subject, key.public_key(), now, server_days, ca=False
            )
            .add_extension(x509.SubjectAlternativeName(general), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write(key_path, _private_pem(key), 0o600, owner)
        _write(crt_path, cert.public_bytes(pem), 0o644, owner)
    else:  # the runtime user may have changed
        _chown((key_path, crt_path), owner)
    _write(server_dir / "ca.crt", ca_pem, 0o644)
    _write(trust_dir / "ca.crt", ca_pem, 0o644)
    return CertificateReport(ca_state, "created" if reissue else "reused", certificate_sans(cert))


def certificate_sans(cert: Any) -> tuple[str, ...]:
    """The subject alternative names of ``cert`` as ``DNS:...`` / ``IP:...`` strings."""
    from cryptography import x509

    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return tuple(
        [f"DNS:{n}" for n in names.get_values_for_type(x509.DNSName)]
        + [f"IP:{a}" for a in names.get_values_for_type(x509.IPAddress)]
    )


# ------------------------------------------------------------------- node keys
@dataclass(frozen=True)
class NodeKey:
    """One SuperNode identity: its key files and whether this call made them."""

    index: int
    private_key: Path  # OpenSSH format, mode 0600: flower-supernode --auth-supernode-private-key
    public_key: Path  # OpenSSH format: flwr supernode register <public_key>
    state: str  # "created" or "reused"

    def public_pem(self) -> bytes:
        """The public key as Flower's Control API stores it (SubjectPublicKeyInfo PEM)."""
        return public_key_pem(self.public_key)


def node_key_paths(keys_dir: Path, index: int) -> tuple[Path, Path]:
    """``(keys_dir/node-<index>.key, keys_dir/node-<index>.pub)``."""
    return keys_dir / f"node-{index}.key", keys_dir / f"node-{index}.pub"


def ensure_node_keys(
    keys_dir: Path, indices: Iterable[int], *, owner: tuple[int, int] | None = None
) -> list[NodeKey]:
    """One P-384 key pair per index in ``keys_dir`` (reused when present).

    Writes ``node-<i>.key`` (OpenSSH private key, unencrypted, mode 0600; the format
    ``flower-supernode --auth-supernode-private-key`` reads) and ``node-<i>.pub``
    (OpenSSH public key line; the format ``flwr supernode register`` reads). An
    existing private key is kept and its ``.pub`` rewritten from it when missing or
    different; a private key that is not a NIST EC key raises :class:`SecurityError`
    (it is never overwritten). ``owner`` (uid, gid) gets both files when run as root.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    keys_dir.mkdir(parents=True, exist_ok=True)
    out: list[NodeKey] = []
    for index in indices:
        priv_path, pub_path = node_key_paths(keys_dir, index)
        state = "reused"
        if priv_path.exists():
            try:
                key = serialization.load_ssh_private_key(priv_path.read_bytes(), password=None)
            except (ValueError, TypeError) as exc:
                raise SecurityError(
                    f"node key {priv_path} is not an unencrypted OpenSSH private key ({exc}); "
                    "remove it to make a new one (then register the new public key)"
                ) from exc
            if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in (
                "secp256r1",
                "secp384r1",
                "secp521r1",
            ):
                raise SecurityError(
                    f"node key {priv_path} is not a NIST EC key (Flower's SuperNode "
                    "authentication needs one); remove it to make a P-384 key"
                )
            if oct(priv_path.stat().st_mode & 0o777) != "0o600":
                os.chmod(priv_path, 0o600)
        else:
            state = "created"
            key = ec.generate_private_key(ec.SECP384R1())
            _write(
                priv_path,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.OpenSSH,
                    serialization.NoEncryption(),
                ),
                0o600,
                owner,
            )
        pub = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        pub += f" bastion-node-{index}\n".encode()
        if not pub_path.exists() or pub_path.read_bytes() != pub:
            _write(pub_path, pub, 0o644, owner)
        _chown((priv_path, pub_path), owner)
        out.append(NodeKey(index, priv_path, pub_path, state))
    return out


def public_key_pem(public_key_file: Path) -> bytes:
    """The NIST EC public key in ``public_key_file`` (OpenSSH or PEM) as SPKI PEM bytes.

    That is the form Flower's ``RegisterNode`` request carries and its SuperLink
    compares with what a SuperNode presents (``flwr supernode register`` converts the
    same way).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = public_key_file.read_bytes()
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data)
    except (OSError, ValueError, TypeError) as exc:
        raise SecurityError(f"public key file {public_key_file} cannot be read: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SecurityError(
            f"public key file {public_key_file}: not an EC key; allowed: a NIST EC (P-384) key"
        )
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ---------------------------------------------------------------- one folder
@dataclass(frozen=True)
class FederationFiles:
    """Every file of a secured federation in one folder (see the module docstring)."""

    root: Path
    certificates: CertificateReport
    nodes: list[NodeKey]

    @property
    def ca_dir(self) -> Path:
        """``ca.key`` + ``ca.crt``: the CA (only needed to issue certificates)."""
        return self.root / "ca"

    @property
    def server_dir(self) -> Path:
        """The SuperLink's ``server.key``, ``server.crt`` and ``ca.crt``."""
        return self.root / "superlink"

    @property
    def ca_cert(self) -> Path:
        """The CA certificate every SuperNode and ``flwr`` trusts."""
        return self.root / "supernode" / "ca.crt"

    def superlink_args(self) -> list[str]:
        """``flower-superlink`` flags: TLS with these files and SuperNode authentication."""
        d = self.server_dir
        return [
            "--ssl-ca-certfile",
            str(d / "ca.crt"),
            "--ssl-certfile",
            str(d / "server.crt"),
            "--ssl-keyfile",
            str(d / "server.key"),
            "--enable-supernode-auth",
        ]

    def supernode_args(self, index: int) -> list[str]:
        """``flower-supernode`` flags of node ``index``: trust the CA, sign with its key."""
        key = next((k for k in self.nodes if k.index == index), None)
        if key is None:
            raise SecurityError(
                f"node index {index}: no key pair in {self.root / 'nodes'}; allowed: "
                f"{[k.index for k in self.nodes]}"
            )
        return [
            "--root-certificates",
            str(self.ca_cert),
            "--auth-supernode-private-key",
            str(key.private_key),
        ]


def ensure_federation_files(
    root: Path, num_nodes: int, sans: Sequence[str], *, first_index: int = 0
) -> FederationFiles:
    """CA, SuperLink certificate for ``sans`` and ``num_nodes`` node key pairs under ``root``.

    Layout as in the module docstring; everything already there is reused
    (:func:`ensure_certificates`, :func:`ensure_node_keys`).
    """
    if num_nodes < 0:
        raise SecurityError(f"nodes: value {num_nodes} is not allowed; allowed: 0 or more")
    report = ensure_certificates(root / "ca", root / "superlink", root / "supernode", sans)
    nodes = ensure_node_keys(root / "nodes", range(first_index, first_index + num_nodes))
    return FederationFiles(Path(root), report, nodes)


# ---------------------------------------------------------------- registration
def control_client(address: str, ca_file: Path | None) -> Any:
    """Flower's Control API client (``ControlHttpClient``) for ``address`` (host:port).

    The client ``flwr supernode register`` uses, with the runtime-version headers the
    ``flwr`` CLI sends, over HTTPS trusting ``ca_file`` (plain HTTP when ``ca_file`` is
    ``None``). No account login: Bastion's SuperLinks run without account auth, so
    nothing is read from or written to a Flower credential store.
    """
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors.http import RuntimeVersionHttpInterceptor

    return ControlHttpClient.from_server_address(
        server_address=address,
        insecure=ca_file is None,
        root_certificates=ca_file.read_bytes() if ca_file is not None else None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )


def _listed(client: Any) -> dict[bytes, int]:
    """Public key (SPKI PEM) -> node id of the registered (not unregistered) SuperNodes."""
    from flwr.proto.control_pb2 import ListNodesRequest

    res = client.ListNodes(ListNodesRequest())
    return {
        bytes(n.public_key): int(n.node_id)
        for n in res.nodes_info
        if n.public_key and n.status != "unregistered"
    }


def registered_nodes(address: str, ca_file: Path | None) -> dict[bytes, int]:
    """Public key (SPKI PEM) -> node id of every SuperNode registered (and not
    unregistered) with the SuperLink whose Control API is at ``address``."""
    client = control_client(address, ca_file)
    try:
        return _listed(client)
    finally:
        client.close()


def register_nodes(
    address: str, ca_file: Path | None, public_keys: Sequence[Path]
) -> dict[Path, int]:
    """Register each public key file with the SuperLink's Control API; return the node ids.

    What ``flwr supernode register <key> <connection>`` does, in this process and over
    one connection. Idempotent: a key that is already registered is not sent again
    and keeps its node id (a SuperNode that restarts with the same key keeps its id).
    Raises :class:`SecurityError` naming the key file when the SuperLink refuses one.
    """
    from flwr.proto.control_pb2 import RegisterNodeRequest

    pems = {path: public_key_pem(path) for path in public_keys}
    client = control_client(address, ca_file)
    out: dict[Path, int] = {}
    try:
        known = _listed(client)
        for path, pem in pems.items():
            if pem in known:
                out[path] = known[pem]
                continue
            try:
                res = client.RegisterNode(RegisterNodeRequest(public_key=pem, name=path.stem))
            except Exception as exc:  # Flower raises its own HTTP/API error types
                raise SecurityError(
                    f"the SuperLink at {address} refused to register {path}: {exc}"
                ) from exc
            if not res.node_id:
                raise SecurityError(f"the SuperLink at {address} returned no node id for {path}")
            out[path] = known[pem] = int(res.node_id)
    finally:
        client.close()
    return out


def unregister_node(address: str, ca_file: Path | None, node_id: int) -> None:
    """Remove SuperNode ``node_id`` (what ``flwr supernode unregister`` does): the
    SuperLink refuses its key from then on."""
    from flwr.proto.control_pb2 import UnregisterNodeRequest

    client = control_client(address, ca_file)
    try:
        client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
    finally:
        client.close()


def flwr_connection_toml(name: str, address: str, ca_file: Path | None) -> str:
    """``$FLWR_HOME/config.toml`` text with one default connection ``name`` to ``address``.

    TLS trusting ``ca_file`` (``root-certificates``), or ``insecure = true`` when
    ``ca_file`` is ``None``.
    """
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]"]
    lines.append(f'address = "{address}"')
    if ca_file is not None:
        lines += [f'root-certificates = "{ca_file}"', "insecure = false"]
    else:
        lines.append("insecure = true")
    return "\n".join(lines) + "\n"
