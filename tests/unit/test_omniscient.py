"""The omniscient research mode: refused outside simulation, exact inside."""

from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.superlink.grid import InMemoryGrid

from common.config import RunConfig
from server.omniscient import OmniscientAdversary, OmniscientRefused, running_in_simulation
from strategies.layout import ModelLayout
from strategies.rules.aggregators import Mean
from strategies.rules.registry import build_aggregator, build_preaggregator, compose
from strategies.strategy import RobustStrategy
from tests.unit.test_strategy import (  # noqa: F401
    FakeGrid,
    _task_identity,
    configured,
    model_arrays,
    reply,
)

CFG = {"num-malicious": 2, "attack-knowledge": "omniscient"}


def simulation_grid() -> InMemoryGrid:
    return InMemoryGrid.__new__(InMemoryGrid)  # the type is what counts


def test_refused_on_a_real_federation_grid() -> None:
    cfg = RunConfig.from_flat(CFG | {"attack": "ipm"})
    assert not running_in_simulation(FakeGrid([1, 2]))
    with pytest.raises(OmniscientRefused, match=r"attack-knowledge.*only allowed in simulation"):
        OmniscientAdversary(cfg, FakeGrid([1, 2]))
    assert running_in_simulation(simulation_grid())


def _round(attack: str, deltas: tuple[float, ...] = (0.5, 1.5, 4.0), **extra: object):
    cfg = RunConfig.from_flat(CFG | {"attack": attack} | extra)
    glob = model_arrays()
    record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in glob.items()))
    honest = [
        reply(i, model_arrays(d), {"num-examples": 5, "partition-id": i})
        for i, d in enumerate(deltas, start=1)
    ]
    bad = [
        reply(9 + i, model_arrays(0.25), {"num-examples": 5, "partition-id": 9 + i, "malicious": 1})
        for i in range(2)
    ]
    replies = [bad[0], *honest, bad[1]]
    n = OmniscientAdversary(cfg, simulation_grid()).tamper(replies, record, round_seed=3)
    return n, bad, glob


def test_ipm_sees_every_honest_update() -> None:
    n, bad, glob = _round("ipm", **{"attack-epsilon": 0.5})
    assert n == 2
    # honest deltas 0.5, 1.5, 4.0 -> mean 2.0 -> -0.5 * 2.0 = -1.0 in every coordinate
    for msg in bad:
        got = msg.content["arrays"].to_numpy_ndarrays()
        assert np.allclose(got[0], glob["weight"] - 1.0) and np.allclose(got[1], glob["bias"] - 1.0)


def test_mimic_copies_the_target_honest_update_and_label_flip_is_left_alone() -> None:
    _, bad, glob = _round("mimic", **{"attack-target": 2})  # third honest by partition id
    assert np.allclose(bad[0].content["arrays"].to_numpy_ndarrays()[0], glob["weight"] + 4.0)
    n, bad, glob = _round("label-flip")
    assert n == 0
    assert np.allclose(bad[0].content["arrays"].to_numpy_ndarrays()[0], glob["weight"] + 0.25)


def test_a_diverged_honest_update_is_left_out_of_what_the_attackers_know() -> None:
    """A nan/inf honest update (a diverged node; the strategy rejects it) must not end
    the run: the attack is computed from the finite ones (seen in the grid: Krum under
    mimic on label-sorted data diverged and the attack raised on the nan row)."""
    n, bad, glob = _round("ipm", (0.5, float("nan"), 1.5), **{"attack-epsilon": 0.5})
    assert n == 2  # mean of 0.5 and 1.5 -> -0.5 * 1.0
    got = bad[0].content["arrays"].to_numpy_ndarrays()[0]
    assert np.allclose(got, glob["weight"] - 0.5)
    n, bad, glob = _round("mimic", (float("inf"), float("nan")))
    assert n == 0  # nothing usable: the replies stay as they are (the strategy judges them)
    assert np.allclose(bad[0].content["arrays"].to_numpy_ndarrays()[0], glob["weight"] + 0.25)


# ------------------------------------------------------------- the adaptive attack
class Recorder(Mean):
    """The mean, remembering every input (a class attribute: deep copies share it)."""

    seen: ClassVar[list[torch.Tensor]] = []

    def _aggregate(self, x, f, weights):
        Recorder.seen.append(x.clone())
        return super()._aggregate(x, f, weights)


def _adaptive_round(strategy: RobustStrategy, **extra: object):
    """Four honest replies (nodes 1-4, random deltas) and two flagged ones (9, 99),
    tampered by the adaptive attack; then the strategy's own round on them."""
    rng = np.random.default_rng(5)
    glob = model_arrays()
    record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in glob.items()))
    honest = [
        reply(
            node,
            OrderedDict(
                (k, v + rng.normal(0, 0.1, v.shape).astype(np.float32)) for k, v in glob.items()
            ),
            {"num-examples": 5, "partition-id": pid},
        )
        for node, pid in ((1, 3), (2, 0), (3, 2), (4, 1))
    ]
    bad = [
        reply(n, model_arrays(0.0), {"num-examples": 5, "partition-id": 7, "malicious": 1})
        for n in (9, 99)
    ]
    cfg = RunConfig.from_flat(CFG | {"attack": "adaptive"} | extra)
    replies = [honest[0], bad[0], honest[1], honest[2], bad[1], honest[3]]
    known = torch.stack([ModelLayout.of(record).flatten(m.content["arrays"]) for m in honest])
    known = known[[1, 3, 2, 0]] - ModelLayout.of(record).flatten(record)  # partition-id order
    configured(strategy, glob)
    adversary = OmniscientAdversary(cfg, simulation_grid(), strategy)
    before = strategy.state_dict()
    assert adversary.tamper(replies, record, round_seed=3, server_round=4) == 2
    after = strategy.state_dict()
    outcome = strategy.train_round(4, replies)
    new = ModelLayout.of(record).flatten(outcome.arrays) - ModelLayout.of(record).flatten(record)
    return adversary.last_choice, known, new, before, after


def test_adaptive_searches_a_copy_of_the_live_pipeline_and_leaves_it_unchanged() -> None:
    """Centered clipping keeps the previous aggregate and bucketing draws from its
    generator: the search must see both as the strategy will, and change neither."""
    pipeline = compose(
        [build_preaggregator("bucket", s=2, seed=3)],
        build_aggregator("centered-clipping", tau=0.05),
    )
    pipeline.aggregate(torch.randn(6, 9) * 0.1, num_byzantine=1)  # a previous aggregate
    strategy = RobustStrategy(
        pipeline=pipeline, num_byzantine=1, min_available_nodes=1, min_train_nodes=1
    )
    choice, known, new, before, after = _adaptive_round(strategy)
    assert choice is not None and choice.base == "alie" and len(choice.probes) <= 20
    # the live state is what it was before the search ...
    cc_before, cc_after = before["pipeline"]["aggregator"], after["pipeline"]["aggregator"]
    assert torch.equal(cc_before["previous"], cc_after["previous"])
    assert torch.equal(
        before["pipeline"]["preaggregators"][0]["generator"],
        after["pipeline"]["preaggregators"][0]["generator"],
    )
    # ... and the round the strategy then ran is the one the search predicted
    damage = float(torch.linalg.vector_norm(new.double() - known.double().mean(0)))
    assert damage == pytest.approx(choice.damage, rel=1e-4)


def test_adaptive_rows_come_in_the_order_the_strategy_decodes_them() -> None:
    Recorder.seen.clear()
    strategy = RobustStrategy(
        pipeline=compose([], Recorder()), num_byzantine=2, min_available_nodes=1, min_train_nodes=1
    )
    choice, *_ = _adaptive_round(strategy, **{"attack-adaptive-max": 3.0})
    assert choice is not None and choice.factor == 3.0  # the mean: the top of the range
    live = Recorder.seen.pop()  # what the strategy aggregated
    assert any(torch.allclose(rows, live, atol=1e-5) for rows in Recorder.seen)


def test_adaptive_stays_below_the_servers_update_norm_limit() -> None:
    """A crafted update longer than max-update-norm is dropped by the strategy; the
    search knows it, so against the mean it stops short of that length."""
    strategy = RobustStrategy(
        pipeline=compose([], build_aggregator("mean")),
        min_available_nodes=1,
        min_train_nodes=1,
        max_update_norm=2.0,
    )
    choice, known, new, *_ = _adaptive_round(strategy)
    assert choice is not None and 0 < float(torch.linalg.vector_norm(choice.vector)) <= 2.0
    assert len({r.value for r in choice.probes if r.factor > 50}) <= 1  # all dropped alike
    assert choice.damage > 0 and outcome_accepted_all(new, known)


def outcome_accepted_all(new: torch.Tensor, known: torch.Tensor) -> bool:
    # not the honest mean: the attackers' rows were accepted and moved it
    return not torch.allclose(new, known.mean(0), atol=1e-6)


def test_adaptive_needs_the_strategy_and_records_nothing_for_other_attacks() -> None:
    cfg = RunConfig.from_flat(CFG | {"attack": "adaptive"})
    with pytest.raises(ValueError, match="needs the run's strategy"):
        OmniscientAdversary(cfg, simulation_grid())
    with pytest.raises(OmniscientRefused):
        OmniscientAdversary(cfg, FakeGrid([1]), RobustStrategy())
    n, *_ = _round("ipm")
    assert n == 2


def test_the_adaptive_choice_goes_into_the_rounds_metrics_row() -> None:
    from server.app import adaptive_metrics

    strategy = RobustStrategy(
        pipeline=compose([], build_aggregator("median")), min_available_nodes=1, min_train_nodes=1
    )
    choice, *_ = _adaptive_round(strategy)
    assert adaptive_metrics(None) is None
    assert choice is not None
    assert adaptive_metrics(choice) == {
        "adaptive_base": "alie",
        "adaptive_factor": choice.factor,
        "adaptive_damage": choice.damage,
        "adaptive_evals": len(choice.probes),
    }
