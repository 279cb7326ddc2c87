"""The omniscient research mode: refused outside simulation, exact inside."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.superlink.grid import InMemoryGrid

from common.config import RunConfig
from server.omniscient import OmniscientAdversary, OmniscientRefused, running_in_simulation
from tests.unit.test_strategy import FakeGrid, _task_identity, model_arrays, reply  # noqa: F401

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
