"""Adding a rule, a pre-aggregation step or an attack is one class: the class below
is the diff docs/ARCHITECTURE.md shows, and everything else must follow from it
(the run config's allowed names and keys, the pipeline, the CLI help, the keys
pyproject.toml must list)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from attacks import Attack, attack_names, attack_params, build_attack
from bastion import cli
from common.config import ConfigError
from common.options import Option
from server.run_config import app_config_defaults, load_run_config
from strategies.rules import Aggregator, PreAggregator, build_aggregator
from strategies.rules.aggregators import AggregationOutput
from strategies.rules.from_config import pipeline_from_config
from strategies.rules.preaggregators import PreAggregationOutput


@pytest.fixture
def registered() -> Iterator[None]:
    """Define the new classes for one test, and take them out of the registries after."""
    before = (dict(Aggregator.registry), dict(PreAggregator.registry), dict(Attack.registry))

    class Midrange(Aggregator):
        """Coordinate-wise midrange, scaled: ``scale * (min + max) / 2`` (an example)."""

        name = "test-midrange"
        options = (Option("test-midrange-scale", param="scale", default=1.0, gt=0),)

        def __init__(self, *, num_byzantine: int | None = None, scale: float = 1.0) -> None:
            super().__init__(num_byzantine=num_byzantine)
            self.scale = scale

        def _aggregate(self, x, f, weights):
            mid = (x.min(dim=0).values + x.max(dim=0).values) / 2
            return AggregationOutput(mid * self.scale)

    class Shift(PreAggregator):
        """Adds a constant to every update (an example); on when ``test-shift`` != 0."""

        name = "test-shift"
        options = (Option("test-shift", param="by", default=0.0, off=0.0),)

        def __init__(self, *, by: float) -> None:
            self.by = by

        def _apply(self, x, f):
            n = x.shape[0]
            return PreAggregationOutput(x + self.by, f, torch.eye(n, dtype=torch.float64))

    class Zero(Attack):
        """Sends a zero update times ``test-zero-gain`` (an example)."""

        name = "test-zero"
        param_names = ("gain",)
        options = (Option("test-zero-gain", param="gain", default=0.0),)

        def __init__(self, *, gain: float = 0.0) -> None:
            self.gain = gain

        def _apply(self, known):
            return torch.zeros_like(known[0], dtype=torch.float64) * self.gain

    yield
    for registry, saved in zip(
        (Aggregator.registry, PreAggregator.registry, Attack.registry), before, strict=True
    ):
        registry.clear()
        registry.update(saved)


def test_a_new_rule_is_reachable_from_the_run_config(registered) -> None:
    cfg = load_run_config({"aggregator": "test-midrange", "test-midrange-scale": 2.0})
    pipeline = pipeline_from_config(cfg)
    assert pipeline.aggregator.name == "test-midrange" and pipeline.aggregator.scale == 2.0
    x = torch.tensor([[0.0, 4.0], [2.0, -4.0], [10.0, 0.0]])
    assert torch.equal(pipeline(x), torch.tensor([10.0, 0.0]))  # 2 * (min + max) / 2
    assert build_aggregator("test-midrange", scale=3.0).scale == 3.0
    assert "test-midrange" in cli._choices("aggregator")
    assert app_config_defaults()["test-midrange-scale"] == 1.0  # pyproject must list it
    with pytest.raises(ConfigError, match=r"'test-midrange-scale'.*-1.*float > 0"):
        load_run_config({"aggregator": "test-midrange", "test-midrange-scale": -1})


def test_a_new_step_joins_the_pipeline_when_its_key_is_on(registered) -> None:
    assert pipeline_from_config(load_run_config({})).preaggregators == []
    pipeline = pipeline_from_config(load_run_config({"test-shift": 1.5, "clip-norm": 9.0}))
    assert [s.name for s in pipeline.preaggregators] == ["clip", "test-shift"]
    assert pipeline.preaggregators[1].by == 1.5


def test_a_new_attack_is_reachable_from_the_run_config(registered) -> None:
    cfg = load_run_config({"attack": "test-zero", "num-malicious": 1, "test-zero-gain": 3.0})
    assert "test-zero" in attack_names() and "test-zero" in cli._choices("attack")
    assert attack_params(cfg, num_clients=5, num_byzantine=1) == {"gain": 3.0}
    assert build_attack("test-zero", gain=3.0)(torch.ones(2, 3)).abs().sum() == 0


def test_keys_of_unregistered_components_are_unknown() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'test-midrange-scale'"):
        load_run_config({"test-midrange-scale": 2.0})
    with pytest.raises(ConfigError, match=r"key 'aggregator': value 'test-midrange'"):
        load_run_config({"aggregator": "test-midrange"})
