"""Wall time, start-up time and per-round overhead of ``bastion run``, side by side.

Runs the real local federation (SuperLink + N SuperNodes on loopback, gRPC) once
per variant, in one invocation, and prints one table:

* ``wall s``      - the whole ``bastion run`` command, process start to exit;
* ``startup s``   - from launch until the ServerApp has evaluated the initial model
                    and is about to send round 1 (processes up, app submitted);
* ``round s``     - mean wall time of a training round (send to last reply);
* ``overhead s``  - mean of (round wall time - the slowest client's training time):
                    what Flower's messaging and the per-message ClientApp process cost;
* ``shutdown s``  - from the last round's results to the command's exit.

Variants:

* ``bastion``         - Bastion's defaults (server polls replies every 0.1 s backing off
                        to 1 s; SuperExec polls every clients / (5 x cores) s, 0.1..1 s);
* ``flower-polling``  - the same app with Flower's stock polling (server every 3 s,
                        SuperExec every 1 s), to show what the shorter intervals buy.

Usage::

    python benchmarks/federation_overhead.py                 # 10 clients, 5 rounds
    python benchmarks/federation_overhead.py --clients 3 --rounds 3 --variants bastion
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "bastion": {},
    "flower-polling": {"BASTION_POLL_SECONDS": "3", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"},
}


def run_once(variant: str, clients: int, rounds: int, extra: list[str], workdir: Path) -> dict:
    out = workdir / variant
    env = dict(os.environ) | VARIANTS[variant]
    bastion = Path(sys.executable).parent / "bastion"
    cmd = [
        str(bastion),
        "run",
        "--clients",
        str(clients),
        "--rounds",
        str(rounds),
        "--output-dir",
        str(out),
        *extra,
    ]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    end = time.time()
    if proc.returncode != 0:
        raise SystemExit(
            f"{variant}: bastion run failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    trained = [r for r in rows if r["round"] > 0]
    return {
        "variant": variant,
        "wall": end - start,
        "startup": rows[0]["time"] - start,
        "round": sum(r["round_seconds"] for r in trained) / len(trained),
        "overhead": sum(r["overhead_seconds"] for r in trained) / len(trained),
        "train": sum(r["slowest_train_seconds"] for r in trained) / len(trained),
        "shutdown": end - rows[-1]["time"],
        "accuracy": summary["final_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--run-config", default="", help="passed through to bastion run")
    args = parser.parse_args()
    extra = ["--run-config", args.run_config] if args.run_config else []
    workdir = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
    try:
        results = [run_once(v, args.clients, args.rounds, extra, workdir) for v in args.variants]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\nbastion run, digits, {args.clients} clients, {args.rounds} rounds, "
        f"{os.cpu_count()} CPU cores\n"
    )
    head = (
        "variant",
        "wall s",
        "startup s",
        "round s",
        "overhead s",
        "slowest train s",
        "shutdown s",
        "accuracy",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        print(
            f"| {r['variant']} | {r['wall']:.1f} | {r['startup']:.1f} | {r['round']:.2f} | "
            f"{r['overhead']:.2f} | {r['train']:.3f} | {r['shutdown']:.1f} | {r['accuracy']:.4f} |"
        )
    if len(results) > 1:
        base = results[0]
        for r in results[1:]:
            print(
                f"\n{r['variant']} / {base['variant']}: wall x{r['wall'] / base['wall']:.2f}, "
                f"per-round overhead x{r['overhead'] / base['overhead']:.2f}"
            )


if __name__ == "__main__":
    main()
