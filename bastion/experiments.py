"""The attack x defence experiment runner: a grid file -> runs -> table and plots.

A grid file (TOML) names a base run config, axes whose Cartesian product gives the
cells, and optional sweeps (extra, smaller products)::

    [grid]
    clients = 25                 # SuperNodes per run
    backend = "simulation"       # or "federation" (real gRPC processes, slower)

    [base]                       # run-config keys every cell shares
    dataset = "fashion-mnist"
    num-server-rounds = 30

    [axes]                       # one list per axis; scalars set that key,
    partitioner = ["iid", "label-sorted"]          # tables set several keys
    attack = [{attack = "none"}, {attack = "ipm", attack-epsilon = 0.1, label = "ipm 0.1"}]
    aggregator = ["mean", "krum"]
    resampling-s = [0, 2]

    [[sweep]]                    # more cells: base + fixed + the sweep's own axes
    name = "krum-ipm"
    fixed = {aggregator = "krum", attack = "ipm"}
    axes = {attack-epsilon = [0.1, 0.5, 1.0, 10.0]}

    # an axis value may name a defence preset (bastion.defences): {defence = "name"}

    [[prune]]                    # cells not run, with the reason the tables show
    where = {aggregator = "mean", pre = ["bucket", "nnm"]}   # axis labels (or lists)
    why = "the mean of bucket means is the mean"

Each cell is one Bastion run whose results directory is
``<out>/cells/<slug>``; a cell whose ``summary.json`` says ``completed`` is
skipped, so an interrupted grid resumes where it stopped. ``attack = "none"``
cells run with ``num-malicious = 0`` (the grid's ``malicious`` count applies to
the others). After the runs, :func:`write_report` writes ``results.csv``,
``results.md`` and the plots (see :mod:`bastion.experiment_plots`).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import shutil
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion.defences import get_defence
from bastion.preflight import check_rule_fits
from common.batch import write_batch
from common.config import ConfigError
from common.runlog import read_jsonl
from server.run_config import load_run_config

# run(cell overrides, output dir, number of clients) -> process exit code
CellRunner = Callable[[dict[str, Any], Path, int], int]
# run(batch file, batch dir, number of clients, called with each finished cell's row)
#   -> exit code; see common.batch
BatchRunner = Callable[[Path, Path, int, Callable[[dict[str, Any]], None]], int]


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its labels per axis and its full run-config overrides."""

    labels: dict[str, str]
    overrides: dict[str, Any]
    group: str = "main"  # "main" or the sweep's name
    # why the cell's rule cannot run with this many clients (then it is not run)
    infeasible: str = ""

    @property
    def pruned(self) -> bool:
        """Left out by a ``[[prune]]`` section (its reason is :attr:`infeasible`)."""
        return self.infeasible.startswith(PRUNED)

    @property
    def slug(self) -> str:
        """A stable directory name: readable labels plus a hash of the overrides."""
        text = json.dumps(self.overrides, sort_keys=True)
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        readable = "-".join(
            str(v).replace(" ", "").replace("/", "_").replace("=", "") for v in self.labels.values()
        )
        return f"{self.group}-{readable}-{digest}"[:120]


@dataclass(frozen=True)
class Sweep:
    """A one-axis ``[[sweep]]``: its swept run-config key and, per value, the cell that
    runs it (a main cell when the sweep repeats one, e.g. Krum under IPM at eps 0.1)."""

    name: str
    key: str
    fixed: dict[str, str]
    points: list[tuple[str, Cell]]


@dataclass
class Grid:
    """A parsed grid file."""

    clients: int
    backend: str
    malicious: int
    base: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)
    sweeps: list[Sweep] = field(default_factory=list)
    # every group ("main", each [[sweep]]'s name) -> the slugs of its cells, including
    # the cells it repeats from another group (run and listed once, under the first)
    groups: dict[str, list[str]] = field(default_factory=dict)
    # every [[sweep]] -> its cells under the sweep's own labels: (labels, slug of the
    # cell that runs it); a repeated cell keeps the labels of the group it was first in
    labelled: dict[str, list[tuple[dict[str, str], str]]] = field(default_factory=dict)


def _axis_values(name: str, values: Any) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(values, list) or not values:
        raise ConfigError(
            f"grid axis {name!r}: value {values!r} is not allowed; allowed: a "
            "non-empty list of values or tables"
        )
    out = []
    for value in values:
        if isinstance(value, dict):
            value = dict(value)
            if "defence" in value:  # a named preset (bastion.defences); its own keys win
                name = str(value.pop("defence"))
                value = dict(get_defence(name).keys) | value
                value.setdefault("label", name)
            label = str(value.pop("label", " ".join(f"{v}" for v in value.values())))
            out.append((label, value))
        else:
            out.append((str(value), {name: value}))
    return out


def _product(axes: Mapping[str, Any]) -> Iterable[tuple[dict[str, str], dict[str, Any]]]:
    names = list(axes)
    choices = [_axis_values(n, axes[n]) for n in names]
    for combo in itertools.product(*choices):
        labels = {n: label for n, (label, _) in zip(names, combo, strict=True)}
        overrides: dict[str, Any] = {}
        for _, values in combo:
            overrides |= values
        yield labels, overrides


#: how the reason of a cell left out by a ``[[prune]]`` section begins
PRUNED = "pruned: "


@dataclass(frozen=True)
class Prune:
    """A ``[[prune]]`` section: cells whose labels match ``where`` are not run."""

    where: dict[str, tuple[str, ...]]
    why: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(axis) in values for axis, values in self.where.items())


def _prunes(sections: Any, axes: Iterable[str]) -> list[Prune]:
    if not isinstance(sections, list):
        raise ConfigError(
            f"grid key 'prune': value {sections!r} is not allowed; allowed: [[prune]] tables"
        )
    known = set(axes)
    out = []
    for section in sections:
        where, why = section.get("where"), section.get("why")
        if not isinstance(where, dict) or not where or not isinstance(why, str) or not why:
            raise ConfigError(
                f"grid [[prune]] {section!r} is not allowed; allowed: a non-empty table "
                "'where' of axis labels and a non-empty string 'why'"
            )
        for axis in where:
            if axis not in known:
                raise ConfigError(
                    f"grid [[prune]] key {axis!r} is not allowed; allowed: one of the "
                    f"[axes] {sorted(known)}"
                )
        values = {
            k: tuple(str(x) for x in (v if isinstance(v, list) else [v])) for k, v in where.items()
        }
        out.append(Prune(values, why))
    return out


def load_grid(path: str | Path) -> Grid:
    """Parse and validate a grid file; every cell's run config is checked up front,
    and cells whose rule cannot run with the grid's clients are marked infeasible."""

    data = tomllib.loads(Path(path).read_text())
    head = data.get("grid", {})
    clients = int(head.get("clients", 25))
    backend = str(head.get("backend", "simulation"))
    if backend not in ("simulation", "federation"):
        raise ConfigError(
            f"grid key 'backend': value {backend!r} is not allowed; allowed: "
            "'simulation', 'federation'"
        )
    malicious = int(head.get("malicious", 0))
    base = dict(data.get("base", {}))
    grid = Grid(clients, backend, malicious, base)
    prunes = _prunes(data.get("prune", []), data.get("axes", {}))
    sections = [("main", {}, data.get("axes", {}))]
    for sweep in data.get("sweep", []):
        sections.append((str(sweep["name"]), dict(sweep.get("fixed", {})), sweep.get("axes", {})))
    seen: dict[str, Cell] = {}
    for group, fixed, axes in sections:
        if not axes and group == "main":
            continue
        points: list[tuple[str, Cell]] = []
        for labels, overrides in _product(axes):
            full = base | fixed | overrides
            attacking = full.get("attack", "none") != "none"
            full.setdefault("num-malicious", malicious if attacking else 0)
            if not attacking:
                full["num-malicious"] = 0
            full.setdefault("min-available-nodes", clients)
            full.setdefault("min-train-nodes", clients)
            try:
                cfg = load_run_config(full)
            except ConfigError as exc:
                raise ConfigError(f"grid cell {labels} ({group}): {exc}") from None
            # e.g. Bulyan after s = 2 resampling needs n >= 4 (2f) + 3: such a cell would
            # only log "aggregation skipped" every round, so it is listed, not run
            problem = check_rule_fits(cfg, clients) or ""
            if group == "main":
                why = next((p.why for p in prunes if p.matches(labels)), "")
                problem = f"{PRUNED}{why}" if why else problem
            cell = Cell(labels | {k: str(v) for k, v in fixed.items()}, full, group, problem)
            key = json.dumps(full, sort_keys=True)
            if key not in seen:  # a sweep may repeat a main cell: run (and list) it once
                seen[key] = cell
                grid.cells.append(cell)
            points.append((next(iter(labels.values()), ""), seen[key]))
            grid.groups.setdefault(group, []).append(seen[key].slug)
            if group != "main":
                own = labels | {k: str(v) for k, v in fixed.items()}
                grid.labelled.setdefault(group, []).append((own, seen[key].slug))
        if group != "main" and len(axes) == 1:
            fixed_labels = {k: str(v) for k, v in fixed.items()}
            grid.sweeps.append(Sweep(group, next(iter(axes)), fixed_labels, points))
    if not grid.cells:
        raise ConfigError(f"grid file {path}: no cells (give [axes] or [[sweep]] sections)")
    return grid


def only_groups(grid: Grid, groups: Iterable[str]) -> Grid:
    """``grid`` with only the cells (and sweeps) of ``groups``: ``"main"`` and sweep names
    (of one axis or several). A sweep cell that repeats a main cell stays in its sweep."""
    keep = set(groups)
    sweeps = [s for s in grid.sweeps if s.name in keep]
    slugs = {slug for name in keep for slug in grid.groups.get(name, [])}
    cells = [c for c in grid.cells if c.group in keep or c.slug in slugs]
    members = {name: list(grid.groups[name]) for name in grid.groups if name in keep}
    labelled = {name: list(v) for name, v in grid.labelled.items() if name in keep}
    return Grid(
        grid.clients, grid.backend, grid.malicious, grid.base, cells, sweeps, members, labelled
    )


def cell_done(cell_dir: Path) -> bool:
    """A cell is done when its summary says the run completed."""
    return _summary(cell_dir).get("status") == "completed"


def run_grid(
    grid: Grid,
    out: Path,
    runner: CellRunner | None = None,
    *,
    batch_runner: BatchRunner | None = None,
    cells_per_batch: int = 16,
    echo: Callable[[str], None] = print,
) -> list[tuple[Cell, Path, bool]]:
    """Run every cell not yet done (in order), with a progress line per cell and an ETA.

    With ``batch_runner``, up to ``cells_per_batch`` cells share one Flower run
    (:mod:`common.batch`); otherwise ``runner`` runs each cell on its own.
    Returns ``(cell, directory, completed)`` for every cell.
    """
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    feasible = [c for c in grid.cells if not c.infeasible]
    todo = [c for c in feasible if not cell_done(cells_dir / c.slug)]
    echo(
        f"grid: {len(grid.cells)} cells, {len(feasible) - len(todo)} already done, "
        f"{len(todo)} to run ({grid.backend}, {grid.clients} clients)"
    )
    for reason in dict.fromkeys(c.infeasible for c in grid.cells if c.infeasible):
        count = sum(c.infeasible == reason for c in grid.cells)
        echo(f"grid: {count} cell(s) not run: {reason}")
    started = time.monotonic()
    finished = 0
    last = [started]

    def report(cell: Cell, code: int | None = None) -> None:
        nonlocal finished
        finished += 1
        cell_dir = cells_dir / cell.slug
        ok = cell_done(cell_dir)
        acc = _summary(cell_dir).get("final_accuracy")
        now = time.monotonic()
        eta = (now - started) / finished * (len(todo) - finished)
        what = ", ".join(f"{k}={v}" for k, v in cell.labels.items())
        status = f"accuracy {acc:.4f}" if ok and acc is not None else "FAILED"
        if not ok and code is not None:
            status += f" (exit {code})"
        echo(
            f"[{finished}/{len(todo)}] {what}: {status}  {now - last[0]:.0f} s, "
            f"ETA {eta / 60:.0f} min"
        )
        last[0] = now

    def overrides(cell: Cell) -> dict[str, Any]:
        # An unfinished cell starts over: its run would append to the interrupted
        # run's metrics.jsonl and diagnostics.jsonl and mix the two.
        shutil.rmtree(cells_dir / cell.slug, ignore_errors=True)
        values = dict(cell.overrides) | {"output-dir": str(cells_dir / cell.slug)}
        colluding = values.get("attack-knowledge", "collude") == "collude"
        if colluding and int(values.get("num-malicious", 0)) > 1:
            values.setdefault("collusion-dir", str(cells_dir / cell.slug / "collusion"))
        return values

    if batch_runner is not None:
        for start in range(0, len(todo), max(1, cells_per_batch)):
            chunk = todo[start : start + cells_per_batch]
            batch_dir = out / "batches" / f"batch-{chunk[0].slug}"
            batch_file = batch_dir / "cells.json"
            write_batch(batch_file, [overrides(c) for c in chunk])
            seen: set[int] = set()

            def on_cell(
                row: dict[str, Any], chunk: list[Cell] = chunk, seen: set[int] = seen
            ) -> None:
                index = int(row.get("cell", -1))
                if 0 <= index < len(chunk) and index not in seen:
                    seen.add(index)
                    report(chunk[index])

            code = batch_runner(batch_file, batch_dir, grid.clients, on_cell)
            for index, cell in enumerate(chunk):  # cells the batch never reached
                if index not in seen:
                    report(cell, code)
    else:
        assert runner is not None, "run_grid needs a runner or a batch_runner"
        for cell in todo:
            code = runner(overrides(cell), cells_dir / cell.slug, grid.clients)
            report(cell, code)
    return [(c, cells_dir / c.slug, cell_done(cells_dir / c.slug)) for c in grid.cells]


def _summary(cell_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((cell_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def cell_row(cell: Cell, cell_dir: Path) -> dict[str, Any]:
    """The table row of one cell: its labels, final/best accuracy, malicious influence."""
    rows = [r for r in read_jsonl(cell_dir / "metrics.jsonl") if r.get("round", 0) > 0]
    infl = [r["malicious_influence"] for r in rows if r.get("malicious_influence") is not None]
    summary = _summary(cell_dir)
    return {
        "group": cell.group,
        **cell.labels,
        "status": ("pruned" if cell.pruned else "infeasible")
        if cell.infeasible
        else summary.get("status", "missing"),
        "final_accuracy": summary.get("final_accuracy"),
        "best_accuracy": max((r.get("central_accuracy", 0.0) for r in rows), default=None),
        # under non-IID data the accuracy swings by ~0.1 from round to round: the mean
        # of the last rounds says more than the last one alone
        f"last{TAIL_ROUNDS}_mean_accuracy": _tail_mean(rows),
        "rounds": len(rows),
        "mean_malicious_influence": sum(infl) / len(infl) if infl else None,
        "skipped_aggregations": sum(1 for r in rows if r.get("aggregation_error")),
        "max_epsilon": summary.get("max_epsilon"),
        "note": cell.infeasible,
        "dir": cell_dir.name,
    } | {k: summary[k] for k in REPUTATION_COLUMNS if summary.get(k) is not None}


#: summary fields of runs with reputation (server.reputation_report) shown per cell
REPUTATION_COLUMNS = (
    "quarantined_malicious",
    "quarantined_honest",
    "max_suspicion_malicious",
    "max_suspicion_honest",
)


#: rounds averaged in the ``last<N>_mean_accuracy`` column and pivot
TAIL_ROUNDS = 5


def _tail_mean(rows: list[dict[str, Any]]) -> float | None:
    accs = [r["central_accuracy"] for r in rows if r.get("central_accuracy") is not None]
    tail = accs[-TAIL_ROUNDS:]
    return sum(tail) / len(tail) if tail else None


def write_tables(
    results: list[tuple[Cell, Path, bool]],
    out: Path,
    sweeps: Sequence[Sweep] = (),
    labelled: Mapping[str, Sequence[tuple[dict[str, str], str]]] | None = None,
) -> list[dict[str, Any]]:
    """``results.csv`` and ``results.md`` (one row per cell, then the attack x defence
    pivots and one table per sweep); returns the rows."""
    rows = [cell_row(c, d) for c, d, _ in results]
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)

    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    shown = [k for k in keys if k != "dir"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in shown) + " |" for r in rows]
    by_slug = {c.slug: row for (c, _, _), row in zip(results, rows, strict=True)}
    md = "\n".join(lines) + "\n"
    cells = [c for c, _, _ in results]
    md += "".join(ranking_tables(cells, by_slug, m) for m in PIVOTS)
    md += "".join(pivot_tables(cells, by_slug, m) for m in PIVOTS)
    md += sweep_tables(sweeps, by_slug)
    md += "".join(sweep_ranking_tables(labelled or {}, by_slug, m) for m in PIVOTS)
    (out / "results.md").write_text(md)
    return rows


def sweep_tables(sweeps: Sequence[Sweep], rows: Mapping[str, dict[str, Any]]) -> str:
    """One Markdown table per sweep: the swept value against final and best accuracy,
    the malicious updates' mean share of the aggregate and the largest DP epsilon
    (``rows``: :func:`cell_row` by cell slug)."""
    parts = []
    for sweep in sweeps:
        fixed = ", ".join(f"{k}={v}" for k, v in sweep.fixed.items())
        parts += [
            f"\n### Sweep {sweep.name}: {sweep.key}" + (f" ({fixed})" if fixed else "") + "\n",
            NOT_RUN_LEGEND,
            f"| {sweep.key} | final accuracy | best accuracy | malicious influence | max epsilon |",
            "|---|---|---|---|---|",
        ]
        for value, cell in sweep.points:
            row = rows[cell.slug]
            done = row["status"] == "completed"
            shown = [
                _fmt(row[k], ".3f") if done else ("n/a" if cell.infeasible else "–")
                for k in ("final_accuracy", "best_accuracy", "mean_malicious_influence")
            ]
            eps = row["max_epsilon"]
            shown.append(_fmt(float(eps), ".3g") if done and eps is not None else "–")
            parts.append(f"| {value} | " + " | ".join(shown) + " |")
    return "\n".join(parts) + ("\n" if parts else "")


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


#: the legend under every table of ``results.md``
NOT_RUN_LEGEND = (
    "(– not run yet; n/a: not run, because the rule cannot run with this many clients or "
    "a [[prune]] section left it out: results.csv's note says which)\n"
)

#: The pivot tables of ``results.md``: a :func:`cell_row` column and its title.
PIVOTS = {
    "final_accuracy": "Final accuracy",
    f"last{TAIL_ROUNDS}_mean_accuracy": f"Mean accuracy of the last {TAIL_ROUNDS} rounds",
}

#: Labels that place a cell in a pivot row or table, not in its defence.
NOT_DEFENCE = ("partitioner", "attack", "seed")


def defence(cell: Cell) -> str:
    """A cell's defence: every label but its partitioner, attack and seed (the
    aggregator by its value alone, the others as ``key=value``)."""
    return defence_of(cell.labels)


def defence_of(labels: Mapping[str, str]) -> str:
    """:func:`defence` from a cell's labels."""
    # an "aggregator" or a "defence" axis names the defence by its value alone
    parts = [
        v if k in ("aggregator", "defence") else f"{k}={v}"
        for k, v in labels.items()
        if k not in NOT_DEFENCE
    ]
    return " ".join(parts) or "default"


def _by_partitioner(cells: Iterable[Cell]) -> list[tuple[str, list[Cell], list[str]]]:
    """The main grid's cells with an attack label, per partitioner (``"all"`` without a
    partitioner axis): ``(partitioner, its cells, its attacks in grid order)``."""
    main = [c for c in cells if c.group == "main" and "attack" in c.labels]
    out = []
    for part in dict.fromkeys(c.labels.get("partitioner", "all") for c in main):
        members = [c for c in main if c.labels.get("partitioner", "all") == part]
        out.append((part, members, list(dict.fromkeys(c.labels["attack"] for c in members))))
    return out


def pivot_tables(
    cells: Sequence[Cell], rows: Mapping[str, dict[str, Any]], metric: str = "final_accuracy"
) -> str:
    """Markdown tables of ``metric`` (a :data:`PIVOTS` key), attacks x defences, one
    per partitioner (main grid only; ``rows``: :func:`cell_row` by cell slug)."""
    out = []
    for part, members, attacks in _by_partitioner(cells):
        defences = list(dict.fromkeys(defence(c) for c in members))
        table = {a: dict.fromkeys(defences, "–") for a in attacks}
        for c in members:
            row = rows[c.slug]
            value = row[metric] if row["status"] == "completed" else None
            shown = f"{value:.3f}" if value is not None else "–"
            table[c.labels["attack"]][defence(c)] = "n/a" if c.infeasible else shown
        out.append(f"\n### {PIVOTS[metric]}, partitioner = {part}\n")
        out.append(NOT_RUN_LEGEND)
        out.append("| attack | " + " | ".join(defences) + " |")
        out.append("|---|" + "---|" * len(defences))
        out += [f"| {a} | " + " | ".join(table[a].values()) + " |" for a in attacks]
    return "\n".join(out) + "\n" if out else ""


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, var**0.5


def _plain(stat: tuple[float, float] | None) -> str:
    return "–" if stat is None else f"{stat[0]:.3f}"


def _with_spread(stat: tuple[float, float] | None) -> str:
    return "–" if stat is None else f"{stat[0]:.3f} ± {stat[1]:.3f}"


def ranking_tables(
    cells: Sequence[Cell], rows: Mapping[str, dict[str, Any]], metric: str = "final_accuracy"
) -> str:
    """Markdown tables, one per partitioner, with one row per defence: ``metric`` under
    each attack (mean ± sample standard deviation over the ``seed`` axis when it has
    several values), then the worst case over the attacks. Defences whose every
    attack finished come first, best worst case first; the others follow with the
    cells they have. This is the table a defence is chosen from (main grid)."""
    out = []
    for part, members, _ in _by_partitioner(c for c in cells if not c.infeasible):
        labelled = [(c.labels, c.slug) for c in members]
        out.append(_ranking(f"partitioner = {part}", labelled, rows, metric))
    return "".join(out)


def over_seeds(members: Sequence[tuple[Mapping[str, str], str]]) -> bool:
    """Whether a sweep's ``(labels, slug)`` members have an attack and several seeds."""
    seeds = {lab.get("seed") for lab, _ in members}
    return bool(members) and "attack" in members[0][0] and len(seeds) > 1


def shared_labels(members: Sequence[tuple[Mapping[str, str], str]]) -> set[str]:
    """The label keys with one value across all ``(labels, slug)`` members."""
    if not members:
        return set()
    first = members[0][0]
    return {k for k, v in first.items() if all(lab.get(k) == v for lab, _ in members)}


def sweep_ranking_tables(
    labelled: Mapping[str, Sequence[tuple[dict[str, str], str]]],
    rows: Mapping[str, dict[str, Any]],
    metric: str = "final_accuracy",
) -> str:
    """:func:`ranking_tables` for every ``[[sweep]]`` with an ``attack`` and a ``seed``
    axis (e.g. a final comparison over 3 seeds), one per partitioner of the sweep,
    from the sweep's own labels (``labelled``: :attr:`Grid.labelled`)."""
    out = []
    for name, members in labelled.items():
        members = [(lab, slug) for lab, slug in members if slug in rows]
        if not over_seeds(members):
            continue
        for part in dict.fromkeys(lab.get("partitioner", "all") for lab, _ in members):
            mine = [(lab, slug) for lab, slug in members if lab.get("partitioner", "all") == part]
            mine = [(lab, slug) for lab, slug in mine if not rows[slug].get("note")]
            # labels every member shares (the sweep's fixed keys) name no defence
            same = shared_labels(mine) - set(NOT_DEFENCE)
            if mine and len(same) < len([k for k in mine[0][0] if k not in NOT_DEFENCE]):
                mine = [
                    ({k: v for k, v in lab.items() if k not in same}, slug) for lab, slug in mine
                ]
            out.append(_ranking(f"sweep {name}, partitioner = {part}", mine, rows, metric))
    return "".join(out)


def _ranking(
    where: str,
    members: Sequence[tuple[Mapping[str, str], str]],
    rows: Mapping[str, dict[str, Any]],
    metric: str,
) -> str:
    """One ranking table over ``members`` ((labels, slug) with an ``attack`` label)."""
    attacks = list(dict.fromkeys(lab["attack"] for lab, _ in members))
    values: dict[str, dict[str, list[float]]] = {}
    expected: dict[tuple[str, str], int] = {}  # cells per (defence, attack): seeds
    for lab, slug in members:
        name, attack = defence_of(lab), lab["attack"]
        per_attack = values.setdefault(name, {a: [] for a in attacks})
        expected[(name, attack)] = expected.get((name, attack), 0) + 1
        row = rows[slug]
        if row["status"] == "completed" and row.get(metric) is not None:
            per_attack[attack].append(float(row[metric]))
    table = []
    for name, per_attack in values.items():
        complete = all(len(per_attack[a]) == expected.get((name, a), 0) > 0 for a in attacks)
        stats = {a: mean_std(v) for a, v in per_attack.items() if v}
        worst = min((m for m, _ in stats.values()), default=None) if complete else None
        table.append((name, stats, worst))
    table.sort(key=lambda t: (t[2] is None, -(t[2] or 0.0)))
    seeds = max(expected.values(), default=1)
    fmt = _with_spread if seeds > 1 else _plain
    title = PIVOTS.get(metric, metric)
    out = [f"\n### Defences ranked by their worst case ({title.lower()}), {where}\n"]
    if seeds > 1:
        out.append(f"(mean ± sample standard deviation over {seeds} seeds)\n")
    out.append("| defence | " + " | ".join(attacks) + " | worst |")
    out.append("|---|" + "---|" * (len(attacks) + 1))
    for name, stats, worst in table:
        cols = [fmt(stats.get(a)) for a in attacks]
        cols.append("–" if worst is None else f"{worst:.3f}")
        out.append(f"| {name} | " + " | ".join(cols) + " |")
    return "\n".join(out) + "\n"
