"""Named defences (``--defence``): expansion, precedence, errors, the grid axis, the note."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion import defences as D
from bastion.cli import _checked_run_config, build_run_config, find_app_dir, main, make_parser
from bastion.experiments import load_grid
from common.config import ConfigError, RunConfig, parse_overrides
from server.run_config import load_run_config


def args(*extra: str):
    return make_parser().parse_args(["simulate", "--clients", "6", *extra])


def test_every_preset_is_a_valid_run_config_and_its_text_reads_back() -> None:
    assert D.RECOMMENDED in D.DEFENCES
    for preset in D.DEFENCES.values():
        keys = dict(preset.keys) | {"num-byzantine": 1}
        cfg = load_run_config(keys)
        assert all(cfg.value(k) == v for k, v in preset.keys.items())
        # what `bastion defences` prints for flwr run gives the same keys back
        assert parse_overrides(preset.run_config_text()) == dict(preset.keys)


def test_the_users_keys_win_over_the_preset(tmp_path: Path, capsys) -> None:
    preset = D.DEFENCES[D.RECOMMENDED]
    out = str(tmp_path / "run")
    cfg, overrides = build_run_config(
        args("--defence", preset.name, "--num-byzantine", "1", "--output-dir", out),
        find_app_dir(),
    )
    assert all(cfg.value(k) == v for k, v in preset.keys.items())
    assert all(overrides[k] == v for k, v in preset.keys.items())
    printed = capsys.readouterr().out
    assert f"--defence {preset.name}:" in printed and "yours win" not in printed
    # the flag wins over the preset's rule, and the console says so
    cfg, _ = build_run_config(
        args(
            "--defence",
            preset.name,
            "--num-byzantine",
            "1",
            "--aggregator",
            "median",
            "--output-dir",
            out,
        ),
        find_app_dir(),
    )
    assert cfg.aggregator == "median"
    if "aggregator" in preset.keys:
        assert "yours win for aggregator" in capsys.readouterr().out


def test_a_preset_needs_a_byzantine_count_and_a_known_name(capsys) -> None:
    assert _checked_run_config(args("--defence", D.RECOMMENDED)) is None
    err = capsys.readouterr().err
    assert "'--defence'" in err and "'num-byzantine' > 0" in err
    assert _checked_run_config(args("--defence", "fortress", "--num-byzantine", "1")) is None
    err = capsys.readouterr().err
    assert "value 'fortress' is not allowed" in err and repr(D.RECOMMENDED) in err
    with pytest.raises(ConfigError, match="num-byzantine"):
        D.with_defence(D.RECOMMENDED, {})


def test_bastion_defences_lists_each_preset_with_its_flwr_run_text(capsys) -> None:
    assert main(["defences"]) == 0
    out = capsys.readouterr().out
    for preset in D.DEFENCES.values():
        assert preset.name in out and preset.run_config_text() in out
    assert f"{D.RECOMMENDED} (recommended)" in out


def test_a_grid_axis_can_name_a_preset(tmp_path: Path) -> None:
    preset = D.DEFENCES[D.RECOMMENDED]
    path = tmp_path / "grid.toml"
    axis = (
        f'[{{defence = "{preset.name}"}}, '
        f'{{defence = "{preset.name}", label = "mine", aggregator = "median"}}]'
    )
    head = '[grid]\nclients = 6\n[base]\ndataset = "digits"\nnum-byzantine = 1\n[axes]\n'
    path.write_text(head + f"defence = {axis}\n")
    first, second = load_grid(path).cells
    assert first.labels == {"defence": preset.name}
    assert all(first.overrides[k] == v for k, v in preset.keys.items())
    assert second.labels == {"defence": "mine"} and second.overrides["aggregator"] == "median"
    path.write_text(head + 'defence = [{defence = "fortress"}]\n')
    with pytest.raises(ConfigError, match="'fortress' is not allowed"):
        load_grid(path)


def test_the_fragile_rule_note(monkeypatch) -> None:
    monkeypatch.setitem(D.FRAGILE, "krum", "ended at 0.17 against the mean's 0.69")
    krum = RunConfig.from_flat({"aggregator": "krum", "partitioner": "label-sorted"})
    note = D.fragile_rule_note(krum, used_defence=False)
    assert note is not None and "0.17" in note and f"--defence {D.RECOMMENDED}" in note
    assert D.fragile_rule_note(krum, used_defence=True) is None
    iid = RunConfig.from_flat({"aggregator": "krum", "partitioner": "iid"})
    assert D.fragile_rule_note(iid, used_defence=False) is None
    mean = RunConfig.from_flat({"aggregator": "mean", "partitioner": "label-sorted"})
    assert D.fragile_rule_note(mean, used_defence=False) is None
