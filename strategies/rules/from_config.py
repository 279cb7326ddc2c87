"""Build a run's robust pipeline and its reputation from the run config.

The run config (:class:`common.config.RunConfig`) names the rule, the pre-aggregation
steps and their parameters; these functions turn it into the objects of
:mod:`strategies.rules` (no Flower here).
"""

from __future__ import annotations

from typing import Any

from strategies.rules.registry import Pipeline, build_aggregator, build_preaggregator, compose
from strategies.rules.reputation import Reputation, ReputationConfig


def reputation_from_config(cfg: Any) -> Reputation:
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


def pipeline_from_config(cfg: Any) -> Pipeline:
    """Build the pre-aggregation steps and the rule from a :class:`common.config.RunConfig`.

    Step order: ``clip`` (``clip-norm`` > 0), ``nnm`` (``nnm = true``), then
    ``bucket`` (``bucketing-s`` > 0) or ``resample`` (``resampling-s`` > 0).
    """
    steps = []
    if cfg.clip_norm > 0:
        steps.append(build_preaggregator("clip", max_norm=cfg.clip_norm))
    if cfg.nnm:
        steps.append(build_preaggregator("nnm"))
    if cfg.bucketing_s > 0:
        steps.append(build_preaggregator("bucket", s=cfg.bucketing_s, seed=cfg.seed))
    if cfg.resampling_s > 0:
        steps.append(build_preaggregator("resample", s=cfg.resampling_s, seed=cfg.seed))
    params: dict[str, Any] = {}
    if cfg.aggregator == "multi-krum" and cfg.multi_krum_m > 0:
        params["m"] = cfg.multi_krum_m
    elif cfg.aggregator == "geometric-median":
        params |= {"max_iter": cfg.gm_max_iter, "nu": cfg.gm_nu, "tol": cfg.gm_tol}
    elif cfg.aggregator == "centered-clipping":
        params |= {"tau": cfg.cc_tau, "iterations": cfg.cc_iterations}
    return compose(steps, build_aggregator(cfg.aggregator, **params))
