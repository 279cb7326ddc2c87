"""The adaptive attack's line search (attacks/line_search.py, attacks.byzantine.Adaptive):
hand-computed cases against Krum and the mean, the config refusal outside the
omniscient mode, determinism; and ALIE's z beyond Baruch et al.'s formula.

No Flower here: the aggregation is a plain callable over the pure rules.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from attacks import attack_params, build_attack, check_attack_config, line_maximize
from attacks.byzantine import Adaptive, alie_z_max
from common.config import ConfigError, RunConfig
from server.run_config import load_run_config
from strategies.rules.registry import build_aggregator, build_preaggregator, compose

# Five honest rows in 2-D: a centre and a ring of radius 1 around it. Mean (0, 0); per
# coordinate the values are 0, 1, -1, 0, 0, so the population std is sqrt(2/5) in both.
RING = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
STD = math.sqrt(2 / 5)
# ALIE with z puts the f = 2 copies at c = -z * STD * (1, 1), i.e. s = z * STD along each
# axis. Krum (n = 7, f = 2, 3 neighbours): a copy scores 0 (the other copy) plus its two
# nearest ring points, (-1, 0) and (0, -1), at squared distance (1 - s)^2 + s^2 each:
# 4s^2 - 4s + 2 (for s >= 1/2). The centre scores 3 once 2 s^2 >= 1 (three ring points
# at distance 1); (-1, 0) scores one more than a copy. So Krum picks a copy while
# 4s^2 - 4s + 2 < 3, i.e. s < (1 + sqrt(2)) / 2, and the centre (damage 0) beyond:
Z_KRUM = (1 + math.sqrt(2)) / 2 / STD  # ~ 1.9086


def damage_of(vector: torch.Tensor, known: torch.Tensor, f: int, aggregate) -> float:
    rows = torch.cat([known, vector.unsqueeze(0).expand(f, -1)])
    return float(torch.linalg.vector_norm(aggregate(rows).double() - known.double().mean(0)))


def krum(x: torch.Tensor) -> torch.Tensor:
    return build_aggregator("krum", num_byzantine=2)(x)


# --------------------------------------------------------------------------- line search
def test_line_search_expands_then_refines_like_byzfl() -> None:
    # a cliff at 2.5: value x below it, 0 above
    probes = line_maximize(lambda x: x if x < 2.5 else 0.0, lower=0, upper=100, step=1, evals=6)
    # expansion: 0, 1 (better: the step doubles to 2), 3 (past the cliff: step 2 * 0.8);
    # refinement: 1 + 1.6 = 2.6 (past it), 1 + 1.28 = 2.28 (better), 2.28 + 1.024
    assert [p.factor for p in probes] == pytest.approx([0, 1, 3, 2.6, 2.28, 3.304])
    assert [p.value for p in probes] == pytest.approx([0, 1, 0, 0, 2.28, 0])
    assert len(line_maximize(lambda x: -abs(x - 0.3), lower=0, upper=1, step=1, evals=20)) == 20


def test_line_search_stops_at_the_top_of_its_range() -> None:
    probes = line_maximize(lambda x: x, lower=0, upper=10, step=1, evals=20)
    # 0, 1, 3, 7, then min(15, 10) = 10: nothing above it is left to try
    assert [p.factor for p in probes] == [0, 1, 3, 7, 10]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lower": 1.0, "upper": 0.0},
        {"step": 0.0},
        {"evals": 0},
        {"ratio": 0.5},
        {"upper": math.inf},
    ],
)
def test_line_search_refuses_bad_arguments(kwargs: dict) -> None:
    args = {"lower": 0.0, "upper": 1.0, "step": 1.0, "evals": 3} | kwargs
    with pytest.raises(ValueError, match="line_maximize"):
        line_maximize(lambda x: x, **args)


# ------------------------------------------------------------------------------ Krum
def test_against_krum_the_choice_is_the_largest_z_krum_still_selects() -> None:
    z_max = alie_z_max(7, 2)  # s = floor(4.5) - 2 = 2, Phi^-1(5/7) ~ 0.566
    attack = build_attack(
        "adaptive", base="alie", base_factor=z_max, num_byzantine=2, aggregate=krum
    )
    choice = attack.search(RING)
    # the chosen vector is ALIE's at the chosen z, bit for bit
    assert torch.equal(choice.vector, build_attack("alie", z=choice.factor)(RING))
    # it beats every factor it tried, and the base attack as configured (Baruch's z)
    assert choice.damage == max(p.value for p in choice.probes)
    assert choice.probes[0].factor == z_max and len(choice.probes) == 20
    base = build_attack("alie", num_clients=7, num_byzantine=2)(RING)
    assert choice.damage >= damage_of(base, RING, 2, krum) > 0
    assert choice.damage == pytest.approx(damage_of(choice.vector, RING, 2, krum))
    # it stays within what Krum accepts: Krum returns the attackers' vector ...
    assert 1.8 < choice.factor < Z_KRUM
    rows = torch.cat([RING, choice.vector.expand(2, -1)])
    assert torch.equal(krum(rows), choice.vector)
    assert choice.damage == pytest.approx(choice.factor * STD * math.sqrt(2))
    # ... whereas a larger z is rejected: Krum picks the centre, no damage at all
    beyond = build_attack("alie", z=Z_KRUM + 0.01)(RING)
    assert torch.equal(krum(torch.cat([RING, beyond.expand(2, -1)])), RING[0])
    assert any(p.factor > Z_KRUM and p.value == 0 for p in choice.probes)


# ------------------------------------------------------------------------------ mean
@pytest.mark.parametrize("base", ["alie", "ipm"])
def test_against_the_mean_the_search_goes_to_the_top_of_its_range(base: str) -> None:
    known = torch.tensor([[0.0], [2.0]])  # mean 1, std 1
    mean = build_aggregator("mean")
    choice = build_attack(
        "adaptive", base=base, max_factor=7.5, num_byzantine=1, aggregate=mean
    ).search(known)
    # probes 0, 1, 3, 7, 7.5: the damage grows with the factor, so the top wins
    assert [p.factor for p in choice.probes] == [0, 1, 3, 7, 7.5]
    assert [p.value for p in choice.probes] == sorted(p.value for p in choice.probes)
    assert choice.factor == 7.5
    # ALIE: c = 1 - 7.5 = -6.5, mean (0 + 2 - 6.5) / 3 = -1.5, 2.5 from 1
    # IPM:  c = -7.5 * 1,        mean (0 + 2 - 7.5) / 3 = -11/6, 17/6 from 1
    assert choice.damage == pytest.approx(2.5 if base == "alie" else 17 / 6)


def test_the_call_returns_the_chosen_vector() -> None:
    known = torch.tensor([[0.0], [2.0]])
    attack = build_attack("adaptive", max_factor=3.0, aggregate=build_aggregator("mean"))
    assert torch.equal(attack(known), torch.tensor([-2.0]))  # z = 3: 1 - 3 * 1


# ----------------------------------------------------------------------- determinism
def test_a_fixed_seed_gives_the_same_choice() -> None:
    torch.manual_seed(0)
    known = torch.randn(10, 50)
    live = compose(
        [build_preaggregator("bucket", s=2, seed=7)], build_aggregator("median", num_byzantine=2)
    )

    def aggregate(x: torch.Tensor) -> torch.Tensor:  # the server's way: a copy each time
        return copy.deepcopy(live)(x, num_byzantine=2)

    first, second = (
        build_attack("adaptive", num_byzantine=2, aggregate=aggregate).search(known)
        for _ in range(2)
    )
    assert first.factor == second.factor and first.damage == second.damage
    assert first.probes == second.probes and torch.equal(first.vector, second.vector)


# --------------------------------------------------------------------------- config
def _cfg(**values: object) -> RunConfig:
    return RunConfig.from_flat({"attack": "adaptive", "num-malicious": 2} | values)


@pytest.mark.parametrize("knowledge", ["own", "collude"])
def test_refused_without_omniscient_knowledge(knowledge: str) -> None:
    cfg = _cfg(**{"attack-knowledge": knowledge})
    with pytest.raises(ConfigError) as err:
        check_attack_config(cfg)
    msg = str(err.value)
    assert "key 'attack'" in msg and "'adaptive'" in msg and knowledge in msg
    assert "allowed: attack-knowledge = 'omniscient'" in msg
    # the whole run config's check (bastion run / simulate, the ServerApp) says the same
    with pytest.raises(ConfigError, match="attack-knowledge = 'omniscient'"):
        load_run_config({"attack": "adaptive", "num-malicious": 2, "attack-knowledge": knowledge})


def test_accepted_with_omniscient_knowledge_and_its_params() -> None:
    cfg = _cfg(**{"attack-knowledge": "omniscient", "attack-adaptive-evals": 7})
    check_attack_config(cfg)
    params = attack_params(cfg, num_clients=7, num_byzantine=2)
    assert params == {
        "base": "alie",
        "evals": 7,
        "max_factor": 100.0,
        "step": 1.0,
        "base_factor": alie_z_max(7, 2),
        "num_byzantine": 2,
    }
    # the base attack as configured is the first probe: attack-z, or IPM's epsilon
    cfg = _cfg(**{"attack-knowledge": "omniscient", "attack-z": 2})
    assert attack_params(cfg, num_clients=7, num_byzantine=2)["base_factor"] == 2.0
    cfg = _cfg(**{"attack-knowledge": "omniscient", "attack-adaptive-base": "ipm"})
    assert attack_params(cfg, num_clients=7, num_byzantine=2)["base_factor"] == 0.1
    # no Baruch z when f is too large for the formula: no first probe then
    assert attack_params(cfg, num_clients=4, num_byzantine=3)["base_factor"] == 0.1
    cfg = _cfg(**{"attack-knowledge": "omniscient"})
    assert attack_params(cfg, num_clients=4, num_byzantine=3)["base_factor"] is None


def test_refused_base_and_a_call_without_the_aggregation() -> None:
    cfg = _cfg(**{"attack-knowledge": "omniscient", "attack-adaptive-base": "gaussian"})
    with pytest.raises(ConfigError, match=r"attack-adaptive-base.*'alie'"):
        check_attack_config(cfg)
    with pytest.raises(ValueError, match="base='mimic'"):
        build_attack("adaptive", base="mimic")
    with pytest.raises(ConfigError, match=r"key 'attack': value 'adaptive'.*'omniscient'"):
        build_attack("adaptive")(RING)
    assert isinstance(build_attack("adaptive"), Adaptive)


# ---------------------------------------------------------------- ALIE's z, swept
@pytest.mark.parametrize("z", [1, 2, 3, 2.5])
def test_alie_z_beyond_the_formula(z: float) -> None:
    """``attack-z`` takes any z (an int from the command line too); 0 means Baruch's."""
    cfg = load_run_config({"attack": "alie", "num-malicious": 2, "attack-z": z})
    params = attack_params(cfg, num_clients=7, num_byzantine=2)
    assert params == {"z": float(z)}
    out = build_attack("alie", **params)(RING)
    assert torch.allclose(out, -float(z) * STD * torch.ones(2))
    cfg = load_run_config({"attack": "alie", "num-malicious": 2})
    assert attack_params(cfg, num_clients=7, num_byzantine=2) == {"z": alie_z_max(7, 2)}
