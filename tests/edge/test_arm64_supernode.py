"""The edge pilot, emulated: an arm64 SuperNode container joins an amd64 SuperLink over
TLS with SuperNode authentication and completes rounds of digits.

This is its own command, beside the README's test command (`.ci/run` does not run it):

    pytest tests/edge          # as root on an amd64 Linux host; 50-70 min the first time

It costs far more than CI's budget on a fresh machine: the arm64 base image alone is
a debootstrap of Debian trixie under QEMU (about 30 min on 2 cores), and the arm64
image build installs Flower's dependencies with pip under emulation. Later runs reuse
the base image and Docker's build cache. See docs/EDGE.md for the figures.

What it does, with the repository's own scripts only:

1. a Docker engine with Compose v2 (the host's, else ``docker/dev-engine.sh``, as in
   ``tests/integration/test_compose.py``);
2. ``docker/edge-emulation.sh start``: Debian's ``qemu-user-static`` registered in
   ``binfmt_misc`` with the F flag, and the arm64 base image
   (``localhost/bastion-edge-base:trixie``: Debian's Python 3.13 and CPU torch);
3. ``docker compose --profile edge``: the amd64 federation (SuperLink, 2 honest and
   1 IPM SuperNode) plus one ``supernode-edge`` replica of the arm64 image, which
   holds the one external partition; TLS and node authentication on; 2 rounds.

It checks that the edge node runs arm64 code (``platform.machine()`` inside it, the
image's architecture), on Python 3.13 with one torch thread, that its updates were
accepted in every round under its own registered key, and it prints the time per
round and the edge container's memory (cgroup peak) and per-task peak RSS.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from common.runlog import read_jsonl
from tests.integration.test_compose import (
    ROOT,
    SETTINGS,
    _compose_run,
    _dev_engine,
    _engine_answers,
    choose_engine,
)

pytestmark = pytest.mark.integration

EDGE_SCRIPT = ROOT / "docker" / "edge-emulation.sh"
HONEST, MALICIOUS, EDGE, ROUNDS = 2, 1, 1, 2
EDGE_PARTITION = HONEST + MALICIOUS  # the external partitions come after compose's


def _edge_setup(engine: dict[str, str]) -> float:
    """``docker/edge-emulation.sh start`` against ``engine``; its duration in seconds."""
    if os.geteuid() != 0:
        pytest.skip("needs root: registers QEMU in binfmt_misc and debootstraps the base image")
    t0 = time.monotonic()
    try:
        res = subprocess.run(
            ["bash", str(EDGE_SCRIPT), "start"],
            env=dict(os.environ) | engine,
            capture_output=True,
            text=True,
            timeout=5400,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("docker/edge-emulation.sh start did not finish within 5400 s")
    if res.returncode != 0:
        pytest.fail(f"docker/edge-emulation.sh start failed:\n{res.stderr[-4000:]}")
    return time.monotonic() - t0


def _inspect_edge(found: dict[str, str]):
    """An ``inspect`` callback for ``_compose_run``: what runs inside the edge node."""

    def inspect(compose: list[str], env: dict[str, str]) -> None:
        probe = (
            "import json, platform, sys, torch; print(json.dumps({'machine': platform.machine(),"
            " 'python': '%d.%d' % sys.version_info[:2], 'torch': torch.__version__}))"
        )
        for key, cmd in {
            "probe": ["python", "-c", probe],
            # cgroup v2 first, v1 otherwise: the container's peak memory
            "memory_peak": [
                "sh",
                "-c",
                "cat /sys/fs/cgroup/memory.peak 2>/dev/null "
                "|| cat /sys/fs/cgroup/memory/memory.max_usage_in_bytes",
            ],
            "memory_now": [
                "sh",
                "-c",
                "cat /sys/fs/cgroup/memory.current 2>/dev/null "
                "|| cat /sys/fs/cgroup/memory/memory.usage_in_bytes",
            ],
            # what the SuperNode's processes were started with (bastion.container sets
            # it when it execs the SuperNode, so the container's own env lacks it)
            "threads": [
                "sh",
                "-c",
                "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' "
                "| sed -n 's/^BASTION_TORCH_THREADS=//p' | sort -u",
            ],
        }.items():
            res = subprocess.run(
                [*compose, "exec", "-T", "supernode-edge", *cmd],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            found[key] = res.stdout.strip() or f"(failed: {res.stderr.strip()[-300:]})"
        res = subprocess.run(
            [*compose, "images", "--format", "json", "supernode-edge"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        image = env.get("BASTION_EDGE_IMAGE", "bastion:edge-arm64")
        arch = subprocess.run(
            ["docker", "image", "inspect", "--format", "{{.Architecture}}", image],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        found["image_arch"] = arch.stdout.strip()
        found["images"] = res.stdout.strip()[-500:]
        logs = subprocess.run(
            [*compose, "logs", "--no-color", "supernode-edge"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        found["edge_log"] = logs.stdout

    return inspect


def test_an_emulated_arm64_supernode_completes_rounds_over_tls_with_node_auth(tmp_path) -> None:
    timings: dict[str, float] = {}
    found: dict[str, str] = {}
    started = time.monotonic()
    engine, started_here = choose_engine()
    settings = SETTINGS | {
        "BASTION_HONEST": str(HONEST),
        "BASTION_MALICIOUS": str(MALICIOUS),
        "BASTION_EXTERNAL_NODES": str(EDGE),
        "BASTION_EDGE": str(EDGE),
        "BASTION_ROUNDS": str(ROUNDS),
        "BASTION_RUN_NAME": "edge",
        "BASTION_RUN_TIMEOUT": "3000",
        "BASTION_EDGE_IMAGE": "bastion:edge-arm64-test",
        # QEMU keeps its translated code in the same cgroup: more room than a board needs
        "BASTION_EDGE_MEMORY": "2g",
    }
    try:
        timings["engine start"] = time.monotonic() - started
        timings["emulation and arm64 base image"] = _edge_setup(engine)
        runner_exit, wait_text, logs, leftovers = _compose_run(
            tmp_path,
            engine,
            timings,
            settings,
            profiles=("edge",),
            inspect=_inspect_edge(found),
            build_timeout=3600,
            up_timeout=1800,
            run_timeout=3000,
        )
    finally:
        if started_here:
            _dev_engine("stop", 120)
        timings["whole test"] = time.monotonic() - started
        print("edge test timings (s):", json.dumps({k: round(v) for k, v in timings.items()}))
    if started_here:
        assert not _engine_answers(dict(os.environ) | engine, compose=False)
    log_tail = "\n".join(logs.read_text().splitlines()[-80:]) if logs.exists() else ""
    assert leftovers == {}, f"docker compose down left these behind: {leftovers}"
    assert runner_exit == 0, f"runner exited {runner_exit!r} ({wait_text}); logs:\n{log_tail}"

    # the figures first, so that a failed check below still reports them
    run_dir = tmp_path / "results" / "edge"
    summary = json.loads((run_dir / "summary.json").read_text())
    diags = read_jsonl(run_dir / "diagnostics.jsonl")
    rounds = read_jsonl(run_dir / "metrics.jsonl")[1:]
    edge_rows = [d for d in diags if d["partition_id"] == EDGE_PARTITION]
    task_rss = [int(x) for x in re.findall(r"max rss (\d+) kB", found.get("edge_log", ""))]

    def mib(raw: str) -> int | str:
        return int(raw) // 2**20 if raw.isdigit() else raw

    report = {
        "round_seconds": [round(r["round_seconds"], 1) for r in rounds],
        "slowest_train_seconds": [round(r["slowest_train_seconds"], 2) for r in rounds],
        "edge_train_seconds": [round(d["train_seconds"], 2) for d in edge_rows],
        "edge_container_peak_MiB": mib(found.get("memory_peak", "")),
        "edge_container_after_run_MiB": mib(found.get("memory_now", "")),
        "edge_task_max_rss_MiB": [kb // 1024 for kb in task_rss],
        "edge_probe": found.get("probe"),
        "final_accuracy": summary.get("final_accuracy"),
    }
    print("edge node:", json.dumps(report))
    Path(os.environ.get("BASTION_EDGE_REPORT", tmp_path / "edge-report.json")).write_text(
        json.dumps({"timings": timings, **report}, indent=2)
    )

    # the edge node is arm64 code on Debian's Python 3.13 and CPU torch, one thread
    probe = json.loads(found["probe"])
    assert probe["machine"] == "aarch64", found
    assert probe["python"] == "3.13", found
    assert found["image_arch"] == "arm64", found
    assert found["threads"] == "1", found

    assert summary["status"] == "completed", summary
    assert summary["rounds"] == ROUNDS
    assert summary["num_clients"] == HONEST + MALICIOUS + EDGE
    assert [d["round"] for d in edge_rows] == list(range(1, ROUNDS + 1)), edge_rows
    assert all(d["status"] == "accepted" and not d["malicious"] for d in edge_rows), edge_rows
    # it signed with the key of the external partition, which `register` registered
    registered = {
        int(m.group(1)): int(m.group(2))
        for m in re.finditer(r"partition (\d+) \(external\): node id (\d+)", logs.read_text())
    }
    assert registered.get(EDGE_PARTITION) == edge_rows[0]["node_id"], registered
