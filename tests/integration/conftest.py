"""Helpers for tests that start real Flower processes through ``bastion run``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bastion.federation import processes_with_env

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
