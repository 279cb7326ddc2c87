"""The malicious ClientApp's plan: who attacks, with which parameters, knowing what."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from attacks import check_attack_config
from attacks.selection import malicious_partitions
from client.collusion import SharedDirectory
from client.malicious import (
    AttackPlan,
    apply_attack,
    craft_update,
    resolve_plan,
)
from common.config import ConfigError, NodeConfig, RunConfig


def node(pid: int = 0, n: int = 10, **extra: object) -> NodeConfig:
    return NodeConfig.from_flat({"partition-id": pid, "num-partitions": n, **extra})


def run(**values: object) -> RunConfig:
    return RunConfig.from_flat(values)


def test_malicious_partitions_are_a_seeded_sample() -> None:
    a = malicious_partitions(25, 5, seed=0)
    assert a == malicious_partitions(25, 5, seed=0)  # same on every node
    assert len(set(a)) == 5 and list(a) == sorted(a) and all(0 <= p < 25 for p in a)
    assert malicious_partitions(25, 5, seed=1) != a
    assert malicious_partitions(25, 0, seed=0) == ()
    assert malicious_partitions(4, 4, seed=3) == (0, 1, 2, 3)
    with pytest.raises(ConfigError, match=r"num-malicious.*0\.\.4"):
        malicious_partitions(4, 5, seed=0)


def test_run_rule_marks_exactly_the_chosen_partitions() -> None:
    cfg = run(**{"num-malicious": 3, "attack": "ipm", "attack-knowledge": "own"})
    chosen = set(malicious_partitions(10, 3, seed=0))
    plans = {pid: resolve_plan(cfg, node(pid)) for pid in range(10)}
    assert {pid for pid, p in plans.items() if p is not None} == chosen
    assert all(p.params == {"epsilon": 0.1} for p in plans.values() if p is not None)


def test_node_role_wins_over_the_run_rule() -> None:
    cfg = run(**{"num-malicious": 10, "attack": "ipm", "attack-knowledge": "own"})
    assert resolve_plan(cfg, node(0, role="honest")) is None
    plan = resolve_plan(run(), node(0, role="malicious", attack="scaling", **{"attack-scale": 3.0}))
    assert plan is not None and plan.attack == "scaling" and plan.params == {"scale": 3.0}
    # node values override the run's, unset ones fall back to it
    cfg = run(**{"attack": "ipm", "attack-epsilon": 0.5, "attack-data": "full"})
    plan = resolve_plan(cfg, node(1, role="malicious", **{"attack-epsilon": 10.0}))
    assert plan is not None and plan.params == {"epsilon": 10.0} and plan.data == "full"


def test_attackers_are_honest_before_the_start_round() -> None:
    cfg = run(
        **{"num-malicious": 3, "attack": "ipm", "attack-knowledge": "own", "attack-start-round": 10}
    )
    chosen = malicious_partitions(10, 3, seed=0)
    for pid in range(10):
        for rnd, attacks in ((1, False), (9, False), (10, True), (11, True)):
            plan = resolve_plan(cfg, node(pid), server_round=rnd)
            assert (plan is not None) == (attacks and pid in chosen), (pid, rnd)
    # without a round (a launcher's up-front check) the plan is resolved as before
    assert resolve_plan(cfg, node(chosen[0])) is not None
    # a node's own start round wins over the run's
    own = node(0, role="malicious", attack="sign-flip", **{"attack-start-round": 3})
    assert resolve_plan(run(), own, server_round=2) is None
    assert resolve_plan(run(), own, server_round=3) is not None
    # the plan is still checked before the start round: a broken one fails at round 1
    with pytest.raises(ConfigError, match=r"'role'.*needs an attack"):
        resolve_plan(run(**{"attack-start-round": 5}), node(0, role="malicious"), server_round=1)
    with pytest.raises(ConfigError, match="attack-start-round"):
        run(**{"attack-start-round": 0})


def test_honest_by_default() -> None:
    assert resolve_plan(run(), node(3)) is None


def test_malicious_without_attack_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"'role'.*needs an attack"):
        resolve_plan(run(), node(0, role="malicious"))
    with pytest.raises(ConfigError, match="num-malicious"):
        check_attack_config(run(**{"num-malicious": 2}))


def test_collusion_needs_a_directory() -> None:
    cfg = run(**{"num-malicious": 2, "attack": "alie"})
    pid = malicious_partitions(10, 2, seed=0)[0]
    with pytest.raises(ConfigError, match="collusion-dir"):
        resolve_plan(cfg, node(pid))
    # label flip does not exchange updates: no directory needed
    assert resolve_plan(run(**{"num-malicious": 2, "attack": "label-flip"}), node(pid))


def test_alie_z_defaults_to_baruch_formula() -> None:
    # n = 25, f = 5: s = floor(25/2 + 1) - 5 = 8, z = Phi^-1(17/25) = 0.4677
    cfg = run(**{"num-malicious": 5, "attack": "alie", "collusion-dir": "/tmp/x"})
    pid = malicious_partitions(25, 5, seed=0)[0]
    plan = resolve_plan(cfg, node(pid, 25))
    assert plan is not None and plan.params["z"] == pytest.approx(0.4677, abs=1e-3)
    cfg = run(**{"num-malicious": 5, "attack": "alie", "attack-z": 1.5, "collusion-dir": "/x"})
    assert resolve_plan(cfg, node(pid, 25)).params["z"] == 1.5  # type: ignore[union-attr]


ROUND = {"server_round": 1, "round_seed": 7, "partition_id": 0, "run_id": 1}


def test_own_knowledge_ipm_and_label_flip_pass_through() -> None:
    own = torch.tensor([1.0, -2.0, 4.0])
    out = craft_update(AttackPlan("ipm", {"epsilon": 2.0}, knowledge="own"), own, **ROUND)
    assert torch.equal(out.update, torch.tensor([-2.0, 4.0, -8.0])) and out.known_rows == 1
    flip = craft_update(AttackPlan("label-flip"), own, **ROUND)
    assert flip.update is own
    omni = craft_update(AttackPlan("ipm", {"epsilon": 2.0}, knowledge="omniscient"), own, **ROUND)
    assert omni.update is own  # the server's research hook replaces it


def test_gaussian_noise_is_fresh_each_round_and_shared_by_colluders() -> None:
    plan = AttackPlan("gaussian", {"sigma": 1.0}, knowledge="own")
    own = torch.zeros(1000)
    a = craft_update(plan, own, **ROUND).update
    b = craft_update(plan, own, **(ROUND | {"partition_id": 5})).update
    c = craft_update(plan, own, **(ROUND | {"round_seed": 8})).update
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_apply_attack_adds_the_crafted_delta_to_the_global_model() -> None:
    glob = {"w": torch.full((2, 2), 10.0), "b": torch.tensor([1.0])}
    trained = {"w": torch.full((2, 2), 11.0), "b": torch.tensor([3.0])}
    plan = AttackPlan("sign-flip", knowledge="own")
    state, crafted = apply_attack(plan, glob, trained, **ROUND)
    assert torch.equal(state["w"], torch.full((2, 2), 9.0))
    assert torch.equal(state["b"], torch.tensor([-1.0]))
    assert crafted.update.shape == (5,)


def _colluder(root: str, pid: int, value: float, queue: mp.Queue) -> None:
    plan = AttackPlan(
        "alie",
        {"z": 1.0},
        knowledge="collude",
        colluders=2,
        collusion_dir=root,
        collusion_timeout=30,
    )
    own = torch.full((4,), value)
    out = craft_update(plan, own, server_round=3, round_seed=1, partition_id=pid, run_id=9)
    queue.put((pid, out.update.tolist(), out.known_rows, out.colluders_seen))


def test_two_colluding_processes_send_identical_vectors(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_colluder, args=(str(tmp_path), pid, value, queue))
        for pid, value in ((4, 1.0), (2, 3.0))
    ]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    (_, a, ka, sa), (_, b, kb, sb) = results
    # mean 2, population std 1, z = 1 -> 1 in every coordinate, for both attackers
    assert a == b == [1.0, 1.0, 1.0, 1.0]
    assert ka == kb == 2 and sa == sb == 2


def test_collusion_times_out_with_what_it_has(tmp_path: Path) -> None:
    channel = SharedDirectory(tmp_path, run_id=1, expected=3, timeout=0.2)
    got = channel.exchange(1, 0, torch.ones(3))
    assert not got.complete and got.partition_ids == (0,)
    with pytest.raises(ValueError, match="different shapes"):
        SharedDirectory(tmp_path, run_id=1, expected=2, timeout=0.1).exchange(1, 1, torch.ones(4))


def test_collusion_removes_rounds_two_back(tmp_path: Path) -> None:
    channel = SharedDirectory(tmp_path, run_id=1, expected=1, timeout=0.1)
    for r in (1, 2, 3):
        channel.exchange(r, 0, torch.ones(2))
    assert sorted(p.name for p in (tmp_path / "run-1").iterdir()) == ["round-2", "round-3"]
