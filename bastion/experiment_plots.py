"""Plots of an experiment grid (:mod:`bastion.experiments`).

* ``accuracy_curves.png``: central accuracy per round, one panel per
  (partitioner, attack), one line per defence;
* ``heatmap-<partitioner>.png``: final accuracy, attacks x defences (defences as rows
  when there are more than twice as many defences as attacks);
* ``krum_selection.png``: how often Krum picked each node over the run, honest
  and malicious nodes coloured apart (as Karimireddy, He & Jaggi 2022, Fig. 1a);
* ``malicious_influence.png``: per round, the share of the aggregate owed to
  malicious updates (see ``strategies.strategy.RoundSummary``), per defence;
* ``sweep-<name>.png``: final accuracy against the swept value of each one-axis
  sweep (and the largest DP epsilon, when the cells ran DP-SGD);
* ``seeds-<name>.png``: for each ``[[sweep]]`` with an attack and a seed axis, final
  accuracy per attack and defence, the mean over seeds as a bar, the sample standard
  deviation as its error bar and every seed as a dot;
* ``privacy.png``: when main cells ran DP-SGD, final accuracy and the largest
  whole-run epsilon per defence (e.g. noise multiplier), one line per attack.

A "defence" is every label of a cell other than its partitioner, attack and seed.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bastion.experiments import (
    Cell,
    Sweep,
    cell_row,
    defence,
    defence_of,
    mean_std,
    over_seeds,
    shared_labels,
)
from common.figures import save_figure
from common.runlog import read_jsonl

PANEL_KEYS = ("partitioner", "attack")


def _panel(cell: Cell) -> str:
    return " / ".join(cell.labels[k] for k in PANEL_KEYS if k in cell.labels) or cell.group


def _titled(fig: Any, grid_dir: Path, what: str) -> None:
    """Head the figure with the grid's name (its output folder) and what it shows."""
    fig.suptitle(f"grid {grid_dir.name}: {what}", fontsize=10)


def _grid_of(n: int) -> tuple[int, int]:
    cols = min(4, max(1, n))
    return math.ceil(n / cols), cols


def plot_grid(
    results: list[tuple[Cell, Path, bool]],
    out: Path,
    sweeps: Sequence[Sweep] = (),
    labelled: Mapping[str, Sequence[tuple[dict[str, str], str]]] | None = None,
) -> list[Path]:
    """Write the plots for the finished cells of ``results`` into ``out``; return them
    (``labelled``: :attr:`bastion.experiments.Grid.labelled`, for the seed plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = [p for sweep in sweeps if (p := _sweep_plot(sweep, out)) is not None]
    cells = {c.slug: (c, d) for c, d, _ in results}
    for name, members in (labelled or {}).items():
        if (path := _seeds_plot(name, members, cells, out)) is not None:
            written.append(path)
    done = [(c, d) for c, d, ok in results if ok and c.group == "main"]
    if not done:
        return written
    if any(c.overrides.get("dp") for c, _ in done):
        written.append(_privacy_plot(done, out / "privacy.png"))

    written.append(
        _curves(done, "central_accuracy", (0, 1), out / "accuracy_curves.png", first_round=0)
    )

    # heatmaps
    by_part: dict[str, list[tuple[Cell, Path]]] = defaultdict(list)
    for c, d in done:
        by_part[c.labels.get("partitioner", "all")].append((c, d))
    for part, members in sorted(by_part.items()):
        attacks = list(dict.fromkeys(c.labels.get("attack", "-") for c, _ in members))
        defences = list(dict.fromkeys(defence(c) for c, _ in members))
        grid = [[math.nan] * len(defences) for _ in attacks]
        for c, d in members:
            try:
                acc = json.loads((d / "summary.json").read_text()).get("final_accuracy")
            except (OSError, ValueError):
                acc = None
            if acc is not None:
                grid[attacks.index(c.labels.get("attack", "-"))][defences.index(defence(c))] = acc
        rows, cols, layout = attacks, defences, "attacks (rows) x defences (columns)"
        if len(defences) > 2 * len(attacks):  # a screening grid: one row per defence
            grid = [list(col) for col in zip(*grid, strict=True)]
            rows, cols, layout = defences, attacks, "defences (rows) x attacks (columns)"
        fig, ax = plt.subplots(
            figsize=(max(6.0, 1.6 + 0.75 * len(cols)), max(3.2, 1.6 + 0.3 * len(rows)))
        )
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(
                        j,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if v < 0.5 else "black",
                    )
        ax.set_title(f"{part} data: {layout}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03, label="final accuracy")
        _titled(fig, out, "final central accuracy")
        fig.tight_layout()
        written.append(save_figure(fig, out / f"heatmap-{part}.png", dpi=110, tight=False))

    # Krum's choices over nodes
    krum = [
        (c, d)
        for c, d in done
        if c.labels.get("aggregator") == "krum" and str(c.overrides.get("resampling-s", 0)) == "0"
    ]
    if krum:
        rows, cols = _grid_of(len(krum))
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
        for ax, (c, d) in zip(axes.flat, krum, strict=False):
            counts: dict[int, int] = defaultdict(int)
            bad: set[int] = set()
            for n in read_jsonl(d / "diagnostics.jsonl"):
                pid = n.get("partition_id")
                if pid is None:
                    continue
                counts[pid] += bool(n.get("selected"))
                if n.get("malicious"):
                    bad.add(pid)
            pids = sorted(counts)
            ax.bar(
                pids,
                [counts[p] for p in pids],
                color=["tab:red" if p in bad else "tab:blue" for p in pids],
            )
            never = sorted(p for p in bad if not counts[p])
            if never:  # a zero bar is invisible: mark malicious nodes Krum never picked
                ax.plot(never, [0] * len(never), "x", color="tab:red", clip_on=False)
            ax.set_title(_panel(c), fontsize=9)
            ax.set_xlabel("node (partition id); red = malicious, x = never selected", fontsize=7)
            ax.set_ylabel("rounds selected", fontsize=7)
        for ax in list(axes.flat)[len(krum) :]:
            ax.axis("off")
        _titled(fig, out, "rounds in which Krum selected each node (red: malicious)")
        fig.tight_layout()
        written.append(save_figure(fig, out / "krum_selection.png", dpi=110, tight=False))

    # malicious influence per round
    attacked = [(c, d) for c, d in done if c.labels.get("attack", "none") != "none"]
    if attacked:
        path = out / "malicious_influence.png"
        written.append(_curves(attacked, "malicious_influence", (-0.02, 1.02), path, first_round=1))
    return written


def _privacy_plot(done: list[tuple[Cell, Path]], path: Path) -> Path:
    """Final accuracy (left) and the largest whole-run epsilon (right, log scale) per
    defence, one line per attack: the privacy/utility/robustness trade-off."""
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    defences = list(dict.fromkeys(defence(c) for c, _ in done))
    attacks = list(dict.fromkeys(c.labels.get("attack", "-") for c, _ in done))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = list(range(len(defences)))
    for i, attack in enumerate(attacks):
        acc: list[float] = [math.nan] * len(defences)
        eps: list[float] = [math.nan] * len(defences)
        for c, d in done:
            if c.labels.get("attack", "-") != attack:
                continue
            j = defences.index(defence(c))
            row = cell_row(c, d)
            acc[j] = math.nan if row["final_accuracy"] is None else row["final_accuracy"]
            # "inf" (a run without noise) reads back as inf
            eps[j] = math.nan if row["max_epsilon"] is None else float(row["max_epsilon"])
        left.plot(x, acc, "o-", color=f"C{i}", label=attack)
        finite = [e if math.isfinite(e) else math.nan for e in eps]
        right.plot(x, finite, "o-", color=f"C{i}", label=attack)
        for j, e in enumerate(eps):
            if e == math.inf:  # no noise, no guarantee: the log axis cannot show it
                right.text(
                    j,
                    0.95 - 0.06 * i,
                    "ε = ∞",
                    transform=blended_transform_factory(right.transData, right.transAxes),
                    ha="center",
                    fontsize=8,
                    color=f"C{i}",
                )
    for ax in (left, right):
        ax.set_xticks(x, defences, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set(ylabel="final accuracy", ylim=(0, 1), title="accuracy")
    right.set(ylabel="max whole-run epsilon (log)", title="privacy spent (largest over nodes)")
    right.set_yscale("log")
    _titled(fig, path.parent, "accuracy and privacy per defence, one line per attack")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110, tight=False)


def _sweep_plot(sweep: Sweep, out: Path) -> Path | None:
    """Final and best accuracy against the swept value; a second axis carries the
    largest DP epsilon when the cells ran DP-SGD."""
    import matplotlib.pyplot as plt

    rows = [(value, cell_row(cell, out / "cells" / cell.slug)) for value, cell in sweep.points]
    rows = [(v, r) for v, r in rows if r["status"] == "completed"]
    if not rows:
        return None
    # the values as equally spaced categories: sweeps such as Xie et al.'s
    # eps in {-10, 0, 0.1, 10} are unreadable on a linear axis and a log axis has no 0
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(xs, [r["final_accuracy"] for _, r in rows], "o-", label="final accuracy")
    ax.plot(xs, [r["best_accuracy"] for _, r in rows], "s--", alpha=0.6, label="best accuracy")
    ax.set(xlabel=sweep.key, ylabel="accuracy", ylim=(0, 1))
    ax.set_xticks(xs, [v for v, _ in rows])
    eps = [r["max_epsilon"] for _, r in rows]
    if any(e is not None for e in eps):
        twin = ax.twinx()
        twin.plot(xs, [math.nan if e is None else float(e) for e in eps], "^:", color="tab:red")
        twin.set_ylabel("max whole-run epsilon", color="tab:red")
    fixed = ", ".join(f"{k}={v}" for k, v in sweep.fixed.items())
    ax.set_title(f"{sweep.name}\n{fixed}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    _titled(fig, out, f"sweep of {sweep.key}")
    fig.tight_layout()
    return save_figure(fig, out / f"sweep-{sweep.name}.png", dpi=110, tight=False)


def _seeds_plot(
    name: str,
    members: Sequence[tuple[dict[str, str], str]],
    cells: Mapping[str, tuple[Cell, Path]],
    out: Path,
) -> Path | None:
    """Grouped bars: per attack, each defence's mean final accuracy over the seeds,
    with the sample standard deviation and the seeds' own values."""
    import matplotlib.pyplot as plt

    members = [(lab, slug) for lab, slug in members if slug in cells]
    if not over_seeds(members):
        return None
    same = shared_labels(members)
    values: dict[str, dict[str, list[float]]] = {}
    attacks = list(dict.fromkeys(lab["attack"] for lab, _ in members))
    for lab, slug in members:
        row = cell_row(*cells[slug])
        if row["status"] != "completed" or row.get("final_accuracy") is None:
            continue
        shown = {k: v for k, v in lab.items() if k not in same or k == "defence"}
        per_attack = values.setdefault(defence_of(shown), {})
        per_attack.setdefault(lab["attack"], []).append(float(row["final_accuracy"]))
    if not values:
        return None
    width = 0.8 / len(values)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(attacks) + 2), 4.2))
    for k, (label, per_attack) in enumerate(values.items()):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(attacks))]
        stats = [mean_std(per_attack[a]) if per_attack.get(a) else (math.nan, 0.0) for a in attacks]
        ax.bar(
            xs,
            [m for m, _ in stats],
            width,
            yerr=[sd for _, sd in stats],
            capsize=2,
            label=label,
            alpha=0.8,
        )
        for x, a in zip(xs, attacks, strict=True):
            seeds = per_attack.get(a, [])
            ax.plot([x] * len(seeds), seeds, "k.", markersize=3)
    ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
    ax.set(ylabel="final accuracy", ylim=(0, 1))
    ax.grid(axis="y", alpha=0.3)
    # below the axes, so that no bar hides behind it
    fig.legend(fontsize=8, loc="lower center", ncol=min(len(values), 4), frameon=False)
    fixed = ", ".join(f"{k}={v}" for k, v in members[0][0].items() if k in same and k != "defence")
    ax.set_title(f"{name}: mean ± sd over seeds, dots: each seed\n{fixed}", fontsize=9)
    _titled(fig, out, f"sweep {name} over seeds")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save_figure(fig, out / f"seeds-{name}.png", dpi=110, tight=False)


def _curves(
    cells: list[tuple[Cell, Path]],
    key: str,
    ylim: tuple[float, float],
    path: Path,
    *,
    first_round: int,
) -> Path:
    """One panel per (partitioner, attack), one line per defence, of ``metrics.jsonl``'s
    ``key`` over the rounds from ``first_round``."""
    import matplotlib.pyplot as plt

    panels: dict[str, list[tuple[Cell, Path]]] = defaultdict(list)
    for c, d in cells:
        panels[_panel(c)].append((c, d))
    rows, cols = _grid_of(len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, members) in zip(axes.flat, sorted(panels.items()), strict=False):
        for c, d in members:
            m = [r for r in read_jsonl(d / "metrics.jsonl") if r.get("round", 0) >= first_round]
            if any(r.get(key) is not None for r in m):
                ax.plot([r["round"] for r in m], [r.get(key) for r in m], label=defence(c), lw=1.1)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(*ylim)
        ax.set_xlabel("round", fontsize=8)
        ax.set_ylabel(key.replace("_", " "), fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=7)
    _titled(fig, path.parent, f"{key.replace('_', ' ')} per round, one line per defence")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, path, dpi=110, tight=False)
