"""Run-config validation: every key known, every error names key, value and what is allowed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import (
    ConfigError,
    NodeConfig,
    RunConfig,
    TrainInstructions,
    format_overrides,
    parse_overrides,
)
from server.run_config import app_config_defaults, load_run_config

ROOT = Path(__file__).resolve().parents[2]


def app_defaults() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_lists_every_key_with_its_default() -> None:
    # Flower refuses a --run-config key that [tool.flwr.app.config] does not list, so the
    # file must list RunConfig's keys and every key a rule, step or attack declares.
    expected = app_config_defaults()
    listed = app_defaults()
    lines = "\n".join(
        f"{k} = {format_overrides({k: v}).split('=', 1)[1]}" for k, v in expected.items()
    )
    assert set(listed) == set(expected), (
        "pyproject.toml [tool.flwr.app.config] is out of date; the keys should be:\n" + lines
    )
    assert {k: listed[k] for k in expected} == expected


def test_pyproject_defaults_validate_and_equal_model_defaults() -> None:
    cfg = load_run_config(app_defaults())
    assert {k: v for k, v in cfg.to_flat().items() if k in set(RunConfig.keys())} == (
        RunConfig().to_flat()
    )
    assert cfg.to_flat() == app_config_defaults()


@pytest.mark.parametrize(
    ("key", "value", "allowed_fragment"),
    [
        ("lr", -0.1, "> 0"),
        ("dataset", "imagenet", "'digits'"),
        ("partitioner", "random", "'label-sorted'"),
        ("num-server-rounds", 0, ">= 1"),
        ("momentum", 1.0, "< 1"),
        ("alpha", 0, "> 0"),
        ("device", "tpu", "str"),
        ("batch-size", "big", "int"),
    ],
)
def test_bad_value_error_names_key_value_and_allowed(key, value, allowed_fragment) -> None:
    values = app_defaults() | {key: value}
    with pytest.raises(ConfigError) as err:
        load_run_config(values)
    message = str(err.value)
    assert repr(key) in message
    assert repr(value) in message
    assert "allowed" in message and allowed_fragment in message


def test_unknown_key_is_named_with_the_known_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_run_config(app_defaults() | {"learning-rate": 0.1})
    assert "'learning-rate'" in str(err.value)
    assert "lr" in str(err.value)


def test_local_epochs_and_steps_both_zero_is_rejected_naming_both() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flat(app_defaults() | {"local-epochs": 0, "local-steps": 0})
    assert "local-epochs" in str(err.value) and "local-steps" in str(err.value)


def test_several_errors_are_all_reported() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flat(app_defaults() | {"lr": 0, "seed": -1})
    assert "'lr'" in str(err.value) and "'seed'" in str(err.value)


def test_node_config_partition_id_must_be_below_num_partitions() -> None:
    assert NodeConfig.from_flat({"partition-id": 2, "num-partitions": 3}).partition_id == 2
    with pytest.raises(ConfigError) as err:
        NodeConfig.from_flat({"partition-id": 3, "num-partitions": 3}, source="node config")
    assert "partition-id" in str(err.value) and "3" in str(err.value)
    with pytest.raises(ConfigError, match="partition-id"):
        NodeConfig.from_flat({"num-partitions": 3}, source="node config")


def test_train_instructions_round_trip_and_differ_per_round() -> None:
    cfg = RunConfig(lr=0.05, local_steps=7)
    first = TrainInstructions.from_flat(cfg.train_instructions(1))
    second = TrainInstructions.from_flat(cfg.train_instructions(2))
    assert (first.lr, first.local_steps, first.server_round) == (0.05, 7, 1)
    assert first.round_seed != second.round_seed


def test_overrides_parse_toml_values_and_round_trip() -> None:
    parsed = parse_overrides('lr=0.05 dataset=mnist data-dir="/a b/c" local-epochs=3 dp=true')
    assert parsed == {
        "lr": 0.05,
        "dataset": "mnist",
        "data-dir": "/a b/c",
        "local-epochs": 3,
        "dp": True,
    }
    assert parse_overrides(format_overrides(parsed)) == parsed
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides("lr")


def test_every_problem_is_listed_fields_and_components_alike() -> None:
    # a refused field does not hide a refused partitioner, rule key or unknown key
    with pytest.raises(ConfigError) as err:
        load_run_config({"lr": -1, "partitioner": "zipf", "cc-tau": -2.0, "bogus": 1})
    message = str(err.value)
    for fragment in ("'lr'", "'zipf'", "'cc-tau'", "'bogus'"):
        assert fragment in message
