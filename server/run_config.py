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
from common.config import RunConfig
from common.options import Option, check_choice, check_options, defaults
from strategies.rules.from_config import declared_options as rule_options
from strategies.rules.from_config import pipeline_from_config
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
    check_options(cfg, declared_options())
    check_choice(cfg, "dataset", DATASETS)
    check_choice(cfg, "partitioner", PARTITIONERS)
    check_attack_config(cfg)
    pipeline_from_config(cfg)


def load_run_config(values: Mapping[str, Any], *, source: str = "run config") -> RunConfig:
    """:meth:`RunConfig.from_flat` and :func:`check_run_config` in one; a declared key
    that ``values`` leaves out gets its default, so the result (and the ``config.json``
    a run writes from it) holds every key, as ``pyproject.toml`` lists them."""
    cfg = RunConfig.from_flat(dict(defaults(declared_options())) | dict(values), source=source)
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
