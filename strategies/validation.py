"""Checks one client reply on its own, so one bad reply never fails a round.

Flower's stock strategies check that all replies *agree with each other* and
reject the whole round when they do not (``InconsistentMessageReplies``); a
single Byzantine client can therefore stop training. Here each reply is checked
against the global model's :class:`~strategies.layout.ModelLayout` and a fixed
reply contract, and a bad reply is dropped with a human-readable reason.

The contract, in the order it is checked (the first broken rule is the reason):

0. identity (:class:`ReplyLedger`, kept by the strategy): a reply answers a message
   sent this round, comes from the node that message went to, and is that node's
   first reply this round;
1. size: the whole reply, metadata, error text, record and array names, array
   metadata and payloads, holds at most ``max-reply-bytes`` bytes (counted from
   lengths, before anything is decoded);
2. not an error reply;
3. records: exactly one ``ArrayRecord`` ``"arrays"`` and one ``MetricRecord``
   ``"metrics"``, nothing else;
4. arrays: the global model's names in its order; each array with serialisation
   type ``numpy.ndarray`` and the model's shape and dtype, and a ``.npy`` payload
   whose header agrees with that metadata and whose length matches it exactly
   (read from the header only: no array is copied or decoded here);
5. metrics: ``num-examples`` an integer in ``1..10^9``; every key of
   :data:`common.protocol.METRIC_TYPES` that is present has its type (an ``int`` key an integer; a
   ``float`` key any number) and, if a float, is finite (``dp-epsilon`` may be
   ``+inf``: DP-SGD without noise). Keys not in :data:`common.protocol.METRIC_TYPES` are ignored
   (the strategy never reads them); their bytes count towards the size limit.

Finiteness of the update values and ``max-update-norm`` are checked by the
strategy after decoding, where the numbers are at hand (the row norms).

Every reason is bounded text: a string taken from a reply (an error reason, an
array's dtype, stype or shape, a name, a metric value) is cut to
:data:`MAX_TEXT_CHARS` characters and the whole reason to :data:`MAX_REASON_CHARS`,
with the full length noted (:func:`bounded`). Any exception raised while one
reply is checked or decoded becomes that reply's reason (:func:`failure_reason`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, Message, MetricRecord, RecordDict

from common import protocol
from strategies.layout import (
    ArraySlot,
    ModelLayout,
    NpyHeaderError,
    UnsupportedNpyVersion,
    read_npy_header,
)

NUMPY_STYPE = "numpy.ndarray"
# defaults of the run-config keys max-reply-bytes and max-update-norm (common.config)
DEFAULT_MAX_REPLY_BYTES = 256 * 2**20
DEFAULT_MAX_UPDATE_NORM = 1e6
# bytes counted for one number in a MetricRecord or ConfigRecord (protobuf: <= 10)
NUMBER_BYTES = 8
# Text bounds: any one string taken from a reply, and a whole recorded reason.
MAX_TEXT_CHARS = 200
MAX_REASON_CHARS = 1000
# at most this many names are listed in a reason (missing/extra arrays, records)
MAX_LISTED = 10


def bounded(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` if it has at most ``limit`` characters; else its first ``limit``
    characters and ``... [truncated, N chars]`` with its full length ``N``."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [truncated, {len(text)} chars]"


def shown(value: object, limit: int = MAX_TEXT_CHARS) -> str:
    """``repr(value)``, :func:`bounded`; a long list or tuple is cut before its repr
    is built, so the cost is bounded too."""
    if isinstance(value, list | tuple) and len(value) > limit:
        head = repr(type(value)(value[:limit]))
        return f"{head[:limit]}... [truncated, {len(value)} items]"
    return bounded(repr(value), limit)


def _listed(names: list[str]) -> str:
    """A list of names for a reason: at most :data:`MAX_LISTED`, each bounded."""
    text = "[" + ", ".join(shown(n) for n in names[:MAX_LISTED])
    more = len(names) - MAX_LISTED
    return text + (f", ... and {more} more]" if more > 0 else "]")


class RejectedReply(ValueError):
    """A reply broke the reply contract; ``str(exc)`` is the reason recorded
    (bounded to :data:`MAX_REASON_CHARS`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(bounded(reason, MAX_REASON_CHARS))


def failure_reason(exc: BaseException) -> str:
    """The bounded reason recorded for a reply whose checking or decoding raised
    ``exc``: a :class:`RejectedReply`'s own text; otherwise ``undecodable update
    (<exception type>): <message>``."""
    if isinstance(exc, RejectedReply):
        return str(exc)
    try:
        text = str(exc)
    except Exception:  # an exception whose str() fails still names its type
        text = "<message unavailable>"
    return bounded(f"undecodable update ({type(exc).__name__}): {bounded(text)}", MAX_REASON_CHARS)


def _value_nbytes(value: object) -> int:
    if isinstance(value, bytes | str):
        return len(value)
    if isinstance(value, list):
        if value and isinstance(value[0], bytes | str):
            return sum(len(v) for v in value)
        return NUMBER_BYTES * len(value)
    return NUMBER_BYTES


def _array_nbytes(array: Array) -> int:
    """An array's payload, dtype and stype by length, each dimension as a number."""
    return (
        len(array.data)
        + len(str(array.dtype))
        + len(str(array.stype))
        + NUMBER_BYTES * len(array.shape)
    )


def reply_nbytes(content: RecordDict) -> int:
    """Bytes a reply's content holds: every record's name; every array's name,
    payload, dtype and stype (by length) and shape (:data:`NUMBER_BYTES` per
    dimension); every metric/config record's keys and values (strings and bytes by
    length, numbers :data:`NUMBER_BYTES` each). Reads lengths only; decodes nothing."""
    total = 0
    for name, record in content.array_records.items():
        total += len(name) + sum(len(k) + _array_nbytes(a) for k, a in record.items())
    for records in (content.metric_records, content.config_records):
        for name, record in records.items():
            total += len(name)
            for key, value in record.items():
                total += len(key) + _value_nbytes(value)
    return total


def message_nbytes(msg: Message) -> int:
    """Bytes of the whole reply: its metadata (strings by length, numbers
    :data:`NUMBER_BYTES` each), its error (code and reason) or its content
    (:func:`reply_nbytes`)."""
    total = sum(_value_nbytes(v) for v in msg.metadata.__dict__.values() if v is not None)
    if msg.has_error():
        return total + NUMBER_BYTES + len(msg.error.reason or "")
    return total + reply_nbytes(msg.content)


def _type_name(value: object) -> str:
    return type(value).__name__


def check_metrics(metrics: MetricRecord) -> None:
    """Raise :class:`RejectedReply` unless ``metrics`` follows the metrics contract
    (``num-examples`` in range; each known key of its type and finite)."""
    if protocol.NUM_EXAMPLES not in metrics:
        raise RejectedReply("metric 'num-examples' is missing")
    num_examples = metrics[protocol.NUM_EXAMPLES]
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer):
        raise RejectedReply(
            f"metric 'num-examples' must be an integer, got {shown(num_examples)} "
            f"({_type_name(num_examples)})"
        )
    if not 1 <= int(num_examples) <= protocol.MAX_NUM_EXAMPLES:
        raise RejectedReply(
            f"metric 'num-examples' is {num_examples}; allowed: 1..{protocol.MAX_NUM_EXAMPLES}"
        )
    for key, value in metrics.items():
        kind = protocol.METRIC_TYPES.get(key)
        if kind is None:
            continue
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise RejectedReply(
                    f"metric {key!r} must be an integer, got {shown(value)} ({_type_name(value)})"
                )
        elif isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise RejectedReply(
                f"metric {key!r} must be a float, got {shown(value)} ({_type_name(value)})"
            )
        elif not math.isfinite(value) and not (
            key in protocol.MAY_BE_INFINITE and value == math.inf
        ):
            allowed = (
                "a finite float or +inf" if key in protocol.MAY_BE_INFINITE else "a finite float"
            )
            raise RejectedReply(f"metric {key!r} is {value!r}; allowed: {allowed}")


def _check_records(content: RecordDict, *, arrays: bool = True) -> None:
    """Exactly ArrayRecord 'arrays' (unless ``arrays`` is false: evaluation replies)
    and MetricRecord 'metrics', nothing else."""
    kinds = {
        **{k: "ArrayRecord" for k in content.array_records},
        **{k: "MetricRecord" for k in content.metric_records},
        **{k: "ConfigRecord" for k in content.config_records},
    }
    wanted = [(protocol.ARRAYS, "ArrayRecord")] if arrays else []
    wanted.append((protocol.METRICS, "MetricRecord"))
    if not kinds:
        expected_text = " and ".join(f"{kind} {key!r}" for key, kind in wanted)
        raise RejectedReply(f"empty reply: no records (expected {expected_text})")
    problems = []
    for key, expected in wanted:
        got = kinds.pop(key, None)
        if got is None:
            problems.append(f"missing {expected} {key!r}")
        elif got != expected:
            problems.append(f"{key!r} is a {got}, expected a {expected}")
    if kinds:
        extra = sorted(kinds.items())
        listed = ", ".join(f"{kind} {shown(key)}" for key, kind in extra[:MAX_LISTED])
        more = f", ... and {len(extra) - MAX_LISTED} more" if len(extra) > MAX_LISTED else ""
        problems.append(f"unexpected records: {listed}{more}")
    if problems:
        expected_text = " and ".join(f"{kind} {key!r}" for key, kind in wanted)
        raise RejectedReply(f"records must be exactly {expected_text}: " + "; ".join(problems))


def _check_payload(array: Array, slot: ArraySlot) -> None:
    """The ``.npy`` header of ``array.data`` agrees with ``slot`` and the payload
    length matches it exactly (header parsing only; nothing is copied)."""
    data = array.data
    where = f"undecodable array {slot.name!r}"
    try:
        head = read_npy_header(data)
    except UnsupportedNpyVersion as exc:
        raise RejectedReply(f"{where}: {exc}") from None
    except NpyHeaderError as exc:
        raise RejectedReply(f"{where}: payload is not a .npy array ({exc})") from None
    shape, dtype = head.shape, head.dtype
    if dtype.hasobject:
        raise RejectedReply(
            f"{where}: the .npy payload holds Python objects (a pickle); not allowed"
        )
    if shape != slot.shape or dtype != np.dtype(slot.dtype):
        said = str(dtype) if dtype.isnative else dtype.str  # '>f4' is "float32" too
        raise RejectedReply(
            f"{where}: .npy header says {said}{list(shape)}, "
            f"metadata says {slot.dtype}{list(slot.shape)}"
        )
    have, need = len(data) - head.offset, head.data_bytes
    if have != need:
        raise RejectedReply(
            f"{where}: payload holds {have} data bytes, {slot.dtype}{list(slot.shape)} needs {need}"
        )


def _check_arrays(content: RecordDict, layout: ModelLayout) -> None:
    arrays = content.array_records[protocol.ARRAYS]
    expected = [slot.name for slot in layout.slots]
    if list(arrays.keys()) != expected:
        missing = [k for k in expected if k not in arrays]
        extra = [k for k in arrays if k not in expected]
        raise RejectedReply(
            f"array names differ from the global model: missing {_listed(missing)}, "
            f"extra {_listed(extra)}"
            + ("" if missing or extra else f", order differs (expected {_listed(expected)})")
        )
    for slot in layout.slots:
        array = arrays[slot.name]
        if array.stype != NUMPY_STYPE:
            raise RejectedReply(
                f"array {slot.name!r} has serialization type {shown(array.stype)}; "
                f"allowed: {NUMPY_STYPE!r}"
            )
        if tuple(array.shape) != slot.shape:
            raise RejectedReply(
                f"array {slot.name!r} has shape {bounded(str(tuple(array.shape)))}, "
                f"expected {slot.shape}"
            )
        if str(array.dtype) != slot.dtype:
            raise RejectedReply(
                f"array {slot.name!r} has dtype {bounded(str(array.dtype))}, expected {slot.dtype}"
            )
        _check_payload(array, slot)


def _check_size_and_error(msg: Message, max_reply_bytes: int) -> None:
    """Rules 1 and 2: the whole reply within ``max_reply_bytes`` (0: no limit), and
    not an error reply."""
    if max_reply_bytes > 0:
        size = message_nbytes(msg)
        if size > max_reply_bytes:
            raise RejectedReply(
                f"reply holds {size} bytes, exceeds max-reply-bytes {max_reply_bytes}"
            )
    if msg.has_error():
        raise RejectedReply(
            f"error reply (code {msg.error.code}): {bounded(str(msg.error.reason))}"
        )


def check_train_reply(msg: Message, layout: ModelLayout, *, max_reply_bytes: int = 0) -> None:
    """Raise :class:`RejectedReply` unless ``msg`` is a well-formed training reply.

    The rules and their order are in this module's docstring (identity is checked
    by the caller's :class:`ReplyLedger`); ``max_reply_bytes`` (0: no limit) is the
    run-config key ``max-reply-bytes``. Cost: lengths, record keys and ``.npy``
    headers only; no array payload is copied or decoded.
    """
    _check_size_and_error(msg, max_reply_bytes)
    content = msg.content
    _check_records(content)
    _check_arrays(content, layout)
    check_metrics(content.metric_records[protocol.METRICS])


def check_evaluate_reply(msg: Message, *, max_reply_bytes: int = 0) -> tuple[float, float]:
    """``(eval-loss, eval-accuracy)`` of a well-formed evaluation reply, or raise
    :class:`RejectedReply`: size and error as for training; exactly MetricRecord
    ``metrics``; the metrics contract (:func:`check_metrics`: ``num-examples`` in
    range, every value finite); ``eval-loss`` and ``eval-accuracy`` present, and the
    accuracy in [0, 1]."""
    _check_size_and_error(msg, max_reply_bytes)
    _check_records(msg.content, arrays=False)
    metrics = msg.content.metric_records[protocol.METRICS]
    check_metrics(metrics)
    for key in (protocol.EVAL_LOSS, protocol.EVAL_ACCURACY):
        if key not in metrics:
            raise RejectedReply(f"metric {key!r} is missing")
    loss = float(metrics[protocol.EVAL_LOSS])  # type: ignore[arg-type]
    accuracy = float(metrics[protocol.EVAL_ACCURACY])  # type: ignore[arg-type]
    if not 0.0 <= accuracy <= 1.0:
        raise RejectedReply(f"metric 'eval-accuracy' is {accuracy!r}; allowed: 0..1")
    return loss, accuracy


@dataclass
class ReplyLedger:
    """Which node each message of a round went to, and which nodes have replied.

    Flower's SuperLink already refuses a second reply to a message, a reply from a
    node that was not sent one and a reply to an earlier round's message; the
    strategy checks the same itself (:meth:`admit`), so its correctness does not
    rest on the transport.
    """

    sent: dict[str, int] = field(default_factory=dict)  # message id -> destination node
    replied: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, messages: Iterable[Message]) -> ReplyLedger:
        """A ledger of ``messages`` (their ids as set when they were pushed)."""
        return cls({m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages})

    def admit(self, msg: Message) -> None:
        """Record ``msg`` as its node's reply, or raise :class:`RejectedReply` when it
        answers no message sent this round, comes from another node than the one the
        message went to, or is not its node's first reply this round."""
        answers, node = msg.metadata.reply_to_message_id, int(msg.metadata.src_node_id)
        if not answers or answers not in self.sent:
            raise RejectedReply(f"reply to message {shown(answers)}, which was not sent this round")
        if self.sent[answers] != node:
            raise RejectedReply(
                f"reply from node {node} to a message sent to node {self.sent[answers]}"
            )
        if node in self.replied:
            raise RejectedReply(f"node {node} already replied this round; one reply per node")
        self.replied.add(node)
