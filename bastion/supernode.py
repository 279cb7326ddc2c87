"""``bastion supernode``: a Flower SuperNode whose ClientApp tasks start warm.

``bastion supernode [OPTIONS] -- FLOWER_SUPERNODE_FLAGS`` runs the same SuperNode as
``flower-supernode FLOWER_SUPERNODE_FLAGS`` (every flag passes through unchanged:
``--superlink``, TLS, ``--auth-supernode-private-key``, ``--node-config``, ...), with
two differences:

* **Warm tasks** (``--launcher warm``, the default). The SuperNode runs with
  ``--isolation process`` beside a warm SuperExec (:mod:`bastion.warm_exec`) that has
  imported torch and Flower once and forks one child per ClientApp task, instead of
  Flower's SuperExec starting a new ``flwr-clientapp`` process per message. This
  process supervises both: it restarts the warm SuperExec if it dies (tasks it had
  running fail with Flower's "ClientApp stopped responding"; the next task is
  served), and exits with the SuperNode's exit status when the SuperNode exits.
* **Tasks start when they arrive.** The SuperNode writes a byte to a pipe whenever a
  message becomes a task; the warm SuperExec, which Flower would have poll every
  ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (1 s by default), wakes on it.
* **Shorter idle polling** (``--idle-poll``, default 0.25 s). Flower 1.39's SuperNode
  sleeps 3 s whenever the SuperLink has no message for it and 0.5 s between checks
  for a finished reply (``flwr/supernode/start_client_internal.py``): up to 3.5 s on
  every message, more than a round's training here. The SuperNode process caps those
  sleeps at ``--idle-poll``; each poll is one small gRPC call to the SuperLink.

``--launcher flower`` runs plain ``flower-supernode`` with the flags as given, for
comparison and for hosts where forking is not wanted. The warm launcher needs
``os.fork``: Linux (tested) or another POSIX system; macOS forks badly once system
frameworks are loaded, so use ``--launcher flower`` there.

Process tree (one process group, so that stopping the group stops everything)::

    bastion supernode            this supervisor (standard library only)
    ├── python -m bastion.supernode node ... --isolation process   Flower's SuperNode
    └── python -m bastion.warm_exec ...                             warm SuperExec
        └── one forked child per ClientApp task
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

#: Flower 1.39's defaults for the Runtime API (``flwr.supercore.constant``).
FLOWER_RUNTIME_HOST = "127.0.0.1"
FLOWER_RUNTIME_PORT = 9094
DEFAULT_IDLE_POLL = 0.25
LAUNCHERS = ("warm", "flower")


class _CappedSleep:
    """The ``time`` module, with ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def run_node(flower_args: Sequence[str], idle_poll: float, notify_fd: int | None = None) -> None:
    """Run Flower's ``flower-supernode`` in this process with its sleeps capped; with
    ``notify_fd``, write a byte to it whenever a message becomes a task, so that the
    warm SuperExec starts it at once instead of at its next poll."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    # Flower 1.39 hard-codes the 3 s idle sleep (module docstring); tests/unit/
    # test_warm_exec.py checks that the module still calls time.sleep through `time`.
    start_client_internal.time = _CappedSleep(idle_poll)  # type: ignore[assignment]
    if notify_fd is not None:
        os.set_blocking(notify_fd, False)
        pull = start_client_internal._pull_and_store_message

        def pull_and_notify(*args: object, **kwargs: object) -> int | None:
            run_id = pull(*args, **kwargs)  # type: ignore[arg-type]
            if run_id is not None:
                with contextlib.suppress(OSError):  # full or closed: the poll still runs
                    os.write(notify_fd, b"!")
            return run_id

        start_client_internal._pull_and_store_message = pull_and_notify  # type: ignore[assignment]
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


def _runtime_view(flower_args: Sequence[str]) -> argparse.Namespace:
    """The flags of ``flower-supernode`` that say where its Runtime API listens."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default=FLOWER_RUNTIME_HOST)
    parser.add_argument("--port", type=int, default=FLOWER_RUNTIME_PORT)
    parser.add_argument("--ssl-certfile")
    parser.add_argument("--ssl-ca-certfile")
    parser.add_argument("--isolation")
    known, _ = parser.parse_known_args(list(flower_args))
    return known


def warm_exec_args(
    flower_args: Sequence[str], task_timeout: float | None, wake_fd: int | None = None
) -> list[str]:
    """The command line of the warm SuperExec for a SuperNode started with ``flower_args``.

    Mirrors what Flower's SuperNode passes its own SuperExec: the Runtime API address
    (a bind-all host becomes loopback) and its TLS (``--ssl-ca-certfile`` when the
    Runtime API serves TLS, else ``--insecure``).
    """
    view = _runtime_view(flower_args)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(view.host, view.host)
    host = f"[{host}]" if ":" in host else host
    args = [
        sys.executable,
        "-m",
        "bastion.warm_exec",
        "--runtime-api-address",
        f"{host}:{view.port}",
    ]
    if view.ssl_certfile and view.ssl_ca_certfile:
        args += ["--root-certificates", str(Path(view.ssl_ca_certfile).expanduser())]
    else:
        args.append("--insecure")
    args += ["--parent-pid", str(os.getpid())]
    if task_timeout:
        args += ["--task-timeout", str(task_timeout)]
    if wake_fd is not None:
        args += ["--wake-fd", str(wake_fd)]
    return args


class Supervisor:
    """Runs the SuperNode and the warm SuperExec; restarts the SuperExec when it dies."""

    def __init__(
        self,
        flower_args: Sequence[str],
        *,
        idle_poll: float,
        task_timeout: float | None,
        restart_backoff: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        view = _runtime_view(flower_args)
        if view.isolation not in (None, "subprocess"):
            raise ValueError(
                f"flag '--isolation': value {view.isolation!r} is not allowed with "
                "'--launcher warm' (it runs its own SuperExec and sets --isolation "
                "process); use '--launcher flower' to run your own SuperExec"
            )
        # The SuperNode writes a byte here per new task; the warm SuperExec wakes on it
        # (both ends stay open in this process, so a restarted SuperExec reuses them).
        self.wake_read, self.wake_write = os.pipe()
        self.node_cmd = [
            sys.executable,
            "-m",
            "bastion.supernode",
            "node",
            "--idle-poll",
            str(idle_poll),
            "--notify-fd",
            str(self.wake_write),
            "--",
            *flower_args,
            "--isolation",
            "process",
        ]
        self.exec_cmd = warm_exec_args(flower_args, task_timeout, self.wake_read)
        self.restart_backoff = restart_backoff
        self.max_backoff = max_backoff
        self.stopping = False
        self.node: subprocess.Popen[bytes] | None = None
        self.exec: subprocess.Popen[bytes] | None = None
        #: how many times the warm SuperExec was started again after it died
        self.restarts = 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True

    def _stop(self, grace: float = 10.0) -> None:
        for proc in (self.exec, self.node):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in (self.exec, self.node):
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def run(self) -> int:
        """Supervise until the SuperNode exits (or this process is told to stop);
        return the SuperNode's exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.node = subprocess.Popen(self.node_cmd, pass_fds=(self.wake_write,))
        self.exec = subprocess.Popen(self.exec_cmd, pass_fds=(self.wake_read,))
        backoff, started = self.restart_backoff, time.monotonic()
        try:
            while not self.stopping:
                code = self.node.poll()
                if code is not None:
                    return code
                if self.exec.poll() is not None:
                    print(
                        f"bastion supernode: the warm SuperExec exited with status "
                        f"{self.exec.returncode}; starting it again in {backoff:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                    if time.monotonic() - started > 60:
                        backoff = self.restart_backoff  # it had run a while: not a crash loop
                    self._sleep(backoff)
                    if self.stopping:
                        break
                    self.exec = subprocess.Popen(self.exec_cmd, pass_fds=(self.wake_read,))
                    self.restarts += 1
                    started = time.monotonic()
                    backoff = min(self.max_backoff, backoff * 2)
                self._sleep(0.2)
            return 0
        finally:
            self._stop()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.1, left))  # `left` once: a busy host can pass the deadline


def build_parser(prog: str = "bastion supernode") -> argparse.ArgumentParser:
    """Options of ``bastion supernode``; everything after ``--`` goes to Flower."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Run a Flower SuperNode whose ClientApp tasks fork from a warm process "
            "(torch and Flower imported once). Flags after '--' are flower-supernode's."
        ),
        epilog=(
            "example: bastion supernode -- --superlink 10.0.0.5:9092 "
            "--root-certificates ca.crt --auth-supernode-private-key node.key "
            '--node-config "partition-id=0 num-partitions=10"'
        ),
    )
    parser.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="warm",
        help="warm: fork each task from a warm SuperExec (default); flower: plain "
        "flower-supernode, one new process per message",
    )
    parser.add_argument(
        "--idle-poll",
        type=_positive_seconds("--idle-poll"),
        default=os.environ.get("BASTION_IDLE_POLL", DEFAULT_IDLE_POLL),
        help=f"cap on the SuperNode's idle sleeps in seconds (Flower's: 3; default "
        f"{DEFAULT_IDLE_POLL})",
    )
    parser.add_argument(
        "--task-timeout",
        type=_positive_seconds("--task-timeout"),
        default=None,
        help="kill a ClientApp task after this many seconds and answer the server "
        "with an error naming the timeout (default: no limit)",
    )
    parser.add_argument("flower_args", nargs=argparse.REMAINDER, help="-- flower-supernode flags")
    return parser


def _positive_seconds(flag: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value > 0:
            raise argparse.ArgumentTypeError(
                f"option '{flag}': value {text!r} is not allowed; allowed: seconds > 0"
            )
        return value

    return parse


def main(argv: Sequence[str] | None = None, prog: str = "bastion supernode") -> int:
    """Entry of ``bastion supernode``; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    flower_args = list(args.flower_args)
    if flower_args[:1] == ["--"]:
        flower_args = flower_args[1:]
    if args.launcher == "flower":
        from bastion.federation import flower_bin

        os.execv(flower_bin("flower-supernode"), ["flower-supernode", *flower_args])
    try:
        supervisor = Supervisor(
            flower_args, idle_poll=args.idle_poll, task_timeout=args.task_timeout
        )
    except ValueError as exc:
        build_parser(prog).error(str(exc))
    return supervisor.run()


def _node_main(argv: Sequence[str]) -> None:
    """``python -m bastion.supernode node --idle-poll S -- FLAGS``: the SuperNode itself."""
    parser = argparse.ArgumentParser(prog="python -m bastion.supernode node")
    parser.add_argument("--idle-poll", type=float, required=True)
    parser.add_argument("--notify-fd", type=int, default=None)
    parser.add_argument("flower_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    flower_args = list(args.flower_args)
    if flower_args[:1] == ["--"]:
        flower_args = flower_args[1:]
    run_node(flower_args, args.idle_poll, args.notify_fd)


if __name__ == "__main__":
    if sys.argv[1:2] == ["node"]:
        _node_main(sys.argv[2:])
    else:
        with contextlib.suppress(KeyboardInterrupt):
            sys.exit(main())
