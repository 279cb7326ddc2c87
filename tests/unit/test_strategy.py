"""RobustStrategy on in-memory Messages: per-reply validation, mean of deltas, diagnostics."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import pytest
import torch
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
from flwr.supercore.task_identity import TaskIdentity

from common.config import RunConfig
from strategies import build_aggregator, compose
from strategies.layout import ModelLayout, npy_array
from strategies.rules.from_config import pipeline_from_config
from strategies.rules.reputation import Reputation, ReputationConfig
from strategies.strategy import RobustStrategy


@pytest.fixture(autouse=True)
def _task_identity():
    # Message() needs a run id; in a real ServerApp Flower sets it.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def model_arrays(w: float = 0.0) -> OrderedDict[str, np.ndarray]:
    return OrderedDict(
        weight=np.full((2, 3), 100.0 + w, dtype=np.float32),
        bias=np.full((3,), -50.0 + w, dtype=np.float32),
    )


def instruction(node_id: int) -> Message:
    msg = Message(content=RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = f"m{node_id}"
    return msg


def reply(
    node_id: int, arrays: dict[str, np.ndarray], metrics: dict | None = None, **extra
) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(OrderedDict((k, Array(v)) for k, v in arrays.items())),
            "metrics": MetricRecord(metrics or {"num-examples": 10, "train-loss": 0.5}),
        }
        | extra
    )
    return Message(content=content, reply_to=instruction(node_id))


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def pushed(messages: Iterable[Message]) -> list[Message]:
    """What a Grid's push does to the strategy's messages: each gets its id (here the
    one :func:`instruction` gives the message to its node)."""
    out = list(messages)
    for msg in out:
        msg.metadata.__dict__["_message_id"] = f"m{msg.metadata.dst_node_id}"
    return out


def configured(strategy: RobustStrategy, global_arrays: dict[str, np.ndarray]) -> None:
    record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in global_arrays.items()))
    pushed(strategy.configure_train(1, record, ConfigRecord(), FakeGrid([1, 2, 3, 4, 9, 99])))


def test_mean_of_deltas_is_applied_to_the_global_model() -> None:
    strategy = RobustStrategy(min_available_nodes=1, min_train_nodes=1)
    base = model_arrays()
    configured(strategy, base)
    deltas = [0.25, 0.5, 1.5]
    replies = [reply(i + 1, model_arrays(d)) for i, d in enumerate(deltas)]
    new, metrics = strategy.aggregate_train(1, replies)
    got = new.to_numpy_ndarrays()
    assert np.allclose(got[0], 100.0 + np.mean(deltas), atol=1e-5)
    assert np.allclose(got[1], -50.0 + np.mean(deltas), atol=1e-5)
    assert metrics["num-accepted"] == 3 and metrics["num-rejected"] == 0


MALFORMED = {
    "nan": lambda: reply(9, {**model_arrays(1), "bias": np.array([np.nan, 0, 0], np.float32)}),
    "inf": lambda: reply(9, {**model_arrays(1), "weight": np.full((2, 3), np.inf, np.float32)}),
    "shape": lambda: reply(9, {**model_arrays(1), "bias": np.zeros(4, np.float32)}),
    "dtype": lambda: reply(9, {**model_arrays(1), "bias": np.zeros(3, np.float64)}),
    "missing array": lambda: reply(9, {"weight": model_arrays(1)["weight"]}),
    "extra array": lambda: reply(9, {**model_arrays(1), "evil": np.zeros(1, np.float32)}),
    "extra record": lambda: reply(9, model_arrays(1), cfg=ConfigRecord({"x": 1})),
    "num-examples negative": lambda: reply(9, model_arrays(1), {"num-examples": -5}),
    "num-examples float": lambda: reply(9, model_arrays(1), {"num-examples": 2.5}),
    "num-examples missing": lambda: reply(9, model_arrays(1), {"train-loss": 1.0}),
    "error reply": lambda: Message(Error(code=0, reason="client crashed"), reply_to=instruction(9)),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_one_malformed_reply_is_rejected_with_a_reason_and_the_round_goes_on(kind: str) -> None:
    strategy = RobustStrategy(min_available_nodes=1, min_train_nodes=1)
    configured(strategy, model_arrays())
    good = [reply(1, model_arrays(1.0)), reply(2, model_arrays(3.0))]
    new, _ = strategy.aggregate_train(1, [good[0], MALFORMED[kind](), good[1]])
    assert new is not None
    assert np.allclose(new.to_numpy_ndarrays()[1], -50.0 + 2.0, atol=1e-5)  # mean of 1 and 3
    nodes = {d.node_id: d for d in strategy.last_round.nodes}
    assert nodes[9].status == "rejected" and nodes[9].reason
    assert nodes[1].status == nodes[2].status == "accepted"
    assert strategy.last_round.num_rejected == 1


def test_all_rejected_leaves_the_model_unchanged() -> None:
    strategy = RobustStrategy(min_available_nodes=1, min_train_nodes=1)
    configured(strategy, model_arrays())
    new, metrics = strategy.aggregate_train(1, [MALFORMED["nan"]()])
    assert new is None and metrics is None
    assert strategy.last_round.num_accepted == 0


def test_diagnostics_norms_and_cosines() -> None:
    strategy = RobustStrategy(min_available_nodes=1, min_train_nodes=1)
    configured(strategy, model_arrays())
    strategy.aggregate_train(1, [reply(1, model_arrays(1.0)), reply(2, model_arrays(-1.0 / 3))])
    d1, d2 = strategy.last_round.nodes
    assert d1.update_norm == pytest.approx(3.0, rel=1e-6)  # 9 coordinates of 1.0
    assert d2.update_norm == pytest.approx(1.0, rel=1e-5)
    assert d1.cosine_to_aggregate == pytest.approx(1.0)
    assert d2.cosine_to_aggregate == pytest.approx(-1.0)
    assert d1.weight == d2.weight == 0.5


def test_layout_round_trip_keeps_names_shapes_dtypes() -> None:
    arrays = ArrayRecord(OrderedDict((k, Array(v)) for k, v in model_arrays(0.5).items()))
    layout = ModelLayout.of(arrays)
    flat = layout.flatten(arrays)
    assert flat.shape == (9,) and layout.dim == 9
    back = layout.add_scaled(arrays, torch.zeros_like(flat), 1.0)
    assert list(back.keys()) == ["weight", "bias"]
    for (name, orig), arr in zip(model_arrays(0.5).items(), back.values(), strict=True):
        assert arr.numpy().dtype == orig.dtype and np.array_equal(arr.numpy(), orig), name
    stepped = layout.add_scaled(arrays, torch.arange(9, dtype=torch.float32), 2.0)
    assert np.array_equal(
        np.concatenate([a.numpy().reshape(-1) for a in stepped.values()]),
        flat.numpy() + 2.0 * np.arange(9, dtype=np.float32),
    )
    with pytest.raises(ValueError, match="floating-point"):
        ModelLayout.of(ArrayRecord(OrderedDict(n=Array(np.zeros(2, np.int64)))))


@pytest.mark.parametrize(
    "values",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        np.array(2.5, np.float32),
        np.zeros((0, 5), np.float16),
    ],
)
def test_npy_array_is_byte_identical_to_flower_serialisation(values) -> None:
    ours = npy_array(values)
    if values.flags.c_contiguous:
        flowers = Array(values)
        assert ours.data == flowers.data
        assert (ours.dtype, ours.shape, ours.stype) == (flowers.dtype, flowers.shape, flowers.stype)
    assert ours.numpy().shape == values.shape and np.array_equal(ours.numpy(), values)


def test_add_scaled_rounds_once() -> None:
    # base + scale * step formed exactly (float64) and rounded once to float32;
    # a float32 multiply-then-add would round twice and differ in many entries
    rng = np.random.default_rng(3)
    base = rng.normal(size=(200, 50)).astype(np.float32)
    step = rng.normal(size=10_000).astype(np.float32)
    arrays = ArrayRecord(OrderedDict(w=Array(base)))
    layout = ModelLayout.of(arrays)
    exact = (base.reshape(-1).astype(np.float64) + 0.3 * step.astype(np.float64)).astype(np.float32)
    got = layout.add_scaled(arrays, torch.from_numpy(step), 0.3, chunk=777)["w"].numpy()
    assert got.shape == (200, 50) and np.array_equal(got.reshape(-1), exact)
    twice = base.reshape(-1) + np.float32(0.3) * step
    assert not np.array_equal(twice, exact)  # the check above can tell the two apart
    one = layout.add_scaled(arrays, torch.from_numpy(step), 1.0)["w"].numpy()
    assert np.array_equal(one.reshape(-1), base.reshape(-1) + step)
    # built in the step's own memory: the same values, and the step is consumed
    for scale in (0.3, 1.0):
        mine = torch.from_numpy(step.copy())
        out = layout.add_scaled(arrays, mine, scale, chunk=777, overwrite_step=True)["w"].numpy()
        ref = layout.add_scaled(arrays, torch.from_numpy(step), scale)["w"].numpy()
        assert np.array_equal(out, ref)
        assert np.array_equal(mine.numpy(), ref.reshape(-1))


def test_deltas_are_exact_when_weights_are_large() -> None:
    # weights ~1e4, update 1e-3: the delta must survive (no full-weight averaging error)
    strategy = RobustStrategy(min_available_nodes=1, min_train_nodes=1)
    big = OrderedDict(w=np.full(4, 1e4, np.float32))
    configured(strategy, big)
    step = np.float32(1e4) + np.float32(2**-10)  # one float32 ulp above 1e4
    new, _ = strategy.aggregate_train(1, [reply(1, {"w": np.full(4, step, np.float32)})])
    assert torch.equal(torch.from_numpy(new.to_numpy_ndarrays()[0]), torch.full((4,), float(step)))


def test_krum_through_the_strategy_selects_an_honest_reply_and_reports_scores() -> None:
    strategy = RobustStrategy(
        pipeline=compose([], build_aggregator("krum")),
        num_byzantine=1,
        min_available_nodes=1,
        min_train_nodes=1,
    )
    configured(strategy, model_arrays())
    honest = [1.0, 1.1, 0.9, 1.05]
    replies = [reply(i + 1, model_arrays(d)) for i, d in enumerate(honest)]
    replies.append(reply(99, model_arrays(500.0)))  # the outlier (f = 1)
    new, _ = strategy.aggregate_train(1, replies)
    picked = new.to_numpy_ndarrays()[1][0] + 50.0
    assert min(abs(picked - h) for h in honest) < 1e-4
    nodes = {d.node_id: d for d in strategy.last_round.nodes}
    assert nodes[99].selected is False and nodes[99].weight == 0.0
    assert sum(d.selected for d in nodes.values()) == 1
    # Krum scores: the outlier's is the largest
    assert nodes[99].score == max(d.score for d in nodes.values())


def test_rule_precondition_failure_keeps_the_model_and_says_why() -> None:
    strategy = RobustStrategy(
        pipeline=compose([], build_aggregator("krum")),
        num_byzantine=2,
        min_available_nodes=1,
        min_train_nodes=1,
    )
    configured(strategy, model_arrays())
    new, metrics = strategy.aggregate_train(1, [reply(i, model_arrays(1.0)) for i in range(1, 5)])
    assert new is None and metrics is None
    error = strategy.last_round.aggregation_error
    assert "krum" in error and "n=4" in error and "f=2" in error


def test_server_momentum_accumulates_over_rounds() -> None:
    strategy = RobustStrategy(
        server_lr=0.5, server_momentum=0.5, min_available_nodes=1, min_train_nodes=1
    )
    base = OrderedDict(w=np.zeros(2, np.float32))
    configured(strategy, base)
    first, _ = strategy.aggregate_train(1, [reply(1, {"w": np.ones(2, np.float32)})])
    assert np.allclose(first.to_numpy_ndarrays()[0], 0.5)  # v = 1, w = 0 + 0.5 * 1
    configured(strategy, {"w": first.to_numpy_ndarrays()[0]})
    second, _ = strategy.aggregate_train(2, [reply(1, {"w": np.full(2, 1.5, np.float32)})])
    # delta = 1.0; v = 0.5 * 1 + 1 = 1.5; w = 0.5 + 0.5 * 1.5 = 1.25
    assert np.allclose(second.to_numpy_ndarrays()[0], 1.25)


def test_pipeline_from_run_config_orders_steps_and_adjusts_f() -> None:
    cfg = RunConfig(aggregator="median", num_byzantine=2, clip_norm=5.0, resampling_s=2)
    pipeline = pipeline_from_config(cfg)
    assert [type(p).__name__ for p in pipeline.preaggregators] == ["Clip", "Resample"]
    out = pipeline.aggregate(torch.randn(10, 4), num_byzantine=2)
    assert out.num_byzantine == 4  # after s-resampling up to s * f outputs are tainted
    assert type(pipeline_from_config(RunConfig(aggregator="krum")).aggregator).__name__ == "Krum"


def test_payload_that_contradicts_its_metadata_is_rejected_not_crashing() -> None:
    strategy = RobustStrategy(min_available_nodes=1, min_train_nodes=1)
    configured(strategy, model_arrays())
    liar = reply(9, model_arrays(1.0))
    arr = liar.content.array_records["arrays"]["bias"]
    # metadata still says float32 (3,), the bytes hold float64 (3,)
    forged = Array(np.zeros(3, np.float64))
    arr.__dict__["data"] = forged.data
    new, _ = strategy.aggregate_train(1, [reply(1, model_arrays(2.0)), liar])
    nodes = {d.node_id: d for d in strategy.last_round.nodes}
    assert nodes[9].status == "rejected" and "undecodable" in nodes[9].reason
    assert np.allclose(new.to_numpy_ndarrays()[1], -48.0)


def test_strategy_state_round_trip_restores_momentum_and_rule_state() -> None:
    def make() -> RobustStrategy:
        return RobustStrategy(
            pipeline=compose([], build_aggregator("centered-clipping", tau=0.5)),
            server_momentum=0.9,
            min_available_nodes=1,
            min_train_nodes=1,
        )

    base = OrderedDict(w=np.zeros(3, np.float32))
    first = make()
    configured(first, base)
    first.aggregate_train(1, [reply(1, {"w": np.ones(3, np.float32)})])
    saved = first.state_dict()
    second = make()
    second.load_state_dict(saved)
    nxt = {"w": np.full(3, 2.0, np.float32)}
    outs = []
    for strategy in (first, second):
        configured(strategy, base)
        new, _ = strategy.aggregate_train(2, [reply(1, nxt)])
        outs.append(new.to_numpy_ndarrays()[0])
    assert np.array_equal(outs[0], outs[1])
    fresh = make()
    configured(fresh, base)
    new, _ = fresh.aggregate_train(2, [reply(1, nxt)])
    assert not np.array_equal(new.to_numpy_ndarrays()[0], outs[0])  # the state mattered


# ------------------------------------------------------------ the round's outcome
def test_train_round_returns_the_model_the_diagnostics_and_the_reputation_changes() -> None:
    """What the server records comes back from train_round: the new model, every
    node's diagnostics (replies, then silent nodes, then quarantined ones) with its
    suspicion, the counts, and who sat out and who is newly quarantined."""
    strategy = RobustStrategy(
        min_available_nodes=1,
        min_train_nodes=1,
        reputation=Reputation(
            ReputationConfig(decay=0.5, quarantine_threshold=0.5, quarantine_rounds=2)
        ),
    )
    strategy.reputation.load_state_dict(
        {
            "6": {
                "score": 0.8,
                "last_evidence": 1.0,
                "rounds_observed": 3,
                "times_quarantined": 1,
                "quarantined_from": 1,
                "quarantined_until": 2,
            }
        }
    )
    configured(strategy, model_arrays())
    replies = [
        reply(1, model_arrays(1.0), {"num-examples": 10, "partition-id": 0, "dp-epsilon": 1.5}),
        reply(2, model_arrays(3.0), {"num-examples": 10, "partition-id": 1, "dp-epsilon": 2.5}),
        MALFORMED["nan"](),  # node 9
    ]
    outcome = strategy.train_round(
        1,
        replies,
        missing=[(4, "no reply within round-timeout")],
        partitions={4: 7, 6: 2},
        online=[1, 2, 3, 4, 6, 9, 99],
    )
    assert replies == []  # consumed: the caller keeps no reference
    assert outcome.aggregation_error is None
    got = outcome.arrays.to_numpy_ndarrays()
    assert np.allclose(got[0], 102.0) and np.allclose(got[1], -48.0)  # mean delta 2
    assert outcome.metrics["num-accepted"] == 2

    assert [(d.node_id, d.status) for d in outcome.nodes] == [
        (1, "accepted"),
        (2, "accepted"),
        (9, "rejected"),
        (4, "rejected"),
        (6, "quarantined"),
    ]
    silent, benched = outcome.nodes[3], outcome.nodes[4]
    assert silent.no_reply and silent.reason == "no reply within round-timeout"
    assert silent.partition_id == 7  # reported in an earlier round
    assert benched.reason == "left out: quarantined until round 2" and benched.partition_id == 2
    assert outcome.replies == outcome.nodes[:3] and outcome.reported_partitions == {1: 0, 2: 1}
    assert outcome.summary.num_rejected == 1 and outcome.num_rejected == 2
    assert outcome.max_dp_epsilon == 2.5

    # node 9's rejected reply is evidence 1: 0.5 * 0 + 0.5 * 1 reaches the threshold
    assert outcome.quarantined == [6] and outcome.newly_quarantined == [9]
    assert outcome.suspicion[9] == pytest.approx(0.5)
    assert all(d.suspicion == strategy.reputation.score(d.node_id) for d in outcome.nodes)
    assert outcome.max_suspicion == max(d.suspicion for d in outcome.nodes)
    assert strategy.reputation.quarantined(2) == [6, 9]


def test_an_unchanged_model_comes_back_with_its_reason() -> None:
    strategy = RobustStrategy(min_available_nodes=1, min_train_nodes=1, min_accepted_replies=3)
    configured(strategy, model_arrays())
    outcome = strategy.train_round(1, [reply(1, model_arrays(1.0)), reply(2, model_arrays(2.0))])
    assert outcome.arrays is None and outcome.metrics is None
    assert outcome.aggregation_error == (
        "2 of 2 replies accepted, fewer than min-accepted-replies 3; the global model is unchanged"
    )
    assert [d.status for d in outcome.nodes] == ["accepted", "accepted"]
    assert outcome.summary.train_loss is None  # set only when the model moved
    # Flower's aggregate_train is the same step: (None, None), the counts in last_round
    configured(strategy, model_arrays())
    new, metrics = strategy.aggregate_train(2, [reply(1, model_arrays(1.0))])
    assert new is None and metrics is None
    assert strategy.last_round.aggregation_error.startswith("1 of 1 replies accepted")


@pytest.mark.parametrize("steps", [{"bucketing-s": 2}, {"resampling-s": 2}])
def test_the_rows_order_follows_the_partitions_not_the_replies_arrival(steps) -> None:
    """Bucketing and resampling group rows at random from the run's seed: the same
    replies arriving in two different orders give the same new model, because rows are
    ordered by reported partition id; the arrival order alone changes the groups."""
    nodes = [11, 12, 13, 14, 15, 16]
    # the nodes' updates: one coordinate each, far apart, so that any other grouping
    # gives another trimmed mean of the group means
    values = {11: 1.0, 12: 2.0, 13: 4.0, 14: 8.0, 15: 16.0, 16: 32.0}
    partition = {11: 3, 12: 0, 13: 5, 14: 1, 15: 4, 16: 2}

    def new_model(arrival: list[int], partitions: bool) -> float:
        cfg = RunConfig(aggregator="trimmed-mean", num_byzantine=1, seed=7, **steps)
        strategy = RobustStrategy(
            pipeline=pipeline_from_config(cfg), num_byzantine=1, min_available_nodes=1
        )
        base = model_arrays()
        record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in base.items()))
        pushed(strategy.configure_train(1, record, ConfigRecord(), FakeGrid(nodes)))
        replies = [
            reply(
                n,
                model_arrays(values[n]),
                {"num-examples": 10, "train-loss": 0.5}
                | ({"partition-id": partition[n]} if partitions else {}),
            )
            for n in arrival
        ]
        new, _ = strategy.aggregate_train(1, replies)
        return float(new.to_numpy_ndarrays()[1][0]) - float(base["bias"][0])

    arrivals = [nodes, nodes[::-1], [13, 16, 11, 15, 12, 14]]
    with_partitions = {new_model(a, partitions=True) for a in arrivals}
    assert len(with_partitions) == 1
    # without reported partitions the node ids order the rows: the same again
    assert len({new_model(a, partitions=False) for a in arrivals}) == 1
    # and the order matters to these steps at all: partition ids that order the rows
    # otherwise than the node ids give another model
    assert with_partitions != {new_model(nodes, partitions=False)}
