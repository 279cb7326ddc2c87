"""A run directory: per-round metrics, per-node diagnostics, checkpoints, plot, summary.

Layout of ``<run-dir>``::

    config.json          the validated run config
    metrics.jsonl        one JSON object per round (round 0 = before training)
    diagnostics.jsonl    one JSON object per node per round (accepted/rejected, why, ...)
    checkpoints/round-NNNN.pt   global model state_dict after each round
    accuracy_loss.png    central accuracy and loss over rounds
    privacy_epsilon.png  with DP: epsilon spent over rounds (max and per node)
    summary.json         final numbers (written at the end, also on failure)

Every file is appended or replaced atomically, so an interrupted run leaves
complete lines and complete files behind.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch


def default_run_dir(base: str | Path = "runs", dataset: str = "run") -> Path:
    """A fresh ``runs/<UTC time>-<dataset>`` directory name (not yet created)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = Path(base) / f"{stamp}-{dataset}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(base) / f"{stamp}-{dataset}-{suffix}"
    return path


#: Keys whose +inf is meaningful (a DP-SGD round without noise promises nothing):
#: written as the string "inf" so that it stays strict JSON and unlike None ("no DP").
_INFINITE_KEYS = frozenset({"dp_epsilon", "max_dp_epsilon", "max_epsilon"})


def _clean(value: Any, key: str = "") -> Any:
    """``value`` as strict JSON: non-finite floats become None, except +inf under
    :data:`_INFINITE_KEYS`, which becomes ``"inf"`` (``float("inf")`` reads it back)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if key in _INFINITE_KEYS and value > 0 else None
    if isinstance(value, Mapping):
        return {k: _clean(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# What a run writes into its folder (logs/ belongs to the launcher and is kept).
_RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "diagnostics.jsonl",
    "summary.json",
    "accuracy_loss.png",
    "privacy_epsilon.png",
    "checkpoints",
)


def _set_aside_previous_run(run_dir: Path) -> Path | None:
    """Move an earlier run's files out of the way (into ``previous-<UTC time>/``).

    Appending a new run to an old ``metrics.jsonl`` would mix the two, and deleting
    it would lose results; returns the folder the old files went to, if any.
    """
    if not any((run_dir / name).exists() for name in ("metrics.jsonl", "summary.json")):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = run_dir / f"previous-{stamp}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = run_dir / f"previous-{stamp}-{suffix}"
    target.mkdir()
    for name in _RUN_FILES:
        if (run_dir / name).exists():
            os.replace(run_dir / name, target / name)
    return target


def _save_figure(fig: Any, path: Path) -> Path:
    """Lay out, save (atomically: a reader never sees half a PNG) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


class RunResults:
    """Writes one run's results into ``run_dir`` as the rounds go."""

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any]) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.moved_previous = _set_aside_previous_run(self.run_dir)
        (self.run_dir / "checkpoints").mkdir(exist_ok=True)
        self.rounds: list[dict[str, Any]] = []
        # (round, node label, epsilon) of every node that reported its DP epsilon
        self.node_epsilons: list[tuple[int, str, float]] = []
        self.started = time.time()
        _write_atomic(self.run_dir / "config.json", json.dumps(dict(config), indent=2).encode())

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Append one round's metrics to ``metrics.jsonl`` and redraw the plot."""
        row = _clean(dict(row))
        self.rounds.append(row)
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        self.plot()
        self.plot_privacy()

    def log_nodes(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append per-node diagnostics to ``diagnostics.jsonl``."""
        with open(self.run_dir / "diagnostics.jsonl", "a", encoding="utf-8") as fh:
            for row in rows:
                row = _clean(dict(row))
                fh.write(json.dumps(row) + "\n")
                if row.get("dp_epsilon") is not None and row.get("round") is not None:
                    who = row.get("partition_id")
                    label = f"partition {who}" if who is not None else f"node {row.get('node_id')}"
                    self.node_epsilons.append((int(row["round"]), label, float(row["dp_epsilon"])))

    def checkpoint(
        self,
        server_round: int,
        state: Mapping[str, torch.Tensor],
        strategy_state: Mapping[str, Any] | None = None,
    ) -> Path:
        """Save the global model (and the strategy's state) after ``server_round`` (atomic)."""
        path = self.run_dir / "checkpoints" / f"round-{server_round:04d}.pt"
        tmp = path.with_name(f".{path.name}.tmp")
        payload: dict[str, Any] = {"round": server_round, "model": dict(state)}
        if strategy_state is not None:
            payload["strategy"] = dict(strategy_state)
        torch.save(payload, tmp)
        os.replace(tmp, path)
        return path

    def plot(self) -> Path | None:
        """Draw central accuracy and loss over rounds into ``accuracy_loss.png``."""
        rows = [r for r in self.rounds if r.get("central_accuracy") is not None]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        rounds = [r["round"] for r in rows]
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
        ax_acc.plot(rounds, [r["central_accuracy"] for r in rows], "o-", label="central test")
        fed = [
            (r["round"], r["federated_accuracy"])
            for r in self.rounds
            if r.get("federated_accuracy") is not None
        ]
        if fed:
            ax_acc.plot(*zip(*fed, strict=True), "s--", label="clients' local test")
        ax_acc.set(xlabel="round", ylabel="accuracy", ylim=(0, 1), title="Accuracy")
        ax_acc.grid(alpha=0.3)
        ax_acc.legend()
        ax_loss.plot(rounds, [r["central_loss"] for r in rows], "o-", label="central test")
        train = [
            (r["round"], r["train_loss"]) for r in self.rounds if r.get("train_loss") is not None
        ]
        if train:
            ax_loss.plot(*zip(*train, strict=True), "^--", label="clients' train")
        ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
        ax_loss.grid(alpha=0.3)
        ax_loss.legend()
        for ax in (ax_acc, ax_loss):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        return _save_figure(fig, self.run_dir / "accuracy_loss.png")

    def max_epsilon(self) -> float | None:
        """The largest DP epsilon any node reported in any round (``max_dp_epsilon``), or None."""
        values = [
            float(r["max_dp_epsilon"]) for r in self.rounds if r.get("max_dp_epsilon") is not None
        ]
        return max(values) if values else None

    def plot_privacy(self) -> Path | None:
        """Draw the epsilon spent over rounds into ``privacy_epsilon.png``.

        The largest epsilon of any node per round, and each node's own curve (epsilon
        of the whole run so far, RDP accounting: Mironov, 2017). Nothing is drawn
        before some node reported an epsilon.
        """
        rows = [r for r in self.rounds if r.get("max_dp_epsilon") is not None]
        if not rows and not self.node_epsilons:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(6, 4))
        curves: dict[str, list[tuple[int, float]]] = {}
        for rnd, label, eps in self.node_epsilons:
            curves.setdefault(label, []).append((rnd, eps))
        many = len(curves) > 10  # then one gray curve per node and one legend entry
        for i, (label, points) in enumerate(sorted(curves.items())):
            ax.plot(
                *zip(*sorted(points), strict=True),
                ".-",
                color="tab:gray" if many else f"C{i % 10}",
                alpha=0.35 if many else 0.8,
                linewidth=1,
                label=("per node" if i == 0 else None) if many else label,
            )
        if rows:
            ax.plot(
                [r["round"] for r in rows],
                [float(r["max_dp_epsilon"]) for r in rows],
                "o--",
                color="black",
                label="max over nodes",
            )
        ax.set(xlabel="round", ylabel="epsilon (whole run so far)", title="Privacy spent")
        if self.max_epsilon() == math.inf:  # infinite points are not drawn: say why
            ax.text(
                0.5,
                0.5,
                "epsilon = inf: some node trained without noise (dp-noise-multiplier = 0)",
                transform=ax.transAxes,
                ha="center",
                wrap=True,
            )
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return _save_figure(fig, self.run_dir / "privacy_epsilon.png")

    def write_summary(self, **fields: Any) -> dict[str, Any]:
        """Write ``summary.json`` from the rounds so far plus ``fields``; return it.

        When some node reported a DP epsilon, ``max_epsilon`` (the largest over nodes
        and rounds) is included unless ``fields`` sets it.
        """
        evaluated = [r for r in self.rounds if r.get("central_accuracy") is not None]
        last = evaluated[-1] if evaluated else {}
        summary = {
            "final_accuracy": last.get("central_accuracy"),
            "final_loss": last.get("central_loss"),
            "initial_accuracy": evaluated[0].get("central_accuracy") if evaluated else None,
            "best_accuracy": max((r["central_accuracy"] for r in evaluated), default=None),
            "rounds": max((r["round"] for r in self.rounds), default=0),
            "wall_seconds": round(time.time() - self.started, 3),
            "run_dir": str(self.run_dir),
        }
        if (eps := self.max_epsilon()) is not None:
            summary["max_epsilon"] = eps
        summary |= fields
        _write_atomic(self.run_dir / "summary.json", json.dumps(_clean(summary), indent=2).encode())
        return summary
