"""Byte-level fuzzing of ``.npy`` payloads: every mutation is rejected or decoded exactly.

Valid payloads (C and Fortran order, format 1.0 and 2.0 headers) are mutated by
:func:`client.malformed.mutate_npy` (seeded): bytes overwritten, inserted, deleted,
truncated, header slices repeated, the header-length field rewritten, bracket
bombs. Each mutated payload goes through the reply contract, the decoder and the
strategy. Nothing may raise past them: a reply is rejected with a bounded reason,
or accepted and decoded to exactly what ``np.load`` reads from the same bytes.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter, OrderedDict

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from client.malformed import fuzzed_node_reply, mutate_npy
from strategies.layout import ModelLayout, NpyHeaderError, UnsupportedNpyVersion, read_npy_header
from strategies.strategy import RobustStrategy
from strategies.validation import MAX_REASON_CHARS, RejectedReply, check_train_reply
from tests.unit.test_strategy import FakeGrid, pushed

CASES = 3000
SEED = 20261204
BATCH = 100
TRUNCATION_NOTE = len("... [truncated, 1000000000 chars]")


@pytest.fixture(autouse=True)
def _task_identity():
    # Message() needs a run id; in a real ServerApp Flower sets it.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def _npy(values: np.ndarray, version: tuple[int, int] = (1, 0)) -> bytes:
    """``values`` as ``.npy`` bytes with a header of the given format version."""
    header = io.BytesIO()
    meta = np.lib.format.header_data_from_array_1_0(values)
    if version == (2, 0):
        np.lib.format.write_array_header_2_0(header, meta)
    else:
        np.lib.format.write_array_header_1_0(header, meta)
    order = "F" if meta["fortran_order"] else "C"
    return header.getvalue() + values.tobytes(order=order)


W = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
B = np.linspace(-1, 1, 4, dtype=np.float32)
GLOBAL = OrderedDict(w=np.zeros((3, 4), np.float32), b=np.zeros(4, np.float32))
VALID = (_npy(W), _npy(np.asfortranarray(W)), _npy(W, (2, 0)))


def _record(w_payload: bytes) -> ArrayRecord:
    forged = Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=w_payload)
    return ArrayRecord(OrderedDict(w=forged, b=Array(B)))


def _reply(node_id: int, record: ArrayRecord) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    instruction.metadata.__dict__["_message_id"] = f"m{node_id}"
    content = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 5})})
    return Message(content=content, reply_to=instruction)


def _np_load(data: bytes) -> np.ndarray | None:
    """What NumPy itself reads from ``data`` (None when it refuses or raises)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:
        return None


def _mutations() -> list[tuple[bytes, str]]:
    rng = np.random.default_rng(SEED)
    return [mutate_npy(VALID[i % len(VALID)], rng) for i in range(CASES)]


def test_the_valid_payloads_decode_exactly() -> None:
    layout = ModelLayout.of(_record(VALID[0]))
    for payload in VALID:
        flat = layout.flatten(_record(payload)).numpy()
        assert np.array_equal(flat, np.concatenate([W.reshape(-1), B]))


def test_every_mutation_is_rejected_or_decoded_exactly() -> None:
    layout = ModelLayout.of(ArrayRecord(OrderedDict((k, Array(v)) for k, v in GLOBAL.items())))
    outcome: Counter[str] = Counter()
    escaped = []
    for i, (data, what) in enumerate(_mutations()):
        msg = _reply(1, _record(data))
        try:
            check_train_reply(msg, layout, max_reply_bytes=2**20)
        except RejectedReply as exc:
            assert str(exc) and len(str(exc)) <= MAX_REASON_CHARS + TRUNCATION_NOTE
            outcome["rejected"] += 1
            continue
        except Exception as exc:  # the bug this test exists for
            escaped.append((i, what, f"{type(exc).__name__}: {exc}"))
            continue
        # accepted by the contract: decoded exactly as NumPy reads the same bytes
        loaded = _np_load(data)
        assert loaded is not None, what
        assert loaded.shape == (3, 4) and loaded.dtype == np.float32, what
        flat = layout.flatten(msg.content.array_records["arrays"]).numpy()
        expected = np.concatenate([loaded.reshape(-1), B])
        assert flat.view(np.uint32).tolist() == expected.view(np.uint32).tolist(), what
        outcome["decoded exactly"] += 1
    assert escaped == []
    assert sum(outcome.values()) == CASES
    # both outcomes occur: the mutations reach past the header and into it
    assert outcome["rejected"] > CASES // 2 and outcome["decoded exactly"] > 50
    print(f"\n{CASES} mutated .npy payloads: {dict(outcome)}")


def test_the_header_parser_raises_only_its_own_errors_where_numpy_raises_others() -> None:
    numpy_raised: Counter[str] = Counter()
    for data, _ in _mutations():
        with contextlib.suppress(NpyHeaderError, UnsupportedNpyVersion):
            read_npy_header(data)  # anything else fails the test
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                np.lib.format.read_array_header_1_0(io.BytesIO(data[8:]))
        except (ValueError, TypeError, SyntaxError):
            pass
        except Exception as exc:
            numpy_raised[type(exc).__name__] += 1
    # NumPy's own parser (ast.literal_eval) raises outside ValueError on this corpus;
    # that is what crashed the ServerApp before the parser was Bastion's own
    assert sum(numpy_raised.values()) > 0
    print(
        f"\nnumpy's header parser, other exceptions than ValueError/TypeError/SyntaxError: "
        f"{dict(numpy_raised)}"
    )


def test_mutated_replies_through_the_strategy_never_raise() -> None:
    strategy = RobustStrategy(min_available_nodes=1, min_train_nodes=1, max_reply_bytes=2**20)
    global_record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in GLOBAL.items()))
    mutations = _mutations()
    statuses: Counter[str] = Counter()
    for server_round, lo in enumerate(range(0, CASES, BATCH), start=1):
        batch = mutations[lo : lo + BATCH]
        grid = FakeGrid(list(range(1, len(batch) + 1)))
        pushed(strategy.configure_train(server_round, global_record, ConfigRecord(), grid))  # type: ignore[arg-type]
        replies = [_reply(n + 1, _record(data)) for n, (data, _) in enumerate(batch)]
        strategy.aggregate_train(server_round, replies)
        nodes = strategy.last_round.nodes
        assert len(nodes) == len(batch)
        for diag in nodes:
            statuses[diag.status] += 1
            if diag.status == "rejected":
                assert diag.reason and len(diag.reason) <= MAX_REASON_CHARS + TRUNCATION_NOTE
    assert sum(statuses.values()) == CASES and statuses["rejected"] > CASES // 2


def test_a_fuzz_node_mutates_one_header_per_round_deterministically() -> None:
    honest = RecordDict(
        {
            "arrays": ArrayRecord(OrderedDict(w=Array(W), b=Array(B))),
            "metrics": MetricRecord({"num-examples": 5}),
        }
    )
    first = fuzzed_node_reply(honest, server_round=3, partition_id=5, node_id=1)
    again = fuzzed_node_reply(honest, server_round=3, partition_id=5, node_id=1)
    changed = [k for k, a in first["arrays"].items() if a.data != honest["arrays"][k].data]
    assert len(changed) <= 1  # one array mutated (a mutation may be a no-op)
    assert all(a.data == again["arrays"][k].data for k, a in first["arrays"].items())
    for name in changed:  # header only: the data bytes are the honest ones, at the end
        original = honest["arrays"][name].data
        assert first["arrays"][name].data.endswith(original[128:])
    rounds = {
        bytes(
            fuzzed_node_reply(honest, server_round=r, partition_id=5, node_id=1)["arrays"]["w"].data
        )
        for r in range(1, 20)
    }
    assert len(rounds) > 5  # each round its own mutation


def test_a_big_endian_header_is_a_mismatch_not_a_byteswapped_decode() -> None:
    # NumPy calls '>f4' float32 too; decoding it natively would swap every value
    layout = ModelLayout.of(ArrayRecord(OrderedDict((k, Array(v)) for k, v in GLOBAL.items())))
    swapped = VALID[0].replace(b"'<f4'", b"'>f4'")
    assert swapped != VALID[0] and _np_load(swapped) is not None
    with pytest.raises(RejectedReply) as err:
        check_train_reply(_reply(1, _record(swapped)), layout)
    assert str(err.value) == (
        "undecodable array 'w': .npy header says >f4[3, 4], metadata says float32[3, 4]"
    )
