"""Build a run's robust pipeline and its reputation from the run config.

The run config (:class:`common.config.RunConfig`) names the rule, the pre-aggregation
steps and their parameters; these functions turn it into the objects of
:mod:`strategies.rules` (no Flower here).
"""

from __future__ import annotations

from typing import Any

from common.config import ConfigError, RunConfig, not_allowed
from common.options import Option, check_choice, read_params
from strategies.rules.aggregators import Aggregator
from strategies.rules.dpcheck import DPCheck, DPSGDDeclaration
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
            weight_opposed=cfg.reputation_weight_opposed,
            quarantine_threshold=cfg.quarantine_threshold,
            quarantine_rounds=cfg.quarantine_rounds,
            escalation=cfg.quarantine_escalation,
            max_quarantined=cap,
            probation=cfg.quarantine_probation,
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


def dp_check_from_config(cfg: RunConfig) -> DPCheck | None:
    """The run's check of the replies' DP noise (:mod:`strategies.rules.dpcheck`), or
    ``None`` when ``dp-check`` is false.

    The check needs noise whose scale the server knows: ``dp`` true and a fixed
    ``dp-noise-multiplier`` > 0 (with ``dp-target-epsilon`` > 0 each node plans its
    own sigma from its data size, which the server does not compute). Raises
    :class:`ConfigError` naming the key, the value and what is allowed.
    """
    if not cfg.dp_check:
        return None
    why = None
    if not cfg.dp:
        why = " when 'dp' is false (there is no DP noise to check)"
    elif cfg.dp_noise_multiplier == 0:
        why = " when 'dp-noise-multiplier' is 0 (clipping without noise: nothing to check)"
    elif cfg.dp_target_epsilon > 0:
        why = (
            f" when 'dp-target-epsilon' is {cfg.dp_target_epsilon:g} (each node then plans its "
            "own noise multiplier, which the server does not know)"
        )
    if why is not None:
        raise ConfigError(
            not_allowed(
                "run config",
                "dp-check",
                True,
                "false, or true with dp = true, dp-noise-multiplier > 0 and dp-target-epsilon = 0",
                why,
            ),
            ("dp-check",),
        )
    declaration = DPSGDDeclaration(
        noise_multiplier=cfg.dp_noise_multiplier,
        max_grad_norm=cfg.dp_max_grad_norm,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size,
        local_epochs=cfg.local_epochs,
        local_steps=cfg.local_steps,
    )
    return DPCheck(declaration, alpha=cfg.dp_check_alpha)


def rule_params(cfg: RunConfig) -> dict[str, Any]:
    """The keyword parameters of ``cfg``'s rule, from the keys the rule declares."""
    check_choice(cfg, "aggregator", Aggregator.registry)
    return read_params(aggregator_class(cfg.aggregator).options, cfg)


def declared_options() -> tuple[Option, ...]:
    """Every run-config key the registered rules and pre-aggregation steps declare."""
    classes = [*Aggregator.registry.values(), *PreAggregator.registry.values()]
    return tuple(opt for cls in classes for opt in cls.options)
