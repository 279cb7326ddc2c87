"""Suspicion scores, quarantine and the reputation report (strategies.rules.reputation)."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from common.config import ConfigError, RunConfig
from server.reputation_report import (
    node_standings,
    reputation_summary,
    write_reputation_report,
)
from strategies import build_aggregator, compose
from strategies.rules.from_config import reputation_from_config
from strategies.rules.reputation import Reputation, ReputationConfig
from strategies.strategy import NodeDiagnostics, RobustStrategy
from tests.unit.test_strategy import FakeGrid, model_arrays, pushed, reply


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def accepted(node: int, distance: float | None = 1.0, selected: bool | None = None):
    return NodeDiagnostics(1, node, "accepted", distance_to_aggregate=distance, selected=selected)


def rejected(node: int, reason: str = "update holds 3 non-finite values", no_reply=False):
    return NodeDiagnostics(1, node, "rejected", reason, no_reply=no_reply)


def test_evidence_of_each_kind_of_observation() -> None:
    rep = Reputation(ReputationConfig(weight_unselected=0.5, weight_far=0.5, weight_missing=0.25))
    # distances 1, 1, 1, 3 -> median 1; node 4 is three times the median (capped at 1)
    # Multi-Krum-like selection: 3 of 4 picked; node 4 left out
    obs = [
        accepted(1, 1.0, True),
        accepted(2, 1.0, True),
        accepted(3, 1.0, True),
        accepted(4, 3.0, False),
        rejected(5),
        rejected(6, "no reply within round-timeout", no_reply=True),
    ]
    e = rep.evidence(obs)
    assert e[1] == e[2] == e[3] == 0.0
    assert e[4] == pytest.approx(0.5 * 3 / 4 + 0.5 * 1.0)
    assert e[5] == 1.0
    assert e[6] == 0.25


def test_being_left_out_by_krum_weighs_little_by_multi_krum_much() -> None:
    rep = Reputation(ReputationConfig(weight_unselected=1.0, weight_far=0.0))
    krum = [accepted(i, 1.0, i == 0) for i in range(10)]  # picks 1 of 10
    multi = [accepted(i, 1.0, i != 0) for i in range(10)]  # keeps 9 of 10
    assert rep.evidence(krum)[5] == pytest.approx(0.1)
    assert rep.evidence(multi)[0] == pytest.approx(0.9)


def test_far_evidence_grows_from_the_median_to_twice_it() -> None:
    rep = Reputation(ReputationConfig(weight_far=1.0))
    obs = [accepted(i, 2.0) for i in range(4)] + [accepted(10, 3.0), accepted(11, 0.5)]
    e = rep.evidence(obs)
    assert e[10] == pytest.approx(0.5)  # 1.5x the median
    assert e[11] == 0.0  # closer than the median is no evidence


def test_opposed_evidence_is_the_negative_part_of_the_cosine() -> None:
    rep = Reputation(ReputationConfig(weight_far=0.0, weight_unselected=0.0, weight_opposed=1.0))

    def obs(node: int, cosine: float | None) -> NodeDiagnostics:
        return NodeDiagnostics(1, node, "accepted", cosine_to_aggregate=cosine)

    e = rep.evidence([obs(1, 0.3), obs(2, 0.0), obs(3, -0.4), obs(4, -1.0), obs(5, None)])
    assert e[1] == e[2] == 0.0  # any non-negative component along the consensus
    assert e[3] == pytest.approx(0.4)
    assert e[4] == pytest.approx(1.0)  # pointing straight against it (IPM, sign flip)
    assert e[5] == 0.0  # no cosine (no aggregate): no signal


def test_far_and_opposed_evidence_are_weighted_by_their_weights() -> None:
    # distances 1, 1, 1, 1.5 -> median 1: node 4 is far by 0.5; its cosine is -0.5
    rep = Reputation(ReputationConfig(weight_far=0.4, weight_opposed=0.6))
    obs = [
        NodeDiagnostics(1, i, "accepted", distance_to_aggregate=1.0, cosine_to_aggregate=0.5)
        for i in range(3)
    ]
    obs.append(
        NodeDiagnostics(1, 4, "accepted", distance_to_aggregate=1.5, cosine_to_aggregate=-0.5)
    )
    e = rep.evidence(obs)
    assert e[0] == 0.0
    assert e[4] == pytest.approx((0.4 * 0.5 + 0.6 * 0.5) / (0.4 + 0.6))


def test_the_opposed_weight_is_checked_with_its_key() -> None:
    with pytest.raises(ValueError, match="reputation-weight-opposed"):
        ReputationConfig(weight_opposed=1.5)
    with pytest.raises(ConfigError, match="reputation-weight-opposed"):
        RunConfig.from_flat({"reputation-weight-opposed": -0.1})


def test_score_is_an_exponential_moving_average_of_evidence() -> None:
    decay = 0.6
    rep = Reputation(ReputationConfig(decay=decay))
    expected = 0.0
    for rnd in range(1, 6):
        rep.observe(rnd, [rejected(7)])
        expected = decay * expected + (1 - decay) * 1.0
        assert rep.score(7) == pytest.approx(expected)
    assert rep.score(7) == pytest.approx(1 - decay**5)
    # rounds without evidence forgive geometrically
    rep.observe(6, [])
    assert rep.score(7) == pytest.approx(decay * (1 - decay**5))
    assert rep.score(12345) == 0.0


def test_quarantine_starts_at_the_threshold_lasts_its_rounds_then_ends() -> None:
    rep = Reputation(ReputationConfig(decay=0.5, quarantine_threshold=0.7, quarantine_rounds=2))
    honest = [accepted(i) for i in range(1, 5)]
    assert rep.observe(1, [*honest, rejected(9)]) == []  # 0.5
    assert rep.observe(2, [*honest, rejected(9)]) == [9]  # 0.75 >= 0.7
    assert rep.quarantined(2) == []  # from the next round on
    assert rep.quarantined(3) == [9] and rep.quarantined(4) == [9]
    assert rep.quarantined(5) == []
    # not quarantined again while it is in quarantine
    assert rep.observe(3, honest) == []
    assert rep.nodes[9].times_quarantined == 1


def test_quarantine_caps_keep_enough_nodes_and_at_most_max() -> None:
    cfg = ReputationConfig(decay=0.0, quarantine_threshold=0.5, max_quarantined=1)
    rep = Reputation(cfg)
    obs = [accepted(1), accepted(2), rejected(8), rejected(9)]
    newly = rep.observe(1, obs, online=[1, 2, 8, 9], min_remaining=1)
    assert len(newly) == 1  # the cap
    rep = Reputation(ReputationConfig(decay=0.0, quarantine_threshold=0.5))
    newly = rep.observe(1, obs, online=[1, 2, 8, 9], min_remaining=3)
    assert len(newly) == 1  # 4 online - 1 quarantined = 3 left; a second would leave 2


def test_state_round_trip() -> None:
    rep = Reputation(ReputationConfig(decay=0.5, quarantine_threshold=0.4))
    rep.observe(1, [accepted(1), rejected(2)])
    other = Reputation(ReputationConfig(decay=0.5, quarantine_threshold=0.4))
    other.load_state_dict(json.loads(json.dumps(rep.state_dict())))
    assert other.nodes == rep.nodes and other.quarantined(2) == [2]


@pytest.mark.parametrize(
    ("key", "value"),
    [("reputation-decay", 1.0), ("quarantine-threshold", 1.5), ("quarantine-rounds", 0)],
)
def test_bad_reputation_keys_name_the_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_flat({key: value})


def test_quarantine_max_defaults_to_num_byzantine() -> None:
    assert reputation_from_config(RunConfig(num_byzantine=3)).config.max_quarantined == 3
    assert reputation_from_config(RunConfig()).config.max_quarantined is None
    cfg = RunConfig.from_flat({"quarantine-max": 5, "num-byzantine": 1})
    assert reputation_from_config(cfg).config.max_quarantined == 5


def test_strategy_leaves_quarantined_nodes_out_of_training_and_evaluation() -> None:
    strategy = RobustStrategy(min_available_nodes=1, min_train_nodes=1)
    strategy.reputation.nodes.clear()
    strategy.reputation.load_state_dict(
        {
            "3": {
                "score": 0.9,
                "last_evidence": 1.0,
                "rounds_observed": 2,
                "times_quarantined": 1,
                "quarantined_until": 4,
            }
        }
    )
    record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in model_arrays().items()))
    grid = FakeGrid([1, 2, 3, 4])
    dst = {
        m.metadata.dst_node_id for m in strategy.configure_train(4, record, ConfigRecord(), grid)
    }
    assert dst == {1, 2, 4}
    dst = {
        m.metadata.dst_node_id for m in strategy.configure_evaluate(4, record, ConfigRecord(), grid)
    }
    assert dst == {1, 2, 4}
    dst = {
        m.metadata.dst_node_id for m in strategy.configure_train(5, record, ConfigRecord(), grid)
    }
    assert dst == {1, 2, 3, 4}
    # the score survives a checkpoint of the strategy
    assert strategy.state_dict()["reputation"]["3"]["quarantined_until"] == 4


def test_distance_to_aggregate_is_the_true_l2_distance() -> None:
    strategy = RobustStrategy(
        pipeline=compose([], build_aggregator("median")), min_available_nodes=1, min_train_nodes=1
    )
    base = model_arrays()
    record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in base.items()))
    pushed(strategy.configure_train(1, record, ConfigRecord(), FakeGrid([1, 2, 3])))
    offsets = [0.1, 0.2, 5.0]
    strategy.aggregate_train(1, [reply(i + 1, model_arrays(w)) for i, w in enumerate(offsets)])
    # every coordinate moves by w; the median moves by 0.2; 9 coordinates in all
    for diag, w in zip(strategy.last_round.nodes, offsets, strict=True):
        assert diag.distance_to_aggregate == pytest.approx(abs(w - 0.2) * 3.0, abs=1e-4)


def test_a_repeat_offender_is_quarantined_through_the_strategy() -> None:
    """Rounds of Krum with one node far away every round: it is quarantined, the
    honest ones are not, and the report says so."""
    strategy = RobustStrategy(
        pipeline=compose([], build_aggregator("multi-krum", m=3)),
        num_byzantine=1,
        min_available_nodes=1,
        min_train_nodes=1,
        reputation=Reputation(
            ReputationConfig(decay=0.5, quarantine_threshold=0.6, quarantine_rounds=2)
        ),
    )
    grid = FakeGrid([1, 2, 3, 4, 5])
    rounds_in = {}
    rng = np.random.default_rng(0)
    for rnd in range(1, 7):
        record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in model_arrays().items()))
        sent = pushed(strategy.configure_train(rnd, record, ConfigRecord(), grid))
        nodes = sorted(m.metadata.dst_node_id for m in sent)
        rounds_in[rnd] = nodes
        # honest updates vary from round to round (which honest node is the odd one
        # out changes); node 5 is far away every round
        offsets = {
            n: 1.0 + 0.05 * float(x)
            for n, x in zip(grid.nodes, rng.standard_normal(5), strict=True)
        }
        offsets[5] = 40.0
        strategy.aggregate_train(rnd, [reply(n, model_arrays(offsets[n])) for n in nodes])
        strategy.update_reputation(rnd, strategy.last_round.nodes, online=grid.nodes)
    assert rounds_in[1] == rounds_in[2] == [1, 2, 3, 4, 5]
    assert 5 not in rounds_in[3] and 5 not in rounds_in[4]
    # Multi-Krum leaves out n - m replies every round, so honest nodes collect some
    # "left out" evidence too, but stay below the threshold
    assert all(strategy.reputation.nodes[n].times_quarantined == 0 for n in (1, 2, 3, 4))
    assert all(strategy.reputation.score(n) < 0.6 for n in (1, 2, 3, 4))


def test_report_lists_each_nodes_rounds_and_draws_the_heatmap(tmp_path) -> None:
    rows = [
        {
            "round": 1,
            "node_id": 11,
            "status": "accepted",
            "selected": True,
            "partition_id": 0,
            "suspicion": 0.0,
        },
        {"round": 1, "node_id": 12, "status": "rejected", "reason": "x", "suspicion": 0.3},
        {
            "round": 2,
            "node_id": 11,
            "status": "accepted",
            "selected": False,
            "partition_id": 0,
            "suspicion": 0.05,
            "malicious": True,
        },
        {"round": 2, "node_id": 12, "status": "quarantined", "suspicion": 0.21},
    ]
    standings = node_standings(rows)
    assert standings[11]["partition_id"] == 0 and standings[11]["malicious"]
    assert standings[11]["rounds_unselected"] == [2]
    assert standings[12]["rounds_rejected"] == [1] and standings[12]["rounds_quarantined"] == [2]
    assert standings[12]["max_suspicion"] == 0.3 and standings[12]["final_suspicion"] == 0.21
    honest = {"round": 1, "node_id": 13, "status": "accepted", "suspicion": 0.0}
    summary = reputation_summary(node_standings([*rows, honest]))
    # Node 12 sent a rejected reply and never declared anything: not counted as honest.
    assert summary["nodes_with_rejected_replies"] == [12]
    assert summary["nodes_quarantined"] == [12] and summary["quarantined_honest"] == 0
    assert summary["max_suspicion_honest"] == 0.0 and summary["max_suspicion_malicious"] == 0.05
    (tmp_path / "diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_reputation_report(tmp_path, threshold=0.5)
    written = json.loads((tmp_path / "reputation.json").read_text())
    assert [w["node_id"] for w in written] == [11, 12]
    png = (tmp_path / "reputation.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert np.isfinite(written[1]["max_suspicion"])


def test_repeat_offenders_stay_out_longer_and_come_back_on_probation() -> None:
    cfg = ReputationConfig(decay=0.5, quarantine_threshold=0.6, quarantine_rounds=2, escalation=2)
    rep = Reputation(cfg)
    honest = [accepted(i) for i in range(1, 5)]
    out: dict[int, list[int]] = {}
    for rnd in range(1, 16):
        asked = [] if 9 in rep.quarantined(rnd) else [rejected(9)]
        out[rnd] = rep.observe(rnd, [*honest, *asked])
    spells = [rnd + 1 for rnd, newly in out.items() if newly == [9]]
    # 0.5, 0.75 -> out for rounds 3-4; back at 0.75 (held), one bad round -> 0.875 ->
    # out for 6-9 (2 x 2); back in 10 -> out for 11-18 (2 x 4)
    assert spells == [3, 6, 11]
    assert rep.quarantined(11) == rep.quarantined(18) == [9] and rep.quarantined(19) == []
    assert rep.nodes[9].times_quarantined == 3


def test_with_probation_a_returning_node_is_on_trial_for_its_first_round_back() -> None:
    cfg = ReputationConfig(decay=0.5, quarantine_threshold=0.7, quarantine_rounds=2)
    for probation in (False, True):
        rep = Reputation(ReputationConfig(**{**cfg.__dict__, "probation": probation}))
        honest = [accepted(i) for i in range(1, 5)]
        rep.observe(1, [*honest, rejected(9)])
        rep.observe(2, [*honest, rejected(9)])  # out for rounds 3 and 4
        trials = {rnd: rep.on_trial(rnd) for rnd in range(1, 8)}
        assert trials == {r: ([9] if probation and r == 5 else []) for r in range(1, 8)}


def test_a_node_on_trial_is_judged_but_not_aggregated_and_goes_back_at_once() -> None:
    """The mean, and node 5 far away whenever it takes part: with probation its
    first round back moves the model by the honest mean only, its diagnostics still
    measure it against that aggregate, and it is quarantined again after that round."""

    def run(probation: bool) -> tuple[dict[int, list[int]], list[float], RobustStrategy]:
        strategy = RobustStrategy(
            num_byzantine=1,
            min_available_nodes=1,
            min_train_nodes=1,
            reputation=Reputation(
                ReputationConfig(
                    decay=0.5, quarantine_threshold=0.6, quarantine_rounds=2, probation=probation
                )
            ),
        )
        grid = FakeGrid([1, 2, 3, 4, 5])
        rounds_in, moved = {}, []
        base = model_arrays()
        for rnd in range(1, 9):
            record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in base.items()))
            sent = pushed(strategy.configure_train(rnd, record, ConfigRecord(), grid))
            nodes = sorted(m.metadata.dst_node_id for m in sent)
            rounds_in[rnd] = nodes
            # honest updates equally far from their mean: no honest node is 'far'
            offsets = {1: 1.05, 2: 0.95, 3: 1.05, 4: 0.95, 5: 40.0}
            new, _ = strategy.aggregate_train(
                rnd, [reply(n, model_arrays(offsets[n])) for n in nodes]
            )
            moved.append(float(new.to_numpy_ndarrays()[1][0]) - float(base["bias"][0]))
            strategy.update_reputation(rnd, strategy.last_round.nodes, online=grid.nodes)
        return rounds_in, moved, strategy

    plain_in, plain_moved, _ = run(False)
    trial_in, trial_moved, strategy = run(True)
    # both: node 5 out for rounds 3-4 and back in round 5
    assert 5 not in plain_in[3] and 5 not in plain_in[4] and 5 in plain_in[5]
    assert trial_in[5] == [1, 2, 3, 4, 5]
    # without probation round 5's mean includes node 5's 40; with it, the honest mean
    assert plain_moved[4] == pytest.approx((4 * 1.0 + 40.0) / 5, abs=1e-4)
    assert trial_moved[4] == pytest.approx(1.0, abs=1e-4)
    node5 = [d for d in strategy.last_round.nodes if d.node_id == 5]
    assert node5 == []  # quarantined again for round 8 (the last round run)
    # it went back out right after its trial: rounds 6 and on (2 x 2 rounds)
    assert 5 not in trial_in[6] and 5 not in trial_in[7] and 5 not in trial_in[8]
    assert strategy.reputation.nodes[5].times_quarantined == 2


def test_a_trial_that_would_leave_krum_too_few_rows_aggregates_everyone() -> None:
    """Krum needs n >= 2f + 3 rows (5 with f = 1). Five nodes, node 5 back on trial in
    round 5: the four others are 2f + 1 (enough for the trial guard) but too few for
    Krum, so round 5 aggregates all five instead of skipping the round."""
    strategy = RobustStrategy(
        pipeline=compose([], build_aggregator("krum")),
        num_byzantine=1,
        min_available_nodes=1,
        min_train_nodes=1,
        reputation=Reputation(
            ReputationConfig(
                decay=0.5,
                weight_unselected=0.0,  # far alone: node 5 is out for rounds 3-4
                quarantine_threshold=0.6,
                quarantine_rounds=2,
                probation=True,
            )
        ),
    )
    grid = FakeGrid([1, 2, 3, 4, 5])
    base = model_arrays()
    offsets = {1: 1.05, 2: 0.95, 3: 1.05, 4: 0.95, 5: 40.0}
    for rnd in range(1, 6):
        record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in base.items()))
        sent = pushed(strategy.configure_train(rnd, record, ConfigRecord(), grid))
        nodes = sorted(m.metadata.dst_node_id for m in sent)
        new, _ = strategy.aggregate_train(rnd, [reply(n, model_arrays(offsets[n])) for n in nodes])
        if rnd == 5:
            assert nodes == [1, 2, 3, 4, 5] and strategy.reputation.on_trial(5) == [5]
            assert strategy.last_round.aggregation_error is None
            assert new is not None  # the round was not skipped
            # Krum picked an honest row among all five; node 5 was aggregated, not on trial
            moved = float(new.to_numpy_ndarrays()[1][0]) - float(base["bias"][0])
            assert moved in (pytest.approx(1.05, abs=1e-4), pytest.approx(0.95, abs=1e-4))
            node5 = next(d for d in strategy.last_round.nodes if d.node_id == 5)
            assert not (node5.reason or "").startswith("probation")
        strategy.update_reputation(rnd, strategy.last_round.nodes, online=grid.nodes)
