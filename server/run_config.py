"""The whole run config a Bastion run accepts, checked once before anything runs.

:class:`common.config.RunConfig` holds the run's own keys; the rules, the
pre-aggregation steps and the attacks declare theirs on their classes
(:mod:`common.options`). This module puts the two together: the ServerApp checks
the run config with it when a run starts, and ``bastion`` (the CLI, the compose
runner, the grid) before any process starts. No Flower import: the CLI loads it
cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attacks import check_attack_config
from attacks import declared_options as attack_options
from common.config import ConfigError, RunConfig
from common.options import Option, check_choice, check_options, defaults
from strategies.rules.from_config import declared_options as rule_options
from strategies.rules.from_config import dp_check_from_config, pipeline_from_config
from task.datasets import DATASETS
from task.partition import PARTITIONERS


def declared_options() -> tuple[Option, ...]:
    """Every run-config key a registered rule, pre-aggregation step or attack declares."""
    return (*rule_options(), *attack_options())


def check_run_config(cfg: RunConfig) -> None:
    """Raise :class:`~common.config.ConfigError` for anything in ``cfg`` its fields did
    not already check: an unknown key, a bad value of a declared key, an unknown rule,
    attack, dataset or partitioner, steps that may not run together (every problem of
    the first kind is listed; the message names the key, the value and what is
    allowed)."""
    problems = []
    for check in (
        lambda: check_options(cfg, declared_options()),
        lambda: check_choice(cfg, "dataset", DATASETS),
        lambda: check_choice(cfg, "partitioner", PARTITIONERS),
        lambda: check_attack_config(cfg),
        lambda: pipeline_from_config(cfg),
        lambda: dp_check_from_config(cfg),
    ):
        try:
            check()
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))


def load_run_config(values: Mapping[str, Any], *, source: str = "run config") -> RunConfig:
    """:meth:`RunConfig.from_flat` and :func:`check_run_config` in one; a declared key
    that ``values`` leaves out gets its default, so the result (and the ``config.json``
    a run writes from it) holds every key, as ``pyproject.toml`` lists them."""
    merged = dict(defaults(declared_options())) | dict(values)
    try:
        cfg = RunConfig.from_flat(merged, source=source)
    except ConfigError as exc:
        # report what the components own too, checked with the refused keys' defaults
        # (a rule about several keys refuses none: then there is nothing more to add)
        kept = {k: v for k, v in merged.items() if k not in exc.keys}
        if not exc.keys:
            raise
        try:
            check_run_config(RunConfig.from_flat(kept, source=source))
        except ConfigError as more:
            raise ConfigError(f"{exc}\n{more}", exc.keys) from None
        raise
    check_run_config(cfg)
    return cfg


def app_config_defaults() -> dict[str, Any]:
    """Every run-config key with its default: what ``[tool.flwr.app.config]`` in
    ``pyproject.toml`` must list (Flower rejects a ``--run-config`` key it does not
    list), in the model's field order, then the declared keys in registry order."""
    return RunConfig().to_flat() | dict(defaults(declared_options()))


def all_keys() -> list[str]:
    """Every run-config key a run accepts."""
    return list(app_config_defaults())
