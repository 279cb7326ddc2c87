"""The ServerApp's round exchange (server.app.send_and_receive) against a fake Grid."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.app import TTL_MARGIN_SECONDS, send_and_receive


@pytest.fixture(autouse=True)
def _task_identity():
    # Message() needs a run id; in a real ServerApp Flower sets it.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


class SilentGrid:
    """A Grid whose nodes never answer; it keeps what was pushed."""

    def __init__(self) -> None:
        self.pushed: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        self.pushed = list(messages)
        return [f"m{i}" for i in range(len(self.pushed))]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return []


def test_instructions_expire_with_their_round() -> None:
    """A node cut off during a round must not get the closed round's instruction when
    it comes back (Flower's default TTL is 12 h): each message lives as long as the
    round waits for it, plus a small margin."""
    grid = SilentGrid()
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2)]
    assert all(m.metadata.ttl > 3600 for m in msgs)  # Flower's default
    replies, missing = send_and_receive(grid, msgs, timeout=0.3)  # type: ignore[arg-type]
    assert replies == [] and missing == {"m0": 1, "m1": 2}
    assert [m.metadata.ttl for m in grid.pushed] == [0.3 + TTL_MARGIN_SECONDS] * 2
