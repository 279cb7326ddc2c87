"""The experiment grid: parsing, cells, resuming, tables and plots (runner faked)."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from bastion.experiment_plots import plot_grid
from bastion.experiments import cell_done, load_grid, run_grid, write_tables
from common.config import ConfigError

GRID_HEAD = """
[grid]
clients = 6
malicious = 1

[base]
dataset = "digits"
num-server-rounds = 2
"""
GRID = (
    GRID_HEAD
    + """
[axes]
partitioner = ["iid", "label-sorted"]
attack = [{attack = "none"}, {attack = "ipm", attack-epsilon = 0.1, label = "ipm 0.1"}]
aggregator = ["mean", "krum"]

[[sweep]]
name = "krum-ipm"
fixed = {aggregator = "krum", attack = "ipm", partitioner = "iid"}
axes = {attack-epsilon = [0.1, 10.0]}
"""
)


def write(tmp_path: Path, text: str = GRID) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return path


def test_cells_are_the_product_plus_sweeps(tmp_path: Path) -> None:
    grid = load_grid(write(tmp_path))
    main = [c for c in grid.cells if c.group == "main"]
    sweep = [c for c in grid.cells if c.group == "krum-ipm"]
    # the sweep's eps = 0.1 cell is the main grid's krum/ipm 0.1/iid cell: listed once
    assert len(main) == 2 * 2 * 2 and len(sweep) == 1
    assert len({c.slug for c in grid.cells}) == len(grid.cells)
    ipm = next(c for c in main if c.labels["attack"] == "ipm 0.1")
    assert ipm.overrides["attack-epsilon"] == 0.1 and ipm.overrides["num-malicious"] == 1
    clean = next(c for c in main if c.labels["attack"] == "none")
    assert clean.overrides["num-malicious"] == 0  # no attackers without an attack
    assert sweep[0].overrides["attack-epsilon"] == 10.0
    assert all(c.overrides["min-available-nodes"] == 6 for c in grid.cells)


def test_a_bad_cell_names_the_cell_and_key(tmp_path: Path) -> None:
    text = GRID.replace('aggregator = ["mean", "krum"]', 'aggregator = ["mean", "krumm"]')
    with pytest.raises(ConfigError, match=r"grid cell .*aggregator.*krumm"):
        load_grid(write(tmp_path, text))
    with pytest.raises(ConfigError, match="backend"):
        load_grid(write(tmp_path, GRID.replace("clients = 6", 'clients = 6\nbackend = "x"')))


def fake_runner(calls: list[str], fail: set[str] = frozenset()):  # type: ignore[assignment]
    def run(overrides: dict, cell_dir: Path, clients: int) -> int:
        calls.append(cell_dir.name)
        cell_dir.mkdir(parents=True, exist_ok=True)
        bad = overrides.get("attack") == "ipm"
        rows = [{"round": 0, "central_accuracy": 0.1}]
        for r in (1, 2):
            rows.append(
                {
                    "round": r,
                    "central_accuracy": 0.1 + 0.3 * r * (not bad),
                    "malicious_influence": 1.0 if bad else None,
                }
            )
        (cell_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
        diags = [
            {"round": r, "partition_id": p, "selected": p == 0, "malicious": bad and p == 0}
            for r in (1, 2)
            for p in range(clients)
        ]
        (cell_dir / "diagnostics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in diags))
        status = "failed" if cell_dir.name in fail else "completed"
        summary = {"status": status, "final_accuracy": rows[-1]["central_accuracy"]}
        (cell_dir / "summary.json").write_text(json.dumps(summary))
        return 0 if status == "completed" else 1

    return run


def test_grid_resumes_and_reports(tmp_path: Path) -> None:
    grid = load_grid(write(tmp_path))
    out = tmp_path / "out"
    first_fail = {grid.cells[3].slug}
    calls: list[str] = []
    lines: list[str] = []
    results = run_grid(grid, out, fake_runner(calls, first_fail), echo=lines.append)
    assert len(calls) == len(grid.cells)
    assert sum(ok for *_, ok in results) == len(grid.cells) - 1
    assert any("FAILED" in line for line in lines) and "ETA" in lines[-1]
    calls.clear()
    stale = out / "cells" / grid.cells[3].slug / "diagnostics-extra.jsonl"
    stale.write_text("left by the interrupted run\n")
    results = run_grid(grid, out, fake_runner(calls), echo=lines.append)
    assert calls == [grid.cells[3].slug]  # only the failed cell runs again,
    assert not stale.exists()  # from an empty folder
    assert all(ok for *_, ok in results)
    assert cell_done(out / "cells" / grid.cells[0].slug)

    rows = write_tables(results, out)
    with open(out / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows) == len(grid.cells)
    ipm = [r for r in table if r["attack"] == "ipm 0.1"]
    assert ipm and all(float(r["mean_malicious_influence"]) == 1.0 for r in ipm)
    assert all(
        float(r["final_accuracy"]) == pytest.approx(0.7) for r in table if r["attack"] == "none"
    )
    md = (out / "results.md").read_text()
    assert md.split("\n### ")[0].count("\n") == len(grid.cells) + 2
    # pivots: attacks x defences per partitioner (fake runner: 0.7 clean, 0.1 under ipm)
    pivot = md.split("### Final accuracy, partitioner = iid\n")[1].split("###")[0]
    assert "| attack | mean | krum |" in pivot
    assert "| none | 0.700 | 0.700 |" in pivot and "| ipm 0.1 | 0.100 | 0.100 |" in pivot
    # and the mean of the last rounds (1 and 2: 0.4 and 0.7), steadier under non-IID data
    tail = md.split("### Mean accuracy of the last 5 rounds, partitioner = iid\n")[1]
    assert "| none | 0.550 | 0.550 |" in tail.split("###")[0]
    assert all(
        float(r["last5_mean_accuracy"]) == pytest.approx(0.55)
        for r in table
        if r["attack"] == "none"
    )

    plots = {p.name for p in plot_grid(results, out)}
    assert plots == {
        "accuracy_curves.png",
        "heatmap-iid.png",
        "heatmap-label-sorted.png",
        "krum_selection.png",
        "malicious_influence.png",
    }
    assert all((out / p).stat().st_size > 5000 for p in plots)


def test_batched_grid_runs_each_cell_once_and_reports_each(tmp_path: Path) -> None:
    from common.batch import load_batch

    grid = load_grid(write(tmp_path))
    out = tmp_path / "out"
    batches: list[int] = []
    calls: list[str] = []
    single = fake_runner(calls)

    def batch_runner(batch_file: Path, batch_dir: Path, clients: int, on_cell) -> int:
        cells = load_batch(batch_file)
        batches.append(len(cells))
        for i, cell in enumerate(cells):
            if i == 1 and len(batches) == 1:
                continue  # a cell the batch "never reached"
            single(cell, Path(cell["output-dir"]), clients)
            on_cell({"round": i + 1, "cell": i})
        return 0

    lines: list[str] = []
    results = run_grid(grid, out, batch_runner=batch_runner, cells_per_batch=4, echo=lines.append)
    assert batches == [4, 4, 1]
    assert sum(ok for *_, ok in results) == len(grid.cells) - 1
    assert sum("FAILED" in line for line in lines) == 1
    assert len([x for x in lines if x.startswith("[")]) == len(grid.cells)
    results = run_grid(grid, out, batch_runner=batch_runner, echo=lines.append)
    assert batches[-1] == 1 and all(ok for *_, ok in results)


def test_cells_whose_rule_cannot_run_are_listed_not_run(tmp_path: Path) -> None:
    text = GRID.replace('aggregator = ["mean", "krum"]', 'aggregator = ["mean", "bulyan"]')
    text = text.replace("malicious = 1", "malicious = 1\n").replace(
        "num-server-rounds = 2", "num-server-rounds = 2\nnum-byzantine = 1\nresampling-s = 2"
    )
    grid = load_grid(write(tmp_path, text))
    bad = [c for c in grid.cells if c.infeasible]
    main = [c for c in grid.cells if c.group == "main"]
    # after s = 2 resampling the rules see f = 2: Bulyan needs n >= 11 (and the sweep's
    # Krum n >= 7), the grid has 6 clients; the mean runs
    assert {c.labels["aggregator"] for c in main if c.infeasible} == {"bulyan"}
    assert all("n >= 4f + 3" in c.infeasible for c in main if c.infeasible)
    assert all("n >= 2f + 3" in c.infeasible for c in grid.cells if c.group != "main")
    calls: list[str] = []
    lines: list[str] = []
    results = run_grid(grid, tmp_path / "out", fake_runner(calls), echo=lines.append)
    assert not {c.slug for c in bad} & set(calls)
    assert any("not run" in line and "4f + 3" in line for line in lines)
    rows = write_tables(results, tmp_path / "out")
    assert {r["status"] for r in rows if r.get("aggregator") == "bulyan"} == {"infeasible"}
    assert {r["status"] for r in rows if r.get("aggregator") == "mean"} == {"completed"}


def test_sweeps_list_every_value_including_the_main_cells_they_repeat(tmp_path: Path) -> None:
    grid = load_grid(write(tmp_path))
    (sweep,) = grid.sweeps
    assert sweep.key == "attack-epsilon" and [v for v, _ in sweep.points] == ["0.1", "10.0"]
    # eps 0.1 is the main krum / ipm 0.1 / iid cell, eps 10 the sweep's own
    assert [c.group for _, c in sweep.points] == ["main", "krum-ipm"]
    assert sweep.points[0][1].labels == {
        "partitioner": "iid",
        "attack": "ipm 0.1",
        "aggregator": "krum",
    }
    out = tmp_path / "out"
    run_grid(grid, out, fake_runner([]), echo=lambda _: None)
    summary = out / "cells" / sweep.points[1][1].slug / "summary.json"
    summary.write_text(json.dumps(json.loads(summary.read_text()) | {"final_accuracy": 0.42}))
    results = [(c, out / "cells" / c.slug, True) for c in grid.cells]
    write_tables(results, out, grid.sweeps)
    md = (out / "results.md").read_text()
    table = md.split("### Sweep krum-ipm: attack-epsilon")[1]
    assert "(aggregator=krum, attack=ipm, partitioner=iid)" in table.splitlines()[0]
    assert "| 0.1 | 0.100 | 0.100 | 1.000 | – |" in table  # the fake ipm cell
    assert "| 10.0 | 0.420 |" in table
    assert "sweep-krum-ipm.png" in {p.name for p in plot_grid(results, out, grid.sweeps)}


def test_dp_grids_plot_accuracy_and_epsilon_per_noise_level(tmp_path: Path) -> None:
    text = GRID.replace(
        'aggregator = ["mean", "krum"]',
        'noise = [{dp = false, label = "no DP"}, {dp = true, dp-noise-multiplier = 0.0, '
        'label = "sigma 0"}, {dp = true, dp-noise-multiplier = 1.0, label = "sigma 1"}]',
    ).split("[[sweep]]")[0]
    grid = load_grid(write(tmp_path, text))
    out = tmp_path / "out"
    results = run_grid(grid, out, fake_runner([]), echo=lambda _: None)
    for c, d, _ in results:
        eps = {"no DP": None, "sigma 0": "inf", "sigma 1": 3.5}[c.labels["noise"]]
        summary = json.loads((d / "summary.json").read_text()) | {"max_epsilon": eps}
        (d / "summary.json").write_text(json.dumps(summary))
    rows = write_tables(results, out)
    assert {str(r["max_epsilon"]) for r in rows} == {"None", "inf", "3.5"}
    plots = {p.name for p in plot_grid(results, out)}
    assert "privacy.png" in plots and (out / "privacy.png").stat().st_size > 5000
    # (a grid without DP draws none: test_grid_resumes_and_reports lists its plots)


def test_pruned_cells_are_listed_with_their_reason_and_not_run(tmp_path: Path) -> None:
    text = GRID + '\n[[prune]]\nwhere = {aggregator = "krum", partitioner = ["label-sorted"]}\n'
    text += 'why = "krum collapses on label-sorted data"\n'
    grid = load_grid(write(tmp_path, text))
    pruned = [c for c in grid.cells if c.pruned]
    assert {(c.labels["aggregator"], c.labels["partitioner"]) for c in pruned} == {
        ("krum", "label-sorted")
    }
    assert len(pruned) == 2 and all("collapses" in c.infeasible for c in pruned)
    # a sweep cell is never pruned by the main grid's [[prune]]
    assert not any(c.pruned for c in grid.cells if c.group != "main")
    calls: list[str] = []
    lines: list[str] = []
    results = run_grid(grid, tmp_path / "out", fake_runner(calls), echo=lines.append)
    assert not {c.slug for c in pruned} & set(calls)
    assert any("2 cell(s) not run: pruned: krum collapses" in line for line in lines)
    rows = write_tables(results, tmp_path / "out")
    assert [r["note"] for r in rows if r["status"] == "pruned"] == [
        "pruned: krum collapses on label-sorted data"
    ] * 2
    for bad, match in (
        ('[[prune]]\nwhere = {rule = "krum"}\nwhy = "x"\n', r"'rule'.*one of the \[axes\]"),
        ('[[prune]]\nwhere = {aggregator = "krum"}\n', "non-empty string 'why'"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_grid(write(tmp_path, GRID + "\n" + bad))


def finishing(accuracy_of: Callable[[dict], float]) -> Callable[[dict, Path, int], int]:
    """A fake cell runner: every cell completes one round at ``accuracy_of(overrides)``."""

    def runner(overrides: dict, cell_dir: Path, clients: int) -> int:
        cell_dir.mkdir(parents=True, exist_ok=True)
        (cell_dir / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
        summary = {"status": "completed", "final_accuracy": accuracy_of(overrides)}
        (cell_dir / "summary.json").write_text(json.dumps(summary))
        return 0

    return runner


def ranking(out: Path, title: str) -> tuple[str, list[str]]:
    """The first table of ``results.md`` after ``title``: its text and its rows."""
    ranked = (out / "results.md").read_text().split(title)[1].split("###")[0]
    return ranked, [line for line in ranked.splitlines() if line.startswith("| ")]


def test_ranking_table_orders_defences_by_their_worst_case_over_seeds(tmp_path: Path) -> None:
    text = (
        GRID_HEAD
        + """
[axes]
attack = [{attack = "none"}, {attack = "ipm", label = "ipm"}]
aggregator = ["mean", "krum"]
seed = [0, 1]
"""
    )
    grid = load_grid(write(tmp_path, text))
    # clean: mean 0.70 / 0.72, krum 0.60; under IPM: mean 0.10, krum 0.50 / 0.60
    accuracy = {
        ("mean", "none"): (0.70, 0.72),
        ("mean", "ipm"): (0.10, 0.10),
        ("krum", "none"): (0.60, 0.60),
        ("krum", "ipm"): (0.50, 0.60),
    }

    runner = finishing(lambda o: accuracy[(o["aggregator"], o["attack"])][o["seed"]])
    out = tmp_path / "out"
    write_tables(run_grid(grid, out, runner, echo=lambda _: None), out)
    ranked, lines = ranking(out, "### Defences ranked by their worst case")
    assert lines[0] == "| defence | none | ipm | worst |"
    # krum's worst case (0.55) beats the mean's (0.10): krum first
    assert lines[1] == "| krum | 0.600 ± 0.000 | 0.550 ± 0.071 | 0.550 |"
    assert lines[2] == "| mean | 0.710 ± 0.014 | 0.100 ± 0.000 | 0.100 |"
    assert "over 2 seeds" in ranked


def test_a_sweep_over_seeds_gets_its_own_ranking_and_reuses_cells(tmp_path: Path) -> None:
    """A [[sweep]] with attack and seed axes is ranked like the main grid, from its own
    labels, also for a cell that another sweep ran first (under other labels)."""
    from bastion.experiments import only_groups

    text = (
        GRID_HEAD
        + """seed = 0

[[sweep]]
name = "first"
fixed = {partitioner = "label-sorted"}
axes.defence = [{aggregator = "krum", label = "the krum"}]
axes.attack = [{attack = "ipm", label = "ipm"}]

[[sweep]]
name = "final"
fixed = {partitioner = "label-sorted"}
axes.defence = [{aggregator = "mean", label = "avg"}, {aggregator = "krum", label = "krum"}]
axes.seed = [0, 1, 2]
axes.attack = [{attack = "none", label = "none"}, {attack = "ipm", label = "ipm"}]
"""
    )
    grid = load_grid(write(tmp_path, text))
    # krum / ipm / seed 0 is "first"'s cell: run once, listed under "first"
    assert len(grid.cells) == 2 * 3 * 2 and len(grid.labelled["final"]) == 12
    accuracy = {"mean": {"none": 0.7, "ipm": 0.1}, "krum": {"none": 0.6, "ipm": 0.4}}

    runner = finishing(lambda o: accuracy[o["aggregator"]][o["attack"]] + 0.01 * o["seed"])
    picked = only_groups(grid, ["final"])
    out = tmp_path / "out"
    write_tables(
        run_grid(picked, out, runner, echo=lambda _: None), out, picked.sweeps, picked.labelled
    )
    ranked, lines = ranking(out, "sweep final, partitioner = label-sorted")
    assert lines[0] == "| defence | none | ipm | worst |"
    # seeds 0, 1, 2 add 0, 0.01, 0.02: krum's ipm mean 0.41 includes "first"'s cell
    assert lines[1] == "| krum | 0.610 ± 0.010 | 0.410 ± 0.010 | 0.410 |"
    assert lines[2] == "| avg | 0.710 ± 0.010 | 0.110 ± 0.010 | 0.110 |"
    assert "over 3 seeds" in ranked
    results = run_grid(picked, out, runner, echo=lambda _: None)
    plots = plot_grid(results, out, picked.sweeps, grid.labelled)
    assert out / "seeds-final.png" in plots and (out / "seeds-final.png").stat().st_size > 0
    # a sweep without a seed axis gets no seed plot
    assert not any(p.name.startswith("seeds-first") for p in plots)


def test_only_some_groups_run(tmp_path: Path, capsys) -> None:
    from bastion.cli import main
    from bastion.experiments import only_groups

    grid = load_grid(write(tmp_path))
    sweep = only_groups(grid, ["krum-ipm"])
    # the sweep's own cell, and the main cell it repeats (eps = 0.1)
    assert {c.group for c in sweep.cells} == {"main", "krum-ipm"} and len(sweep.cells) == 2
    assert [s.name for s in sweep.sweeps] == ["krum-ipm"]
    assert len(only_groups(grid, ["main"]).cells) == 8
    code = main(["grid", str(write(tmp_path)), "--out", str(tmp_path / "o"), "--only", "krum"])
    assert code == 2 and "'--only': value 'krum' is not allowed" in capsys.readouterr().err


def test_only_selects_a_sweep_of_several_axes(tmp_path: Path) -> None:
    """A [[sweep]] with two axes has no one-axis table, but --only still selects its
    cells, including one that repeats a main cell."""
    from bastion.experiments import only_groups

    text = GRID + (
        '\n[[sweep]]\nname = "two-axes"\nfixed = {partitioner = "iid"}\n'
        'axes.aggregator = ["mean", "krum"]\naxes.attack = [{attack = "ipm", '
        'attack-epsilon = 0.1}, {attack = "ipm", attack-epsilon = 5.0}]\n'
    )
    grid = load_grid(write(tmp_path, text))
    picked = only_groups(grid, ["two-axes"])
    eps = sorted((c.overrides["aggregator"], c.overrides["attack-epsilon"]) for c in picked.cells)
    assert eps == [("krum", 0.1), ("krum", 5.0), ("mean", 0.1), ("mean", 5.0)]
    # krum/mean at eps 0.1 on iid are main cells: listed once, under main
    assert sorted(c.group for c in picked.cells) == ["main", "main", "two-axes", "two-axes"]
    assert picked.sweeps == [] and set(picked.groups) == {"two-axes"}
