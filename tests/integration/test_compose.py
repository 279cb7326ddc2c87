"""The compose federation end to end: images from a local wheelhouse, 3 honest + 1
malicious SuperNodes over TLS with SuperNode authentication, 2 rounds on digits,
results on a host folder. A SuperNode started on the host with a key compose never
registered is refused by the SuperLink.

Which Docker engine: the host's own when ``docker info`` and ``docker compose version``
answer for this user (it is left running); otherwise, as root, a private engine that
the repository's ``docker/dev-engine.sh`` starts (it installs Debian's engine and
Compose v2 when missing and makes a local ``python:3.11-slim`` base image, so no
registry is needed; the test stops that engine again if it started it). Without
either (not root and no usable Docker) the test is skipped with a reason that says
what to install. The images are built with ``docker compose build`` from
``docker/wheelhouse/``, which ``docker/fill-wheelhouse.sh`` fills with the local CPU
torch wheel. Everything the test creates in the engine (containers, volumes,
network) is removed at the end, also on failure. The fast tests at the end pin the
engine choice, the skip reason and ``dev-engine.sh``'s contract without Docker.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from attacks.selection import malicious_partitions
from bastion import security
from bastion.container import Layout
from bastion.federation import flower_bin, free_port
from common.runlog import read_jsonl

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEV_ENGINE = ROOT / "docker" / "dev-engine.sh"
HONEST, MALICIOUS, ROUNDS = 3, 1, 2
IMAGE = "bastion:compose-test"


def _run(
    cmd: Sequence[str | os.PathLike[str]], env: dict[str, str], timeout: float, what: str
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; fail the test with its output when it fails or times out."""
    try:
        res = subprocess.run(
            [str(c) for c in cmd],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        pytest.fail(f"{what} did not finish within {timeout:.0f} s; output tail:\n{out[-4000:]}")
    if res.returncode != 0:
        pytest.fail(
            f"{what} failed ({res.returncode}): {' '.join(map(str, cmd))}\n"
            f"stdout tail:\n{res.stdout[-4000:]}\nstderr tail:\n{res.stderr[-4000:]}"
        )
    return res


def _exports(stdout: str) -> dict[str, str]:
    """``export DOCKER_HOST=... DOCKER_CONFIG=...`` (dev-engine.sh's last line) as a dict."""
    exports = [line for line in stdout.splitlines() if line.startswith("export ")]
    assert exports, f"dev-engine.sh printed no export line:\n{stdout}"
    pairs = dict(item.split("=", 1) for item in exports[-1].removeprefix("export ").split())
    assert {"DOCKER_HOST", "DOCKER_CONFIG"} <= set(pairs), exports[-1]
    return pairs


def _engine_answers(env: dict[str, str], compose: bool = True) -> bool:
    """``docker info`` (and, with ``compose``, ``docker compose version``) succeed with ``env``."""
    cmds = [["docker", "info"], ["docker", "compose", "version"]][: 2 if compose else 1]
    for cmd in cmds:
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return False
        if res.returncode != 0:
            return False
    return True


def _dev_engine(command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``docker/dev-engine.sh COMMAND`` with the caller's environment."""
    return subprocess.run(
        ["bash", str(DEV_ENGINE), command],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


NO_DOCKER_REASON = (
    "needs Docker with Compose v2 for this user (`docker info` and `docker compose "
    "version` must succeed: install Docker Engine 23+ with the compose plugin and "
    "add the user to the docker group), or root to start a private engine with "
    "docker/dev-engine.sh (it installs Debian's docker.io, debootstrap and Compose v2)"
)


def choose_engine() -> tuple[dict[str, str], bool]:
    """The environment to reach a Docker engine with Compose v2, and whether this test
    started it (then it stops it again).

    The host's engine when it answers; else, as root, the repository's private engine
    (``docker/dev-engine.sh``, already running or started now); else the test is
    skipped, saying what to install.
    """
    if _engine_answers(dict(os.environ)):
        return {}, False
    private = _exports(_dev_engine("env", 60).stdout)
    if _dev_engine("status", 120).returncode == 0 and _engine_answers(os.environ | private):
        return private, False
    if os.geteuid() != 0:
        pytest.skip(f"{NO_DOCKER_REASON}; running as uid {os.geteuid()}")
    if shutil.which("dockerd") is None and shutil.which("apt-get") is None:
        pytest.skip(
            "no Docker engine and no apt-get to install one: install Docker Engine 23+ "
            "with the compose plugin"
        )
    # up but not ready (no base image yet): `start` completes it and the engine stays
    was_running = _engine_answers(os.environ | private, compose=False)
    try:
        try:
            res = _dev_engine("start", 1200)
        except subprocess.TimeoutExpired:
            pytest.fail("docker/dev-engine.sh start did not finish within 1200 s")
        if res.returncode != 0:
            pytest.fail(
                f"docker/dev-engine.sh start failed ({res.returncode}); stderr tail:\n"
                f"{res.stderr[-4000:]}"
            )
    except BaseException:  # a half-done start may have left dockerd running
        if not was_running:
            _dev_engine("stop", 120)
        raise
    return _exports(res.stdout), not was_running


def _tls_handshake(port: int, ca_file: Path, hostname: str) -> str:
    """TLS-connect to 127.0.0.1:``port`` trusting only ``ca_file``; the TLS version."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=15) as raw,
        ctx.wrap_socket(raw, server_hostname=hostname) as tls,
    ):
        return str(tls.version())


def _unregistered_supernode(tmp_path: Path, fleet_port: int, ca: Path) -> tuple[int, str]:
    """Run a real ``flower-supernode`` on this host against the published Fleet port,
    trusting the compose CA but signing with a fresh, never registered P-384 key.

    Returns its exit code and output (it is killed after 90 s: the code is then -9).
    """
    (key,) = security.ensure_node_keys(tmp_path / "stranger", [0])
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "stranger-home"))
    env |= {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    cmd = [
        flower_bin("flower-supernode"),
        "--superlink",
        f"127.0.0.1:{fleet_port}",
        "--root-certificates",
        str(ca),
        "--auth-supernode-private-key",
        str(key.private_key),
        "--port",
        str(free_port()),
        "--node-config",
        "partition-id=0 num-partitions=4",
    ]
    log = tmp_path / "stranger.log"
    with open(log, "wb") as out_file:
        # a file, not a pipe: its SuperExec child keeps inherited pipes open after it exits
        proc = subprocess.Popen(
            cmd, stdout=out_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # the SuperExec child outlives the SuperNode for a few seconds: end the group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, log.read_text(errors="replace")


#: the federation of this test (the edge test, tests/edge/, adds an arm64 node to it)
SETTINGS = {
    "BASTION_IMAGE": IMAGE,
    "BASTION_TORCH_SOURCE": "wheelhouse",  # the local wheel, never a download
    "BASTION_HONEST": str(HONEST),
    "BASTION_MALICIOUS": str(MALICIOUS),
    "BASTION_ATTACK": "ipm",
    "BASTION_ATTACK_CONFIG": "attack-epsilon=0.1",
    "BASTION_ROUNDS": str(ROUNDS),
    "BASTION_DATASET": "digits",
    "BASTION_AGGREGATOR": "median",
    "BASTION_RUN_CONFIG": "local-steps=10",
    "BASTION_RUN_NAME": "ci",
    "BASTION_RUN_TIMEOUT": "600",
}


def _compose_run(
    tmp_path: Path,
    engine: dict[str, str],
    timings: dict[str, float],
    settings: dict[str, str] | None = None,
    profiles: Sequence[str] = (),
    inspect: Callable[[list[str], dict[str, str]], None] | None = None,
    build_timeout: float = 900,
    up_timeout: float = 420,
    run_timeout: float = 720,
) -> tuple[int | None, str, Path, dict[str, str]]:
    """Build, bring up, wait for the runner, collect logs, and always tear down.

    ``settings`` (default :data:`SETTINGS`) are the compose variables, ``profiles``
    compose profiles to enable, and ``inspect(compose command, env)`` runs after the
    runner exited, before the teardown (to look inside the still running SuperNodes).
    Returns the runner's exit code, what ``docker compose wait`` said, the compose log
    file and what ``down`` left behind.
    """
    # the test's own settings only: no BASTION_*/COMPOSE_* from the caller's shell
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BASTION_", "COMPOSE_"))}
    env |= engine
    fleet_port, control_port = free_port(), free_port()
    results = tmp_path / "results"
    env |= dict(SETTINGS if settings is None else settings)
    env |= {
        "BASTION_RESULTS": str(results),
        "BASTION_FLEET_PUBLISH": f"127.0.0.1:{fleet_port}",
        "BASTION_CONTROL_PUBLISH": f"127.0.0.1:{control_port}",
    }
    project = f"bastion-test-{uuid.uuid4().hex[:8]}"
    compose = [
        "docker",
        "compose",
        "--project-directory",
        str(ROOT),
        "-f",
        str(ROOT / "docker-compose.yml"),
        "--env-file",
        str(ROOT / ".env.example"),
        "-p",
        project,
    ]
    for profile in profiles:
        compose += ["--profile", profile]
    logs = tmp_path / "compose.log"
    leftovers: dict[str, str] = {}
    try:
        _run(["bash", ROOT / "docker" / "fill-wheelhouse.sh"], env, 120, "fill-wheelhouse.sh")
        t0 = time.monotonic()
        _run([*compose, "build"], env, build_timeout, "docker compose build")
        timings["image build"] = time.monotonic() - t0

        t0 = time.monotonic()
        _run([*compose, "up", "--detach"], env, up_timeout, "docker compose up")
        timings["up (until the runner started)"] = time.monotonic() - t0

        # The SuperLink speaks TLS on both published ports, with a certificate for its
        # compose name that chains to the CA the setup service made.
        ca = tmp_path / "ca.crt"
        _run(
            [*compose, "cp", "superlink:/var/lib/bastion/tls/ca.crt", ca],
            env,
            60,
            "docker compose cp",
        )
        assert _tls_handshake(fleet_port, ca, "superlink").startswith("TLS")
        assert _tls_handshake(control_port, ca, "superlink").startswith("TLS")
        with pytest.raises(ssl.SSLCertVerificationError):
            _tls_handshake(fleet_port, ca, "not-the-superlink.example.org")
        # SuperNode authentication is on: a node whose key compose did not register is
        # refused at activation (Flower's exit code 305), TLS being fine
        t0 = time.monotonic()
        code, out = _unregistered_supernode(tmp_path, fleet_port, ca)
        timings["unregistered node refused"] = time.monotonic() - t0
        assert code not in (0, -9) and "Failed to activate SuperNode" in out, (code, out[-3000:])
        # the SuperLink knows exactly the compose nodes' keys; a key copied out of the
        # (exited) register container, as docker/README.md tells edge users, is one
        pub = tmp_path / "node-0.pub"
        _run(
            [*compose, "cp", "register:/var/lib/bastion/node-keys/node-0.pub", pub],
            env,
            60,
            "docker compose cp from the register container",
        )
        listed = security.registered_nodes(f"127.0.0.1:{control_port}", ca)
        layout = Layout.from_env(env)
        assert len(listed) == layout.total, listed
        assert security.public_key_pem(pub) in listed

        t0 = time.monotonic()
        waited = subprocess.run(
            [*map(str, compose), "wait", "runner"],
            env=env,
            capture_output=True,
            text=True,
            timeout=run_timeout,
        )
        timings["run (runner exit)"] = time.monotonic() - t0
        if inspect is not None:
            inspect(compose, env)
        logs.write_text(
            subprocess.run(
                [*map(str, compose), "logs", "--no-color"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            ).stdout
        )
        # "container <id> exited with status code N"
        found = re.search(r"status code (-?\d+)", waited.stdout)
        runner_exit = int(found.group(1)) if found else None
        wait_text = f"{waited.stdout.strip()} {waited.stderr.strip()}"
    finally:
        t0 = time.monotonic()
        subprocess.run(
            [*map(str, compose), "down", "--volumes", "--remove-orphans", "--timeout", "10"],
            env=env,
            capture_output=True,
            timeout=300,
        )
        timings["down"] = time.monotonic() - t0
        label = f"label=com.docker.compose.project={project}"
        for kind in ("ps -a", "volume ls", "network ls"):
            out = subprocess.run(
                ["docker", *kind.split(), "--filter", label, "-q"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout.strip()
            if out:
                leftovers[kind] = out
        # dangling images left by rebuilds of the test image (the build cache stays)
        subprocess.run(["docker", "image", "prune", "-f"], env=env, capture_output=True)
    return runner_exit, wait_text, logs, leftovers


def test_compose_federation_with_a_malicious_node(tmp_path) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()
    engine, started_here = choose_engine()
    stop_failure = ""
    try:
        timings["engine start"] = time.monotonic() - started
        runner_exit, wait_text, logs, leftovers = _compose_run(tmp_path, engine, timings)
    finally:
        if started_here:  # the engine this test started goes again, also on failure
            stopped = _dev_engine("stop", 120)
            if stopped.returncode != 0:
                stop_failure = f"dev-engine.sh stop failed ({stopped.returncode}): {stopped.stderr}"
        timings["whole test"] = time.monotonic() - started
        print("compose test timings (s):", json.dumps({k: round(v) for k, v in timings.items()}))

    assert not stop_failure, stop_failure
    if started_here:
        assert not _engine_answers(dict(os.environ) | engine, compose=False), (
            "the private engine this test started still answers after dev-engine.sh stop"
        )
    results = tmp_path / "results"
    log_tail = "\n".join(logs.read_text().splitlines()[-60:]) if logs.exists() else ""
    assert leftovers == {}, f"docker compose down left these behind: {leftovers}"
    assert runner_exit == 0, (
        f"runner exited {runner_exit!r} ({wait_text}); compose logs:\n{log_tail}"
    )

    run_dir = results / "ci"
    assert (results / "latest").resolve() == run_dir.resolve()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    assert summary["rounds"] == ROUNDS
    assert summary["num_clients"] == HONEST + MALICIOUS
    for name in ("metrics.jsonl", "diagnostics.jsonl", "config.json", "accuracy_loss.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "checkpoints" / f"round-{ROUNDS:04d}.pt").exists()
    assert "round 2/2" in (run_dir / "logs" / "flwr-run.log").read_text()
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    assert all(r["num_malicious_accepted"] == MALICIOUS for r in rows[1:])

    # Every node took part in every round under its own partition, and the malicious
    # node's IPM updates (-0.1 x its honest estimate) show in the diagnostics.
    diags = read_jsonl(run_dir / "diagnostics.jsonl")
    n = HONEST + MALICIOUS
    bad_ids = set(malicious_partitions(n, MALICIOUS, 0))
    for rnd in range(1, ROUNDS + 1):
        this = [d for d in diags if d["round"] == rnd]
        assert sorted(d["partition_id"] for d in this) == list(range(n)), this
        assert all(d["status"] == "accepted" for d in this), this
        bad = [d for d in this if d["malicious"]]
        assert {d["partition_id"] for d in bad} == bad_ids, this
        honest_norm = statistics.median(d["update_norm"] for d in this if not d["malicious"])
        for d in bad:
            assert d["cosine_to_aggregate"] < 0, d
            assert d["update_norm"] < 0.5 * honest_norm, (d, honest_norm)
    assert summary["final_accuracy"] > 0.5, summary
    runner_log = [line for line in log_tail.splitlines() if line.startswith("runner")]
    all_logs = logs.read_text().splitlines()
    assert any("TLS and node authentication on" in line for line in all_logs), runner_log
    # every compose partition's key was registered, each with its own node id
    registered = [
        re.search(r"partition (\d+) \(compose\): node id (\d+)", line) for line in all_logs
    ]
    ids = {int(m.group(1)): int(m.group(2)) for m in registered if m}
    assert sorted(ids) == list(range(n)), registered
    # each replica signed with the key of the partition it claimed
    assert all(ids[d["partition_id"]] == d["node_id"] for d in diags), (ids, diags)
    assert not any("SuperNode authentication is disabled" in line for line in all_logs)


# How the engine is chosen (no Docker needed: the engine probes and dev-engine.sh are
# replaced by fakes that record what was asked).

PRIVATE = {"DOCKER_HOST": "unix:///x/docker.sock", "DOCKER_CONFIG": "/x/cli-config"}
EXPORT_LINE = "export DOCKER_HOST=unix:///x/docker.sock DOCKER_CONFIG=/x/cli-config\n"


class FakeDevEngine:
    """Stands in for ``_dev_engine``: ``status`` and ``start`` answer as told."""

    def __init__(self, status_rc: int = 1, start_rc: int = 0) -> None:
        self.calls: list[str] = []
        self.rc = {"env": 0, "status": status_rc, "start": start_rc, "stop": 0}

    def __call__(self, command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        self.calls.append(command)
        rc = self.rc[command]
        out = EXPORT_LINE if rc == 0 and command in ("env", "status", "start") else ""
        return subprocess.CompletedProcess(["bash", command], rc, out, "dev-engine: failed")


def _fake_engines(
    monkeypatch: pytest.MonkeyPatch, host: bool, private_up: bool, private_ready: bool
) -> None:
    """The host's engine answers when ``host``; the private one is up / fully ready."""

    def answers(env: dict[str, str], compose: bool = True) -> bool:
        if env.get("DOCKER_HOST") == PRIVATE["DOCKER_HOST"]:
            return private_ready or (private_up and not compose)
        return host

    monkeypatch.setitem(globals(), "_engine_answers", answers)


def test_the_hosts_docker_is_used_when_it_answers(monkeypatch) -> None:
    fake = FakeDevEngine()
    monkeypatch.setitem(globals(), "_dev_engine", fake)
    _fake_engines(monkeypatch, host=True, private_up=False, private_ready=False)
    assert choose_engine() == ({}, False)
    assert fake.calls == []


def test_without_docker_and_without_root_it_skips_saying_what_to_install(monkeypatch) -> None:
    fake = FakeDevEngine()
    monkeypatch.setitem(globals(), "_dev_engine", fake)
    _fake_engines(monkeypatch, host=False, private_up=False, private_ready=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception) as skipped:
        choose_engine()
    reason = str(skipped.value)
    for needed in ("Docker Engine", "compose plugin", "docker group", "root"):
        assert needed in reason, reason
    assert "docker/dev-engine.sh" in reason and "uid 1000" in reason, reason
    assert "start" not in fake.calls


def test_as_root_it_starts_the_repositorys_engine_and_stops_it_after(monkeypatch) -> None:
    fake = FakeDevEngine()
    monkeypatch.setitem(globals(), "_dev_engine", fake)
    _fake_engines(monkeypatch, host=False, private_up=False, private_ready=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert choose_engine() == (PRIVATE, True)
    assert fake.calls == ["env", "status", "start"]


def test_a_running_private_engine_is_reused_and_left_running(monkeypatch) -> None:
    fake = FakeDevEngine(status_rc=0)
    monkeypatch.setitem(globals(), "_dev_engine", fake)
    _fake_engines(monkeypatch, host=False, private_up=True, private_ready=True)
    assert choose_engine() == (PRIVATE, False)
    # up but without the base image: `start` completes it, the test does not stop it
    fake = FakeDevEngine(status_rc=1)
    monkeypatch.setitem(globals(), "_dev_engine", fake)
    _fake_engines(monkeypatch, host=False, private_up=True, private_ready=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert choose_engine() == (PRIVATE, False)
    assert fake.calls == ["env", "status", "start"]


def test_a_failed_start_fails_the_test_and_stops_the_half_started_engine(monkeypatch) -> None:
    fake = FakeDevEngine(start_rc=1)
    monkeypatch.setitem(globals(), "_dev_engine", fake)
    _fake_engines(monkeypatch, host=False, private_up=False, private_ready=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(pytest.fail.Exception, match=r"dev-engine\.sh start failed"):
        choose_engine()
    assert fake.calls == ["env", "status", "start", "stop"]


def test_dev_engine_prints_the_exports_and_never_kills_a_reused_pid(tmp_path) -> None:
    env = dict(os.environ, BASTION_DOCKER_ROOT=str(tmp_path))

    def dev_engine(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(DEV_ENGINE), *args], env=env, capture_output=True, text=True, timeout=60
        )

    assert _exports(dev_engine("env").stdout) == {
        "DOCKER_HOST": f"unix://{tmp_path}/docker.sock",
        "DOCKER_CONFIG": f"{tmp_path}/cli-config",
    }
    usage = dev_engine()
    assert usage.returncode == 2 and "usage:" in usage.stderr
    nothing = dev_engine("stop")
    assert nothing.returncode == 0 and "nothing to stop" in nothing.stderr
    # a PID file whose process is no dockerd (a PID reused since): left alone
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "dockerd.pid").write_text(str(other.pid))
        stale = dev_engine("stop")
        assert stale.returncode == 0, stale.stderr
        assert "stale PID file" in stale.stderr
        assert other.poll() is None, "dev-engine.sh stop killed a process that is not its dockerd"
        assert not (tmp_path / "dockerd.pid").exists()
    finally:
        other.kill()
        other.wait()


def test_the_repository_refers_to_nothing_beside_it() -> None:
    """No tracked file names a folder outside the clone (such as a sibling ``shared``)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git clone and git (lists the tracked files)")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    outside = re.compile(r"\.\./shared|shared" + r"/ci/")
    found = []
    for name in filter(None, listed):
        path = ROOT / name
        if path.is_file():
            text = path.read_bytes().decode(errors="replace")
            found += [f"{name}: {m.group(0)}" for m in outside.finditer(text)]
    assert found == [], found
