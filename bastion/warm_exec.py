"""A warm SuperExec: each ClientApp task runs in a child forked from a process that has
already imported Flower and torch.

Flower 1.39 starts a fresh ``flwr-clientapp`` process for every message a SuperNode
receives (``flwr.supercore.superexec.executor.subprocess_executor``). Importing torch
and Flower's SuperNode runtime costs about 2.6 s of CPU per message on this project's
machines, more than the training of a round (``docs/PERFORMANCE.md``). This module is
a SuperExec that pays that once: it imports the libraries (:data:`DEFAULT_PRELOAD`),
then runs Flower's own SuperExec loop (:func:`flwr.supercore.superexec.run_superexec.
run_superexec`: task polling, authentication, the plugin) with :class:`ForkExecutor`
as its executor. For every ClientApp task the executor forks a child that runs
Flower's own ClientApp entry (:func:`flwr.supernode.runtime.run_clientapp.
run_clientapp`, what ``flwr-clientapp --token T`` runs) for that task's token, then
exits.

One task per child, as with Flower's processes: the child installs the FAB and
imports the app itself, so nothing of one task (module state, RNG state, a changed app
version) reaches the next. The parent never imports the app's modules: Flower's
loader (``flwr.supercore.object_ref.load_app``) reuses a module already in
``sys.modules``, so a parent that had imported ``client.app`` would hand every later
run that module, whatever app version the run ships. :func:`preload` refuses
module names that are not installed libraries for the same reason.

Failures are answered, not left to time out. A child that dies from a signal (a
crash, the OOM killer) or that runs past ``task_timeout`` (it is then killed) never
pushes its reply; Flower's SuperNode would answer the server only when the task's
token expires (2 missed heartbeats of 30 s, ``ClientApp stopped responding``). The
child sends the message's metadata to the parent through a pipe as soon as it has
pulled it, so the parent can push an error reply naming what happened (signal,
run time, the timeout) with the task's own token, and close the task as failed.

Why a hand-written executor: Flower 1.39 ships ``subprocess`` and ``kubernetes``
executors only (``executor/factory.py``), and its ``warm_executor*`` modules keep
Kubernetes pods, not processes. ``run_superexec`` builds its executor with
``get_executor``; :func:`run` replaces that name in the module for this process
only (the pinned ``flwr==1.39.0``; ``tests/unit/test_warm_exec.py`` checks the hook
still exists).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib
import logging
import os
import random
import select
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import (
    ExecutionSpec,
    LaunchResult,
    SubprocessExecutor,
)

log = logging.getLogger("bastion.warm_exec")

#: Libraries the warm parent imports before it serves tasks: what every Bastion
#: ClientApp imports (torch, numpy) and Flower's ClientApp runtime. Only installed
#: libraries belong here, never the app's own packages (module docstring).
DEFAULT_PRELOAD: tuple[str, ...] = (
    "numpy",
    "torch",
    "flwr.app",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
)

#: Top-level packages of a Bastion app (pyproject's packages): never preloaded.
APP_PACKAGES = frozenset({"client", "task", "common", "attacks", "server", "strategies"})

#: How many finished tasks :attr:`ForkExecutor.finished` remembers.
FINISHED_KEPT = 1000

#: Exit status of a child whose task code raised past Flower's own handler.
CHILD_EXCEPTION_EXIT = 70

TaskMain = Callable[[ExecutionSpec, int], None]
FailureHandler = Callable[[ExecutionSpec, bytes, str], None]


def preload(modules: Sequence[str]) -> float:
    """Import ``modules`` (installed libraries only); return the seconds it took."""
    started = time.perf_counter()
    for name in modules:
        if name.split(".")[0] in APP_PACKAGES:
            raise ValueError(
                f"option '--preload': value {name!r} is not allowed: the app's own "
                f"packages ({', '.join(sorted(APP_PACKAGES))}) must be imported by each "
                "task, from the app version its run ships"
            )
        importlib.import_module(name)
    return time.perf_counter() - started


# --------------------------------------------------------------------------- child side
def _reset_after_fork() -> None:
    """Undo the parent's process-wide state that must not act in a task's child.

    Flower keeps exit handlers in a module-level list (the parent's close the
    SuperExec's HTTP client and kill this executor's children: a child running them
    would kill its siblings); its signal handlers call them. The RNGs are re-seeded
    from fresh entropy, as a new process would be, so that sibling tasks do not draw
    the same numbers (an app that wants reproducibility seeds them itself).
    """
    from flwr.supercore import telemetry
    from flwr.supercore.exit import exit_handler

    exit_handler.registered_exit_handlers.clear()
    exit_handler._lock_handlers = threading.Lock()  # may be held by a dead thread
    telemetry.state_lock = threading.Lock()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)  # the parent's SIGCHLD pipe
    random.seed()
    if "numpy" in sys.modules:
        import numpy as np

        np.random.seed(int.from_bytes(os.urandom(4), "little"))
    if "torch" in sys.modules:
        import torch

        torch.seed()


def run_clientapp_task(spec: ExecutionSpec, report_fd: int) -> None:
    """Run Flower's ClientApp entry for ``spec``'s token (in the forked child).

    The message's metadata (without content) is written to ``report_fd`` as soon as
    the task has pulled it, for :func:`push_failure_reply`.
    """
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime import run_clientapp as runtime

    pull = runtime.pull_task_input

    def pull_and_report(client):  # type: ignore[no-untyped-def]
        message, context, run, fab = pull(client)
        header = message_to_proto(remove_content_from_message(message)).SerializeToString()
        with contextlib.suppress(OSError):
            os.write(report_fd, header)
        os.close(report_fd)
        return message, context, run, fab

    runtime.pull_task_input = pull_and_report  # this child only: it runs one task
    runtime.install_from_fab = install_fab_once
    runtime.run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        ),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=False,
    )


def install_fab_once(fab_content: bytes, *args: object, **kwargs: object) -> Path:
    """Flower's ``install_from_fab``, skipped when this FAB (by SHA-256) is installed.

    Flower extracts, hash-checks and copies the whole FAB for every message (0.2-0.3 s
    of CPU for Bastion's 120 files, a third of a warm task), and the fresh copies
    carry no bytecode, so the app's modules are compiled again each time. The FAB's
    hash names its content, so one verified install serves every later task of that
    FAB: a marker under ``$FLWR_HOME/bastion-installed/<sha256>`` holds the installed
    path and is written (atomically) only after Flower's install succeeded.
    """
    from flwr.cli.install import install_from_fab
    from flwr.supercore.utils import get_flwr_home

    marker = get_flwr_home() / "bastion-installed" / hashlib.sha256(fab_content).hexdigest()
    with contextlib.suppress(OSError):
        installed = Path(marker.read_text())
        if (installed / "pyproject.toml").is_file():
            return installed
    installed = install_from_fab(fab_content, *args, **kwargs)  # type: ignore[arg-type]
    with contextlib.suppress(OSError):
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(str(installed))
        os.replace(tmp, marker)
    return installed


def _child(task_main: TaskMain, spec: ExecutionSpec, report_fd: int) -> None:
    """The forked child's whole life: run the task, then ``os._exit`` (never return)."""
    code = CHILD_EXCEPTION_EXIT
    try:
        _reset_after_fork()
        task_main(spec, report_fd)
        code = 0
    except SystemExit as exc:  # Flower's flwr_exit ends every task with sys.exit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # the child must never return into the loop
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


# -------------------------------------------------------------------------- parent side
def push_failure_reply(spec: ExecutionSpec, header: bytes, reason: str) -> None:
    """Answer the task's message with an error reply naming ``reason``, and close the
    task as failed, with the task's own token (what the child would have done).

    ``header`` is the message without content, as :func:`run_clientapp_task` reported
    it; without it (the child died before pulling its message) there is nothing to
    reply to, and Flower's token expiry answers instead.
    """
    if not header:
        log.warning(
            "task %d failed before it pulled its message (%s); the SuperNode answers "
            "when the task's token expires",
            spec.task_id,
            reason,
        )
        return
    from flwr.app import Context, Error, Message, RecordDict
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    message = message_from_proto(ProtoMessage.FromString(header))
    invoker = make_simple_http_retry_invoker()
    invoker.max_tries = 3
    client = RuntimeHttpClient.from_server_address(
        server_address=spec.runtime_api_address,
        insecure=spec.insecure,
        root_certificates=validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        ),
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(spec.token),
        ],
        retry_invoker=invoker,
    )
    try:
        reply = Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason), reply_to=message)
        context = Context(
            run_id=message.metadata.run_id,
            node_id=message.metadata.dst_node_id,
            node_config={},
            state=RecordDict(),
            run_config={},
        )
        push_message(client, reply, context)
        push_task_output(client, None, SubStatus.FAILED, reason)
    finally:
        client.close()


@dataclass
class _Running:
    """One forked task: its child, its report pipe and what it reported."""

    pid: int
    spec: ExecutionSpec
    started: float
    report_fd: int
    header: bytearray = field(default_factory=bytearray)
    timed_out: bool = False


def describe_exit(
    status: int, seconds: float, timeout: float | None, timed_out: bool
) -> str | None:
    """Why a child's task failed without Flower answering it, or ``None`` when Flower's
    own exit path ran (it pushed the reply, or an error reply for an exception)."""
    if timed_out:
        return (
            f"ClientApp task ran past the warm launcher's task timeout of {timeout:g} s "
            "and was killed"
        )
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"ClientApp task process was killed by signal {name} after {seconds:.1f} s"
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == CHILD_EXCEPTION_EXIT:
        return (
            "ClientApp task process failed outside Flower's ClientApp handler "
            f"after {seconds:.1f} s"
        )
    return None


class ForkExecutor:
    """A Flower SuperExec executor that forks ClientApp tasks from this process.

    Implements Flower 1.39's ``Executor`` protocol (``executor/types.py``). Task types
    other than ``clientapp``, and runs that ask for runtime dependency installation
    (a virtual environment per app), go to Flower's :class:`SubprocessExecutor`.
    """

    def __init__(
        self,
        task_timeout: float | None = None,
        *,
        task_main: TaskMain = run_clientapp_task,
        on_failure: FailureHandler = push_failure_reply,
        fallback: SubprocessExecutor | None = None,
    ) -> None:
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError(
                f"option '--task-timeout': value {task_timeout!r} is not allowed; "
                "allowed: seconds > 0 (or none)"
            )
        self.task_timeout = task_timeout
        self.task_main = task_main
        self.on_failure = on_failure
        self.fallback = fallback or SubprocessExecutor()
        self.running: dict[int, _Running] = {}
        #: (task id, pid, failure reason or None) of the latest finished tasks, oldest
        #: first; bounded, since a warm parent lives as long as its SuperNode
        self.finished: deque[tuple[int, int, str | None]] = deque(maxlen=FINISHED_KEPT)

    # Flower's Executor protocol --------------------------------------------------
    def get_eligible_capacity(
        self,
        supported_task_types: set[TaskType],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[TaskType], set[str]]:
        """Every supported task type can start now (one process per task, no pool)."""
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(self, *args: object, **kwargs: object) -> None:
        """No capacity gate: return at once."""
        del args, kwargs

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Fork a child that runs ``spec``'s ClientApp task (see the class docstring)."""
        if spec.task_type != TaskType.CLIENT_APP or spec.runtime_dependency_install:
            return self.fallback.launch(spec)
        read_fd, write_fd = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            return LaunchResult.failed(f"fork failed: {exc}")
        if pid == 0:  # the child
            os.close(read_fd)
            _child(self.task_main, spec, write_fd)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.running[pid] = _Running(pid, spec, time.monotonic(), read_fd)
        log.info("task %d: forked child %d", spec.task_id, pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children, answer the failed ones, kill the ones past the timeout."""
        now = time.monotonic()
        for pid, task in list(self.running.items()):
            self._drain(task)
            try:
                done, status, usage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: nothing more to learn
                done, status, usage = pid, 0, None
            if done == 0:
                late = self.task_timeout is not None and now - task.started > self.task_timeout
                if late and not task.timed_out:
                    task.timed_out = True
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                continue
            self._drain(task)
            os.close(task.report_fd)
            del self.running[pid]
            reason = describe_exit(status, now - task.started, self.task_timeout, task.timed_out)
            self.finished.append((task.spec.task_id, pid, reason))
            if reason is None:
                # benchmarks/federation_overhead.py reads this line
                log.info(
                    "task %d: child %d done in %.2f s, cpu %.3f s, max rss %d kB",
                    task.spec.task_id,
                    pid,
                    now - task.started,
                    0.0 if usage is None else usage.ru_utime + usage.ru_stime,
                    0 if usage is None else usage.ru_maxrss,
                )
                continue
            log.warning("task %d (child %d): %s", task.spec.task_id, pid, reason)
            try:
                self.on_failure(task.spec, bytes(task.header), reason)
            except Exception as exc:  # the next task must still be served
                log.error("task %d: could not push its error reply: %s", task.spec.task_id, exc)

    def close(self) -> None:
        """Kill every running child and reap it (SuperExec shutdown)."""
        for pid in list(self.running):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid, task in list(self.running.items()):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            os.close(task.report_fd)
        self.running.clear()

    # -----------------------------------------------------------------------------
    @staticmethod
    def _drain(task: _Running) -> None:
        """Read what the child reported so far (non-blocking)."""
        while True:
            try:
                chunk = os.read(task.report_fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            task.header += chunk


# ------------------------------------------------------------------------------- entry
class _WakeableSleep:
    """The ``time`` module, with ``sleep`` ending early when one of ``fds`` becomes
    readable: the SuperNode's "new task" pipe (:mod:`bastion.supernode`) and this
    process's SIGCHLD wake-up pipe (a task ended: reap it and answer it now, not at
    the next poll). What was written is drained, so one wake-up serves many bytes."""

    def __init__(self, *fds: int) -> None:
        self.fds = list(fds)
        for fd in self.fds:
            os.set_blocking(fd, False)

    def sleep(self, seconds: float) -> None:
        readable, _, _ = select.select(self.fds, [], [], max(0.0, seconds))
        for fd in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(fd, 4096):
                    pass

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def run(
    runtime_api_address: str,
    *,
    insecure: bool,
    root_certificates_path: str | None = None,
    parent_pid: int | None = None,
    task_timeout: float | None = None,
    modules: Sequence[str] = DEFAULT_PRELOAD,
    wake_fd: int | None = None,
) -> None:
    """Preload ``modules``, then run Flower's SuperExec loop with a :class:`ForkExecutor`
    (with ``wake_fd``, its sleep between polls ends when a byte arrives there)."""
    seconds = preload(modules)
    log.info("warm SuperExec: preloaded %s in %.2f s", ", ".join(modules), seconds)
    # Keep the collector out of what the children inherit: a collection in a child
    # writes to the header of every tracked object it visits, so each page of the
    # parent's heap would be copied into every task (CPython's gc.freeze, "to avoid
    # copy-on-write in child processes"). Measured on Fashion-MNIST: a task's private
    # memory after importing the app 61 MB without, 12 MB with.
    gc.collect()
    gc.freeze()
    from flwr.supercore.superexec import run_superexec as superexec

    executor = ForkExecutor(task_timeout)
    # Flower 1.39 has no hook for a custom executor (module docstring)
    superexec.get_executor = lambda *args, **kwargs: executor  # type: ignore[assignment]
    # SIGCHLD writes a byte to a pipe (signal.set_wakeup_fd): the loop wakes when a task
    # ends. The loop's `time.sleep(task_poll_interval)` (tests/unit/test_warm_exec.py)
    # then waits on that pipe and on the SuperNode's "new task" pipe.
    child_read, child_write = os.pipe()
    os.set_blocking(child_write, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(child_write)
    fds = [child_read] if wake_fd is None else [child_read, wake_fd]
    superexec.time = _WakeableSleep(*fds)  # type: ignore[assignment]
    superexec.run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=insecure,
        root_certificates_path=root_certificates_path,
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bastion.warm_exec``: what ``bastion supernode`` starts beside the SuperNode."""
    parser = argparse.ArgumentParser(
        prog="python -m bastion.warm_exec", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--runtime-api-address", required=True)
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true")
    tls.add_argument("--root-certificates", metavar="CA_CERT")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument(
        "--task-timeout",
        type=float,
        default=None,
        help="kill a ClientApp task after this many seconds and answer it with an error",
    )
    parser.add_argument(
        "--wake-fd",
        type=int,
        default=None,
        help="a pipe the SuperNode writes to when a task arrives (bastion supernode)",
    )
    parser.add_argument(
        "--preload",
        default=",".join(DEFAULT_PRELOAD),
        help="comma-separated libraries to import before serving tasks",
    )
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        run(
            args.runtime_api_address,
            insecure=args.insecure,
            root_certificates_path=args.root_certificates,
            parent_pid=args.parent_pid,
            task_timeout=args.task_timeout,
            modules=[m.strip() for m in args.preload.split(",") if m.strip()],
            wake_fd=args.wake_fd,
        )
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
