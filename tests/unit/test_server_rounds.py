"""The ServerApp's round exchange (server.app.send_and_receive) against a fake Grid."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Message, MessageType, RecordDict
from flwr.common import Error
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

from server.app import (
    NO_REPLY_REASON,
    TTL_MARGIN_SECONDS,
    NoReply,
    send_and_receive,
    superlink_error_reason,
)


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
    assert replies == [] and missing == {
        "m0": NoReply(1, NO_REPLY_REASON),
        "m1": NoReply(2, NO_REPLY_REASON),
    }
    assert [m.metadata.ttl for m in grid.pushed] == [0.3 + TTL_MARGIN_SECONDS] * 2


class OneDeadNodeGrid:
    """Node 7 answers with a model, node 8 with its own error (a crashed ClientApp), and
    for node 9 (dead) the SuperLink answers: Flower's own NODE_UNAVAILABLE error reply,
    made by the function the SuperLink uses (its source is the SuperLink, node id 1)."""

    def __init__(self) -> None:
        self.pushed: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what the SuperLink does
            self.pushed[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        out = []
        for mid in message_ids:
            ins = self.pushed[mid]
            node = ins.metadata.dst_node_id
            if node == 7:
                out.append(Message(RecordDict(), reply_to=ins))
            elif node == 8:
                out.append(Message(Error(code=0, reason="ClientApp crashed"), reply_to=ins))
            else:
                error = create_message_error_unavailable_res_message(ins.metadata, "node")
                assert error.metadata.src_node_id == SUPERLINK_NODE_ID  # not node 9
                out.append(error)
        return out


def test_superlink_error_reply_is_mapped_to_the_node_it_stands_for() -> None:
    """A node that died shows up as an error reply *from the SuperLink* (src_node_id 1):
    the server must name the node the instruction went to, say why, and keep the
    SuperLink's reply away from the strategy; a node's own error reply stays a reply."""
    grid = OneDeadNodeGrid()
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN) for n in (7, 8, 9)]
    replies, missing = send_and_receive(grid, msgs, timeout=5.0)  # type: ignore[arg-type]
    assert sorted(r.metadata.src_node_id for r in replies) == [7, 8]
    assert [r.has_error() for r in sorted(replies, key=lambda r: r.metadata.src_node_id)] == [
        False,
        True,
    ]
    dead = msgs[2].metadata.message_id
    assert list(missing) == [dead] and missing[dead].node_id == 9
    reason = missing[dead].reason
    assert reason.startswith("node unavailable (SuperLink reported it offline")
    assert f"error code {int(ErrorCode.NODE_UNAVAILABLE)}" in reason


def test_superlink_reasons_name_each_unavailability() -> None:
    assert superlink_error_reason(Error(ErrorCode.MESSAGE_UNAVAILABLE, "x")).startswith(
        "instruction unavailable"
    )
    assert superlink_error_reason(Error(ErrorCode.REPLY_MESSAGE_UNAVAILABLE, "x")).startswith(
        "reply unavailable"
    )
    assert superlink_error_reason(Error(99, "odd")) == (
        "error reply from the SuperLink; error code 99: odd"
    )
