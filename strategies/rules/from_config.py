"""Build a run's robust pipeline and its reputation from the run config.

The run config (:class:`common.config.RunConfig`) names the rule, the pre-aggregation
steps and their parameters; these functions turn it into the objects of
:mod:`strategies.rules` (no Flower here).
"""

from __future__ import annotations

from typing import Any

from common.config import ConfigError, RunConfig
from common.options import Option, check_choice, read_params
from strategies.rules.aggregators import Aggregator
from strategies.rules.preaggregators import PreAggregator
from strategies.rules.registry import (
    Pipeline,
    aggregator_class,
    build_aggregator,
    compose,
    preaggregator_classes,
)
from strategies.rules.reputation import Reputation, ReputationConfig


def reputation_from_config(cfg: RunConfig) -> Reputation:
    """A :class:`~strategies.rules.reputation.Reputation` from a :class:`common.config.RunConfig`
    (``quarantine-max = -1`` caps quarantine at ``num-byzantine``, none when that is 0)."""
    cap = cfg.quarantine_max
    if cap < 0:
        cap = cfg.num_byzantine if cfg.num_byzantine > 0 else None
    return Reputation(
        ReputationConfig(
            decay=cfg.reputation_decay,
            weight_unselected=cfg.reputation_weight_unselected,
            weight_far=cfg.reputation_weight_far,
            weight_missing=cfg.reputation_weight_missing,
            quarantine_threshold=cfg.quarantine_threshold,
            quarantine_rounds=cfg.quarantine_rounds,
            escalation=cfg.quarantine_escalation,
            max_quarantined=cap,
        )
    )


def pipeline_from_config(cfg: RunConfig) -> Pipeline:
    """Build the pre-aggregation steps and the rule that ``cfg`` names.

    Each step whose switch (its first declared option: ``clip-norm`` > 0, ``nnm``,
    ``bucketing-s`` > 0, ``resampling-s`` > 0) is on joins the pipeline, in registry
    order (clip, nnm, then resample or bucket); the rule is ``aggregator``. Every
    parameter comes from the keys the class declares (:mod:`common.options`).
    Raises :class:`ConfigError` naming the key, the value and what is allowed.
    """
    steps = []
    for cls in preaggregator_classes():
        switch = cls.options[0]
        if not switch.is_off(switch.read(cfg)):
            steps.append(cls(**read_params(cls.options, cfg)))
    regrouping = [s for s in steps if s.regroups]
    if len(regrouping) > 1:
        keys = [type(s).options[0] for s in regrouping]
        raise ConfigError(
            " and ".join(f"key {o.key!r} ({o.read(cfg)})" for o in keys)
            + " are set together; allowed: at most one of them > 0 (each regroups the updates "
            "into means of s; chaining them has no use)"
        )
    return compose(steps, build_aggregator(cfg.aggregator, **rule_params(cfg)))


def rule_params(cfg: RunConfig) -> dict[str, Any]:
    """The keyword parameters of ``cfg``'s rule, from the keys the rule declares."""
    check_choice(cfg, "aggregator", Aggregator.registry)
    return read_params(aggregator_class(cfg.aggregator).options, cfg)


def declared_options() -> tuple[Option, ...]:
    """Every run-config key the registered rules and pre-aggregation steps declare."""
    classes = [*Aggregator.registry.values(), *PreAggregator.registry.values()]
    return tuple(opt for cls in classes for opt in cls.options)
