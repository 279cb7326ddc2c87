"""The reputation part of a run directory: ``reputation.json`` and ``reputation.png``.

Both are built from ``diagnostics.jsonl`` (one row per node per round, with the
node's ``suspicion`` after the round, see :mod:`strategies.rules.reputation`), so they
can be redrawn for any finished or interrupted run.

``reputation.json``
    one entry per node: its partition (when it ever said), whether it declared
    itself malicious (experiment ground truth, never used by the server), its
    final and highest suspicion, the rounds it was rejected, left out by the rule,
    and quarantined.
``reputation.png``
    a heatmap of suspicion, nodes by rounds; quarantined rounds are hatched and
    declared-malicious nodes are starred in the labels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from common.figures import run_title, save_figure
from common.runlog import read_jsonl


def node_standings(rows: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per-node reputation summary from diagnostics rows (see the module docstring)."""
    out: dict[int, dict[str, Any]] = {}
    for row in rows:
        node = int(row["node_id"])
        entry = out.setdefault(
            node,
            {
                "node_id": node,
                "partition_id": None,
                "malicious": False,
                "final_suspicion": None,
                "max_suspicion": 0.0,
                "rounds_rejected": [],
                "rounds_unselected": [],
                "rounds_quarantined": [],
            },
        )
        if row.get("partition_id") is not None:
            entry["partition_id"] = row["partition_id"]
        entry["malicious"] = entry["malicious"] or bool(row.get("malicious"))
        rnd, status = row.get("round"), row.get("status")
        if status == "rejected":
            entry["rounds_rejected"].append(rnd)
        elif status == "quarantined":
            entry["rounds_quarantined"].append(rnd)
        elif row.get("selected") is False:
            entry["rounds_unselected"].append(rnd)
        if (score := row.get("suspicion")) is not None:
            entry["final_suspicion"] = score
            entry["max_suspicion"] = max(entry["max_suspicion"], float(score))
    return out


def reputation_summary(standings: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The run summary's reputation fields: the quarantined nodes, and against the
    experiment's ground truth how many of each kind were quarantined and their mean
    highest suspicion.

    *Malicious*: nodes that declared themselves malicious (an accepted reply said so).
    *Honest*: nodes that neither declared it nor ever sent a reply that validation
    rejected. Nodes that only sent rejected replies (a ``malformed`` node, a broken
    client) never get to declare anything, so they are listed apart, in
    ``nodes_with_rejected_replies``, instead of counting as honest.
    """

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    bad = [s for s in standings.values() if s["malicious"]]
    rejecting = [s for s in standings.values() if not s["malicious"] and s["rounds_rejected"]]
    good = [s for s in standings.values() if not s["malicious"] and not s["rounds_rejected"]]
    return {
        "nodes_quarantined": sorted(n for n, s in standings.items() if s["rounds_quarantined"]),
        "nodes_with_rejected_replies": sorted(int(s["node_id"]) for s in rejecting),
        "quarantined_malicious": sum(1 for s in bad if s["rounds_quarantined"]),
        "quarantined_honest": sum(1 for s in good if s["rounds_quarantined"]),
        "max_suspicion_malicious": mean([float(s["max_suspicion"]) for s in bad]),
        "max_suspicion_honest": mean([float(s["max_suspicion"]) for s in good]),
    }


def write_reputation_report(run_dir: Path, threshold: float = 0.0) -> dict[int, dict[str, Any]]:
    """Write ``reputation.json`` and ``reputation.png`` into ``run_dir``; return the standings."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "diagnostics.jsonl")
    standings = node_standings(rows)
    tmp = run_dir / f".reputation.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps([standings[k] for k in sorted(standings)], indent=2))
    os.replace(tmp, run_dir / "reputation.json")
    if rows:
        try:
            config = json.loads((run_dir / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        title = run_title(run_dir, config) if config else run_dir.name
        plot_reputation(rows, standings, run_dir / "reputation.png", threshold, title)
    return standings


def plot_reputation(
    rows: list[dict[str, Any]],
    standings: Mapping[int, Mapping[str, Any]],
    path: Path,
    threshold: float = 0.0,
    title: str = "",
) -> Path:
    """Heatmap of each node's suspicion over rounds (hatched: quarantined), under
    ``title`` (the run's name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    rounds = sorted({int(r["round"]) for r in rows})
    col = {rnd: j for j, rnd in enumerate(rounds)}

    def order(node: int) -> tuple[int, int]:
        part = standings[node]["partition_id"]
        return (part if part is not None else 10**9, node)

    nodes = sorted(standings, key=order)
    line = {node: i for i, node in enumerate(nodes)}
    grid = np.full((len(nodes), len(rounds)), np.nan)
    for r in rows:
        if r.get("suspicion") is not None:
            grid[line[int(r["node_id"])], col[int(r["round"])]] = float(r["suspicion"])
    height = min(12.0, 2.2 + 0.28 * len(nodes))
    fig, ax = plt.subplots(figsize=(min(14.0, max(7.5, 3.0 + 0.3 * len(rounds))), height))
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        aspect="auto",
        cmap="Reds",
        vmin=0,
        vmax=1,
        interpolation="nearest",
    )
    for r in rows:
        if r.get("status") == "quarantined":
            ax.add_patch(
                Rectangle(
                    (col[int(r["round"])] - 0.5, line[int(r["node_id"])] - 0.5),
                    1,
                    1,
                    fill=False,
                    hatch="///",
                    edgecolor="black",
                    linewidth=0,
                )
            )
    labels = []
    for node in nodes:
        part = standings[node]["partition_id"]
        label = f"p{part}" if part is not None else f"n{node}"
        labels.append(label + (" *" if standings[node]["malicious"] else ""))
    step = max(1, len(nodes) // 40)
    ax.set_yticks(range(0, len(nodes), step), labels[::step], fontsize="small")
    tick = max(1, len(rounds) // 20)
    ax.set_xticks(range(0, len(rounds), tick), [str(x) for x in rounds[::tick]])
    key = "hatched: quarantined; * declared malicious"
    if threshold > 0:
        key += f"; quarantine threshold {threshold:g}"
    ax.set(xlabel=f"round\n({key})", ylabel="node (partition)", title="Suspicion per node")
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.colorbar(image, ax=ax, label="suspicion score")
    return save_figure(fig, path)
