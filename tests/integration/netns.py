"""Several "hosts" on one Linux machine: network namespaces, veth pairs and a bridge.

:class:`Topology` builds a small LAN without touching the host's own network: a
"switch" namespace holds a bridge, and every host (the SuperLink, each SuperNode)
gets a namespace of its own whose ``eth0`` is one end of a veth pair; the other end
is a port of the bridge. Every name starts with a per-run prefix, and interfaces
are created directly inside those namespaces, so parallel or leftover runs never
collide and the root namespace gets no new interface. :meth:`Topology.destroy`
kills what still runs inside the namespaces (by PID) and deletes them.

:class:`NetnsFederation` is :class:`bastion.federation.LocalFederation` with each
process started inside its host's namespace (``ip netns exec``): the SuperLink
binds its Fleet and Control APIs to its own address, the SuperNodes reach it over
the bridge, and ``flwr run`` submits from the SuperLink's host.

Needs root (``CAP_SYS_ADMIN`` and ``CAP_NET_ADMIN``) and iproute2 (``ip``, ``ss``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bastion.federation import LocalFederation, ManagedProcess, flower_bin

SUBNET = "10.77.0"
BRIDGE = "br0"
HOST_IFACE = "eth0"


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message names the command and its output."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` and return the finished process (raise :class:`NetnsError` on failure)."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(
            f"`ip {' '.join(args)}` failed with exit code {proc.returncode}: "
            f"{(proc.stderr or proc.stdout).strip()}"
        )
    return proc


def netns_prerequisites_missing() -> str | None:
    """What this user or machine lacks for network namespaces (root, iproute2), or None."""
    missing = [tool for tool in ("ip", "ss") if shutil.which(tool) is None]
    if missing:
        return (
            f"{' and '.join(missing)} not found: install iproute2 "
            "(Debian: apt-get install iproute2)"
        )
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()}); run as root"
    return None


def netns_unavailable_reason() -> str | None:
    """Why this machine cannot build a :class:`Topology`, or None when it can.

    Checks :func:`netns_prerequisites_missing`, then creates and deletes one
    throw-away namespace, so it checks the permission as well as the tools.
    """
    missing = netns_prerequisites_missing()
    if missing is not None:
        return missing
    probe = f"bastion-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return (
            f"`ip netns add` failed ({made.stderr.strip()}); the process needs "
            "CAP_SYS_ADMIN and CAP_NET_ADMIN (a container must run --privileged or with "
            "those capabilities)"
        )
    try:
        bridge = ip("-n", probe, "link", "add", BRIDGE, "type", "bridge", check=False)
        if bridge.returncode != 0:
            return f"cannot create a bridge in a namespace: {bridge.stderr.strip()}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


def _ipv4(endpoint: str) -> str:
    """The address of an ``ss`` endpoint: ``10.0.0.1:80`` and ``[::ffff:10.0.0.1]:80`` (gRPC
    listens on IPv6 sockets, IPv4 addresses show v4-mapped) both give ``10.0.0.1``."""
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    return host.removeprefix("::ffff:")


@dataclass(frozen=True)
class Host:
    """One namespace on the LAN: its name, address and the bridge port facing it."""

    namespace: str
    address: str
    port: str  # its veth end on the bridge, inside the switch namespace

    def exec_prefix(self) -> list[str]:
        """Command prefix that runs a program inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace]


@dataclass
class Topology:
    """A switch namespace with a bridge and one namespace per host name, on a /24.

    The first host gets address ``.1``, the others ``.11``, ``.12``, ...
    """

    host_names: tuple[str, ...]
    prefix: str = ""

    def __post_init__(self) -> None:
        # pid + random suffix: unique among parallel runs and against a leftover of a
        # crashed run whose pid was reused
        self.prefix = self.prefix or f"bastion-netns-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        if len(self.host_names) > 200:
            raise ValueError(f"at most 200 hosts on {SUBNET}.0/24, got {len(self.host_names)}")
        self.switch = f"{self.prefix}-switch"
        self.hosts: dict[str, Host] = {
            name: Host(f"{self.prefix}-{name}", f"{SUBNET}.{1 if i == 0 else 10 + i}", f"p{i}")
            for i, name in enumerate(self.host_names)
        }
        self.created: list[str] = []

    def create(self) -> None:
        """Create the namespaces, the bridge and the links; every host can reach every other."""
        for ns in (self.switch, *(h.namespace for h in self.hosts.values())):
            ip("netns", "add", ns)
            self.created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", self.switch, "link", "add", BRIDGE, "type", "bridge")
        ip("-n", self.switch, "link", "set", BRIDGE, "up")
        for host in self.hosts.values():
            # both ends are born in their namespaces: no name ever exists in the root one
            veth = f"link add {host.port} type veth peer name {HOST_IFACE} netns {host.namespace}"
            ip("-n", self.switch, *veth.split())
            ip("-n", self.switch, "link", "set", host.port, "master", BRIDGE, "up")
            ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", HOST_IFACE)
            ip("-n", host.namespace, "link", "set", HOST_IFACE, "up")

    def set_link(self, name: str, up: bool) -> None:
        """Unplug (``up=False``) or plug back in the cable between host ``name`` and the switch.

        Sets the bridge-side end of the host's veth down or up; the host's own
        ``eth0`` loses its carrier, as with a cable pulled at the switch.
        """
        ip("-n", self.switch, "link", "set", self.hosts[name].port, "up" if up else "down")

    def link_is_up(self, name: str) -> bool:
        """Whether the host's ``eth0`` has a carrier (its cable is plugged in)."""
        out = ip("-n", self.hosts[name].namespace, "-o", "link", "show", HOST_IFACE).stdout
        return "LOWER_UP" in out

    def run_in(self, name: str, *command: str) -> str:
        """Run ``command`` inside host ``name``'s namespace and return its stdout."""
        return subprocess.run(
            [*self.hosts[name].exec_prefix(), *command],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout

    def tcp_peers(self, name: str, local_port: int) -> list[str]:
        """Remote addresses of established TCP connections to ``local_port`` on host ``name``."""
        out = self.run_in(name, "ss", "-Htn", "state", "established", f"( sport = :{local_port} )")
        return [_ipv4(line.split()[-1]) for line in out.splitlines() if line.strip()]

    def is_listening(self, name: str, address: str, port: int) -> bool:
        """Whether something on host ``name`` listens on TCP ``address:port``."""
        out = self.run_in(name, "ss", "-Hltn", f"( sport = :{port} )")
        return any(_ipv4(line.split()[3]) == address for line in out.splitlines() if line.strip())

    def wait_listening(
        self, name: str, address: str, port: int, timeout: float, proc: subprocess.Popen
    ) -> None:
        """Block until host ``name`` listens on ``address:port`` (fail if ``proc`` exits)."""
        deadline = time.monotonic() + timeout
        while not self.is_listening(name, address, port):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{proc.args} exited with {proc.returncode} before listening on "
                    f"{address}:{port} in {self.hosts[name].namespace}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listened on {address}:{port} after {timeout:.0f} s")
            time.sleep(0.2)

    def pids(self) -> dict[str, list[int]]:
        """PIDs of the processes still running inside each of this topology's namespaces."""
        found: dict[str, list[int]] = {}
        for ns in self.created:
            out = ip("netns", "pids", ns, check=False).stdout.split()
            if out:
                found[ns] = [int(p) for p in out]
        return found

    def destroy(self, grace: float = 5.0) -> None:
        """Kill what still runs in the namespaces (TERM, then KILL, by PID) and delete them."""
        for pids in self.pids().values():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pids in self.pids().values():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # deleting the switch namespace destroys the bridge and every veth pair with it
        for ns in reversed(self.created):
            ip("netns", "del", ns, check=False)
        self.created.clear()

    def leftovers(self) -> list[str]:
        """Namespaces with this topology's prefix that still exist (empty after destroy)."""
        out = ip("netns", "list").stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(self.prefix)]

    def __enter__(self) -> Topology:
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


class NetnsFederation(LocalFederation):
    """A :class:`LocalFederation` whose SuperLink and SuperNodes are hosts of a :class:`Topology`.

    Host ``"superlink"`` runs the SuperLink and ``flwr run``; host ``"node{i}"`` runs
    SuperNode ``i`` (partition ``i``). Each namespace has its own ports, so Flower's
    default ports are used (Fleet API 9092, Control API 9093, SuperNode API 9094).
    Processes, environment, ``submit`` and ``stop`` are :class:`LocalFederation`'s.
    """

    FLEET_PORT = 9092
    CONTROL_PORT = 9093

    def __init__(
        self,
        topology: Topology,
        log_dir: Path,
        *,
        node_config: Mapping[int, Mapping[str, object]] | None = None,
        torch_threads: int = 0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        nodes = [n for n in topology.hosts if n != "superlink"]
        expected = [f"node{i}" for i in range(len(nodes))]
        if "superlink" not in topology.hosts or nodes != expected:
            raise ValueError(
                f"hosts must be 'superlink' and {expected} (in this order), got "
                f"{list(topology.hosts)}"
            )
        super().__init__(
            len(nodes),
            log_dir,
            node_config=dict(node_config or {}),
            torch_threads=torch_threads,
            env=dict(env or {}),
        )
        self.topology = topology
        # (the parent picked free loopback ports; a fresh namespace has all ports free)
        self.host = topology.hosts["superlink"].address
        self.fleet_port, self.http_port = self.FLEET_PORT, self.CONTROL_PORT

    def host_of(self, process_name: str) -> str:
        """The topology host a process runs on (``supernode-2`` runs on ``node2``)."""
        if process_name.startswith("supernode-"):
            return "node" + process_name.removeprefix("supernode-")
        return "superlink"  # the SuperLink itself and `flwr run`

    def _start(self, name: str, args: list[str]) -> ManagedProcess:
        # `ip netns exec` execs the program: the PID (and process group) is Flower's own
        host = self.topology.hosts[self.host_of(name)]
        return super()._start(name, [*host.exec_prefix(), *args])

    def _wait_listening(self, port: int, timeout: float, popen: subprocess.Popen[bytes]) -> None:
        # the SuperLink listens inside its own namespace: look there
        self.topology.wait_listening("superlink", self.host, port, timeout, popen)

    def _supernode_port_args(self) -> list[str]:
        return []  # every SuperNode has a namespace, and so its ports, to itself

    def _register(self, public_keys: list[Path]) -> dict[Path, int]:
        # The Control API listens inside the SuperLink's namespace, out of this
        # process's reach: register from there, with Flower's own CLI (`flwr supernode
        # register KEY bastion-local`, the connection LocalFederation wrote, over TLS).
        host = self.topology.hosts["superlink"]
        ids: dict[Path, int] = {}
        for key in public_keys:
            cmd = [*host.exec_prefix(), flower_bin("flwr"), "supernode", "register"]
            cmd += [str(key), "bastion-local", "--format", "json"]
            done = subprocess.run(
                cmd, capture_output=True, text=True, env=self._env(), timeout=120, check=False
            )
            found = re.search(r'"node-id":\s*(\d+)', done.stdout)
            if done.returncode != 0 or found is None:
                raise RuntimeError(
                    f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stdout}{done.stderr}"
                )
            ids[key] = int(found.group(1))
        return ids

    def log_of(self, name: str) -> str:
        """The log of process ``name`` so far (empty before it wrote anything)."""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""
