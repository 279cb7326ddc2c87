"""Plots of an experiment grid (:mod:`bastion.experiments`).

* ``accuracy_curves.png``: central accuracy per round, one panel per
  (partitioner, attack), one line per defence;
* ``heatmap-<partitioner>.png``: final accuracy, attacks x defences;
* ``krum_selection.png``: how often Krum picked each node over the run, honest
  and malicious nodes coloured apart (as Karimireddy, He & Jaggi 2022, Fig. 1a);
* ``malicious_influence.png``: per round, the share of the aggregate owed to
  malicious updates (see ``strategies.strategy.RoundSummary``), per defence.

A "defence" is every label of a cell other than its partitioner, attack and seed.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from bastion.experiments import Cell
from bastion.runlog import read_jsonl

PANEL_KEYS = ("partitioner", "attack")
IGNORED = ("seed",)


def _defence(cell: Cell) -> str:
    parts = [
        f"{k}={v}" if k not in ("aggregator",) else v
        for k, v in cell.labels.items()
        if k not in PANEL_KEYS + IGNORED
    ]
    return " ".join(parts) or "default"


def _panel(cell: Cell) -> str:
    return " / ".join(cell.labels[k] for k in PANEL_KEYS if k in cell.labels) or cell.group


def _grid_of(n: int) -> tuple[int, int]:
    cols = min(4, max(1, n))
    return math.ceil(n / cols), cols


def plot_grid(results: list[tuple[Cell, Path, bool]], out: Path) -> list[Path]:
    """Write the plots for the finished cells of ``results`` into ``out``; return them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [(c, d) for c, d, ok in results if ok and c.group == "main"]
    written: list[Path] = []
    if not done:
        return written

    written.append(
        _curves(done, "central_accuracy", (0, 1), out / "accuracy_curves.png", first_round=0)
    )

    # heatmaps
    by_part: dict[str, list[tuple[Cell, Path]]] = defaultdict(list)
    for c, d in done:
        by_part[c.labels.get("partitioner", "all")].append((c, d))
    for part, members in sorted(by_part.items()):
        attacks = list(dict.fromkeys(c.labels.get("attack", "-") for c, _ in members))
        defences = list(dict.fromkeys(_defence(c) for c, _ in members))
        grid = [[math.nan] * len(defences) for _ in attacks]
        for c, d in members:
            try:
                acc = json.loads((d / "summary.json").read_text()).get("final_accuracy")
            except (OSError, ValueError):
                acc = None
            if acc is not None:
                grid[attacks.index(c.labels.get("attack", "-"))][defences.index(_defence(c))] = acc
        fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(defences), 1.0 + 0.45 * len(attacks)))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(defences)), defences, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(attacks)), attacks, fontsize=8)
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
        ax.set_title(f"final accuracy ({part})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03)
        fig.tight_layout()
        written.append(_save(fig, out / f"heatmap-{part}.png"))

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
            ax.set_title(_panel(c), fontsize=9)
            ax.set_xlabel("node (partition id); red = malicious", fontsize=7)
            ax.set_ylabel("rounds selected", fontsize=7)
        for ax in list(axes.flat)[len(krum) :]:
            ax.axis("off")
        fig.tight_layout()
        written.append(_save(fig, out / "krum_selection.png"))

    # malicious influence per round
    attacked = [(c, d) for c, d in done if c.labels.get("attack", "none") != "none"]
    if attacked:
        path = out / "malicious_influence.png"
        written.append(_curves(attacked, "malicious_influence", (-0.02, 1.02), path, first_round=1))
    return written


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
                ax.plot([r["round"] for r in m], [r.get(key) for r in m], label=_defence(c), lw=1.1)
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
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
