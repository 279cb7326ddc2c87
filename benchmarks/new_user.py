"""Time a new user's first commands, as the README gives them, and print one table.

A fresh ``git clone`` of this repository into an empty temporary folder (nothing
beside it), then, each timed from the outside like ``time`` would:

1. the README's install command (``python3.11 -m venv .venv && . .venv/bin/activate &&
   pip install -e ".[dev]"``) in a new virtual environment;
2. ``bastion run`` on its defaults, started as ``/path/.venv/bin/bastion`` from an
   environment whose ``PATH`` lacks the venv (``env -i HOME=... PATH=/usr/bin:/bin``),
   as cron, systemd or an IDE would start it;
3. a DP run (``--clients 4 --rounds 2 --run-config "dp=true"``).

For each run the table shows the wall time measured here, the ``wall_seconds`` the
command wrote into ``summary.json`` (they should agree to about a second: the one
figure the console prints), the ServerApp's own ``serverapp_seconds``, the rounds'
mean duration and the final accuracy (and ε for the DP run).

    python benchmarks/new_user.py [--keep DIR] [--skip-install VENV]

Measure on an otherwise idle machine: on 2 cores, anything else running (a test
suite, a helper's build) stretches every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL = 'python3.11 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]"'


def timed(cmd: list[str] | str, cwd: Path, env: dict[str, str] | None = None) -> float:
    """Run ``cmd`` (a shell string or argv) in ``cwd``; its wall seconds. Fails loudly."""
    start = time.monotonic()
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        shell=isinstance(cmd, str),
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds


def run_row(name: str, seconds: float, run_dir: Path) -> dict[str, object]:
    """One table row from a finished run's files."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r["round_seconds"] for r in rows if r.get("round_seconds") is not None]
    return {
        "what": name,
        "measured s": f"{seconds:.1f}",
        "summary wall_seconds": summary.get("wall_seconds"),
        "serverapp s": summary.get("serverapp_seconds"),
        "mean round s": f"{statistics.mean(rounds):.1f}" if rounds else "-",
        "accuracy": f"{summary['final_accuracy']:.4f}",
        "epsilon": f"{summary['max_epsilon']:.2f}" if summary.get("max_epsilon") else "-",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", help="clone into this (empty) folder and keep it")
    parser.add_argument(
        "--skip-install", metavar="VENV", help="use this venv instead of installing one"
    )
    args = parser.parse_args()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bastion-new-user-"))
    base.mkdir(parents=True, exist_ok=True)
    clone = base / "bastion"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    table: list[dict[str, object]] = []
    if args.skip_install:
        bastion = Path(args.skip_install) / "bin" / "bastion"
    else:
        seconds = timed(INSTALL, clone)
        table.append({"what": "install (README command)", "measured s": f"{seconds:.1f}"})
        bastion = clone / ".venv" / "bin" / "bastion"
    bare = {"HOME": str(Path.home()), "PATH": "/usr/bin:/bin"}  # no venv on PATH
    runs = [
        ("bastion run (defaults; venv not on PATH)", [], "default"),
        (
            "bastion run --clients 4 --rounds 2 dp=true",
            ["--clients", "4", "--rounds", "2", "--run-config", "dp=true"],
            "dp",
        ),
    ]
    for name, extra, folder in runs:
        out = base / "runs" / folder
        seconds = timed([str(bastion), "run", *extra, "--output-dir", str(out)], clone, bare)
        table.append(run_row(name, seconds, out))
    keys = [
        "what",
        "measured s",
        "summary wall_seconds",
        "serverapp s",
        "mean round s",
        "accuracy",
        "epsilon",
    ]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in table:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    print(f"\n(clone and runs in {base})")


if __name__ == "__main__":
    main()
