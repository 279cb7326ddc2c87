"""A real Flower federation on this machine: one SuperLink, N SuperNodes, ``flwr run``.

Every process is a real Flower process and talks over real sockets: SuperNodes
reach the SuperLink's Fleet API over gRPC (grpc-rere) and ``flwr run`` submits
the app through the SuperLink's Control API. Each process is started in its own
process group so that stopping the group also stops the SuperExec, ServerApp and
ClientApp processes Flower spawns below it; :meth:`LocalFederation.stop` runs on
normal exit, on errors and on Ctrl-C (the class is a context manager).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bastion import security
from bastion.supernode import LAUNCHERS
from common.config import format_overrides

log = logging.getLogger(__name__)


def superexec_poll_seconds(num_supernodes: int, cores: int | None = None) -> float:
    """How often each SuperExec polls for work (Flower's default: 1 s).

    Shorter intervals take up to the interval off every message's latency, but each
    poll costs CPU (measured here with 10 idle SuperNodes: 31% of a core at 1 s,
    81% at 0.1 s). The rule keeps idle polling to about 10% of the machine:
    ``interval = clients / (5 * cores)``, clamped to 0.1..1 s.
    """
    cores = cores or os.cpu_count() or 1
    return min(1.0, max(0.1, num_supernodes / (5.0 * cores)))


FEDERATION_TAG_VAR = "BASTION_FEDERATION_ID"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    host: str, port: int, timeout: float, proc: subprocess.Popen | None = None
) -> None:
    """Block until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process {proc.args[0]} exited with {proc.returncode} before "
                f"listening on {host}:{port}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listened on {host}:{port} after {timeout:.0f} s")


def interpreter_bin() -> Path:
    """The ``bin`` folder of the running interpreter (a venv's ``bin``, unresolved).

    Flower's console scripts live there, next to ``python``, whether or not the venv
    is activated.
    """
    return Path(sys.executable).parent


def flower_bin(name: str) -> str:
    """Path of a Flower console script, preferring the one next to this Python."""
    candidate = interpreter_bin() / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name!r} not found; is flwr installed in this environment?")
    return found


def with_interpreter_on_path(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with :func:`interpreter_bin` first on ``PATH``.

    Flower's SuperLink and SuperNode start their children (``flower-superexec``,
    ``flwr-serverapp``, ``flwr-clientapp``) by name from ``PATH``. Started from a
    shell without the venv activated (cron, systemd, an IDE, ``/path/.venv/bin/bastion``)
    they would not find them and exit at start; with this they find the ones that
    belong to the same installation as Bastion itself.
    """
    env = dict(env)
    first = str(interpreter_bin())
    rest = [p for p in env.get("PATH", os.defpath).split(os.pathsep) if p and p != first]
    env["PATH"] = os.pathsep.join([first, *rest])
    return env


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# a Python exception line: "FileNotFoundError: ...", "SystemExit: Port ... in use."
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit)): (.+)$")


def failure_cause(log_path: Path, max_chars: int = 400) -> str | None:
    """The line of a Flower process's log that says why it failed, or None.

    The last Python exception line (``SomeError: message``) when there is one, else the
    last line logged at ERROR level; at most ``max_chars`` characters.
    """
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    lines = [_ANSI.sub("", line).strip() for line in text.splitlines()]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return line[:max_chars]
    for line in reversed(lines):
        if " ERROR " in f" {line} " or line.startswith("ERROR"):
            return line[:max_chars]
    return None


class ProcessStartError(RuntimeError):
    """A Flower process of the federation exited, or never listened, while starting.

    ``cause`` is the line of its log that says why (:func:`failure_cause`), when found.
    """

    def __init__(self, name: str, log_path: Path, detail: str) -> None:
        self.name, self.log_path, self.detail = name, log_path, detail
        self.cause = failure_cause(log_path)
        super().__init__(f"the {name} could not start: {self.cause or detail}")

    def explain(self) -> str:
        """What the console shows: the cause, what was seen, and where the log is."""
        seen = f"\n  ({self.detail})" if self.cause else ""
        return f"{self}{seen}\n  its log: {self.log_path}"


@dataclass
class ManagedProcess:
    """A started process, its role and its log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    log_file: IO[bytes]


@dataclass
class LocalFederation:
    """One SuperLink and ``num_supernodes`` SuperNodes as processes on loopback.

    Secure by default: the SuperLink serves TLS (a CA and a server certificate for
    ``localhost``, ``127.0.0.1``, this host's name, ``host`` and ``extra_sans``) and
    runs with SuperNode authentication; every SuperNode gets a P-384 key pair of its
    own, registered through the Control API before it starts. The files live in
    ``security_dir`` (default: a private temporary folder removed by :meth:`stop`).
    ``insecure=True`` turns TLS and authentication off (plain-text gRPC and HTTP, any
    process that reaches the Fleet port can join) and logs a warning.
    """

    num_supernodes: int
    log_dir: Path
    host: str = "127.0.0.1"
    node_config: Mapping[int, Mapping[str, object]] = field(default_factory=dict)
    torch_threads: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    processes: list[ManagedProcess] = field(default_factory=list)
    insecure: bool = False
    extra_sans: Sequence[str] = ()
    security_dir: Path | None = None
    #: "warm": ``bastion supernode`` (tasks fork from a warm SuperExec, idle polls
    #: capped); "flower": plain ``flower-supernode`` (one new process per message)
    launcher: str = "warm"
    #: a ClientApp task killed after this many seconds (warm launcher; None: no limit)
    task_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(
                f"option 'launcher': value {self.launcher!r} is not allowed; allowed: "
                f"one of {', '.join(LAUNCHERS)}"
            )
        self.log_dir = Path(self.log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = Path(tempfile.mkdtemp(prefix="bastion-flwr-home-"))
        # Inherited by every process below ours; Flower detaches some of them (the
        # ServerApp runs in a session of its own), so process groups are not enough.
        self.tag = uuid.uuid4().hex
        self._ports_given: set[int] = set()
        self.http_port = self._new_port()
        self.fleet_port = self._new_port()
        if self.security_dir is None:
            self.security_dir = self.flwr_home / "security"
        self.security_dir = Path(self.security_dir)
        #: TLS and node-key files once :meth:`start` made them (``None`` when insecure)
        self.security: security.FederationFiles | None = None
        #: node id the SuperLink gave each partition's key (empty when insecure)
        self.node_ids: dict[int, int] = {}
        #: each SuperNode's full command line by partition id (a restart reuses it)
        self.supernode_args: dict[int, list[str]] = {}

    # ----------------------------------------------------------------- processes
    def _env(self) -> dict[str, str]:
        env = with_interpreter_on_path(os.environ)
        env.update(self.env)
        env["FLWR_HOME"] = str(self.flwr_home)
        env[FEDERATION_TAG_VAR] = self.tag
        env.setdefault(
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL",
            f"{superexec_poll_seconds(self.num_supernodes):.2f}",
        )
        # Flower's telemetry and update check call home; on a closed network each call
        # blocks a fresh process until it times out (measured: rounds took 27 s, not 15 s).
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
        if self.torch_threads > 0:
            env["BASTION_TORCH_THREADS"] = str(self.torch_threads)
        return env

    def _start(self, name: str, args: list[str]) -> ManagedProcess:
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        popen = subprocess.Popen(
            args,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._env(),
            start_new_session=True,  # own process group: stop() reaches Flower's children
        )
        proc = ManagedProcess(name, popen, log_path, log_file)
        self.processes.append(proc)
        return proc

    def _wait_listening(self, port: int, timeout: float, popen: subprocess.Popen[bytes]) -> None:
        """Wait until the SuperLink listens on ``port`` (hook for other network setups)."""
        wait_for_port(self.host, port, timeout, popen)

    def _new_port(self) -> int:
        """A free port this federation has not handed out before.

        :func:`free_port` closes its probe socket, so the OS may offer the same port
        again before the process it went to has bound it: CI once saw two SuperNodes
        of one federation get the same runtime API port, and one of them exit.
        """
        while True:
            port = free_port(self.host)
            if port not in self._ports_given:
                self._ports_given.add(port)
                return port

    def _supernode_port_args(self) -> list[str]:
        """Each SuperNode on this host needs its own ClientAppIo port."""
        return ["--port", str(self._new_port())]

    def _security_files(self) -> security.FederationFiles:
        """CA, SuperLink certificate (for ``host`` and ``extra_sans`` too) and node keys."""
        assert self.security_dir is not None
        sans = security.default_sans([self.host, *self.extra_sans])
        return security.ensure_federation_files(self.security_dir, self.num_supernodes, sans)

    def _supernode_security_args(self, pid: int) -> list[str]:
        """``--insecure``, or the CA to trust and SuperNode ``pid``'s private key."""
        if self.security is None:
            return ["--insecure"]
        return self.security.supernode_args(pid)

    def start(self, startup_timeout: float = 60.0) -> None:
        """Start the SuperLink, wait for its ports, register the node keys (unless
        insecure), then start the SuperNodes, each with its own key."""
        if self.insecure:
            log.warning(
                "INSECURE federation: no TLS and no SuperNode authentication; traffic is "
                "plain text and any process that reaches %s:%s can join as a SuperNode",
                self.host,
                self.fleet_port,
            )
            link_security = ["--insecure"]
        else:
            self.security = self._security_files()
            link_security = self.security.superlink_args()
        link = self._start(
            "superlink",
            [
                flower_bin("flower-superlink"),
                *link_security,
                "--disable-runtime-dependency-installation",
                "--host",
                self.host,
                "--port",
                str(self.http_port),
                "--fleet-api-address",
                f"{self.host}:{self.fleet_port}",
            ],
        )
        try:
            for port in (self.fleet_port, self.http_port):
                self._wait_listening(port, startup_timeout, link.popen)
        except (RuntimeError, TimeoutError) as exc:
            raise ProcessStartError("SuperLink", link.log_path, str(exc)) from exc
        (self.flwr_home / "config.toml").write_text(
            security.flwr_connection_toml(
                "bastion-local",
                f"{self.host}:{self.http_port}",
                None if self.security is None else self.security.ca_cert,
            )
        )
        if self.security is not None:
            self.node_ids = self.register_keys(range(self.num_supernodes))
        for pid in range(self.num_supernodes):
            node_cfg = {"partition-id": pid, "num-partitions": self.num_supernodes}
            node_cfg |= dict(self.node_config.get(pid, {}))
            self.supernode_args[pid] = [
                *self._supernode_command(),
                *self._supernode_security_args(pid),
                "--superlink",
                f"{self.host}:{self.fleet_port}",
                *self._supernode_port_args(),
                "--node-config",
                format_overrides(node_cfg),
            ]
            self._start(f"supernode-{pid}", self.supernode_args[pid])

    def _supernode_command(self) -> list[str]:
        """The program part of a SuperNode's command line; its flags follow."""
        if self.launcher == "flower":
            return [flower_bin("flower-supernode")]
        timeout = [] if self.task_timeout is None else ["--task-timeout", f"{self.task_timeout:g}"]
        return [sys.executable, "-m", "bastion.supernode", *timeout, "--"]

    def register_keys(self, pids: Sequence[int]) -> dict[int, int]:
        """Register the public keys of SuperNodes ``pids`` with the running SuperLink
        (Control API, idempotent); return partition id -> node id."""
        if self.security is None:
            raise RuntimeError("register_keys: this federation is insecure (no node keys)")
        keys = {k.index: k.public_key for k in self.security.nodes if k.index in set(pids)}
        ids = self._register(list(keys.values()))
        return {pid: ids[path] for pid, path in keys.items()}

    def _register(self, public_keys: list[Path]) -> dict[Path, int]:
        """Register ``public_keys`` from where ``flwr`` runs (hook for other network setups)."""
        assert self.security is not None
        return security.register_nodes(
            f"{self.host}:{self.http_port}", self.security.ca_cert, public_keys
        )

    def submit(self, app_dir: Path, run_config: Mapping[str, object]) -> ManagedProcess:
        """Submit the app with Flower's own ``flwr run ... --stream`` (returns at once)."""
        return self._start(
            "flwr-run",
            [
                flower_bin("flwr"),
                "run",
                str(app_dir),
                "bastion-local",
                "--stream",
                "--run-config",
                format_overrides(run_config),
            ],
        )

    def dead_processes(self) -> list[ManagedProcess]:
        """Long-running processes (SuperLink, SuperNodes) that have exited."""
        return [p for p in self.processes if p.name != "flwr-run" and p.popen.poll() is not None]

    # ------------------------------------------------------- crashes and restarts
    def pids_of(self, program: str) -> list[int]:
        """PIDs of this federation's live processes running Flower's ``program``
        (``flwr-serverapp``, ``flwr-clientapp``, ``flower-supernode``, ...).

        Found by the federation's tag, so also the processes Flower detaches (the
        ServerApp runs in a session of its own, below the SuperLink's SuperExec).
        """
        found = []
        for pid in processes_with_env(FEDERATION_TAG_VAR, self.tag):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(Path(arg.decode(errors="replace")).name == program for arg in argv[:2]):
                found.append(pid)
        return sorted(found)

    def clientapp_pids(self) -> list[int]:
        """PIDs of this federation's running ClientApp tasks: Flower's ``flwr-clientapp``
        processes (``launcher="flower"``) and the children forked by warm SuperExecs."""
        tagged = processes_with_env(FEDERATION_TAG_VAR, self.tag)
        warm = {pid for pid in tagged if _is_module_process(pid, "bastion.warm_exec")}
        forked = [pid for pid in tagged if _parent_pid(pid) in warm]
        return sorted(set(self.pids_of("flwr-clientapp")) | set(forked))

    def serverapp_pids(self) -> list[int]:
        """PIDs of the running ServerApp processes (one per run in progress)."""
        return self.pids_of("flwr-serverapp")

    def supernode(self, partition_id: int) -> ManagedProcess:
        """The SuperNode process last started for ``partition_id``."""
        name = f"supernode-{partition_id}"
        for proc in reversed(self.processes):
            if proc.name == name:
                return proc
        raise KeyError(f"no SuperNode with partition-id {partition_id} was started")

    def supernode_group(self, partition_id: int) -> list[int]:
        """PIDs in SuperNode ``partition_id``'s process group: the SuperNode, its
        SuperExec and the ClientApps it runs."""
        return sorted(processes_in_groups({self.supernode(partition_id).popen.pid}))

    def kill_supernode(self, partition_id: int, timeout: float = 10.0) -> list[int]:
        """Crash SuperNode ``partition_id``: SIGKILL its whole process group (the SuperNode,
        its SuperExec and ClientApps), so it never tells the SuperLink it leaves. Returns
        the PIDs killed, once all of them are gone."""
        proc = self.supernode(partition_id)
        pids = self.supernode_group(partition_id)
        _signal_group(proc.popen, signal.SIGKILL)
        proc.popen.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while processes_in_groups({proc.popen.pid}):
            if time.monotonic() > deadline:
                raise TimeoutError(f"SuperNode {partition_id}'s processes outlived SIGKILL")
            time.sleep(0.05)
        return pids

    def restart_supernode(
        self, partition_id: int, timeout: float = 120.0, retry_seconds: float = 1.0
    ) -> ManagedProcess:
        """Start SuperNode ``partition_id`` again with its original command line
        (:attr:`supernode_args`) and wait until the SuperLink has activated it.

        With SuperNode authentication the node comes back under its registered node id.
        Flower 1.39's SuperLink refuses to activate a node id whose earlier session it
        still counts online (a killed node stays online until it missed its heartbeats,
        up to 60 s): the SuperNode then exits, and it is started again every
        ``retry_seconds`` until the activation succeeds or ``timeout`` passes.
        """
        if partition_id not in self.supernode_args:
            raise KeyError(f"no SuperNode with partition-id {partition_id} was started")
        # without authentication the node comes back under a new id: any activation counts
        node_id = self.node_ids.get(partition_id)
        marker = "[Fleet.ActivateNode] Activated node_id="
        link_log = self.log_dir / "superlink.log"

        def activations() -> int:
            lines = link_log.read_text(errors="replace").splitlines()
            if node_id is None:
                return sum(marker in line for line in lines)
            return sum(line.rstrip().endswith(f"{marker}{node_id}") for line in lines)

        before, deadline = activations(), time.monotonic() + timeout
        while True:
            proc = self._start(f"supernode-{partition_id}", self.supernode_args[partition_id])
            while proc.popen.poll() is None and time.monotonic() < deadline:
                if activations() > before:
                    return proc
                time.sleep(0.2)
            if time.monotonic() >= deadline:
                _signal_group(proc.popen, signal.SIGKILL)
                raise TimeoutError(
                    f"SuperNode {partition_id} was not activated within {timeout:.0f} s; see "
                    f"{proc.log_path}"
                )
            time.sleep(retry_seconds)  # refused (still counted online): try again

    def stop(self, grace: float = 5.0) -> None:
        """Stop every process group this federation started (TERM, then KILL)."""
        groups = tagged_groups(FEDERATION_TAG_VAR, self.tag)  # while all are findable
        for proc in reversed(self.processes):
            _signal_group(proc.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        # Children (SuperExec, ServerApp, ClientApps) may outlive their parent.
        for proc in self.processes:
            _signal_group(proc.popen, signal.SIGKILL)
            if proc.popen.poll() is None:
                proc.popen.wait(timeout=5)
            proc.log_file.close()
        kill_tagged(FEDERATION_TAG_VAR, self.tag, groups)
        shutil.rmtree(self.flwr_home, ignore_errors=True)

    def group_ids(self) -> list[int]:
        """Process-group ids of everything started (equal to the leaders' pids)."""
        return [p.popen.pid for p in self.processes]

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stat_field(pid: int, index: int) -> int | None:
    """Field ``index`` after the command name in ``/proc/PID/stat`` (0: state, 1: parent
    pid, 2: process group), or ``None`` once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[index])


def _parent_pid(pid: int) -> int | None:
    """The parent of process ``pid`` (Linux ``/proc``), or ``None`` once it is gone."""
    return _stat_field(pid, 1)


def _is_module_process(pid: int, module: str) -> bool:
    """Whether process ``pid`` runs ``python -m module``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return module.encode() in argv[1:4] and b"-m" in argv[1:3]


def _process_group(pid: int) -> int | None:
    """The process-group id of ``pid`` (Linux /proc), or None when it is gone."""
    return _stat_field(pid, 2)


def tagged_groups(name: str, value: str) -> set[int]:
    """Process groups of the processes whose environment has ``name=value``.

    Never the caller's own group (nor 0 or 1): signalling those would hit the caller.
    """
    own = os.getpgrp()
    groups = {_process_group(pid) for pid in processes_with_env(name, value)}
    return {g for g in groups if g is not None and g > 1 and g != own}


def processes_in_groups(groups: set[int]) -> list[int]:
    """PIDs of live (non-zombie) processes in any of ``groups``."""
    if not groups:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) in groups:
                found.append(int(entry.name))
    return found


def kill_tagged(
    name: str,
    value: str,
    groups: set[int] | None = None,
    timeout: float = 15.0,
    quiet_scans: int = 3,
) -> list[int]:
    """SIGKILL every process whose environment has ``name=value``, and their process groups.

    Flower's SuperExec, ServerApps, ClientApps and Ray's processes run in sessions of
    their own, so the environment tag is what finds them. The tag alone is not enough:
    Ray's agents rename themselves with ``setproctitle``, which overwrites part of the
    environment area that ``/proc/PID/environ`` shows, so a variable can vanish from
    it (seen here: a ``ray::DashboardAgent`` kept ``BASTION_TEST_TAG`` but lost
    ``BASTION_SIMULATION_ID``). Every member of a process group that held a tagged
    process is therefore killed too: ``groups`` learned by ``tagged_groups`` before a
    graceful shutdown began (when every group still had a findable member), plus the
    groups of what each scan finds. Scans repeat until ``quiet_scans`` in a row find
    nothing (a process forked between two scans is caught by the next) or ``timeout``
    seconds pass. The caller's own process group is never signalled.

    Returns the PIDs still alive at the end (logged as a warning): empty on success.
    """
    groups = set(groups or ()) | tagged_groups(name, value)
    deadline, quiet = time.monotonic() + timeout, 0
    while True:
        groups |= tagged_groups(name, value)
        left = sorted(set(processes_with_env(name, value)) | set(processes_in_groups(groups)))
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        quiet = 0 if left else quiet + 1
        if quiet >= quiet_scans:
            return []
        if time.monotonic() > deadline:
            log.warning("still alive %.0f s after SIGKILL (%s=%s): %s", timeout, name, value, left)
            return left
        time.sleep(0.1)


def _signal_group(popen: subprocess.Popen, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


def processes_with_env(name: str, value: str) -> list[int]:
    """PIDs of live (non-zombie) processes whose environment has ``name=value`` (Linux /proc)."""
    needle, found = f"{name}={value}".encode(), []
    proc_root = Path("/proc")
    if not proc_root.is_dir():
        return found
    for entry in proc_root.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if "\nState:\tZ" in (entry / "status").read_text():
                continue
        except OSError:
            continue
        found.append(int(entry.name))
    return found
