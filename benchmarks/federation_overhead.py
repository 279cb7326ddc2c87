"""Wall time, per-round overhead, node CPU and ClientApp memory of ``bastion run``,
with the warm launcher and with Flower's stock process per message, side by side.

Runs the real local federation (SuperLink + N SuperNodes on loopback, gRPC) once per
variant, in one invocation, and prints one table:

* ``wall s``      - the whole ``bastion run`` command, process start to exit;
* ``startup s``   - from launch until the ServerApp has evaluated the initial model
                    and is about to send round 1 (processes up, app submitted);
* ``round s``     - mean wall time of a training round (send to last reply);
* ``overhead s``  - mean of (round wall time - the slowest client's training time):
                    what messaging and starting ClientApp tasks cost;
* ``node cpu/msg s`` - CPU seconds the SuperNode side spent per ClientApp message:
                    (CPU of the task processes + CPU of the SuperNodes, SuperExecs
                    and supervisors during the rounds) / messages, the client's
                    training included. Run with ``--run-config local-steps=1`` (one
                    SGD step, a few ms) it is the cost of a message beyond training.
                    One-time start-up (the SuperNode's and the warm parent's
                    imports) is not in it;
* ``task rss/pss/uss MB`` - a ClientApp task's peak memory, mean over tasks: RSS
                    (every resident page it maps, shared ones included), PSS (shared
                    pages divided among the processes sharing them) and USS (its
                    private pages: what it costs on top of the rest).

A second table gives the SuperLink's CPU (cores busy, during the rounds) and peak
RSS, the SuperNode daemons' CPU, and how many processes of the run were still alive
a second after ``bastion run`` exited (should be 0).

Variants:

* ``warm``           - ``bastion run`` defaults: ``bastion supernode`` forks each task
                       from a warm SuperExec; SuperNode idle polls capped at 0.25 s;
* ``flower-process`` - ``--launcher flower``: Flower's ``flower-supernode``, a new
                       ``flwr-clientapp`` process per message, Bastion's poll intervals;
* ``flower-stock``   - the same with Flower's stock polling too (server 3 s, SuperExec 1 s).

Measurement: a sampler reads ``/proc`` every 0.1 s for the processes of the run (found
by an environment tag they inherit). Warm task children live well under a second, so
their CPU and peak RSS come from ``wait4`` in the warm SuperExec (its log), and their
PSS/USS from the samples that caught them.

Usage::

    python benchmarks/federation_overhead.py                 # 10 clients, 5 rounds
    python benchmarks/federation_overhead.py --clients 3 --rounds 3 --variants warm
    python benchmarks/federation_overhead.py --rounds 2 --dataset fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAG_VAR = "BASTION_BENCH_TAG"
VARIANTS: dict[str, tuple[dict[str, str], list[str]]] = {
    "warm": ({}, ["--launcher", "warm"]),
    "flower-process": ({}, ["--launcher", "flower"]),
    "flower-stock": (
        {"BASTION_POLL_SECONDS": "3", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"},
        ["--launcher", "flower"],
    ),
}
TICK = os.sysconf("SC_CLK_TCK")
WARM_DONE = re.compile(
    r"^(\S+ \S+) .*task \d+: child (\d+) done in [\d.]+ s, cpu ([\d.]+) s, max rss (\d+) kB"
)


@dataclass
class Proc:
    """What the sampler learnt of one process."""

    pid: int
    role: str  # "task", "node", "superlink" or "server"
    state: str = "?"  # /proc state letter at the last sample (Z: zombie)
    samples: list[tuple[float, float]] = field(default_factory=list)  # (time, own cpu s)
    rss: float = 0.0
    pss: float = 0.0
    uss: float = 0.0


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


class Sampler(threading.Thread):
    """Samples CPU and memory of every process carrying ``TAG_VAR=tag``."""

    NODE_MODULES = ("bastion.supernode", "bastion.warm_exec")
    NODE_PROGRAMS = ("flower-supernode",)

    def __init__(self, tag: str, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.tag, self.interval = tag, interval
        self.procs: dict[tuple[int, str], Proc] = {}
        self.untagged: set[tuple[int, str]] = set()
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def _role(self, argv: list[str], ppid: int) -> str:
        names = [Path(a).name for a in argv[:2]]
        parent = next((p for (q, _), p in self.procs.items() if q == ppid), None)
        parent_argv = (_read(f"/proc/{ppid}/cmdline") or "").split("\0")
        if parent is not None and "bastion.warm_exec" in parent_argv[1:4]:
            return "task"  # a child forked by a warm SuperExec (same command line)
        if "flwr-clientapp" in names:
            return "task"
        if "flower-superlink" in names:
            return "superlink"
        if any(m in argv[1:4] for m in self.NODE_MODULES):
            return "node"
        if any(p in names for p in self.NODE_PROGRAMS):
            return "node"
        if parent is not None and "flower-superexec" in names:
            return parent.role  # the SuperNode's SuperExec (not the SuperLink's)
        return "server"

    def sample(self) -> None:
        now = time.time()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            stat = _read(f"/proc/{pid}/stat")
            if stat is None:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            key = (pid, fields[19])  # pid and start time: pids are reused
            if key in self.untagged:
                continue
            proc = self.procs.get(key)
            if proc is None:
                env = _read(f"/proc/{pid}/environ") or ""
                if f"{TAG_VAR}={self.tag}" not in env.split("\0"):
                    self.untagged.add(key)
                    continue
                argv = (_read(f"/proc/{pid}/cmdline") or "").split("\0")
                proc = Proc(pid, self._role(argv, int(fields[1])))
                self.procs[key] = proc
            proc.state = fields[0]
            cpu = (int(fields[11]) + int(fields[12])) / TICK
            proc.samples.append((now, cpu))
            if proc.role == "superlink":
                status = _read(f"/proc/{pid}/status") or ""
                hwm = [int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM:")]
                proc.rss = max([proc.rss, *(kb / 1024 for kb in hwm)])
            if proc.role == "task":
                rollup = _read(f"/proc/{pid}/smaps_rollup") or ""
                kb = {
                    k: int(v.split()[0])
                    for k, v in (
                        line.split(":", 1) for line in rollup.splitlines()[1:] if ":" in line
                    )
                }
                proc.rss = max(proc.rss, kb.get("Rss", 0) / 1024)
                proc.pss = max(proc.pss, kb.get("Pss", 0) / 1024)
                uss = kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)
                proc.uss = max(proc.uss, uss / 1024)


def _cpu_between(proc: Proc, t0: float, t1: float) -> float:
    """CPU seconds ``proc`` spent between wall times ``t0`` and ``t1`` (from samples)."""
    inside = [c for t, c in proc.samples if t0 <= t <= t1]
    before = [c for t, c in proc.samples if t < t0]
    if not inside:
        return 0.0
    return inside[-1] - (before[-1] if before else inside[0])


def run_once(variant: str, clients: int, rounds: int, extra: list[str], workdir: Path) -> dict:
    out = workdir / variant
    tag = uuid.uuid4().hex
    env_extra, flags = VARIANTS[variant]
    env = dict(os.environ) | env_extra | {TAG_VAR: tag}
    bastion = Path(sys.executable).parent / "bastion"
    cmd = [str(bastion), "run", "--clients", str(clients), "--rounds", str(rounds)]
    cmd += ["--output-dir", str(out), *flags, *extra]
    sampler = Sampler(tag)
    sampler.start()
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    end = time.time()
    sampler.stop_event.set()
    sampler.join()
    time.sleep(1.0)
    after = Sampler(tag)  # a fresh scan: anything of the run still alive (not a zombie)?
    after.sample()
    leftovers = [p.pid for p in after.procs.values() if p.state != "Z"]
    if proc.returncode != 0:
        raise SystemExit(
            f"{variant}: bastion run failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    trained = [r for r in rows if r["round"] > 0]
    t0, t1 = rows[0]["time"], rows[-1]["time"]

    procs = list(sampler.procs.values())
    tasks = [p for p in procs if p.role == "task"]
    warm_done = []
    for log in (out / "logs").glob("supernode-*.log"):
        warm_done += [
            m.groups()
            for m in map(WARM_DONE.match, log.read_text(errors="replace").splitlines())
            if m
        ]
    daemons = sum(_cpu_between(p, t0, t1) for p in procs if p.role == "node")
    if warm_done:  # wait4's numbers: exact, where 0.1 s samples would miss part of a child
        task_cpu = [float(c) for _, _, c, _ in warm_done]
        task_rss = [int(kb) / 1024 for _, _, _, kb in warm_done]
    else:
        task_cpu = [p.samples[-1][1] for p in tasks if p.samples]
        task_rss = [p.rss for p in tasks if p.rss]
    messages = max(len(task_cpu), 1)
    sampled = [p for p in tasks if p.pss]
    return {
        "variant": variant,
        "wall": end - start,
        "startup": t0 - start,
        "round": statistics.mean(r["round_seconds"] for r in trained),
        "overhead": statistics.mean(r["overhead_seconds"] for r in trained),
        "train": statistics.mean(r["slowest_train_seconds"] for r in trained),
        "cpu_per_msg": (sum(task_cpu) + daemons) / messages,
        "messages": len(task_cpu),
        "rss": statistics.mean(task_rss) if task_rss else float("nan"),
        "pss": statistics.mean(p.pss for p in sampled) if sampled else float("nan"),
        "uss": statistics.mean(p.uss for p in sampled) if sampled else float("nan"),
        "shutdown": end - t1,
        "accuracy": summary["final_accuracy"],
        "superlink_cores": sum(_cpu_between(p, t0, t1) for p in procs if p.role == "superlink")
        / max(t1 - t0, 1e-9),
        "superlink_rss": max((p.rss for p in procs if p.role == "superlink"), default=0.0),
        "node_cores": daemons / max(t1 - t0, 1e-9),
        "leftovers": len(leftovers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dataset", default=None, help="passed to bastion run (default: its own)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--run-config", default="", help="passed through to bastion run")
    args = parser.parse_args()
    extra = ["--run-config", args.run_config] if args.run_config else []
    extra += ["--dataset", args.dataset] if args.dataset else []
    workdir = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
    try:
        results = [run_once(v, args.clients, args.rounds, extra, workdir) for v in args.variants]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\nbastion run, {args.dataset or 'digits'}, {args.clients} clients, {args.rounds} rounds, "
        f"{os.cpu_count()} CPU cores\n"
    )
    head = (
        "variant",
        "wall s",
        "startup s",
        "round s",
        "overhead s",
        "slowest train s",
        "node cpu/msg s",
        "messages",
        "task rss MB",
        "task pss MB",
        "task uss MB",
        "shutdown s",
        "accuracy",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        print(
            f"| {r['variant']} | {r['wall']:.1f} | {r['startup']:.1f} | {r['round']:.2f} | "
            f"{r['overhead']:.2f} | {r['train']:.3f} | {r['cpu_per_msg']:.2f} | {r['messages']} | "
            f"{r['rss']:.0f} | {r['pss']:.0f} | {r['uss']:.0f} | {r['shutdown']:.1f} | "
            f"{r['accuracy']:.4f} |"
        )
    print(
        "\n| variant | SuperLink CPU (cores, during rounds) | SuperLink peak RSS MB | "
        "SuperNode daemons CPU (cores) | processes left after exit |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['variant']} | {r['superlink_cores']:.2f} | {r['superlink_rss']:.0f} | "
            f"{r['node_cores']:.2f} | {r['leftovers']} |"
        )
    if len(results) > 1:
        base = results[0]
        for r in results[1:]:
            print(
                f"\n{r['variant']} / {base['variant']}: wall x{r['wall'] / base['wall']:.2f}, "
                f"per-round overhead x{r['overhead'] / base['overhead']:.2f}, node CPU per "
                f"message x{r['cpu_per_msg'] / base['cpu_per_msg']:.2f}"
            )


if __name__ == "__main__":
    main()
