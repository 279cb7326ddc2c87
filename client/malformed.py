"""A corpus of malformed training replies, and the node that sends them.

Each kind in :data:`MALFORMED_KINDS` is one way a broken or hostile ClientApp can
answer a ``train`` message: values that are not finite or absurdly large, arrays
of the wrong shape, dtype, name, order or serialisation, payload bytes that
contradict their metadata, records missing or added, metrics of the wrong type or
range, an error reply instead of content, and a payload over the server's
``max-reply-bytes``. :func:`malformed_reply` turns an honest reply into one of
them (pure: the honest reply is not modified). The server must reject every one
with a reason and go on (:mod:`strategies.validation`, ``docs/RELIABILITY.md``).

A SuperNode whose node config says ``role = "malformed"`` runs this: it trains
exactly like an honest node (so the broken reply is built from a realistic one),
then replaces its reply with kind :func:`kind_for_round` of its list
(``malformed-kinds``, comma-separated; default: the whole corpus in corpus
order). The rule, with ``K`` kinds and ``H = ceil(K / 2)``::

    kind index in round r = (r - 1 + partition-id * H) mod K

so two malformed nodes with consecutive partition ids send, between them, every
kind once in the first ``H`` rounds. The node logs the kind it sends (ground truth
for tests and experiments, never read by the server).

A SuperNode with ``role = "fuzz"`` sends, every round, its honest reply with one
array's ``.npy`` header mutated at the byte level (:func:`mutate_npy`, seeded by
round and partition; :func:`fuzzed_node_reply`). Header mutations only: whatever
the server accepts of them carries the honest values, so a fuzz node does not
poison the model when the server is right; the unit fuzz test mutates payloads too.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import log

from common import protocol
from common.config import ConfigError

# how far over max-reply-bytes the oversized kinds go; and their size without a limit
OVERSIZE_MARGIN = 1024
UNLIMITED_OVERSIZE = 4 * 2**20
HUGE_NORM = 1e30
HUGE_VALUE = 1e18


class MalformedNodeError(RuntimeError):
    """Raised by the ``error-reply`` kind: Flower turns it into an error reply."""


@dataclass(frozen=True)
class MalformedKind:
    """One kind of malformed reply: its name and what the node sends."""

    name: str
    description: str


def _kinds(*pairs: tuple[str, str]) -> tuple[MalformedKind, ...]:
    return tuple(MalformedKind(name, text) for name, text in pairs)


MALFORMED_KINDS: tuple[MalformedKind, ...] = _kinds(
    # values
    ("nan", "one value of the first array is NaN"),
    ("pos-inf", "one value of the first array is +Inf"),
    ("neg-inf", "one value of the first array is -Inf"),
    ("huge-norm", "the whole reply scaled to L2 norm 1e30 (every value finite in float32)"),
    ("huge-values", "every value is 1e18 (finite in float32; the norm overflows float32)"),
    # array metadata
    ("wrong-shape", "the first array has one extra row"),
    ("reshaped", "the first array flattened to 1-D (same values, another shape)"),
    ("scalar-array", "the first array replaced by a 0-d array (one value)"),
    ("dtype-float64", "every array sent as float64 instead of float32"),
    ("dtype-int", "the first array cast to int32"),
    ("missing-array", "the last array is left out"),
    ("extra-array", "an additional array 'extra' next to the model's"),
    ("renamed-array", "the first array under another name (key mismatch)"),
    ("reordered-arrays", "the model's arrays in reverse order"),
    ("sparse-stype", "the first array claims serialisation type 'torch.sparse_coo'"),
    # array payloads (the bytes contradict the metadata)
    ("truncated-bytes", "the first array's .npy payload is 4 bytes short"),
    ("garbage-bytes", "the first array's payload is random bytes, not .npy"),
    ("header-mismatch", "metadata says float32, the .npy payload holds float64"),
    ("object-array", "the .npy payload is a pickled object array (metadata says float32)"),
    # records
    ("empty-reply", "a reply with no records at all"),
    ("error-reply", "the ClientApp raises; Flower sends an error reply (code 2)"),
    ("arrays-renamed", "the ArrayRecord is named 'weights' instead of 'arrays'"),
    ("extra-array-record", "a second ArrayRecord 'extra' next to 'arrays'"),
    ("extra-config-record", "an additional ConfigRecord 'config'"),
    ("extra-metric-record", "an additional MetricRecord 'extra-metrics'"),
    ("metrics-missing", "no MetricRecord 'metrics'"),
    ("metrics-as-config", "the metrics sent as a ConfigRecord 'metrics'"),
    # metrics
    ("num-examples-negative", "num-examples is minus the true count"),
    ("num-examples-zero", "num-examples is 0"),
    ("num-examples-huge", "num-examples is 10^12"),
    ("num-examples-float", "num-examples is a float (the true count as float)"),
    ("num-examples-missing", "num-examples is left out"),
    ("train-loss-list", "train-loss is a list of two floats"),
    ("train-loss-nan", "train-loss is NaN"),
    ("partition-id-float", "partition-id is a float"),
    # size
    ("oversized-array", "the right arrays, one padded past max-reply-bytes"),
    ("oversized-record", "an extra ArrayRecord holding more than max-reply-bytes"),
)
KIND_NAMES: tuple[str, ...] = tuple(k.name for k in MALFORMED_KINDS)


# ------------------------------------------------------------------ helpers
def _arrays(honest: RecordDict) -> OrderedDict[str, Array]:
    return OrderedDict(honest.array_records[protocol.ARRAYS].items())


def _metrics(honest: RecordDict) -> dict[str, object]:
    return dict(honest.metric_records[protocol.METRICS].items())


def _reply(
    honest: RecordDict,
    arrays: OrderedDict[str, Array] | None = None,
    metrics: dict[str, object] | None = None,
    **extra: ArrayRecord | ConfigRecord | MetricRecord,
) -> RecordDict:
    """A reply with ``honest``'s arrays and metrics unless replaced, plus ``extra``."""
    return RecordDict(
        {
            protocol.ARRAYS: ArrayRecord(_arrays(honest) if arrays is None else arrays),
            protocol.METRICS: MetricRecord(_metrics(honest) if metrics is None else metrics),  # type: ignore[arg-type]
        }
        | extra
    )


def _first(honest: RecordDict) -> tuple[str, Array]:
    return next(iter(_arrays(honest).items()))


def _first_values(honest: RecordDict) -> np.ndarray:
    return np.array(_first(honest)[1].numpy())  # a writable copy


def _replace_first(honest: RecordDict, array: Array, name: str | None = None) -> RecordDict:
    """``honest`` with its first array replaced by ``array`` (under ``name``, if given,
    at the same position)."""
    first = _first(honest)[0]
    arrays = OrderedDict(
        ((name or k, array) if k == first else (k, v)) for k, v in _arrays(honest).items()
    )
    return _reply(honest, arrays)


def _with_value(honest: RecordDict, value: float) -> RecordDict:
    values = _first_values(honest)
    values.reshape(-1)[0] = value
    return _replace_first(honest, Array(values))


def _with_metrics(honest: RecordDict, **changes: object) -> RecordDict:
    """``honest`` with metrics changed (``key_name`` means ``key-name``; None deletes)."""
    metrics = _metrics(honest)
    for key, value in changes.items():
        if value is None:
            metrics.pop(key.replace("_", "-"), None)
        else:
            metrics[key.replace("_", "-")] = value
    return _reply(honest, metrics=metrics)


def _num_examples(honest: RecordDict) -> int:
    value = _metrics(honest).get(protocol.NUM_EXAMPLES)
    return value if isinstance(value, int) and value > 0 else 1


def _each_array(honest: RecordDict, fn: Callable[[np.ndarray], np.ndarray]) -> RecordDict:
    return _reply(
        honest, OrderedDict((k, Array(fn(a.numpy()))) for k, a in _arrays(honest).items())
    )


def _scaled(honest: RecordDict, norm: float) -> RecordDict:
    """Every array multiplied by one factor so that the reply's L2 norm is ``norm``
    (all ones scaled, for an all-zero model)."""
    values = {k: a.numpy().astype(np.float64) for k, a in _arrays(honest).items()}
    total = math.sqrt(sum(float(np.sum(v * v)) for v in values.values()))
    if total == 0.0:
        values = {k: np.ones_like(v) for k, v in values.items()}
        total = math.sqrt(sum(v.size for v in values.values()))
    return _reply(
        honest,
        OrderedDict(
            (k, Array((values[k] * (norm / total)).astype(a.dtype)))
            for k, a in _arrays(honest).items()
        ),
    )


def _payload(honest: RecordDict, data: bytes, stype: str | None = None) -> RecordDict:
    """The first array's metadata kept, its payload bytes (or stype) replaced."""
    old = _first(honest)[1]
    forged = Array(dtype=old.dtype, shape=tuple(old.shape), stype=stype or old.stype, data=data)
    return _replace_first(honest, forged)


def _object_npy(values: np.ndarray) -> bytes:
    """A ``.npy`` payload of dtype object: a pickle, which a server must never load."""
    buffer = io.BytesIO()
    np.save(buffer, values.astype(object), allow_pickle=True)
    return buffer.getvalue()


def _array_bytes(content: RecordDict) -> int:
    return sum(len(a.data) for rec in content.array_records.values() for a in rec.values())


def _oversize_target(max_reply_bytes: int) -> int:
    return max_reply_bytes + OVERSIZE_MARGIN if max_reply_bytes > 0 else UNLIMITED_OVERSIZE


def _oversized_array(honest: RecordDict, max_reply_bytes: int) -> RecordDict:
    """The honest arrays with zero bytes appended to the first one's payload until
    the reply's arrays exceed the limit (metadata unchanged)."""
    pad = max(_oversize_target(max_reply_bytes) - _array_bytes(honest), 1)
    return _payload(honest, _first(honest)[1].data + bytes(pad))


def _oversized_record(honest: RecordDict, max_reply_bytes: int) -> RecordDict:
    """The honest reply plus an ArrayRecord whose one array alone exceeds the limit."""
    padding = np.zeros(_oversize_target(max_reply_bytes), dtype=np.uint8)
    return _reply(honest, padding=ArrayRecord(OrderedDict(padding=Array(padding))))


def _one_more_row(values: np.ndarray) -> np.ndarray:
    values = np.atleast_1d(values)
    return np.concatenate([values, values[:1]])


def _error(_: RecordDict) -> RecordDict:
    raise MalformedNodeError("malformed node: kind 'error-reply' raises on purpose")


def _builders(max_reply_bytes: int) -> dict[str, Callable[[RecordDict], RecordDict]]:
    """Kind name -> function from the honest reply content to the malformed one."""
    first, values = _first, _first_values
    return {
        "nan": lambda h: _with_value(h, math.nan),
        "pos-inf": lambda h: _with_value(h, math.inf),
        "neg-inf": lambda h: _with_value(h, -math.inf),
        "huge-norm": lambda h: _scaled(h, HUGE_NORM),
        "huge-values": lambda h: _each_array(h, lambda a: np.full_like(a, HUGE_VALUE)),
        "wrong-shape": lambda h: _replace_first(h, Array(_one_more_row(values(h)))),
        "reshaped": lambda h: _replace_first(h, Array(values(h).reshape(1, -1))),
        "scalar-array": lambda h: _replace_first(h, Array(np.array(values(h).reshape(-1)[0]))),
        "dtype-float64": lambda h: _each_array(h, lambda a: a.astype(np.float64)),
        "dtype-int": lambda h: _replace_first(h, Array(np.rint(values(h)).astype(np.int32))),
        "missing-array": lambda h: _reply(h, OrderedDict(list(_arrays(h).items())[:-1])),
        "extra-array": lambda h: _reply(h, _arrays(h) | {"extra": Array(np.zeros(3, np.float32))}),
        "renamed-array": lambda h: _replace_first(h, first(h)[1], name=first(h)[0] + "-renamed"),
        "reordered-arrays": lambda h: _reply(h, OrderedDict(reversed(_arrays(h).items()))),
        "sparse-stype": lambda h: _payload(h, first(h)[1].data, stype="torch.sparse_coo"),
        "truncated-bytes": lambda h: _payload(h, first(h)[1].data[:-4]),
        "garbage-bytes": lambda h: _payload(
            h, np.random.default_rng(0).bytes(len(first(h)[1].data))
        ),
        "header-mismatch": lambda h: _payload(h, Array(values(h).astype(np.float64)).data),
        "object-array": lambda h: _payload(h, _object_npy(values(h))),
        "empty-reply": lambda h: RecordDict(),
        "error-reply": _error,
        "arrays-renamed": lambda h: RecordDict(
            {
                "weights": ArrayRecord(_arrays(h)),
                protocol.METRICS: h.metric_records[protocol.METRICS],
            }
        ),
        "extra-array-record": lambda h: _reply(
            h, extra=ArrayRecord(OrderedDict(x=Array(np.zeros(3, np.float32))))
        ),
        "extra-config-record": lambda h: _reply(
            h, config=ConfigRecord({"note": "not part of the reply contract"})
        ),
        "extra-metric-record": lambda h: _reply(h, **{"extra-metrics": MetricRecord({"x": 1.0})}),
        "metrics-missing": lambda h: RecordDict({protocol.ARRAYS: ArrayRecord(_arrays(h))}),
        "metrics-as-config": lambda h: RecordDict(
            {protocol.ARRAYS: ArrayRecord(_arrays(h)), protocol.METRICS: ConfigRecord(_metrics(h))}  # type: ignore[arg-type]
        ),
        "num-examples-negative": lambda h: _with_metrics(h, num_examples=-_num_examples(h)),
        "num-examples-zero": lambda h: _with_metrics(h, num_examples=0),
        "num-examples-huge": lambda h: _with_metrics(h, num_examples=10**12),
        "num-examples-float": lambda h: _with_metrics(h, num_examples=float(_num_examples(h))),
        "num-examples-missing": lambda h: _with_metrics(h, num_examples=None),
        "train-loss-list": lambda h: _with_metrics(h, train_loss=[0.5, 0.5]),
        "train-loss-nan": lambda h: _with_metrics(h, train_loss=math.nan),
        "partition-id-float": lambda h: _with_metrics(
            h,
            partition_id=float(_metrics(h).get(protocol.PARTITION_ID, 0)),  # type: ignore[arg-type]
        ),
        "oversized-array": lambda h: _oversized_array(h, max_reply_bytes),
        "oversized-record": lambda h: _oversized_record(h, max_reply_bytes),
    }


# ------------------------------------------------------------------ byte-level fuzzing
# bytes that matter to a .npy header's dict literal and to Python's tokenizer
FUZZ_SPECIAL = b"()[]{}'\",:0123456789-+.eEjJL_ \n\t\\#\x00\x7f\x80\xff"
FUZZ_OPS = (
    "set-byte",
    "set-special",
    "insert",
    "delete",
    "truncate",
    "repeat",
    "header-length",
    "nest",
)


def _npy_header_end(data: bytes) -> int:
    """Where a well-formed ``.npy`` payload's data starts (its header's end), or
    ``len(data)`` when the prefix does not say (already mutated)."""
    if len(data) >= 10 and data[6:8] == b"\x01\x00":
        return min(len(data), 10 + int.from_bytes(data[8:10], "little"))
    if len(data) >= 12 and data[6:8] == b"\x02\x00":
        return min(len(data), 12 + int.from_bytes(data[8:12], "little"))
    return len(data)


def mutate_npy(
    data: bytes, rng: np.random.Generator, *, header_only: bool = False
) -> tuple[bytes, str]:
    """One seeded byte-level mutation of the ``.npy`` payload ``data``, and what it did.

    The operation is drawn from :data:`FUZZ_OPS`: overwrite one byte (any value, or
    one of :data:`FUZZ_SPECIAL`), insert or delete 1-8 bytes, truncate, repeat a
    slice of the header up to 64 times, rewrite the header-length field, or replace
    a stretch of the header with 1-5000 nested brackets (a recursion bomb for an
    ``eval``-based parser), fixing the length field so the header still spans it.
    Positions fall in the header (``header_only``) or, 3 times in 4, in the header
    and else anywhere in the payload.
    """
    end = _npy_header_end(data)
    span = end if header_only or rng.random() < 0.75 else len(data)
    pos = int(rng.integers(0, max(span, 1)))
    op = FUZZ_OPS[int(rng.integers(0, len(FUZZ_OPS)))]
    special = FUZZ_SPECIAL
    if op == "set-byte" and data:
        value = int(rng.integers(0, 256))
        return data[:pos] + bytes([value]) + data[pos + 1 :], f"{op} {pos}={value}"
    if op == "set-special" and data:
        value = special[int(rng.integers(0, len(special)))]
        return data[:pos] + bytes([value]) + data[pos + 1 :], f"{op} {pos}={value}"
    if op == "insert":
        count = int(rng.integers(1, 9))
        blob = bytes(special[int(i)] for i in rng.integers(0, len(special), count))
        return data[:pos] + blob + data[pos:], f"{op} {pos}+{blob!r}"
    if op == "delete":
        count = int(rng.integers(1, 9))
        return data[:pos] + data[pos + count :], f"{op} {pos}-{count}"
    if op == "truncate":
        return data[:pos], f"{op} {pos}"
    if op == "repeat":
        lo = int(rng.integers(0, max(end, 1)))
        hi = min(end, lo + int(rng.integers(1, 9)))
        times = int(rng.integers(2, 65))
        return data[:hi] + data[lo:hi] * times + data[hi:], f"{op} [{lo}:{hi}]x{times}"
    if op == "header-length":
        field = 4 if data[6:8] == b"\x02\x00" else 2
        value = int(rng.integers(0, 256**field))
        patched = data[:8] + value.to_bytes(field, "little") + data[8 + field :]
        return patched, f"{op} {value}"
    # nest: brackets in the middle of the header, length field fixed to cover them
    depth = int(rng.integers(1, 5001))
    opening, closing = ((b"(", b")"), (b"[", b"]"), (b"{", b"}"))[int(rng.integers(0, 3))]
    nested = opening * depth + closing * int(rng.integers(0, depth + 1))
    pos = min(max(pos, 12), end)
    body = data[:pos] + nested + data[pos:end]
    start = 12 if data[6:8] == b"\x02\x00" else 10
    length = min(max(len(body) - start, 0), 256 ** (start - 8) - 1)
    patched = body[:8] + length.to_bytes(start - 8, "little") + body[start:]
    return patched + data[end:], f"{op} {pos} depth {depth}"


def fuzzed_node_reply(
    honest: RecordDict, *, server_round: int, partition_id: int, node_id: int
) -> RecordDict:
    """What a ``role = "fuzz"`` node sends instead of ``honest`` this round: the
    honest reply with one array's ``.npy`` header byte-mutated (:func:`mutate_npy`,
    ``header_only``; generator seeded by ``(round, partition)``). Logs the array
    and the mutation (ground truth for tests)."""
    rng = np.random.default_rng([server_round, partition_id])
    arrays = _arrays(honest)
    name = list(arrays)[int(rng.integers(0, len(arrays)))]
    old = arrays[name]
    data, what = mutate_npy(old.data, rng, header_only=True)
    arrays[name] = Array(dtype=old.dtype, shape=tuple(old.shape), stype=old.stype, data=data)
    log(
        WARNING,
        "[bastion] fuzz node %d (partition %d), round %d: array %r: %s",
        node_id,
        partition_id,
        server_round,
        name,
        what[:200],
    )
    return _reply(honest, arrays)


# ------------------------------------------------------------------ public API
def malformed_reply(kind: str, honest: RecordDict, *, max_reply_bytes: int = 0) -> RecordDict:
    """The content of a ``kind`` reply, built from the honest reply content ``honest``.

    ``honest`` must follow the reply contract (ArrayRecord ``arrays`` with the
    model, MetricRecord ``metrics``); it is not modified. ``max_reply_bytes`` is the
    server's limit, which the ``oversized-*`` kinds exceed (by
    :data:`OVERSIZE_MARGIN` bytes; by :data:`UNLIMITED_OVERSIZE` bytes of padding
    when it is 0, no limit). Raises :class:`MalformedNodeError` for
    ``error-reply`` and ``ValueError`` for an unknown kind.
    """
    builders = _builders(max_reply_bytes)
    if kind not in builders:
        raise ValueError(f"unknown malformed kind {kind!r}; known: {', '.join(KIND_NAMES)}")
    return builders[kind](honest)


def parse_kinds(text: str | None) -> tuple[str, ...]:
    """The node-config value ``malformed-kinds`` (comma-separated names) as a tuple;
    empty or unset means the whole corpus in corpus order."""
    if not text or not text.strip():
        return KIND_NAMES
    kinds = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [k for k in kinds if k not in KIND_NAMES]
    if unknown or not kinds:
        raise ConfigError(
            f"node config key 'malformed-kinds': value {text!r} is not allowed "
            f"(unknown kinds {unknown}); allowed: comma-separated names out of "
            f"{', '.join(KIND_NAMES)}"
        )
    return kinds


def kind_for_round(kinds: tuple[str, ...], server_round: int, partition_id: int) -> str:
    """The kind a malformed node sends in ``server_round``:
    ``kinds[(server_round - 1 + partition_id * ceil(K / 2)) % K]`` with ``K = len(kinds)``.

    Two nodes with consecutive partition ids cover all ``K`` kinds in the first
    ``ceil(K / 2)`` rounds (their offsets differ by ``ceil(K / 2)``).
    """
    if not kinds:
        raise ValueError("kinds must not be empty")
    half = (len(kinds) + 1) // 2
    return kinds[(server_round - 1 + partition_id * half) % len(kinds)]


def malformed_node_reply(
    honest: RecordDict,
    *,
    kinds_text: str | None,
    server_round: int,
    partition_id: int,
    node_id: int,
    max_reply_bytes: int,
) -> RecordDict:
    """What a ``role = "malformed"`` node sends instead of ``honest`` this round; the
    kind (:func:`kind_for_round`) is logged as ground truth."""
    kind = kind_for_round(parse_kinds(kinds_text), server_round, partition_id)
    log(
        WARNING,
        "[bastion] malformed node %d (partition %d), round %d: sends kind %r",
        node_id,
        partition_id,
        server_round,
        kind,
    )
    return malformed_reply(kind, honest, max_reply_bytes=max_reply_bytes)
