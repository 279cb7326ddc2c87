"""Checks one client reply on its own, so one bad reply never fails a round.

Flower's stock strategies check that all replies *agree with each other* and
reject the whole round when they do not (``InconsistentMessageReplies``); a
single Byzantine client can therefore stop training. Here each reply is checked
against the global model's :class:`~strategies.layout.ModelLayout` and a fixed
reply contract, and a bad reply is dropped with a human-readable reason.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Message

from strategies.layout import ModelLayout

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
MAX_NUM_EXAMPLES = 10**9


class RejectedReply(ValueError):
    """A reply broke the reply contract; ``str(exc)`` is the reason recorded."""


def _record_keys(content: object, attr: str) -> set[str]:
    return set(getattr(content, attr).keys())


def check_train_reply(msg: Message, layout: ModelLayout) -> None:
    """Raise :class:`RejectedReply` unless ``msg`` is a well-formed training reply.

    Well-formed: not an error reply; exactly one ``ArrayRecord`` named ``arrays``
    and one ``MetricRecord`` named ``metrics`` and nothing else; the arrays have
    exactly the global model's names, shapes and dtypes; ``num-examples`` is an
    integer in ``1..10^9``. Finiteness of the values is checked after decoding,
    where the numbers are at hand (the strategy's row norms).
    """
    if msg.has_error():
        raise RejectedReply(f"error reply (code {msg.error.code}): {msg.error.reason}")
    content = msg.content
    arrays_keys = _record_keys(content, "array_records")
    metrics_keys = _record_keys(content, "metric_records")
    config_keys = _record_keys(content, "config_records")
    if arrays_keys != {ARRAYS_KEY} or metrics_keys != {METRICS_KEY} or config_keys:
        raise RejectedReply(
            f"records must be exactly ArrayRecord {ARRAYS_KEY!r} and MetricRecord "
            f"{METRICS_KEY!r}; got array records {sorted(arrays_keys)}, metric records "
            f"{sorted(metrics_keys)}, config records {sorted(config_keys)}"
        )
    arrays = content.array_records[ARRAYS_KEY]
    expected = [slot.name for slot in layout.slots]
    if list(arrays.keys()) != expected:
        missing = sorted(set(expected) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(expected))
        raise RejectedReply(
            f"array names differ from the global model: missing {missing}, extra {extra}"
            + ("" if missing or extra else ", order differs")
        )
    for slot in layout.slots:
        array = arrays[slot.name]
        if tuple(array.shape) != slot.shape:
            raise RejectedReply(
                f"array {slot.name!r} has shape {tuple(array.shape)}, expected {slot.shape}"
            )
        if str(array.dtype) != slot.dtype:
            raise RejectedReply(
                f"array {slot.name!r} has dtype {array.dtype}, expected {slot.dtype}"
            )
    metrics = content.metric_records[METRICS_KEY]
    num_examples = metrics.get("num-examples")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer):
        raise RejectedReply(f"metric 'num-examples' must be an integer, got {num_examples!r}")
    if not 1 <= int(num_examples) <= MAX_NUM_EXAMPLES:
        raise RejectedReply(
            f"metric 'num-examples' is {num_examples}; allowed: 1..{MAX_NUM_EXAMPLES}"
        )
