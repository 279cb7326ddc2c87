"""Checks one client reply on its own, so one bad reply never fails a round.

Flower's stock strategies check that all replies *agree with each other* and
reject the whole round when they do not (``InconsistentMessageReplies``); a
single Byzantine client can therefore stop training. Here each reply is checked
against the global model's :class:`~strategies.layout.ModelLayout` and a fixed
reply contract, and a bad reply is dropped with a human-readable reason.

The contract, in the order it is checked (the first broken rule is the reason):

1. not an error reply;
2. size: the reply's array payloads and record values hold at most
   ``max-reply-bytes`` bytes (counted from lengths, before anything is decoded);
3. records: exactly one ``ArrayRecord`` ``"arrays"`` and one ``MetricRecord``
   ``"metrics"``, nothing else;
4. arrays: the global model's names in its order; each array with serialisation
   type ``numpy.ndarray`` and the model's shape and dtype, and a ``.npy`` payload
   whose header agrees with that metadata and whose length matches it exactly
   (read from the header only: no array is copied or decoded here);
5. metrics: ``num-examples`` an integer in ``1..10^9``; every key of
   :data:`METRIC_TYPES` that is present has its type (an ``int`` key an integer; a
   ``float`` key any number) and, if a float, is finite (``dp-epsilon`` may be
   ``+inf``: DP-SGD without noise). Keys not in :data:`METRIC_TYPES` are ignored
   (the strategy never reads them); their bytes count towards the size limit.

Finiteness of the update values and ``max-update-norm`` are checked by the
strategy after decoding, where the numbers are at hand (the row norms).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, Message, MetricRecord, RecordDict

from strategies.layout import ArraySlot, ModelLayout, UnsupportedNpyVersion, read_npy_header

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
MAX_NUM_EXAMPLES = 10**9
NUMPY_STYPE = "numpy.ndarray"
# defaults of the run-config keys max-reply-bytes and max-update-norm (bastion.config)
DEFAULT_MAX_REPLY_BYTES = 256 * 2**20
DEFAULT_MAX_UPDATE_NORM = 1e6

# Every metric key a Bastion ClientApp sends (client.app, client.privacy,
# client.malicious) and its type; see the module docstring for the rules.
METRIC_TYPES: Mapping[str, type] = {
    "num-examples": int,
    "train-loss": float,
    "train-seconds": float,
    "steps": int,
    "partition-id": int,
    "dp-epsilon": float,
    "dp-delta": float,
    "dp-noise-multiplier": float,
    "dp-sample-rate": float,
    "dp-rounds": int,
    "malicious": int,
    "known-rows": int,
    "colluders-seen": int,
}
# float metrics that may be +inf (never NaN): epsilon of DP-SGD without noise
MAY_BE_INFINITE = frozenset({"dp-epsilon"})
# bytes counted for one number in a MetricRecord or ConfigRecord (protobuf: <= 10)
NUMBER_BYTES = 8


class RejectedReply(ValueError):
    """A reply broke the reply contract; ``str(exc)`` is the reason recorded."""


def _value_nbytes(value: object) -> int:
    if isinstance(value, bytes | str):
        return len(value)
    if isinstance(value, list):
        if value and isinstance(value[0], bytes | str):
            return sum(len(v) for v in value)
        return NUMBER_BYTES * len(value)
    return NUMBER_BYTES


def reply_nbytes(content: RecordDict) -> int:
    """Bytes a reply's content holds: every array's payload length, and every
    metric/config record's keys and values (strings and bytes by length, numbers
    :data:`NUMBER_BYTES` each). Reads lengths only; decodes nothing."""
    total = 0
    for record in content.array_records.values():
        for key, array in record.items():
            total += len(key) + len(array.data)
    for records in (content.metric_records, content.config_records):
        for record in records.values():
            for key, value in record.items():
                total += len(key) + _value_nbytes(value)
    return total


def _type_name(value: object) -> str:
    return type(value).__name__


def check_metrics(metrics: MetricRecord) -> None:
    """Raise :class:`RejectedReply` unless ``metrics`` follows the metrics contract
    (``num-examples`` in range; each known key of its type and finite)."""
    if "num-examples" not in metrics:
        raise RejectedReply("metric 'num-examples' is missing")
    num_examples = metrics["num-examples"]
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer):
        raise RejectedReply(
            f"metric 'num-examples' must be an integer, got {num_examples!r} "
            f"({_type_name(num_examples)})"
        )
    if not 1 <= int(num_examples) <= MAX_NUM_EXAMPLES:
        raise RejectedReply(
            f"metric 'num-examples' is {num_examples}; allowed: 1..{MAX_NUM_EXAMPLES}"
        )
    for key, value in metrics.items():
        kind = METRIC_TYPES.get(key)
        if kind is None:
            continue
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise RejectedReply(
                    f"metric {key!r} must be an integer, got {value!r} ({_type_name(value)})"
                )
        elif isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise RejectedReply(
                f"metric {key!r} must be a float, got {value!r} ({_type_name(value)})"
            )
        elif not math.isfinite(value) and not (key in MAY_BE_INFINITE and value == math.inf):
            allowed = "a finite float or +inf" if key in MAY_BE_INFINITE else "a finite float"
            raise RejectedReply(f"metric {key!r} is {value!r}; allowed: {allowed}")


def _check_records(content: RecordDict) -> None:
    """Exactly ArrayRecord 'arrays' and MetricRecord 'metrics', nothing else."""
    kinds = {
        **{k: "ArrayRecord" for k in content.array_records},
        **{k: "MetricRecord" for k in content.metric_records},
        **{k: "ConfigRecord" for k in content.config_records},
    }
    if not kinds:
        raise RejectedReply(
            f"empty reply: no records (expected ArrayRecord {ARRAYS_KEY!r} and "
            f"MetricRecord {METRICS_KEY!r})"
        )
    problems = []
    for key, expected in ((ARRAYS_KEY, "ArrayRecord"), (METRICS_KEY, "MetricRecord")):
        got = kinds.pop(key, None)
        if got is None:
            problems.append(f"missing {expected} {key!r}")
        elif got != expected:
            problems.append(f"{key!r} is a {got}, expected a {expected}")
    if kinds:
        extra = ", ".join(f"{kind} {key!r}" for key, kind in sorted(kinds.items()))
        problems.append(f"unexpected records: {extra}")
    if problems:
        raise RejectedReply(
            "records must be exactly ArrayRecord 'arrays' and MetricRecord 'metrics': "
            + "; ".join(problems)
        )


def _check_payload(array: Array, slot: ArraySlot) -> None:
    """The ``.npy`` header of ``array.data`` agrees with ``slot`` and the payload
    length matches it exactly (header parsing only; nothing is copied)."""
    data = array.data
    where = f"undecodable array {slot.name!r}"
    try:
        head = read_npy_header(data)
    except UnsupportedNpyVersion as exc:
        raise RejectedReply(f"{where}: {exc}") from None
    except (ValueError, TypeError, SyntaxError) as exc:
        raise RejectedReply(f"{where}: payload is not a .npy array ({exc})") from None
    shape, dtype = head.shape, head.dtype
    if dtype.hasobject:
        raise RejectedReply(
            f"{where}: the .npy payload holds Python objects (a pickle); not allowed"
        )
    if tuple(shape) != slot.shape or str(dtype) != slot.dtype:
        raise RejectedReply(
            f"{where}: .npy header says {dtype}{list(shape)}, "
            f"metadata says {slot.dtype}{list(slot.shape)}"
        )
    have, need = len(data) - head.offset, head.data_bytes
    if have != need:
        raise RejectedReply(
            f"{where}: payload holds {have} data bytes, {slot.dtype}{list(slot.shape)} needs {need}"
        )


def _check_arrays(content: RecordDict, layout: ModelLayout) -> None:
    arrays = content.array_records[ARRAYS_KEY]
    expected = [slot.name for slot in layout.slots]
    if list(arrays.keys()) != expected:
        missing = [k for k in expected if k not in arrays]
        extra = [k for k in arrays if k not in expected]
        raise RejectedReply(
            f"array names differ from the global model: missing {missing}, extra {extra}"
            + ("" if missing or extra else f", order differs (expected {expected})")
        )
    for slot in layout.slots:
        array = arrays[slot.name]
        if array.stype != NUMPY_STYPE:
            raise RejectedReply(
                f"array {slot.name!r} has serialization type {array.stype!r}; "
                f"allowed: {NUMPY_STYPE!r}"
            )
        if tuple(array.shape) != slot.shape:
            raise RejectedReply(
                f"array {slot.name!r} has shape {tuple(array.shape)}, expected {slot.shape}"
            )
        if str(array.dtype) != slot.dtype:
            raise RejectedReply(
                f"array {slot.name!r} has dtype {array.dtype}, expected {slot.dtype}"
            )
        _check_payload(array, slot)


def check_train_reply(msg: Message, layout: ModelLayout, *, max_reply_bytes: int = 0) -> None:
    """Raise :class:`RejectedReply` unless ``msg`` is a well-formed training reply.

    The rules and their order are in this module's docstring; ``max_reply_bytes``
    (0: no limit) is the run-config key ``max-reply-bytes``. Cost: lengths, record
    keys and ``.npy`` headers only; no array payload is copied or decoded.
    """
    if msg.has_error():
        raise RejectedReply(f"error reply (code {msg.error.code}): {msg.error.reason}")
    content = msg.content
    if max_reply_bytes > 0:
        size = reply_nbytes(content)
        if size > max_reply_bytes:
            raise RejectedReply(
                f"reply holds {size} bytes, exceeds max-reply-bytes {max_reply_bytes}"
            )
    _check_records(content)
    _check_arrays(content, layout)
    check_metrics(content.metric_records[METRICS_KEY])
