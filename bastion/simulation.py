"""Run the Bastion app on Flower's Simulation Engine (Ray backend).

The same ServerApp (``server.app:app``) and ClientApp (``client.app:app``) that
``bastion run`` deploys over gRPC run here on virtual SuperNodes: Flower's
Simulation Engine keeps a pool of Ray actors (each holding ``cpus_per_client``
CPUs, and ``gpus_per_client`` GPUs) and lets them execute the ClientApp for every
message, one virtual SuperNode after another. The actors live for the whole run,
so PyTorch and the dataset are loaded once per actor, not once per message.

How it runs (the way Flower 1.39 supports, no private API):

1. a private ``flower-superlink --simulation`` on a free loopback port, with a
   temporary ``FLWR_HOME`` holding a ``[superlink.bastion-sim]`` connection;
2. ``flwr run APP bastion-sim --stream --run-config ... --federation-config
   "num-supernodes=N client-resources-num-cpus=C client-resources-num-gpus=G"``.
   The SuperLink's SuperExec then starts one ``flwr-simulation`` process which
   installs the FAB, starts Ray, runs the ServerApp in a thread (on Flower's
   ``InMemoryGrid``) and the ClientApps in Ray actors. Every virtual SuperNode
   gets node config ``partition-id`` (0..N-1) and ``num-partitions`` (N).

Every process below (SuperLink, SuperExec, flwr-simulation, Ray's GCS, raylet and
workers, ``flwr run``) inherits an environment tag; when :func:`run_simulation`
returns, also on errors, timeouts and Ctrl-C, every tagged process is stopped
(SIGTERM, then SIGKILL) and the temporary ``FLWR_HOME`` and Ray temp directory
are removed. Telemetry and update checks of Flower (and Ray's usage stats) are
off: on a closed network each of them would block a process until it times out.

``ray`` comes with the optional extra: ``pip install -e '.[simulation]'``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bastion.federation import (
    flower_bin,
    free_port,
    kill_tagged,
    processes_with_env,
    tagged_groups,
    wait_for_port,
    with_interpreter_on_path,
)
from common.config import format_overrides
from common.rundir import default_run_dir
from common.runlog import read_new_rows

__all__ = [
    "RAY_MISSING_MESSAGE",
    "SIMULATION_TAG_VAR",
    "SimulationResult",
    "SimulationUnavailableError",
    "federation_config",
    "ray_available",
    "run_simulation",
]

#: Environment variable every process of one simulation inherits (value: a fresh id).
SIMULATION_TAG_VAR = "BASTION_SIMULATION_ID"

#: Name of the SuperLink connection written into the temporary ``FLWR_HOME``.
CONNECTION_NAME = "bastion-sim"

RAY_MISSING_MESSAGE = (
    "Flower's Simulation Engine needs Ray, which is not installed in this environment; "
    "install the simulation extra: pip install -e '.[simulation]'"
)

# Forced in every process: Flower's telemetry and update check, and Ray's usage
# stats, call home; on a closed network each call blocks until it times out.
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # A fresh private Ray instance, never a cluster named by the caller's RAY_ADDRESS
    # or found by `ray start`'s address file (our processes could not be stopped).
    "RAY_ADDRESS": "local",
}

#: Exit codes of :func:`run_simulation` besides 0 (completed) and 1 (failed).
EXIT_TIMEOUT = 124


class SimulationUnavailableError(RuntimeError):
    """The simulation cannot start here (Ray missing); the message says what to install."""


@dataclass(frozen=True)
class SimulationResult:
    """What one simulation left behind.

    ``exit_code`` is 0 when the ServerApp wrote ``summary.json`` with status
    ``completed``, 124 when ``timeout`` passed, 1 otherwise (``error`` says why).
    """

    exit_code: int
    output_dir: Path
    log_dir: Path
    wall_seconds: float
    summary: dict[str, Any] | None = None
    error: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the run completed."""
        return self.exit_code == 0


def ray_available() -> bool:
    """Whether ``ray`` can be imported here (the ``simulation`` extra is installed)."""
    return importlib.util.find_spec("ray") is not None


def federation_config(
    num_supernodes: int,
    *,
    cpus_per_client: int = 1,
    gpus_per_client: float = 0.0,
    ray_num_cpus: int | None = None,
    ray_num_gpus: int | None = None,
    verbose: bool = False,
) -> dict[str, object]:
    """The ``flwr run --federation-config`` keys of a local Ray simulation.

    These are the fields of Flower 1.39's ``SimulationConfig``: ``num-supernodes``,
    ``client-resources-num-cpus`` (an integer in Flower 1.39),
    ``client-resources-num-gpus`` (may be fractional, e.g. 0.25 puts four ClientApp
    actors on one GPU), ``init-args-num-cpus`` / ``init-args-num-gpus`` (what Ray is
    told the machine has; default: what it detects), ``verbose``. Ray runs
    ``floor(ray CPUs / cpus_per_client)`` actors at once (also bounded by GPUs).
    """
    if isinstance(num_supernodes, bool) or not isinstance(num_supernodes, int):
        raise TypeError(f"num_supernodes must be an int, got {num_supernodes!r}")
    if num_supernodes < 1:
        raise ValueError(f"num_supernodes must be >= 1, got {num_supernodes}")
    if isinstance(cpus_per_client, bool) or not isinstance(cpus_per_client, int):
        raise TypeError(
            f"cpus_per_client must be an int (Flower 1.39's client-resources-num-cpus is an "
            f"integer), got {cpus_per_client!r}; to run more actors than cores, raise "
            "ray_num_cpus instead"
        )
    if cpus_per_client < 1:
        raise ValueError(f"cpus_per_client must be >= 1, got {cpus_per_client}")
    if not (math.isfinite(gpus_per_client) and gpus_per_client >= 0):
        raise ValueError(f"gpus_per_client must be >= 0, got {gpus_per_client}")
    cfg: dict[str, object] = {
        "num-supernodes": num_supernodes,
        "backend": "ray",
        "client-resources-num-cpus": cpus_per_client,
        "client-resources-num-gpus": float(gpus_per_client),
        "verbose": bool(verbose),
    }
    if ray_num_cpus is not None:
        if ray_num_cpus < cpus_per_client:
            raise ValueError(
                f"ray_num_cpus ({ray_num_cpus}) must be >= cpus_per_client ({cpus_per_client})"
            )
        cfg["init-args-num-cpus"] = int(ray_num_cpus)
    if ray_num_gpus is not None:
        if ray_num_gpus < 0:
            raise ValueError(f"ray_num_gpus must be >= 0, got {ray_num_gpus}")
        cfg["init-args-num-gpus"] = int(ray_num_gpus)
    return cfg


def _default_app_dir() -> Path:
    return Path(__file__).resolve().parents[1]


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log_file: IO[bytes]


@dataclass
class _SimulationProcesses:
    """The processes of one simulation and what is needed to stop all of them."""

    log_dir: Path
    env: dict[str, str]
    tag: str
    procs: list[_Proc] = field(default_factory=list)
    groups: set[int] = field(default_factory=set)
    _groups_seen_at: float = 0.0

    def remember_groups(self, every: float = 1.0) -> None:
        """Note the process groups of this simulation's processes (at most every ``every`` s).

        ``stop`` kills every member of them: Ray's agents can lose the tag from what
        ``/proc`` shows of their environment (see ``kill_tagged``).
        """
        if time.monotonic() - self._groups_seen_at >= every:
            self.groups |= tagged_groups(SIMULATION_TAG_VAR, self.tag)
            self._groups_seen_at = time.monotonic()

    def start(self, name: str, args: list[str]) -> _Proc:
        log_file = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        popen = subprocess.Popen(
            args,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,  # own process group, no terminal's Ctrl-C
        )
        proc = _Proc(name, popen, log_file)
        self.procs.append(proc)
        return proc

    def tagged(self, name_part: str | None = None) -> list[int]:
        """Live processes of this simulation (optionally: command line contains ``name_part``)."""
        pids = processes_with_env(SIMULATION_TAG_VAR, self.tag)
        if name_part is None:
            return pids
        out = []
        for pid in pids:
            with contextlib.suppress(OSError):
                if name_part.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(pid)
        return out

    def wait_gone(self, name_part: str | None, timeout: float) -> bool:
        """Wait until no tagged process (matching ``name_part``) is alive."""
        deadline = time.monotonic() + timeout
        while self.tagged(name_part):
            if time.monotonic() > deadline:
                return False
            for proc in self.procs:  # reap our own children
                proc.popen.poll()
            time.sleep(0.2)
        return True

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM everything (the simulation first: it shuts Ray down), then SIGKILL."""
        self.remember_groups(every=0.0)
        for pid in self.tagged("flwr-simulation"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        self.wait_gone("flwr-simulation", grace / 2)
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace / 2
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        # SuperExec, flwr-simulation and Ray run in sessions of their own: the tag finds them.
        kill_tagged(SIMULATION_TAG_VAR, self.tag, self.groups)
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)
            proc.log_file.close()


def run_simulation(
    *,
    num_supernodes: int,
    run_config: Mapping[str, object],
    app_dir: Path | None = None,
    output_dir: Path | None = None,
    log_dir: Path | None = None,
    cpus_per_client: int = 1,
    gpus_per_client: float = 0.0,
    ray_num_cpus: int | None = None,
    ray_num_gpus: int | None = None,
    min_parallel_clients: int | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    verbose: bool = False,
    startup_timeout: float = 60.0,
) -> SimulationResult:
    """Run the Bastion app on ``num_supernodes`` virtual SuperNodes; block until it ends.

    Parameters
    ----------
    num_supernodes:
        Number of virtual SuperNodes (ClientApps); node ``i`` gets node config
        ``partition-id=i``, ``num-partitions=num_supernodes``.
    run_config:
        Run-config overrides (kebab-case keys of ``[tool.flwr.app.config]``), passed
        to the ServerApp and every ClientApp like ``flwr run --run-config``.
        ``output-dir`` is taken from ``output_dir`` when given, else from here, else
        a fresh ``./runs/<time>-<dataset>`` directory; it is always made absolute.
    app_dir:
        The Flower App directory (default: this checkout).
    output_dir:
        Where the ServerApp writes its results (overrides run-config ``output-dir``).
    log_dir:
        Logs of the SuperLink, ``flwr run`` (the streamed run log, including the
        ServerApp's and the ClientApps' output) and, on failure, Ray's own logs.
        Default: ``<output-dir>/logs``.
    cpus_per_client, gpus_per_client:
        Resources of one ClientApp actor (Flower's ``client-resources``). Ray runs
        ``floor(CPUs / cpus_per_client)`` actors in parallel.
    ray_num_cpus, ray_num_gpus:
        What Ray is told the machine has (Flower's ``init-args``; default: detected).
        ``ray_num_cpus`` above the core count oversubscribes the CPUs.
    min_parallel_clients:
        Raise ``ray_num_cpus`` (default: this machine's cores) so that at least this
        many ClientApps run at once. Needed when ClientApps wait for each other:
        colluding attackers (``attack-knowledge = "collude"``) block until every
        colluder has published, so with fewer actors than ``num-malicious`` each
        round stalls for ``collusion-timeout``. Pass ``num-malicious`` there.
    timeout:
        Give up (exit code 124) after this many seconds; ``None``: no limit.
    env:
        Extra environment variables for every process, Ray's workers included
        (e.g. ``BASTION_CACHE_DIR``).
    on_round:
        Called in this thread with each row the ServerApp appends to ``metrics.jsonl``.
    verbose:
        Flower's DEBUG logging in the simulation.
    startup_timeout:
        Seconds to wait for the SuperLink to accept connections.

    Returns
    -------
    SimulationResult
        ``exit_code`` 0 (completed), 1 (failed: ``error`` says why) or 124 (timeout).

    Raises
    ------
    SimulationUnavailableError
        Ray is not installed (install the ``simulation`` extra).
    KeyboardInterrupt
        Re-raised after every process has been stopped.
    """
    if not ray_available():
        raise SimulationUnavailableError(RAY_MISSING_MESSAGE)
    if min_parallel_clients is not None:
        if min_parallel_clients < 1:
            raise ValueError(f"min_parallel_clients must be >= 1, got {min_parallel_clients}")
        cores = ray_num_cpus or len(os.sched_getaffinity(0))
        ray_num_cpus = max(cores, min_parallel_clients * cpus_per_client)
    fed_cfg = federation_config(
        num_supernodes,
        cpus_per_client=cpus_per_client,
        gpus_per_client=gpus_per_client,
        ray_num_cpus=ray_num_cpus,
        ray_num_gpus=ray_num_gpus,
        verbose=verbose,
    )
    app_dir = Path(app_dir).resolve() if app_dir else _default_app_dir()
    overrides = dict(run_config)
    if output_dir is None:
        given = str(overrides.get("output-dir") or "")
        if given:
            output_dir = Path(given)
        else:
            output_dir = default_run_dir("runs", str(overrides.get("dataset", "run")))
    output_dir = Path(output_dir).resolve()
    overrides["output-dir"] = str(output_dir)
    log_dir = Path(log_dir).resolve() if log_dir else output_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    flwr_home = Path(tempfile.mkdtemp(prefix="bastion-sim-home-"))
    ray_tmp = Path(tempfile.mkdtemp(prefix="bastion-ray-"))  # short: Ray's socket paths
    tag = uuid.uuid4().hex
    proc_env = with_interpreter_on_path(os.environ)
    proc_env.update(env or {})
    proc_env.update(QUIET_ENV)
    proc_env.update(
        {"FLWR_HOME": str(flwr_home), "RAY_TMPDIR": str(ray_tmp), SIMULATION_TAG_VAR: tag}
    )
    procs = _SimulationProcesses(log_dir, proc_env, tag)
    summary_path, metrics_path = output_dir / "summary.json", output_dir / "metrics.jsonl"
    metrics_offset = metrics_path.stat().st_size if metrics_path.exists() else 0
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    started_wall = time.time()
    exit_code, error = 1, None
    try:
        port = free_port()
        link = procs.start(
            "superlink",
            [
                flower_bin("flower-superlink"),
                "--insecure",
                "--simulation",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
        )
        wait_for_port("127.0.0.1", port, startup_timeout, link.popen)
        (flwr_home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{CONNECTION_NAME}"\n\n'
            f"[superlink.{CONNECTION_NAME}]\n"
            f'address = "127.0.0.1:{port}"\n'
            "insecure = true\n"
        )
        runner = procs.start(
            "flwr-run",
            [
                flower_bin("flwr"),
                "run",
                str(app_dir),
                CONNECTION_NAME,
                "--stream",
                "--run-config",
                format_overrides(overrides),
                "--federation-config",
                format_overrides(fed_cfg),
            ],
        )
        deadline = None if timeout is None else started + timeout
        while True:
            procs.remember_groups()
            finished = runner.popen.poll() is not None
            new, metrics_offset = read_new_rows(metrics_path, metrics_offset)
            for row in new:
                rows.append(row)
                if on_round is not None:
                    on_round(row)
            if finished:
                break
            if link.popen.poll() is not None:
                error = f"the SuperLink exited with {link.popen.returncode}"
                break
            if deadline is not None and time.monotonic() > deadline:
                exit_code, error = EXIT_TIMEOUT, f"did not finish within {timeout:.0f} s"
                break
            time.sleep(0.25)
        if error is None:
            # `flwr run --stream` returns once the run is finished; let flwr-simulation
            # shut Ray down by itself before anything is signalled.
            procs.wait_gone("flwr-simulation", 30.0)
            summary = _fresh_summary(summary_path, started_wall)
            if summary is None:
                error = f"no summary.json written in {output_dir}; see {log_dir / 'flwr-run.log'}"
            elif summary.get("status") != "completed":
                error = f"run {summary.get('status')}: {summary.get('reason', '?')}"
            else:
                exit_code = 0
    finally:
        if exit_code != 0:
            with contextlib.suppress(OSError, shutil.Error):
                shutil.copytree(
                    ray_tmp / "ray" / "session_latest" / "logs",
                    log_dir / "ray",
                    dirs_exist_ok=True,
                    ignore_dangling_symlinks=True,
                )
        procs.stop()
        shutil.rmtree(flwr_home, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return SimulationResult(
        exit_code=exit_code,
        output_dir=output_dir,
        log_dir=log_dir,
        wall_seconds=time.monotonic() - started,
        summary=_fresh_summary(summary_path, started_wall),
        error=error,
        rows=rows,
    )


def _fresh_summary(path: Path, since: float) -> dict[str, Any] | None:
    """``summary.json`` if this run wrote it (not one left by an earlier run)."""
    try:
        if path.stat().st_mtime < since - 1.0:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
