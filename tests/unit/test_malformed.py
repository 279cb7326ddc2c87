"""The malformed-reply corpus against RobustStrategy: every kind rejected, for its reason.

Honest replies come from the real ClientApp ``train`` function (digits MLP, a few
local steps); each malformed reply is built from a real honest reply by
:func:`client.malformed.malformed_reply` and aggregated next to three honest ones.
"""

from __future__ import annotations

import math
import re
import tracemalloc
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from client.app import train as client_train
from client.malformed import (
    KIND_NAMES,
    MALFORMED_KINDS,
    MalformedNodeError,
    kind_for_round,
    malformed_reply,
    parse_kinds,
)
from common.config import ConfigError, RunConfig
from strategies.layout import ModelLayout
from strategies.strategy import RobustStrategy
from strategies.validation import (
    DEFAULT_MAX_REPLY_BYTES,
    DEFAULT_MAX_UPDATE_NORM,
    RejectedReply,
    check_train_reply,
)
from task.models import build_model

NUM_PARTITIONS = 5
LIMIT = 2**20  # max-reply-bytes in these tests (the oversized kinds go just past it)

# The reason each kind must be rejected with (re.search on the recorded reason).
# The shapes are those of the digits MLP (net.0.weight is (128, 64)).
EXPECTED_REASONS: dict[str, str] = {
    "nan": r"^non-finite update: [1-9]\d* NaN, 0 \+Inf, 0 -Inf values$",
    "pos-inf": r"^non-finite update: 0 NaN, [1-9]\d* \+Inf, 0 -Inf values$",
    "neg-inf": r"^non-finite update: 0 NaN, 0 \+Inf, [1-9]\d* -Inf values$",
    "huge-norm": r"^update norm 1e\+30 exceeds max-update-norm 1e\+06$",
    # every value 1e18 over d = 9610 coordinates: 1e18 * sqrt(9610) = 9.803e19
    "huge-values": r"^update norm 9\.803e\+19 exceeds max-update-norm 1e\+06$",
    "wrong-shape": r"^array 'net\.0\.weight' has shape \(129, 64\), expected \(128, 64\)$",
    "reshaped": r"^array 'net\.0\.weight' has shape \(1, 8192\), expected \(128, 64\)$",
    "scalar-array": r"^array 'net\.0\.weight' has shape \(\), expected \(128, 64\)$",
    "dtype-float64": r"^array 'net\.0\.weight' has dtype float64, expected float32$",
    "dtype-int": r"^array 'net\.0\.weight' has dtype int32, expected float32$",
    "missing-array": r"^array names differ .*: missing \['net\.2\.bias'\], extra \[\]$",
    "extra-array": r"^array names differ .*: missing \[\], extra \['extra'\]$",
    "renamed-array": (
        r"^array names differ .*: missing \['net\.0\.weight'\], "
        r"extra \['net\.0\.weight-renamed'\]$"
    ),
    "reordered-arrays": r"^array names differ .*: missing \[\], extra \[\], order differs",
    "sparse-stype": r"^array 'net\.0\.weight' has serialization type 'torch\.sparse_coo'",
    "truncated-bytes": (
        r"^undecodable array 'net\.0\.weight': payload holds 32764 data bytes, "
        r"float32\[128, 64\] needs 32768$"
    ),
    "garbage-bytes": r"^undecodable array 'net\.0\.weight': payload is not a \.npy array",
    "header-mismatch": (
        r"^undecodable array 'net\.0\.weight': \.npy header says float64\[128, 64\], "
        r"metadata says float32\[128, 64\]$"
    ),
    "object-array": r"^undecodable array 'net\.0\.weight': .*Python objects \(a pickle\)",
    "empty-reply": r"^empty reply: no records",
    "error-reply": r"^error reply \(code 2\): .*MalformedNodeError.*'error-reply'",
    "arrays-renamed": (r"missing ArrayRecord 'arrays'; unexpected records: ArrayRecord 'weights'$"),
    "extra-array-record": r": unexpected records: ArrayRecord 'extra'$",
    "extra-config-record": r": unexpected records: ConfigRecord 'config'$",
    "extra-metric-record": r": unexpected records: MetricRecord 'extra-metrics'$",
    "metrics-missing": r": missing MetricRecord 'metrics'$",
    "metrics-as-config": r": 'metrics' is a ConfigRecord, expected a MetricRecord$",
    "num-examples-negative": r"^metric 'num-examples' is -[1-9]\d*; allowed: 1\.\.1000000000$",
    "num-examples-zero": r"^metric 'num-examples' is 0; allowed: 1\.\.1000000000$",
    "num-examples-huge": r"^metric 'num-examples' is 1000000000000; allowed: 1\.\.1000000000$",
    "num-examples-float": r"^metric 'num-examples' must be an integer, got \d+\.0 \(float\)$",
    "num-examples-missing": r"^metric 'num-examples' is missing$",
    "train-loss-list": r"^metric 'train-loss' must be a float, got \[0\.5, 0\.5\] \(list\)$",
    "train-loss-nan": r"^metric 'train-loss' is nan; allowed: a finite float$",
    "partition-id-float": r"^metric 'partition-id' must be an integer, got \d+\.0 \(float\)$",
    "oversized-array": r"^reply holds \d+ bytes, exceeds max-reply-bytes (?P<limit>\d+)$",
    "oversized-record": r"^reply holds \d+ bytes, exceeds max-reply-bytes (?P<limit>\d+)$",
}


@pytest.fixture(autouse=True)
def _task_identity():
    # Message() needs a run id; in a real ClientApp or ServerApp Flower sets it.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    yield


def run_config(**overrides: Any) -> RunConfig:
    return RunConfig.from_flat({"local-steps": 3, "max-reply-bytes": LIMIT} | overrides)


def global_arrays() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(build_model("digits").state_dict())


def instruction(node_id: int, run: RunConfig, server_round: int = 1) -> Message:
    content = RecordDict(
        {
            "arrays": global_arrays(),
            "config": ConfigRecord(run.train_instructions(server_round) | {"batch-cell": -1}),
        }
    )
    msg = Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = f"m{node_id}-{server_round}"
    return msg


def call_client(
    partition_id: int, run: RunConfig, server_round: int = 1, **node_config: Any
) -> Message:
    """The real ClientApp train function, as Flower calls it (node id = partition + 1)."""
    context = Context(
        run_id=7,
        node_id=partition_id + 1,
        node_config={"partition-id": partition_id, "num-partitions": NUM_PARTITIONS} | node_config,
        state=RecordDict(),
        run_config=run.to_flat(),
    )
    return client_train(instruction(partition_id + 1, run, server_round), context)


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> dict[int, Message]:
    """Honest replies of partitions 0..3 from the real ClientApp (round 1)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BASTION_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    try:
        return {pid: call_client(pid, run_config()) for pid in range(4)}
    finally:
        mp.undo()


def malformed_message(kind: str, honest_reply: Message, node_id: int = 9) -> Message:
    """The reply a malformed node sends; for ``error-reply`` the error reply Flower's
    ClientApp runtime builds from the exception (flwr/supernode/runtime/run_clientapp.py)."""
    msg = instruction(node_id, run_config())
    try:
        content = malformed_reply(kind, honest_reply.content, max_reply_bytes=LIMIT)
    except MalformedNodeError as ex:
        reason = str(type(ex)) + ":<'" + str(ex) + "'>"
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
        )
    return Message(content=content, reply_to=msg)


def configured(strategy: RobustStrategy) -> RobustStrategy:
    class Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2, 3, 8, 9, *range(10, 18)]

    sent = strategy.configure_train(1, global_arrays(), ConfigRecord(), Grid())  # type: ignore[arg-type]
    for msg in sent:  # what the Grid's push does: ids, here the ones instruction() gives
        msg.metadata.__dict__["_message_id"] = f"m{msg.metadata.dst_node_id}-1"
    return strategy


def strategy(**kwargs: Any) -> RobustStrategy:
    params = {"max_reply_bytes": LIMIT} | kwargs
    return configured(RobustStrategy(min_available_nodes=1, min_train_nodes=1, **params))


def flat(record: ArrayRecord) -> np.ndarray:
    return np.concatenate([a.numpy().reshape(-1).astype(np.float64) for a in record.values()])


def test_the_corpus_has_at_least_24_distinct_described_kinds() -> None:
    assert len(MALFORMED_KINDS) >= 24
    assert len(set(KIND_NAMES)) == len(KIND_NAMES)
    assert all(k.description and "\n" not in k.description for k in MALFORMED_KINDS)
    # and this test states a reason for every one of them
    assert set(EXPECTED_REASONS) == set(KIND_NAMES)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_each_kind_is_rejected_for_its_reason_and_the_honest_replies_make_the_model(
    kind: str, honest: dict[int, Message]
) -> None:
    good = [honest[p] for p in range(3)]  # nodes 1, 2, 3
    bad = malformed_message(kind, honest[3])
    robust = strategy()
    new, metrics = robust.aggregate_train(1, [good[0], bad, good[1], good[2]])
    nodes = {d.node_id: d for d in robust.last_round.nodes}
    assert nodes[9].status == "rejected"
    assert re.search(EXPECTED_REASONS[kind], nodes[9].reason), nodes[9].reason
    assert [nodes[i].status for i in (1, 2, 3)] == ["accepted"] * 3
    assert metrics is not None and metrics["num-accepted"] == 3 and metrics["num-rejected"] == 1
    # the new model is finite and is exactly what the three honest replies make
    got = flat(new)
    assert np.isfinite(got).all()
    reference, _ = strategy().aggregate_train(1, good)
    assert np.array_equal(got, flat(reference))


def test_the_error_reply_kind_raises_in_the_client() -> None:
    content = RecordDict({"arrays": global_arrays(), "metrics": MetricRecord({"num-examples": 1})})
    with pytest.raises(MalformedNodeError, match="error-reply"):
        malformed_reply("error-reply", content)
    with pytest.raises(ValueError, match="unknown malformed kind 'nope'"):
        malformed_reply("nope", content)


def test_malformed_reply_does_not_modify_the_honest_reply(honest: dict[int, Message]) -> None:
    before = {k: (a.data, a.dtype, a.shape) for k, a in honest[3].content["arrays"].items()}
    metrics = dict(honest[3].content["metrics"])
    for kind in KIND_NAMES:
        if kind != "error-reply":
            malformed_reply(kind, honest[3].content, max_reply_bytes=LIMIT)
    after = {k: (a.data, a.dtype, a.shape) for k, a in honest[3].content["arrays"].items()}
    assert after == before and dict(honest[3].content["metrics"]) == metrics


def test_the_huge_norm_is_reported_with_its_float64_value(honest: dict[int, Message]) -> None:
    bad = malformed_message("huge-norm", honest[3])
    expected = float(np.linalg.norm(flat(bad.content["arrays"]) - flat(global_arrays())))
    assert 0.999e30 < expected < 1.001e30
    robust = strategy()
    robust.aggregate_train(1, [honest[0], bad])
    reason = robust.last_round.nodes[1].reason
    reported = float(re.search(r"update norm (\S+) exceeds", reason).group(1))
    assert reported == pytest.approx(expected, rel=1e-3)
    # without a limit the same update is still rejected: float32 cannot hold its norm
    unlimited = strategy(max_update_norm=0.0)
    unlimited.aggregate_train(1, [honest[0], malformed_message("huge-values", honest[3])])
    assert re.fullmatch(
        r"update norm 9\.803e\+19 overflows float32 \(values too large\)",
        unlimited.last_round.nodes[1].reason,
    )


def test_max_update_norm_bounds_the_delta_not_the_weights(honest: dict[int, Message]) -> None:
    norms = [
        float(np.linalg.norm(flat(honest[p].content["arrays"]) - flat(global_arrays())))
        for p in range(3)
    ]
    weights = float(np.linalg.norm(flat(global_arrays())))
    assert max(norms) < weights  # a bound on weights would reject them all
    limit = sorted(norms)[1]  # between the smallest and the largest update
    robust = strategy(max_update_norm=limit)
    robust.aggregate_train(1, [honest[p] for p in range(3)])
    for diag, norm in zip(robust.last_round.nodes, norms, strict=True):
        if norm > limit:
            assert diag.status == "rejected"
            assert f"update norm {norm:.4g} exceeds max-update-norm {limit:g}" == diag.reason
        else:
            assert diag.status == "accepted"


def test_without_a_size_limit_oversized_kinds_fail_the_other_rules(
    honest: dict[int, Message],
) -> None:
    robust = strategy(max_reply_bytes=0)
    replies = [honest[0]]
    for node_id, kind in ((8, "oversized-array"), (9, "oversized-record")):
        msg = instruction(node_id, run_config())
        content = malformed_reply(kind, honest[3].content, max_reply_bytes=0)
        replies.append(Message(content=content, reply_to=msg))
    robust.aggregate_train(1, replies)
    nodes = {d.node_id: d for d in robust.last_round.nodes}
    assert re.search(r"undecodable array 'net\.0\.weight': payload holds \d+ data", nodes[8].reason)
    assert nodes[9].reason.endswith("unexpected records: ArrayRecord 'padding'")


def test_size_is_checked_before_anything_else(honest: dict[int, Message]) -> None:
    # an oversized reply that is also broken in every other way reports its size
    content = malformed_reply("oversized-record", honest[3].content, max_reply_bytes=LIMIT)
    content["config"] = ConfigRecord({"x": "y"})
    del content["metrics"]
    msg = Message(content=content, reply_to=instruction(9, run_config()))
    with pytest.raises(RejectedReply, match=rf"exceeds max-reply-bytes {LIMIT}$"):
        check_train_reply(msg, ModelLayout.of(global_arrays()), max_reply_bytes=LIMIT)
    # record values count too: a ConfigRecord of large strings
    big = RecordDict(
        {
            "arrays": global_arrays(),
            "metrics": MetricRecord({"num-examples": 3}),
            "config": ConfigRecord({"blob": "x" * LIMIT}),
        }
    )
    msg = Message(content=big, reply_to=instruction(9, run_config()))
    with pytest.raises(RejectedReply, match="exceeds max-reply-bytes"):
        check_train_reply(msg, ModelLayout.of(global_arrays()), max_reply_bytes=LIMIT)


def test_too_few_accepted_replies_leave_the_model_unchanged_and_say_why(
    honest: dict[int, Message],
) -> None:
    robust = strategy(min_accepted_replies=3)
    bad = malformed_message("nan", honest[3])
    new, metrics = robust.aggregate_train(1, [honest[0], honest[1], bad])
    assert new is None and metrics is None
    assert robust.last_round.num_accepted == 2
    assert robust.last_round.aggregation_error == (
        "2 of 3 replies accepted, fewer than min-accepted-replies 3; the global model is unchanged"
    )
    configured(robust)  # the round again: a round's messages are answered once
    new, _ = robust.aggregate_train(1, [honest[0], honest[1], honest[2], bad])
    assert new is not None and robust.last_round.aggregation_error is None


def test_the_metrics_contract_accepts_honest_variants(honest: dict[int, Message]) -> None:
    """What honest nodes may send: DP's +inf epsilon, an int for a float key, keys
    the contract does not know (ignored), no train-loss (DP replies)."""
    base = dict(honest[0].content["metrics"])
    variants = [
        base | {"dp-epsilon": math.inf, "dp-delta": 1e-5, "dp-noise-multiplier": 0.0},
        base | {"train-seconds": 1},
        base | {"some-future-metric": [1, 2, 3]},
        {k: v for k, v in base.items() if k != "train-loss"},
    ]
    rejected = [
        base | {"dp-epsilon": math.nan},
        base | {"dp-epsilon": -math.inf},
        base | {"steps": 2.0},
        base | {"malicious": [1]},
    ]
    replies = [
        Message(
            RecordDict({"arrays": honest[0].content["arrays"], "metrics": MetricRecord(m)}),
            reply_to=instruction(10 + i, run_config()),
        )
        for i, m in enumerate(variants + rejected)
    ]
    robust = strategy()
    robust.aggregate_train(1, replies)
    statuses = [d.status for d in robust.last_round.nodes]
    assert statuses == ["accepted"] * len(variants) + ["rejected"] * len(rejected)
    reasons = [d.reason for d in robust.last_round.nodes[len(variants) :]]
    assert reasons == [
        "metric 'dp-epsilon' is nan; allowed: a finite float or +inf",
        "metric 'dp-epsilon' is -inf; allowed: a finite float or +inf",
        "metric 'steps' must be an integer, got 2.0 (float)",
        "metric 'malicious' must be an integer, got [1] (list)",
    ]


def test_validating_a_large_reply_copies_no_array() -> None:
    big = np.ones((2048, 1024), np.float32)  # 8 MiB
    model = ArrayRecord(OrderedDict(w=Array(big), b=Array(np.zeros(1024, np.float32))))
    content = RecordDict({"arrays": model, "metrics": MetricRecord({"num-examples": 5})})
    msg = Message(content=content, reply_to=instruction(1, run_config()))
    layout = ModelLayout.of(model)
    tracemalloc.start()
    try:
        check_train_reply(msg, layout, max_reply_bytes=DEFAULT_MAX_REPLY_BYTES)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024  # far below one 8 MiB payload


def test_defaults_match_the_run_config() -> None:
    cfg = RunConfig()
    assert cfg.max_reply_bytes == DEFAULT_MAX_REPLY_BYTES == 256 * 2**20
    assert cfg.max_update_norm == DEFAULT_MAX_UPDATE_NORM
    assert cfg.min_accepted_replies == 1
    for key, value in (("max-reply-bytes", -1), ("max-update-norm", -1.0)):
        with pytest.raises(ConfigError, match=rf"'{key}': value {value!r}.*allowed: .*>= 0"):
            RunConfig.from_flat({key: value})
    with pytest.raises(ConfigError, match=r"'min-accepted-replies': value 0 .*>= 1"):
        RunConfig.from_flat({"min-accepted-replies": 0})


@pytest.mark.parametrize("num_kinds", [1, 2, 5, len(KIND_NAMES), 37, 38])
def test_two_consecutive_partitions_cover_every_kind_in_half_the_rounds(num_kinds: int) -> None:
    kinds = tuple(f"k{i}" for i in range(num_kinds))
    rounds = range(1, math.ceil(num_kinds / 2) + 1)
    for first in (0, 3, 7):
        sent = {kind_for_round(kinds, r, p) for r in rounds for p in (first, first + 1)}
        assert sent == set(kinds)


def test_malformed_kinds_are_parsed_and_checked() -> None:
    assert parse_kinds(None) == parse_kinds("") == KIND_NAMES
    assert parse_kinds(" nan, empty-reply ") == ("nan", "empty-reply")
    with pytest.raises(ConfigError) as err:
        parse_kinds("nan,bogus")
    message = str(err.value)
    assert "'malformed-kinds'" in message and "'nan,bogus'" in message and "['bogus']" in message
    assert "allowed" in message and "pos-inf" in message


def test_a_malformed_clientapp_follows_the_documented_rule(honest, tmp_path, monkeypatch) -> None:
    """The real ClientApp with node config role="malformed": in each round it sends
    kind kinds[(r - 1 + partition-id * ceil(K/2)) % K] of its list, built from its
    honest reply (which the honest ClientApp call reproduces exactly)."""
    monkeypatch.setenv("BASTION_CACHE_DIR", str(tmp_path / "cache"))
    run = run_config()
    kinds = "num-examples-zero,nan,error-reply"
    node = {"role": "malformed", "malformed-kinds": kinds}
    # partition 3, K = 3, ceil(K/2) = 2: round 1 -> index (0 + 6) % 3 = 0, round 2 -> 1
    first = call_client(3, run, 1, **node)
    assert first.content["metrics"]["num-examples"] == 0
    assert dict(first.content["metrics"]) == dict(honest[3].content["metrics"]) | {
        "num-examples": 0,
        "train-seconds": first.content["metrics"]["train-seconds"],
    }
    second = call_client(3, run, 2, **node)
    values = second.content["arrays"]["net.0.weight"].numpy()
    assert np.isnan(values.reshape(-1)[0]) and np.isfinite(values.reshape(-1)[1:]).all()
    with pytest.raises(MalformedNodeError):
        call_client(3, run, 3, **node)
    assert kind_for_round(parse_kinds(kinds), 3, 3) == "error-reply"
