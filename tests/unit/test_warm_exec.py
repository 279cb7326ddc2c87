"""The warm launcher's lifecycle (bastion.warm_exec, bastion.supernode) with real forks.

The task bodies here are small functions instead of Flower's ClientApp entry; the
integration test (tests/integration/test_warm_launcher.py) runs the real one.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult

from bastion import supernode, warm_exec
from bastion.warm_exec import CHILD_EXCEPTION_EXIT, ForkExecutor, describe_exit


def spec(
    task_id: int = 1, task_type: TaskType = TaskType.CLIENT_APP, **kw: object
) -> ExecutionSpec:
    fields: dict[str, object] = {
        "task_type": task_type,
        "runtime_api_address": "127.0.0.1:1",
        "token": f"token-{task_id}",
        "insecure": True,
        "root_certificates_path": None,
        "runtime_dependency_install": False,
        "parent_pid": os.getpid(),
        "suppress_output": True,
        "task_id": task_id,
    }
    return ExecutionSpec(**(fields | kw))  # type: ignore[arg-type]


class Failures:
    """An on_failure hook that records what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bytes, str]] = []

    def __call__(self, s: ExecutionSpec, header: bytes, reason: str) -> None:
        self.calls.append((s.task_id, header, reason))


def run_until_done(executor: ForkExecutor, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while executor.running:
        assert time.monotonic() < deadline, "children still running"
        executor.reconcile()
        time.sleep(0.02)


def writes_identity(out: Path) -> Callable[[ExecutionSpec, int], None]:
    def task(s: ExecutionSpec, report_fd: int) -> None:
        os.write(report_fd, b"header-" + str(s.task_id).encode())
        record = {"pid": os.getpid(), "ppid": os.getppid(), "random": random.random()}
        (out / f"task-{s.task_id}.json").write_text(json.dumps(record))

    return task


def test_each_task_runs_in_its_own_forked_child(tmp_path: Path) -> None:
    failures = Failures()
    ex = ForkExecutor(task_main=writes_identity(tmp_path), on_failure=failures)
    for task_id in (1, 2, 3):
        assert ex.launch(spec(task_id)) == LaunchResult.accepted()
    run_until_done(ex)
    records = [json.loads((tmp_path / f"task-{i}.json").read_text()) for i in (1, 2, 3)]
    assert {r["ppid"] for r in records} == {os.getpid()}  # forked from this process
    assert len({r["pid"] for r in records}) == 3  # one child per task
    # re-seeded per child: siblings do not draw the same numbers
    assert len({r["random"] for r in records}) == 3
    assert sorted(t for t, _, _ in ex.finished) == [1, 2, 3]
    assert all(reason is None for _, _, reason in ex.finished)
    assert failures.calls == []


def test_a_crashed_child_is_answered_with_its_header_and_the_signal(tmp_path: Path) -> None:
    def crash(s: ExecutionSpec, report_fd: int) -> None:
        os.write(report_fd, b"the-message-metadata")
        os.kill(os.getpid(), signal.SIGKILL)

    failures = Failures()
    ex = ForkExecutor(task_main=crash, on_failure=failures)
    ex.launch(spec(7))
    run_until_done(ex)
    [(task_id, header, reason)] = failures.calls
    assert task_id == 7 and header == b"the-message-metadata"
    assert "killed by signal SIGKILL" in reason


def test_a_hung_child_is_killed_at_the_timeout_and_answered() -> None:
    def hang(s: ExecutionSpec, report_fd: int) -> None:
        os.write(report_fd, b"h")
        time.sleep(60)

    failures = Failures()
    ex = ForkExecutor(0.5, task_main=hang, on_failure=failures)
    started = time.monotonic()
    ex.launch(spec(3))
    run_until_done(ex)
    assert time.monotonic() - started < 10
    [(task_id, header, reason)] = failures.calls
    assert (task_id, header) == (3, b"h")
    assert "task timeout of 0.5 s" in reason


def test_flowers_own_exits_are_not_answered_twice_but_escaped_exceptions_are() -> None:
    def flower_error_exit(s: ExecutionSpec, report_fd: int) -> None:
        sys.exit(1)  # flwr_exit after Flower pushed an error reply itself

    def raises(s: ExecutionSpec, report_fd: int) -> None:
        raise RuntimeError("boom outside Flower's handler")

    failures = Failures()
    ex = ForkExecutor(task_main=flower_error_exit, on_failure=failures)
    ex.launch(spec(1))
    run_until_done(ex)
    assert failures.calls == []
    ex.task_main = raises
    ex.launch(spec(2))
    run_until_done(ex)
    [(task_id, _, reason)] = failures.calls
    assert task_id == 2 and "outside Flower's ClientApp handler" in reason


def test_a_failing_failure_hook_does_not_stop_the_next_task(tmp_path: Path) -> None:
    def crash(s: ExecutionSpec, report_fd: int) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def broken_hook(s: ExecutionSpec, header: bytes, reason: str) -> None:
        raise ConnectionError("runtime API unreachable")

    ex = ForkExecutor(task_main=crash, on_failure=broken_hook)
    ex.launch(spec(1))
    run_until_done(ex)
    ex.task_main = writes_identity(tmp_path)
    ex.launch(spec(2))
    run_until_done(ex)
    assert (tmp_path / "task-2.json").exists()


def test_the_parents_flower_exit_handlers_do_not_run_in_a_child(tmp_path: Path) -> None:
    from flwr.supercore.exit import exit_handler
    from flwr.supercore.exit.exit import flwr_exit

    marker = tmp_path / "handler-ran"
    before = list(exit_handler.registered_exit_handlers)
    exit_handler.add_exit_handler(lambda: marker.write_text(str(os.getpid())))
    try:

        def flower_exits(s: ExecutionSpec, report_fd: int) -> None:
            flwr_exit(0, emit_telemetry=False)

        ex = ForkExecutor(task_main=flower_exits, on_failure=Failures())
        ex.launch(spec(1))
        run_until_done(ex)
        assert list(ex.finished) == [(1, ex.finished[0][1], None)]
        assert not marker.exists()  # e.g. the parent's executor.close() would kill siblings
    finally:
        exit_handler.registered_exit_handlers[:] = before


def test_other_task_types_and_dependency_installs_go_to_flowers_executor() -> None:
    launched: list[ExecutionSpec] = []

    class Fallback:
        def launch(self, s: ExecutionSpec) -> LaunchResult:
            launched.append(s)
            return LaunchResult.accepted()

    ex = ForkExecutor(task_main=lambda s, fd: None, fallback=Fallback())  # type: ignore[arg-type]
    ex.launch(spec(1, task_type=TaskType.AGENT_APP))
    ex.launch(spec(2, runtime_dependency_install=True))
    assert [s.task_id for s in launched] == [1, 2]
    assert ex.running == {}


def test_close_kills_running_children() -> None:
    ex = ForkExecutor(task_main=lambda s, fd: time.sleep(60), on_failure=Failures())
    ex.launch(spec(1))
    [pid] = list(ex.running)
    ex.close()
    assert ex.running == {}
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_bad_timeout_and_app_preloads_are_refused_with_the_option() -> None:
    with pytest.raises(ValueError, match="'--task-timeout': value 0"):
        ForkExecutor(0)
    with pytest.raises(ValueError, match=r"'--preload': value 'client\.app'"):
        warm_exec.preload(["json", "client.app"])


def test_the_warm_parent_holds_none_of_the_apps_modules() -> None:
    """What the parent has imported, every task reuses (Flower's loader takes a module
    from sys.modules): after the default preload, no package of the app is there."""
    code = (
        "import sys, bastion.warm_exec as w; w.preload(w.DEFAULT_PRELOAD); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & w.APP_PACKAGES)); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    ).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "True"


def test_describe_exit() -> None:
    assert describe_exit(0, 1.0, None, False) is None
    assert describe_exit(1 << 8, 1.0, None, False) is None  # exit(1): Flower's own exit
    assert "SIGSEGV" in describe_exit(signal.SIGSEGV, 2.5, None, False)  # type: ignore[operator]
    assert "2.5 s" in describe_exit(signal.SIGSEGV, 2.5, None, False)  # type: ignore[operator]
    assert "outside" in describe_exit(CHILD_EXCEPTION_EXIT << 8, 1.0, None, False)  # type: ignore[operator]
    assert "timeout of 30 s" in describe_exit(signal.SIGKILL, 31.0, 30.0, True)  # type: ignore[operator]


def test_the_flower_hooks_this_relies_on_are_still_there() -> None:
    """Flower 1.39 internals the launcher depends on (module docstrings); a Flower
    upgrade that moves them must fail here, not in a deployment."""
    import time as time_module

    from flwr.supercore.superexec import run_superexec
    from flwr.supernode import start_client_internal
    from flwr.supernode.runtime import run_clientapp

    assert "get_executor(" in inspect.getsource(run_superexec.run_superexec)
    assert start_client_internal.time is time_module
    assert "time.sleep(3)" in inspect.getsource(start_client_internal.start_client_internal)
    assert "pull_task_input(client)" in inspect.getsource(run_clientapp.run_clientapp)
    assert run_superexec.time is time_module
    assert "time.sleep(task_poll_interval)" in inspect.getsource(run_superexec.run_superexec)
    loop = inspect.getsource(start_client_internal.start_client_internal)
    assert "run_id = _pull_and_store_message(" in loop
    assert callable(run_clientapp.push_message) and callable(run_clientapp.push_task_output)


def test_the_superexec_sleep_ends_when_the_supernode_writes_to_the_pipe() -> None:
    read_fd, write_fd = os.pipe()
    try:
        sleeper = warm_exec._WakeableSleep(read_fd)
        os.write(write_fd, b"!!!")
        started = time.monotonic()
        sleeper.sleep(30)
        assert time.monotonic() - started < 5
        # the bytes were drained: the next sleep lasts its time
        started = time.monotonic()
        sleeper.sleep(0.2)
        assert time.monotonic() - started >= 0.15
    finally:
        os.close(read_fd)
        os.close(write_fd)


# --------------------------------------------------------------------- the supervisor
def test_capped_sleep_caps_only_long_sleeps() -> None:
    capped = supernode._CappedSleep(0.05)
    started = time.monotonic()
    capped.sleep(3)
    assert time.monotonic() - started < 1
    assert capped.monotonic is time.monotonic  # the rest of `time` passes through


@pytest.mark.parametrize(
    ("flags", "address", "tls"),
    [
        (["--superlink", "x:9092"], "127.0.0.1:9094", ["--insecure"]),
        (["--port", "7000", "--host", "0.0.0.0"], "127.0.0.1:7000", ["--insecure"]),
        (["--host", "::", "--port", "7001"], "[::1]:7001", ["--insecure"]),
        (
            ["--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem", "--ssl-ca-certfile", "ca.pem"],
            "127.0.0.1:9094",
            ["--root-certificates", "ca.pem"],
        ),
    ],
)
def test_warm_exec_reaches_the_supernodes_runtime_api(
    flags: list[str], address: str, tls: list[str]
) -> None:
    args = supernode.warm_exec_args(flags, task_timeout=None)
    assert args[args.index("--runtime-api-address") + 1] == address
    assert all(t in args for t in tls)
    assert args[args.index("--parent-pid") + 1] == str(os.getpid())


def test_the_supernode_and_the_superexec_share_the_wake_pipe() -> None:
    sup = supernode.Supervisor(
        ["--superlink", "x:1", "--port", "7000"], idle_poll=0.2, task_timeout=5
    )
    node_fd = int(sup.node_cmd[sup.node_cmd.index("--notify-fd") + 1])
    exec_fd = int(sup.exec_cmd[sup.exec_cmd.index("--wake-fd") + 1])
    os.write(node_fd, b"!")
    assert os.read(exec_fd, 1) == b"!"
    assert sup.node_cmd[-2:] == ["--isolation", "process"]
    assert sup.exec_cmd[sup.exec_cmd.index("--task-timeout") + 1] == "5"
    assert sup.exec_cmd[sup.exec_cmd.index("--runtime-api-address") + 1] == "127.0.0.1:7000"


def test_the_supervisor_refuses_process_isolation_with_the_warm_launcher() -> None:
    with pytest.raises(ValueError, match="'--isolation': value 'process'"):
        supernode.Supervisor(["--isolation", "process"], idle_poll=0.2, task_timeout=None)
    with pytest.raises(SystemExit):
        supernode.main(["--idle-poll", "0", "--", "--superlink", "x:1"])


def test_the_supervisor_restarts_a_dead_superexec_and_returns_the_nodes_status() -> None:
    sup = supernode.Supervisor(["--superlink", "x:1"], idle_poll=0.2, task_timeout=None)
    sup.restart_backoff = 0.05
    sup.node_cmd = [sys.executable, "-c", "import time, sys; time.sleep(2.5); sys.exit(4)"]
    sup.exec_cmd = [sys.executable, "-c", "import sys; sys.exit(3)"]
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert sup.run() == 4
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert sup.restarts >= 2


def test_the_supervisors_sleep_survives_a_deadline_passing_between_two_clock_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a loaded host (50 SuperNodes on 2 cores) the clock passed the deadline between
    the loop's check and the sleep's length: a negative sleep killed the supervisor."""
    sup = supernode.Supervisor(["--superlink", "x:1"], idle_poll=0.2, task_timeout=None)
    readings = iter([100.0, 100.05, 100.2, 100.3])  # start; check (in time); then late
    monkeypatch.setattr(supernode.time, "monotonic", lambda: next(readings, 101.0))
    slept: list[float] = []
    monkeypatch.setattr(supernode.time, "sleep", lambda s: slept.append(s))
    sup._sleep(0.1)
    assert all(s >= 0 for s in slept)
