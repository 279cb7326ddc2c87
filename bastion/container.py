"""Entry points of Bastion's containers: ``python -m bastion.container COMMAND``.

``docker-compose.yml`` runs one image in six roles; each is a subcommand here:

``setup``
    One-shot, as root: creates the shared folders (partition slots, privacy
    ledgers, the colluders' side channel, the results folder) owned by the
    runtime user, and unless ``BASTION_INSECURE=1`` makes a certificate authority,
    a SuperLink certificate and one P-384 node key pair per partition
    (:mod:`bastion.security`; all reused on later starts, the server certificate
    re-issued by the same CA when the requested names change).
``superlink``
    ``flower-superlink`` with TLS and SuperNode authentication, its Fleet API (gRPC)
    on 9092 and its Control/Runtime API (HTTP) on 9093.
``register``
    One-shot, once the SuperLink is healthy and before any SuperNode starts:
    registers every partition's public key through the Control API (idempotent).
``supernode --role honest|malicious``
    Claims a free data partition (:func:`claim_partition`), then becomes
    ``flower-supernode`` with that partition's private key and ``--node-config
    "partition-id=... num-partitions=... role=..."`` (plus the attack for a malicious
    node).
``run``
    The one-shot runner: submits the app with ``flwr run`` over TLS, streams the
    ServerApp's log, and exits 0 only when the run's ``summary.json`` says
    ``completed`` (the ServerApp, inside the SuperLink container, writes the
    results into the mounted results folder).
``certs --out DIR [--san NAME ...]``
    The same CA and SuperLink certificate for a federation without compose
    (``bastion keys`` also makes node key pairs).
``probe HOST:PORT ...``
    Healthcheck: exits 0 when every address accepts TCP connections.

Partition ids. Compose has no loops, so each SuperNode kind is one service scaled
by ``deploy.replicas``. With ``N = BASTION_HONEST + BASTION_MALICIOUS +
BASTION_EXTERNAL_NODES`` partitions, the malicious partitions are the ones
``bastion run --malicious`` would pick (:func:`attacks.selection.malicious_partitions`
with ``BASTION_SEED``) among the first ``HONEST + MALICIOUS``; the other ones of
those belong to honest nodes, and ``HONEST + MALICIOUS .. N-1`` are left for
SuperNodes outside compose (edge devices). A replica takes the first partition
of its kind whose lock file in the shared slots volume it can ``flock``; the lock
lives as long as the SuperNode process (the open file is inherited across
``exec``), so a restarted container takes back a free partition and two live
containers never share one.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attacks.selection import malicious_partitions
from bastion import security
from bastion.console import final_table, plural
from bastion.federation import superexec_poll_seconds
from bastion.preflight import app_defaults, check_rule_fits
from bastion.probe import probe
from bastion.supernode import LAUNCHERS
from common.config import (
    ConfigError,
    NodeConfig,
    RunConfig,
    format_overrides,
    node_may_set,
    overlay,
    parse_overrides,
)
from common.rundir import record_outcome
from common.runlog import read_jsonl
from server.run_config import all_keys, check_run_config, load_run_config

FLEET_PORT = 9092
CONTROL_PORT = 9093
SUPERNODE_HEALTH_PORT = 9099
STATE_ROOT = Path("/var/lib/bastion")
CA_DIR = STATE_ROOT / "ca"  # CA key and certificate (only the setup service mounts it)
SERVER_TLS_DIR = STATE_ROOT / "tls"  # SuperLink certificate, key and the CA certificate
TRUST_DIR = STATE_ROOT / "trust"  # the CA certificate alone, for SuperNodes and the runner
NODE_KEYS_DIR = STATE_ROOT / "node-keys"  # node-<partition>.key/.pub, one pair per partition
SLOTS_DIR = STATE_ROOT / "slots"
LEDGER_DIR = STATE_ROOT / "state"
COLLUSION_DIR = STATE_ROOT / "collusion"
RESULTS_DIR = Path("/results")
APP_DIR = Path("/app")
#: names the SuperLink certificate always carries (compose service name, loopback)
DEFAULT_SANS = ("superlink", "localhost", "127.0.0.1")
#: SuperNode services: honest and malicious take compose's partitions; ``edge`` (the
#: compose profile ``edge``: an arm64 image, one torch thread, a memory limit) takes
#: the ``BASTION_EXTERNAL_NODES`` partitions and trains honestly
ROLES = ("honest", "malicious", "edge")


# ------------------------------------------------------------------- environment
def env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    """Integer environment variable ``name`` (``default`` when unset or empty)."""
    raw = env.get(name, "").strip()
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ConfigError(
            f"environment variable {name}: value {raw!r} is not allowed; "
            f"allowed: an integer >= {minimum}"
        )
    return value


def env_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """Boolean environment variable ``name``: 1/true/yes/on or 0/false/no/off."""
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(
        f"environment variable {name}: value {raw!r} is not allowed; allowed: 1 or 0 "
        "(also true/false, yes/no, on/off)"
    )


@dataclass(frozen=True)
class Layout:
    """How many SuperNodes of each kind the federation has, and who holds which partition."""

    honest: int
    malicious: int
    external: int = 0
    seed: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Layout:
        """Read ``BASTION_HONEST`` (3), ``BASTION_MALICIOUS`` (1),
        ``BASTION_EXTERNAL_NODES`` (0) and ``BASTION_SEED`` (0)."""
        layout = cls(
            honest=env_int(env, "BASTION_HONEST", 3),
            malicious=env_int(env, "BASTION_MALICIOUS", 1),
            external=env_int(env, "BASTION_EXTERNAL_NODES", 0),
            seed=env_int(env, "BASTION_SEED", 0),
        )
        if layout.total < 1:
            raise ConfigError(
                "environment variables BASTION_HONEST + BASTION_MALICIOUS + "
                "BASTION_EXTERNAL_NODES: value 0 is not allowed; allowed: at least 1 SuperNode"
            )
        return layout

    @property
    def in_compose(self) -> int:
        """SuperNodes that compose starts (honest + malicious)."""
        return self.honest + self.malicious

    @property
    def total(self) -> int:
        """All SuperNodes of the federation, ``num-partitions``."""
        return self.in_compose + self.external

    def malicious_ids(self) -> tuple[int, ...]:
        """Partitions of the malicious SuperNodes: ``bastion run --malicious``'s seeded rule."""
        return malicious_partitions(self.in_compose, self.malicious, self.seed)

    def partitions(self, role: str) -> tuple[int, ...]:
        """The partition ids a SuperNode of ``role`` may take, in the order it tries them."""
        bad = set(self.malicious_ids()) if self.malicious else set()
        if role == "malicious":
            return tuple(sorted(bad))
        if role == "honest":
            return tuple(p for p in range(self.in_compose) if p not in bad)
        if role == "external":
            return tuple(range(self.in_compose, self.total))
        raise ConfigError(f"role: value {role!r} is not allowed; allowed: one of {ROLES}")


# ------------------------------------------------------------------ partitions
class NoFreePartition(RuntimeError):
    """Every partition of a role is held by a live SuperNode."""


def claim_partition(slots_dir: Path, candidates: Sequence[int], owner: str) -> tuple[int, int]:
    """Lock the first free partition of ``candidates``; return ``(partition id, fd)``.

    A partition is free when no live process holds an exclusive ``flock`` on
    ``slots_dir/partition-<id>.lock``. The lock belongs to the returned open file:
    it lasts while that descriptor (inherited across ``exec``) stays open in some
    process, and the kernel drops it when the last holder dies. ``owner`` is
    written into the file for people looking at the volume.
    """
    slots_dir.mkdir(parents=True, exist_ok=True)
    for pid in candidates:
        fd = os.open(slots_dir / f"partition-{pid}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{owner} {os.getpid()} {time.time():.0f}\n".encode())
        return pid, fd
    raise NoFreePartition(
        f"no free partition among {list(candidates)} in {slots_dir}: more SuperNodes of this "
        "kind run than BASTION_HONEST / BASTION_MALICIOUS say. Change those counts (in .env "
        "or the environment) instead of `docker compose up --scale`, so that every node "
        "agrees on num-partitions"
    )


#: what a compose node's config may hold: the node's own keys, and the run-config keys
#: a node may set for itself (its attack and DP settings, common.config.node_may_set)
NODE_CONFIG_KEYS = frozenset(NodeConfig.keys()) | {k for k in all_keys() if node_may_set(k)}


def node_config(
    layout: Layout,
    role: str,
    partition_id: int,
    env: Mapping[str, str],
) -> dict[str, Any]:
    """The ``--node-config`` of a compose SuperNode, validated.

    Every node gets ``partition-id``, ``num-partitions`` and ``role`` plus
    ``BASTION_NODE_CONFIG``; a malicious node also gets ``attack``
    (``BASTION_ATTACK``), ``num-colluders`` (the malicious count), the
    colluders' shared folder and ``BASTION_ATTACK_CONFIG`` (e.g.
    ``attack-epsilon=0.1``). Keys that ``NodeConfig`` does not know are refused.
    """
    cfg: dict[str, Any] = {
        "partition-id": partition_id,
        "num-partitions": layout.total,
        "role": role,
    }
    sources = [("BASTION_NODE_CONFIG", env.get("BASTION_NODE_CONFIG", ""))]
    if role == "malicious":
        attack = env.get("BASTION_ATTACK", "").strip() or "ipm"
        cfg |= {
            "attack": attack,
            "num-colluders": max(layout.malicious, 1),
            "collusion-dir": str(COLLUSION_DIR),
        }
        sources.append(("BASTION_ATTACK_CONFIG", env.get("BASTION_ATTACK_CONFIG", "")))
    for name, text in sources:
        extra = parse_overrides(text)
        unknown = sorted(set(extra) - NODE_CONFIG_KEYS)
        if unknown:
            raise ConfigError(
                f"environment variable {name}: key(s) {unknown} are not node-config keys; "
                f"allowed: {', '.join(sorted(NODE_CONFIG_KEYS))}"
            )
        fixed = sorted({"partition-id", "num-partitions", "role"} & set(extra))
        if fixed:
            raise ConfigError(
                f"environment variable {name}: key(s) {fixed} are set by the container "
                "(from BASTION_HONEST / BASTION_MALICIOUS); remove them"
            )
        cfg |= extra
    node = NodeConfig.from_flat(cfg, source=f"node config of a {role} SuperNode")
    check_run_config(overlay(RunConfig(), node))  # the attack's name and its keys' values
    return cfg


# ------------------------------------------------------------------ certificates
# One implementation of certificates and node keys: bastion.security.
CertificateReport = security.CertificateReport
ensure_certificates = security.ensure_certificates


def parse_sans(text: str, source: str = "environment variable BASTION_TLS_SANS") -> list[str]:
    """:func:`bastion.security.parse_sans` with errors naming ``BASTION_TLS_SANS``."""
    return security.parse_sans(text, source=source)


def insecure_mode(env: Mapping[str, str]) -> bool:
    """``BASTION_INSECURE`` (default 0): 1 turns off TLS *and* SuperNode authentication.

    ``BASTION_TLS``, the older switch, is refused unless empty or 1, so that an old
    ``BASTION_TLS=0`` does not silently mean something else.
    """
    legacy = env.get("BASTION_TLS", "").strip()
    if legacy not in ("", "1"):
        raise ConfigError(
            f"environment variable BASTION_TLS: value {legacy!r} is not allowed; it was "
            "replaced by BASTION_INSECURE (1 = no TLS and no SuperNode authentication)"
        )
    return env_flag(env, "BASTION_INSECURE", False)


def warn_insecure(service: str) -> None:
    """The warning every service prints when ``BASTION_INSECURE=1``."""
    print(
        f"bastion {service}: WARNING: BASTION_INSECURE=1: no TLS and no SuperNode "
        "authentication; traffic is plain text and anything that reaches the Fleet port can "
        "join as a SuperNode. Use only on a trusted network.",
        file=sys.stderr,
        flush=True,
    )


def node_key_file(pid: int) -> Path:
    """The private key of the SuperNode holding partition ``pid`` (made by ``setup``)."""
    return security.node_key_paths(NODE_KEYS_DIR, pid)[0]


# ------------------------------------------------------------------------ setup
def prepare_dirs(dirs: Sequence[Path], owner: tuple[int, int]) -> None:
    """Create ``dirs`` and, when run as root, hand them to ``owner`` (uid, gid)."""
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(d, *owner)


def prepare_results(results: Path, owner: tuple[int, int]) -> None:
    """Make the results folder writable for ``owner``.

    A bind-mounted folder that did not exist on the host is created by the engine
    and owned by root; that one is handed to ``owner``. A folder owned by anyone
    else is left alone, and must already be writable for ``owner``.
    """
    results.mkdir(parents=True, exist_ok=True)
    st = results.stat()
    if os.geteuid() == 0 and st.st_uid == 0 and owner[0] != 0:
        os.chown(results, *owner)
        return
    if st.st_uid != owner[0] and not st.st_mode & 0o002:
        raise ConfigError(
            f"results folder {results} belongs to uid {st.st_uid}, but the containers run as "
            f"uid {owner[0]}; set BASTION_UID/BASTION_GID to its owner "
            f"(`id -u`/`id -g`) or make it writable"
        )


def cmd_setup(env: Mapping[str, str]) -> int:
    """The ``setup`` service: folders for the runtime user, certificates, node keys.

    Unless ``BASTION_INSECURE=1``: the CA and SuperLink certificate
    (:func:`bastion.security.ensure_certificates`) and one P-384 key pair per
    partition, ``NODE_KEYS_DIR/node-<id>.key|.pub`` for ids ``0 .. N-1`` (the compose
    SuperNodes' and the external ones'), owned by the runtime user. Everything is
    reused on later starts.
    """
    owner = (env_int(env, "BASTION_UID", 1000), env_int(env, "BASTION_GID", 1000))
    layout = Layout.from_env(env)
    insecure = insecure_mode(env)
    prepare_dirs([SLOTS_DIR, LEDGER_DIR, COLLUSION_DIR], owner)
    prepare_results(RESULTS_DIR, owner)
    if insecure:
        warn_insecure("setup")
        print("bastion setup: no certificates and no node keys (BASTION_INSECURE=1)")
        return 0
    sans = parse_sans(" ".join(DEFAULT_SANS) + " " + env.get("BASTION_TLS_SANS", ""))
    report = ensure_certificates(CA_DIR, SERVER_TLS_DIR, TRUST_DIR, sans, owner=owner)
    prepare_dirs([NODE_KEYS_DIR], owner)
    keys = security.ensure_node_keys(NODE_KEYS_DIR, range(layout.total), owner=owner)
    made = [k.index for k in keys if k.state == "created"]
    print(
        f"bastion setup: CA {report.ca}, SuperLink certificate {report.server} for "
        f"{', '.join(report.sans)}; node key pairs for partitions 0..{layout.total - 1} "
        f"({len(made)} new) in {NODE_KEYS_DIR}"
    )
    return 0


def cmd_certs(out: Path, sans: Sequence[str]) -> int:
    """``certs``: the same CA and SuperLink certificate, for hosts without compose.

    ``out/ca/`` (keep private), ``out/superlink/`` (the SuperLink's ``--ssl-*``
    files), ``out/supernode/ca.crt`` (every SuperNode's ``--root-certificates``,
    and ``flwr``'s ``root-certificates``). ``bastion keys`` does the same and makes
    node key pairs too.
    """
    names = parse_sans(" ".join([*DEFAULT_SANS, *sans]), source="--san")
    report = ensure_certificates(out / "ca", out / "superlink", out / "supernode", names)
    print(
        f"CA {report.ca} in {out / 'ca'}; SuperLink certificate {report.server} for "
        f"{', '.join(report.sans)} in {out / 'superlink'}; SuperNodes trust "
        f"{out / 'supernode' / 'ca.crt'}"
    )
    return 0


def cmd_register(env: Mapping[str, str], attempts: int = 30) -> int:
    """The ``register`` service: register every partition's public key with the SuperLink.

    Runs once the SuperLink is healthy and before any SuperNode starts; idempotent (a
    key already registered keeps its node id), so ``docker compose up`` may run it
    again. Keys of ``BASTION_EXTERNAL_NODES`` partitions are registered too: hand
    ``node-<id>.key`` to that device. Retries while the Control API is not ready yet.
    """
    layout = Layout.from_env(env)
    if insecure_mode(env):
        warn_insecure("register")
        print("bastion register: nothing to register (BASTION_INSECURE=1)")
        return 0
    _require_certificate(TRUST_DIR / "ca.crt")
    pubs = [security.node_key_paths(NODE_KEYS_DIR, pid)[1] for pid in range(layout.total)]
    for pub in pubs:
        _require_certificate(pub)
    control = env.get("BASTION_CONTROL", "").strip() or f"superlink:{CONTROL_PORT}"
    for attempt in range(1, attempts + 1):
        try:
            ids = security.register_nodes(control, TRUST_DIR / "ca.crt", pubs)
            break
        except security.SecurityError:
            raise
        except Exception as exc:  # the Control API may still be starting
            if attempt == attempts:
                raise ConfigError(
                    f"cannot reach the SuperLink's Control API at {control} (BASTION_CONTROL) "
                    f"after {attempts} attempts: {exc}"
                ) from exc
            time.sleep(1.0)
    for pid, pub in enumerate(pubs):
        kind = "external" if pid >= layout.in_compose else "compose"
        print(f"bastion register: partition {pid} ({kind}): node id {ids[pub]} ({pub.name})")
    return 0


# -------------------------------------------------------------- Flower processes
def flower_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment for Flower's processes: no calls home, no ``uv sync`` at run time."""
    out = dict(env)
    defaults = {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    return out | {k: v for k, v in defaults.items() if not out.get(k, "").strip()}


def superlink_command(tls: bool) -> list[str]:
    """``flower-superlink``: Fleet API on 0.0.0.0:9092, Control/Runtime API on 0.0.0.0:9093.

    ``tls``: TLS with the setup service's certificate and SuperNode authentication
    (only registered keys may join); otherwise ``--insecure`` (neither).
    """
    cmd = ["flower-superlink", "--disable-runtime-dependency-installation"]
    if tls:
        cmd += [
            "--ssl-ca-certfile",
            str(SERVER_TLS_DIR / "ca.crt"),
            "--ssl-certfile",
            str(SERVER_TLS_DIR / "server.crt"),
            "--ssl-keyfile",
            str(SERVER_TLS_DIR / "server.key"),
            "--enable-supernode-auth",
        ]
    else:
        cmd.append("--insecure")
    return [
        *cmd,
        "--fleet-api-address",
        f"0.0.0.0:{FLEET_PORT}",
        "--host",
        "0.0.0.0",
        "--port",
        str(CONTROL_PORT),
    ]


def supernode_command(
    superlink: str,
    tls: bool,
    cfg: Mapping[str, Any],
    key: Path | None = None,
    launcher: str = "warm",
) -> list[str]:
    """A SuperNode reaching ``superlink`` (host:port) with node config ``cfg``: with
    ``launcher="warm"`` ``bastion supernode -- FLAGS`` (ClientApp tasks fork from a warm
    process, :mod:`bastion.supernode`), with ``"flower"`` plain ``flower-supernode FLAGS``.

    ``tls``: trust the setup service's CA and sign with the private ``key`` (this
    partition's identity); otherwise ``--insecure``.
    """
    if launcher not in LAUNCHERS:
        raise ConfigError(
            f"BASTION_LAUNCHER: value {launcher!r} is not allowed; allowed: one of "
            f"{', '.join(LAUNCHERS)}"
        )
    program = ["flower-supernode"] if launcher == "flower" else ["bastion", "supernode", "--"]
    cmd = [*program, "--superlink", superlink]
    if tls:
        cmd += ["--root-certificates", str(TRUST_DIR / "ca.crt")]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
    else:
        cmd.append("--insecure")
    return [
        *cmd,
        "--node-config",
        format_overrides(cfg),
        "--health-server-address",
        f"127.0.0.1:{SUPERNODE_HEALTH_PORT}",
    ]


def _exec(cmd: list[str], env: Mapping[str, str]) -> int:
    print("bastion:", " ".join(cmd), flush=True)
    os.execvpe(cmd[0], cmd, dict(env))
    return 1  # pragma: no cover - exec does not return


def _require_certificate(path: Path) -> None:
    if not path.exists():
        raise ConfigError(
            f"TLS and node authentication are on (BASTION_INSECURE=0) but {path} does not "
            "exist; the setup service makes it (`docker compose up` runs it first)"
        )


def cmd_superlink(env: Mapping[str, str]) -> int:
    """The ``superlink`` service."""
    tls = not insecure_mode(env)
    if tls:
        _require_certificate(SERVER_TLS_DIR / "server.key")
    else:
        warn_insecure("superlink")
    return _exec(superlink_command(tls), flower_env(env))


def cmd_supernode(role: str, env: Mapping[str, str]) -> int:
    """A ``supernode-*`` service replica: claim a partition, become ``flower-supernode``."""

    if role not in ROLES:
        raise ConfigError(f"--role: value {role!r} is not allowed; allowed: one of {ROLES}")
    layout = Layout.from_env(env)
    tls = not insecure_mode(env)
    if tls:
        _require_certificate(TRUST_DIR / "ca.crt")
    else:
        warn_insecure("supernode")
    candidates = layout.partitions("external" if role == "edge" else role)
    if role == "edge" and not candidates:
        raise ConfigError(
            "environment variable BASTION_EXTERNAL_NODES: value 0 is not allowed with the "
            "edge profile; allowed: at least the number of edge SuperNodes (BASTION_EDGE), "
            "whose partitions come after the compose ones"
        )
    pid, fd = claim_partition(SLOTS_DIR, candidates, socket.gethostname())
    os.set_inheritable(fd, True)  # the lock lives as long as flower-supernode
    cfg = node_config(layout, "honest" if role == "edge" else role, pid, env)
    key = node_key_file(pid) if tls else None
    if key is not None:
        _require_certificate(key)
    out = flower_env(env)
    cores = os.cpu_count() or 1
    # compose passes unset variables as empty strings: those count as unset too
    # an edge node trains with one thread: a board's other cores serve the SuperNode,
    # and one thread keeps torch's per-thread buffers (memory) small
    threads = 1 if role == "edge" else max(1, cores // max(layout.in_compose, 1))
    defaults = {
        "BASTION_TORCH_THREADS": str(threads),
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": f"{superexec_poll_seconds(layout.in_compose):.2f}",
        "BASTION_STATE_DIR": str(LEDGER_DIR),
    }
    out |= {k: v for k, v in defaults.items() if not out.get(k, "").strip()}
    superlink = env.get("BASTION_SUPERLINK", "").strip() or f"superlink:{FLEET_PORT}"
    print(
        f"bastion: {role} SuperNode holds partition {pid} of {layout.total} "
        f"({role} partitions: {list(candidates)})",
        flush=True,
    )
    launcher = env.get("BASTION_LAUNCHER", "").strip() or "warm"
    return _exec(supernode_command(superlink, tls, cfg, key, launcher), out)


# ------------------------------------------------------------------------ runner
def runner_run_config(
    layout: Layout, env: Mapping[str, str], output_dir: Path, defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``flwr run --run-config`` overrides of the runner, validated.

    ``BASTION_ROUNDS`` (3), ``BASTION_DATASET`` (digits), ``BASTION_AGGREGATOR``
    (median), ``BASTION_NUM_BYZANTINE`` (the malicious count) and ``BASTION_SEED``
    first, then any key from ``BASTION_RUN_CONFIG``; the first round waits for
    all ``num-partitions`` SuperNodes. ``output-dir`` is the runner's.
    """

    overrides: dict[str, Any] = {
        "num-server-rounds": env_int(env, "BASTION_ROUNDS", 3, minimum=1),
        "dataset": env.get("BASTION_DATASET", "").strip() or "digits",
        "aggregator": env.get("BASTION_AGGREGATOR", "").strip() or "median",
        "num-byzantine": env_int(env, "BASTION_NUM_BYZANTINE", layout.malicious),
        "seed": layout.seed,
        "min-available-nodes": layout.total,
        "min-train-nodes": layout.total,
    }
    extra = parse_overrides(env.get("BASTION_RUN_CONFIG", ""))
    if "output-dir" in extra:
        raise ConfigError(
            "environment variable BASTION_RUN_CONFIG: key 'output-dir' is set by the runner; "
            "use BASTION_RUN_NAME (a folder name under the results folder) instead"
        )
    overrides |= extra
    overrides["output-dir"] = str(output_dir)
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(
            f"environment variable BASTION_RUN_CONFIG: unknown key(s) {unknown}; known keys: "
            + ", ".join(all_keys())
        )
    load_run_config(dict(defaults) | overrides)
    return overrides


def flwr_connection_toml(address: str, tls: bool, ca_file: Path) -> str:
    """``$FLWR_HOME/config.toml`` with one connection, ``compose``, to ``address``."""
    return security.flwr_connection_toml("compose", address, ca_file if tls else None)


def run_name(env: Mapping[str, str], dataset: str, results: Path) -> str:
    """``BASTION_RUN_NAME``, or a fresh ``<UTC time>-<dataset>`` folder name."""
    name = env.get("BASTION_RUN_NAME", "").strip()
    if name:
        if "/" in name or name in (".", "..", "latest"):
            raise ConfigError(
                f"environment variable BASTION_RUN_NAME: value {name!r} is not allowed; "
                "allowed: a folder name (no '/'), not 'latest'"
            )
        return name
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name, n = f"{stamp}-{dataset}", 1
    while (results / name).exists():
        n += 1
        name = f"{stamp}-{dataset}-{n}"
    return name


def _stream(
    cmd: list[str], env: Mapping[str, str], log_path: Path, timeout: float
) -> tuple[int, bool]:
    """Run ``cmd``, copying its output to stdout and ``log_path``; kill it after ``timeout``.

    Returns ``(exit code, timed out)``.
    """
    timed_out = threading.Event()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(env), bufsize=0
        )

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, b""):
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                log.write(line)
            return proc.wait(), timed_out.is_set()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def cmd_run(env: Mapping[str, str]) -> int:
    """The ``runner`` service: submit the app, wait for it, check its summary."""

    layout = Layout.from_env(env)
    tls = not insecure_mode(env)
    if not tls:
        warn_insecure("runner")
    app_dir = Path(env.get("BASTION_APP_DIR", "").strip() or APP_DIR)
    results = RESULTS_DIR
    defaults = app_defaults(app_dir)
    overrides = runner_run_config(layout, env, results / "pending", defaults)
    name = run_name(env, str(overrides["dataset"]), results)
    out_dir = results / name
    overrides["output-dir"] = str(out_dir)
    cfg = load_run_config(dict(defaults) | overrides)
    problem = check_rule_fits(cfg, layout.total)
    if problem:
        raise ConfigError(f"{problem}; change BASTION_AGGREGATOR / BASTION_NUM_BYZANTINE")
    if tls:
        _require_certificate(TRUST_DIR / "ca.crt")
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    latest = results / "latest"
    with contextlib.suppress(OSError):
        tmp = results / ".latest.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(name)
        os.replace(tmp, latest)

    flwr_home = Path(env.get("FLWR_HOME", "").strip() or "/tmp/flwr-home")
    flwr_home.mkdir(parents=True, exist_ok=True)
    control = env.get("BASTION_CONTROL", "").strip() or f"superlink:{CONTROL_PORT}"
    (flwr_home / "config.toml").write_text(flwr_connection_toml(control, tls, TRUST_DIR / "ca.crt"))
    proc_env = flower_env(env) | {"FLWR_HOME": str(flwr_home)}
    host_dir = env.get("BASTION_RESULTS_HOST", "").strip()
    where = f"{host_dir.rstrip('/')}/{name}" if host_dir else str(out_dir)
    print(
        f"bastion runner: {layout.honest} honest + {layout.malicious} malicious SuperNodes"
        + (f" + {layout.external} outside compose" if layout.external else "")
        + f", {cfg.num_server_rounds} rounds of {cfg.dataset}, aggregator {cfg.aggregator}, "
        f"TLS and node authentication {'on' if tls else 'OFF'}; results in {where}",
        flush=True,
    )
    cmd = [
        "flwr",
        "run",
        str(app_dir),
        "compose",
        "--stream",
        "--run-config",
        format_overrides(overrides),
    ]
    timeout = float(env_int(env, "BASTION_RUN_TIMEOUT", 3600, minimum=1))
    started, since = time.monotonic(), time.time() - 1.0
    code, timed_out = _stream(cmd, proc_env, out_dir / "logs" / "flwr-run.log", timeout)
    # the attempt's outcome in summary.json, with the runner's wall time (the one printed)
    wall = round(time.monotonic() - started, 1)
    if timed_out:
        why = f"the run did not finish within BASTION_RUN_TIMEOUT ({timeout:.0f} s)"
        record_outcome(out_dir, "failed", why, since=since, wall_seconds=wall)
        print(f"bastion runner: {why}", file=sys.stderr)
        return 1
    summary = record_outcome(
        out_dir,
        "failed",
        f"flwr run exited {code} without a summary from the ServerApp",
        since=since,
        only_if_missing=True,
        wall_seconds=wall,
    )
    if summary.get("status") != "completed":
        print(
            f"bastion runner: the run did not complete (flwr run exited {code}): "
            f"{summary.get('reason')}",
            file=sys.stderr,
        )
        return 1
    print(final_table(read_jsonl(out_dir / "metrics.jsonl"), dp=cfg.dp))
    print(
        f"bastion runner: final accuracy {summary['final_accuracy']:.4f} after "
        f"{plural(int(summary['rounds']), 'round')} ({wall:.0f} s wall); results in {where}",
        flush=True,
    )
    return 0


# ------------------------------------------------------------------------- main
def make_parser() -> argparse.ArgumentParser:
    """The ``python -m bastion.container`` command line."""
    p = argparse.ArgumentParser(
        prog="python -m bastion.container",
        description="Entry points of Bastion's containers (see docker/README.md).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="folders for the runtime user and TLS certificates (as root)")
    certs = sub.add_parser("certs", help="a CA and SuperLink certificate in a folder")
    certs.add_argument("--out", type=Path, required=True, help="folder for ca/, superlink/, ...")
    certs.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or IP address of the SuperLink (repeatable)",
    )
    sub.add_parser("superlink", help="flower-superlink with TLS (Fleet 9092, Control 9093)")
    sub.add_parser("register", help="register every partition's node key with the SuperLink")
    node = sub.add_parser("supernode", help="claim a partition, then run flower-supernode")
    node.add_argument("--role", required=True, choices=ROLES)
    sub.add_parser("run", help="submit the app with flwr run and check its results")
    pr = sub.add_parser("probe", help="exit 0 when every HOST:PORT accepts TCP connections")
    pr.add_argument("addresses", nargs="+", metavar="HOST:PORT")
    return p


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run one subcommand; configuration errors print one clear line and exit 2."""
    args = make_parser().parse_args(argv)
    env = dict(os.environ if env is None else env)
    commands: dict[str, Callable[[], int]] = {
        "setup": lambda: cmd_setup(env),
        "certs": lambda: cmd_certs(getattr(args, "out", Path()), getattr(args, "san", [])),
        "superlink": lambda: cmd_superlink(env),
        "register": lambda: cmd_register(env),
        "supernode": lambda: cmd_supernode(getattr(args, "role", ""), env),
        "run": lambda: cmd_run(env),
    }
    try:
        if args.command == "probe":
            down = probe(args.addresses)
            if down:
                print(f"not listening: {', '.join(down)}", file=sys.stderr)
            return 1 if down else 0
        return commands[args.command]()
    except (ConfigError, NoFreePartition) as exc:  # SecurityError is a ConfigError
        print(f"bastion {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
