"""Helpers for tests that start real Flower processes through ``bastion run``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bastion.federation import LocalFederation, processes_with_env

ROOT = Path(__file__).resolve().parents[2]
FLOWER_NAMES = (
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr-serverapp",
    "flwr-clientapp",
    "flwr",
)


def bastion_exe() -> list[str]:
    """The installed ``bastion`` console script (what the README tells users to run)."""
    exe = Path(sys.executable).parent / "bastion"
    found = str(exe) if exe.exists() else shutil.which("bastion")
    assert found, "the bastion console script is not installed"
    return [found]


@contextlib.contextmanager
def running_federation(
    log_dir: Path, num_nodes: int, env: dict[str, str] | None = None, **kwargs: Any
) -> Iterator[LocalFederation]:
    """A started :class:`LocalFederation` under a fresh test tag; on exit every process
    is stopped, and none of them may be left running."""
    tag = uuid.uuid4().hex
    fed = LocalFederation(
        num_nodes, log_dir, env={"BASTION_TEST_TAG": tag, **(env or {})}, **kwargs
    )
    with fed:
        fed.start()
        yield fed
    left = tagged_processes(tag)
    assert left == [], describe_processes(left)


def tagged_processes(tag: str) -> list[int]:
    """PIDs of live processes started under ``bastion_env`` (they inherit the tag)."""
    return processes_with_env("BASTION_TEST_TAG", tag)


def describe_processes(pids: list[int]) -> str:
    """One line per PID: state, parent and command line, for a failure message."""
    lines = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            cmd = (
                Path(f"/proc/{pid}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
            )
            state, ppid = fields.get("State", "?").strip(), fields.get("PPid", "?").strip()
            lines.append(f"{pid} state={state} ppid={ppid} cmd={cmd.strip()[:300]!r}")
        except OSError as exc:
            lines.append(f"{pid} gone ({exc.__class__.__name__})")
    return "\n".join(lines)


@pytest.fixture
def bastion_env(tmp_path):
    """Environment for a ``bastion run`` subprocess: private cache, a tag to find its processes."""
    tag = uuid.uuid4().hex
    env = dict(os.environ)
    env["BASTION_TEST_TAG"] = tag
    env.setdefault("BASTION_CACHE_DIR", str(tmp_path / "cache"))
    return env, tag


def run_bastion(
    args: list[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*bastion_exe(), "run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_local_federation(
    tmp_path: Path,
    bastion_env: tuple[dict[str, str], str],
    num_nodes: int,
    run_config: dict[str, Any],
    *,
    timeout: float,
    node_config: dict[int, dict[str, Any]] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Run the Bastion app once on a real loopback federation and check it ended well.

    Starts a :class:`LocalFederation` of ``num_nodes`` SuperNodes (TLS and node
    authentication on, one torch thread each, the test's tag and cache), submits
    the app with ``run_config`` (``output-dir`` set to ``tmp_path / "run"``), waits
    up to ``timeout`` seconds and stops every process. Asserts that none is left
    running and that the run completed (else shows the end of the run log).
    Returns the run directory and its ``summary.json``.
    """
    env, tag = bastion_env
    out = tmp_path / "run"
    with LocalFederation(
        num_nodes,
        tmp_path / "logs",
        node_config=node_config or {},
        torch_threads=1,
        env={k: env[k] for k in ("BASTION_TEST_TAG", "BASTION_CACHE_DIR")},
    ) as fed:
        fed.start()
        runner = fed.submit(ROOT, {**run_config, "output-dir": str(out)})
        runner.popen.wait(timeout=timeout)
    left = tagged_processes(tag)
    assert left == [], describe_processes(left)
    log = tmp_path / "logs" / "flwr-run.log"
    assert (out / "summary.json").exists(), log.read_text(errors="replace")[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", log.read_text(errors="replace")[-3000:]
    return out, summary
