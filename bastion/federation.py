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
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bastion.config import format_overrides


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


def flower_bin(name: str) -> str:
    """Path of a Flower console script, preferring the one next to this Python."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name!r} not found; is flwr installed in this environment?")
    return found


@dataclass
class ManagedProcess:
    """A started process, its role and its log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    log_file: IO[bytes]


@dataclass
class LocalFederation:
    """One SuperLink and ``num_supernodes`` SuperNodes as processes on loopback."""

    num_supernodes: int
    log_dir: Path
    host: str = "127.0.0.1"
    node_config: Mapping[int, Mapping[str, object]] = field(default_factory=dict)
    torch_threads: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    processes: list[ManagedProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log_dir = Path(self.log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = Path(tempfile.mkdtemp(prefix="bastion-flwr-home-"))
        # Inherited by every process below ours; Flower detaches some of them (the
        # ServerApp runs in a session of its own), so process groups are not enough.
        self.tag = uuid.uuid4().hex
        self.http_port = free_port(self.host)
        self.fleet_port = free_port(self.host)

    # ----------------------------------------------------------------- processes
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
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

    def _supernode_port_args(self) -> list[str]:
        """Each SuperNode on this host needs its own ClientAppIo port."""
        return ["--port", str(free_port(self.host))]

    def start(self, startup_timeout: float = 60.0) -> None:
        """Start the SuperLink, wait for its ports, then start the SuperNodes."""
        link = self._start(
            "superlink",
            [
                flower_bin("flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                self.host,
                "--port",
                str(self.http_port),
                "--fleet-api-address",
                f"{self.host}:{self.fleet_port}",
            ],
        )
        for port in (self.fleet_port, self.http_port):
            self._wait_listening(port, startup_timeout, link.popen)
        for pid in range(self.num_supernodes):
            node_cfg = {"partition-id": pid, "num-partitions": self.num_supernodes}
            node_cfg |= dict(self.node_config.get(pid, {}))
            self._start(
                f"supernode-{pid}",
                [
                    flower_bin("flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"{self.host}:{self.fleet_port}",
                    *self._supernode_port_args(),
                    "--node-config",
                    format_overrides(node_cfg),
                ],
            )
        (self.flwr_home / "config.toml").write_text(
            "[superlink]\n"
            'default = "bastion-local"\n\n'
            "[superlink.bastion-local]\n"
            f'address = "{self.host}:{self.http_port}"\n'
            "insecure = true\n"
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

    def stop(self, grace: float = 5.0) -> None:
        """Stop every process group this federation started (TERM, then KILL)."""
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
        deadline = time.monotonic() + 10.0
        while (left := processes_with_env(FEDERATION_TAG_VAR, self.tag)) and (
            time.monotonic() < deadline
        ):
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        shutil.rmtree(self.flwr_home, ignore_errors=True)

    def group_ids(self) -> list[int]:
        """Process-group ids of everything started (equal to the leaders' pids)."""
        return [p.popen.pid for p in self.processes]

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
