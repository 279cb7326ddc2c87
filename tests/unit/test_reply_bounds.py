"""What one node can do to a round: nothing escapes its reply, its text is bounded,
its identity is checked, and it cannot set the federated evaluation."""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

import strategies.strategy as strategy_module
from strategies.strategy import RobustStrategy
from strategies.validation import (
    MAX_REASON_CHARS,
    MAX_TEXT_CHARS,
    bounded,
    message_nbytes,
    reply_nbytes,
)
from tests.unit.test_strategy import (
    FakeGrid,
    _task_identity,  # noqa: F401  (autouse fixture: Message() needs a run id)
    configured,
    instruction,
    model_arrays,
    reply,
)

BOUND = MAX_REASON_CHARS + len("... [truncated, 1000000000 chars]")


def robust(**kwargs) -> RobustStrategy:
    strategy = RobustStrategy(min_available_nodes=1, min_train_nodes=1, **kwargs)
    configured(strategy, model_arrays())
    return strategy


def reasons(strategy: RobustStrategy) -> dict[int, str]:
    return {d.node_id: d.reason for d in strategy.last_round.nodes if d.status == "rejected"}


# ---------------------------------------------------------------- nothing escapes
@pytest.mark.parametrize("error", [RecursionError, IndexError, MemoryError, KeyError])
def test_any_exception_from_one_reply_is_that_replys_rejection(monkeypatch, error) -> None:
    real = strategy_module.check_train_reply

    def check(msg, layout, **kwargs):
        if msg.metadata.src_node_id == 2:
            raise error("x" * 10_000)
        return real(msg, layout, **kwargs)

    monkeypatch.setattr(strategy_module, "check_train_reply", check)
    strategy = robust()
    new, _ = strategy.aggregate_train(1, [reply(1, model_arrays(1.0)), reply(2, model_arrays(2.0))])
    assert new is not None and np.allclose(new.to_numpy_ndarrays()[1], -49.0)  # node 1 only
    reason = reasons(strategy)[2]
    assert reason.startswith(f"undecodable update ({error.__name__}): ")
    assert "[truncated, " in reason and len(reason) <= BOUND


def test_a_rule_precondition_is_still_the_rounds_outcome() -> None:
    from strategies import build_aggregator, compose

    strategy = robust(pipeline=compose([], build_aggregator("krum")), num_byzantine=1)
    new, _ = strategy.aggregate_train(1, [reply(1, model_arrays(1.0))])
    assert new is None and "2f + 3" in strategy.last_round.aggregation_error


# ---------------------------------------------------------------- identity
def test_a_second_reply_of_a_node_is_rejected() -> None:
    strategy = robust()
    strategy.aggregate_train(1, [reply(1, model_arrays(1.0)), reply(1, model_arrays(9.0))])
    statuses = [(d.node_id, d.status) for d in strategy.last_round.nodes]
    assert statuses == [(1, "accepted"), (1, "rejected")]
    assert reasons(strategy)[1] == "node 1 already replied this round; one reply per node"


def test_a_reply_to_a_message_not_sent_this_round_is_rejected() -> None:
    strategy = robust()
    stale = instruction(2)
    stale.metadata.__dict__["_message_id"] = "round-0-message"
    late = Message(
        RecordDict(
            {
                "arrays": ArrayRecord(
                    OrderedDict((k, Array(v)) for k, v in model_arrays().items())
                ),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        ),
        reply_to=stale,
    )
    strategy.aggregate_train(1, [reply(1, model_arrays(1.0)), late])
    assert reasons(strategy) == {
        2: "reply to message 'round-0-message', which was not sent this round"
    }


def test_a_reply_from_another_node_than_the_message_went_to_is_rejected() -> None:
    strategy = robust()
    forged = reply(3, model_arrays(1.0))
    forged.metadata.__dict__["_reply_to_message_id"] = "m4"  # node 4's instruction
    strategy.aggregate_train(1, [forged])
    assert reasons(strategy) == {3: "reply from node 3 to a message sent to node 4"}


def test_last_rounds_message_ids_are_not_accepted_in_the_next_round() -> None:
    strategy = robust()
    strategy.aggregate_train(1, [reply(1, model_arrays(1.0))])
    record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in model_arrays().items()))
    for msg in strategy.configure_train(2, record, ConfigRecord(), FakeGrid([1, 2])):
        msg.metadata.__dict__["_message_id"] = f"r2-{msg.metadata.dst_node_id}"
    strategy.aggregate_train(2, [reply(1, model_arrays(1.0))])  # answers round 1's "m1"
    assert reasons(strategy) == {1: "reply to message 'm1', which was not sent this round"}


# ---------------------------------------------------------------- bounded text
def test_bounded_notes_the_full_size() -> None:
    assert bounded("abc", 5) == "abc"
    assert bounded("x" * 500_000, 10) == "xxxxxxxxxx... [truncated, 500000 chars]"


def test_ten_thousand_extra_arrays_give_a_bounded_reason() -> None:
    strategy = robust(max_reply_bytes=0)
    arrays = model_arrays(1.0) | {f"extra-{i:05d}": np.zeros(1, np.float32) for i in range(10_000)}
    strategy.aggregate_train(1, [reply(1, arrays)])
    reason = reasons(strategy)[1]
    assert len(reason) <= BOUND
    assert reason.endswith(", ... and 9990 more]")
    assert "'extra-00000'" in reason and "'extra-09999'" not in reason


def test_an_error_reply_with_a_20_mb_message_is_bounded() -> None:
    strategy = robust(max_reply_bytes=0)
    crash = Message(Error(code=2, reason="E" * 20_000_000), reply_to=instruction(1))
    strategy.aggregate_train(1, [crash])
    reason = reasons(strategy)[1]
    assert reason.startswith("error reply (code 2): EEE")
    assert reason.endswith("... [truncated, 20000000 chars]")
    assert len(reason) <= MAX_TEXT_CHARS + 100


def test_long_array_metadata_strings_are_bounded() -> None:
    strategy = robust(max_reply_bytes=0)
    msg = reply(1, model_arrays(1.0))
    weight = msg.content.array_records["arrays"]["weight"]
    weight.__dict__["dtype"] = "f" * 100_000
    msg2 = reply(2, model_arrays(1.0))
    msg2.content.array_records["arrays"]["weight"].__dict__["shape"] = [1] * 100_000
    msg3 = reply(3, model_arrays(1.0))
    msg3.content.array_records["arrays"]["weight"].__dict__["stype"] = "s" * 100_000
    strategy.aggregate_train(1, [msg, msg2, msg3])
    got = reasons(strategy)
    assert got[1].endswith("... [truncated, 100000 chars], expected float32")
    assert "... [truncated, " in got[2] and got[2].endswith("expected (2, 3)")
    assert "[truncated, 100002 chars]" in got[3]  # the repr's quotes included
    assert all(len(r) <= BOUND for r in got.values())


# ---------------------------------------------------------------- size counts everything
def test_max_reply_bytes_counts_error_text_metadata_and_array_metadata() -> None:
    msg = reply(1, model_arrays(1.0))
    content = msg.content
    payload = sum(len(a.data) for a in content.array_records["arrays"].values())
    assert reply_nbytes(content) > payload + len("arrays") + len("weight") + len("bias")
    assert message_nbytes(msg) > reply_nbytes(content)

    strategy = robust(max_reply_bytes=10_000)
    crash = Message(Error(code=2, reason="E" * 20_000), reply_to=instruction(1))
    shaped = reply(2, model_arrays(1.0))
    shaped.content.array_records["arrays"]["weight"].__dict__["shape"] = [1] * 2_000
    strategy.aggregate_train(1, [crash, shaped])
    got = reasons(strategy)
    assert re.fullmatch(r"reply holds 2\d{4} bytes, exceeds max-reply-bytes 10000", got[1])
    assert re.fullmatch(r"reply holds 1\d{4} bytes, exceeds max-reply-bytes 10000", got[2])


# ---------------------------------------------------------------- federated evaluation
def eval_reply(node_id: int, metrics: dict) -> Message:
    ins = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.EVALUATE)
    ins.metadata.__dict__["_message_id"] = f"e{node_id}"
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=ins)


def evaluated(replies: list[Message], nodes: list[int]) -> tuple[MetricRecord | None, dict]:
    strategy = RobustStrategy(min_available_nodes=1, min_evaluate_nodes=1)
    record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in model_arrays().items()))
    for msg in strategy.configure_evaluate(1, record, ConfigRecord(), FakeGrid(nodes)):
        msg.metadata.__dict__["_message_id"] = f"e{msg.metadata.dst_node_id}"
    out = strategy.aggregate_evaluate(1, replies)
    return out, {n.node_id: n for n in strategy.last_evaluation}


def honest_eval(node_id: int, acc: float = 0.9, loss: float = 0.3) -> Message:
    return eval_reply(node_id, {"num-examples": 100, "eval-loss": loss, "eval-accuracy": acc})


def test_one_node_claiming_2_62_examples_does_not_set_the_accuracy() -> None:
    liar = eval_reply(4, {"num-examples": 2**62, "eval-loss": 9.0, "eval-accuracy": 0.0})
    out, nodes = evaluated(
        [honest_eval(1), honest_eval(2, 0.92), honest_eval(3, 0.88), liar], [1, 2, 3, 4]
    )
    assert nodes[4].status == "rejected"
    assert nodes[4].reason == f"metric 'num-examples' is {2**62}; allowed: 1..1000000000"
    assert out["eval-accuracy"] == pytest.approx(0.9) and out["num-nodes"] == 3


def test_a_node_in_range_moves_the_median_only_within_the_others() -> None:
    liar = eval_reply(4, {"num-examples": 10**9, "eval-loss": 1e300, "eval-accuracy": 0.0})
    out, _ = evaluated(
        [honest_eval(1), honest_eval(2, 0.92), honest_eval(3, 0.88), liar], [1, 2, 3, 4]
    )
    # sorted accuracies 0.0, 0.88, 0.9, 0.92: median 0.89; losses 0.3, 0.3, 0.3, 1e300: 0.3
    assert out["eval-accuracy"] == pytest.approx(0.89) and out["eval-loss"] == pytest.approx(0.3)
    assert out["num-examples"] == 10**9 + 300  # kept as a diagnostic only


@pytest.mark.parametrize(
    "metrics, reason",
    [
        ({"eval-loss": 1.7e308 * 10}, "metric 'eval-loss' is inf; allowed: a finite float"),
        ({"eval-loss": -math.inf}, "metric 'eval-loss' is -inf; allowed: a finite float"),
        ({"eval-accuracy": math.nan}, "metric 'eval-accuracy' is nan; allowed: a finite float"),
        ({"eval-accuracy": 1.5}, "metric 'eval-accuracy' is 1.5; allowed: 0..1"),
        ({"eval-accuracy": None}, "metric 'eval-accuracy' is missing"),
    ],
)
def test_non_finite_or_impossible_values_are_dropped_with_a_reason(metrics, reason) -> None:
    values = {"num-examples": 100, "eval-loss": 0.3, "eval-accuracy": 0.5} | metrics
    values = {k: v for k, v in values.items() if v is not None}
    out, nodes = evaluated([honest_eval(1), eval_reply(2, values)], [1, 2])
    assert nodes[2].reason == reason
    assert out["eval-accuracy"] == pytest.approx(0.9) and out["num-nodes"] == 1


def test_plus_minus_max_float_losses_cannot_make_the_result_nan() -> None:
    a = eval_reply(2, {"num-examples": 1, "eval-loss": 1.7e308, "eval-accuracy": 0.5})
    b = eval_reply(3, {"num-examples": 1, "eval-loss": -1.7e308, "eval-accuracy": 0.5})
    out, _ = evaluated([honest_eval(1), a, b], [1, 2, 3])
    assert out["eval-loss"] == pytest.approx(0.3)
    # an even count whose two middle values are both 1.7e308: their midpoint is
    # 1.7e308 (a + b would overflow to inf)
    c, d = (
        eval_reply(n, {"num-examples": 1, "eval-loss": 1.7e308, "eval-accuracy": 0.5})
        for n in (4, 5)
    )
    out, _ = evaluated([honest_eval(1), a, c, d], [1, 2, 4, 5])
    assert out["eval-loss"] == 1.7e308


def test_evaluation_replies_are_identity_checked_too() -> None:
    out, nodes = evaluated([honest_eval(1), honest_eval(1, 0.0), honest_eval(7, 0.0)], [1, 2])
    assert out["eval-accuracy"] == pytest.approx(0.9) and out["num-nodes"] == 1
    assert [n.status for n in nodes.values()] == ["rejected", "rejected"]  # 1 twice, then 7


def test_evaluate_round_returns_the_metrics_and_each_nodes_outcome() -> None:
    """What the server records of federated evaluation comes back from evaluate_round:
    the medians and every node's outcome, the dropped replies with why."""
    strategy = RobustStrategy(min_available_nodes=1, min_evaluate_nodes=1)
    record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in model_arrays().items()))
    for msg in strategy.configure_evaluate(1, record, ConfigRecord(), FakeGrid([1, 2, 3])):
        msg.metadata.__dict__["_message_id"] = f"e{msg.metadata.dst_node_id}"
    bad = eval_reply(3, {"num-examples": 5, "eval-loss": math.nan, "eval-accuracy": 0.5})
    outcome = strategy.evaluate_round(1, [honest_eval(1, 0.8), honest_eval(2, 0.6), bad])
    # the median of two values is their midpoint
    assert outcome.metrics["eval-accuracy"] == pytest.approx(0.7)
    assert outcome.metrics["num-nodes"] == 2 and outcome.metrics["num-examples"] == 200
    assert [(n.node_id, n.status) for n in outcome.nodes] == [
        (1, "accepted"),
        (2, "accepted"),
        (3, "rejected"),
    ]
    assert [(n.node_id, n.reason) for n in outcome.rejected] == [
        (3, "metric 'eval-loss' is nan; allowed: a finite float")
    ]


def test_evaluate_round_without_a_usable_reply_has_no_metrics() -> None:
    strategy = RobustStrategy(min_available_nodes=1, min_evaluate_nodes=1)
    outcome = strategy.evaluate_round(1, [honest_eval(1)])  # no message of this round
    assert outcome.metrics is None and [n.status for n in outcome.rejected] == ["rejected"]
