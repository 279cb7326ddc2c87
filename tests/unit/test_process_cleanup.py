"""``kill_tagged``: how a federation's or a simulation's processes are found and stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

from bastion.federation import kill_tagged, processes_in_groups, processes_with_env, tagged_groups

TAG_VAR = "BASTION_CLEANUP_TEST_TAG"

# A parent that starts a tagged child and an untagged one (its environment cleared,
# as a process whose environment area was overwritten would look to a scan), prints
# their PIDs and sleeps; both children sleep too.
FAMILY = (
    "import os, subprocess, sys, time\n"
    "tagged = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    f"env = {{k: v for k, v in os.environ.items() if k != {TAG_VAR!r}}}\n"
    "hidden = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], env=env)\n"
    "print(tagged.pid, hidden.pid, flush=True)\n"
    "time.sleep(60)\n"
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except OSError:
        return False


def _start_family(tag: str, new_session: bool) -> tuple[subprocess.Popen, int, int]:
    parent = subprocess.Popen(
        [sys.executable, "-c", FAMILY],
        env={**os.environ, TAG_VAR: tag},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )
    assert parent.stdout is not None
    tagged, hidden = (int(x) for x in parent.stdout.readline().split())
    return parent, tagged, hidden


def test_kills_tagged_processes_and_everything_in_their_process_groups():
    tag = uuid.uuid4().hex
    parent, tagged, hidden = _start_family(tag, new_session=True)
    try:
        assert sorted(processes_with_env(TAG_VAR, tag)) == sorted([parent.pid, tagged])
        assert kill_tagged(TAG_VAR, tag, timeout=10.0) == []
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(hidden) and time.monotonic() < deadline:
            time.sleep(0.05)
        # The untagged child went with its group; the tagged ones went by their tag.
        assert not _alive(tagged) and not _alive(hidden)
        assert processes_with_env(TAG_VAR, tag) == []
    finally:
        for pid in (parent.pid, tagged, hidden):
            if _alive(pid):
                os.kill(pid, 9)


def test_never_signals_the_callers_own_process_group():
    tag = uuid.uuid4().hex
    # Started in this test's process group: the tagged processes are killed one by one,
    # the group (pytest's own) is left alone, so the untagged child lives on.
    parent, tagged, hidden = _start_family(tag, new_session=False)
    try:
        assert kill_tagged(TAG_VAR, tag, timeout=10.0) == []
        parent.wait(timeout=10)
        assert not _alive(tagged)
        assert _alive(hidden)
    finally:
        for pid in (parent.pid, tagged, hidden):
            if _alive(pid):
                os.kill(pid, 9)


def test_returns_what_survives_the_timeout(monkeypatch):
    # A process that cannot be killed (here: a PID the scan keeps reporting) is
    # returned after the timeout instead of blocking the caller forever.
    import bastion.federation as federation

    monkeypatch.setattr(federation, "processes_with_env", lambda name, value: [2**22 + 7])
    assert kill_tagged(TAG_VAR, "x", timeout=0.3) == [2**22 + 7]


def test_groups_learned_earlier_reach_members_left_without_a_tagged_process():
    # Like Ray's agents after a graceful shutdown stopped every process that still
    # showed the tag: only the group, learned while the tagged ones lived, leads to them.
    tag = uuid.uuid4().hex
    parent, tagged, hidden = _start_family(tag, new_session=True)
    try:
        groups = tagged_groups(TAG_VAR, tag)
        assert groups == {parent.pid}
        os.kill(tagged, 9)
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while processes_with_env(TAG_VAR, tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with_env(TAG_VAR, tag) == [] and processes_in_groups(groups) == [hidden]
        assert kill_tagged(TAG_VAR, tag, groups, timeout=10.0) == []
        deadline = time.monotonic() + 10
        while _alive(hidden) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(hidden)
    finally:
        for pid in (parent.pid, tagged, hidden):
            if _alive(pid):
                os.kill(pid, 9)
