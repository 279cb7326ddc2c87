"""A run directory: per-round metrics, per-node diagnostics, checkpoints, plot, summary.

Layout of ``<run-dir>``::

    config.json          the validated run config
    metrics.jsonl        one JSON object per round (round 0 = before training)
    diagnostics.jsonl    one JSON object per node per round (accepted/rejected, why, ...)
    checkpoints/round-NNNN.pt   everything a resumed server needs after that round
                         (see :meth:`RunResults.checkpoint` and :class:`Checkpoint`)
    accuracy_loss.png    central accuracy and loss over rounds
    privacy_epsilon.png  with DP: epsilon spent over rounds (max and per node)
    summary.json         final numbers (written at the end, also on failure)

Every file is appended or replaced atomically, so an interrupted run leaves
complete lines and complete files behind.

Resume (run-config ``resume = true``): :class:`RunResults` opened with ``resume=True``
on a folder that holds checkpoints loads the newest one that reads back
(:func:`load_latest_checkpoint`), refuses it when the new run's config differs in a
key that changes what the run computes (:func:`check_resume_config`), and rewinds
``metrics.jsonl`` and ``diagnostics.jsonl`` to the checkpoint's round
(:func:`rewind_run_dir`); the ServerApp then continues with the next round.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import ConfigError, RunConfig
from common.figures import run_title, save_figure
from common.runlog import read_jsonl

# Flower's logger (the ServerApp's log), without importing Flower into the ground
log = logging.getLogger("flwr").log


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


#: layout version of ``round-NNNN.pt`` (:meth:`RunResults.checkpoint`); resume refuses others
CHECKPOINT_VERSION = 1
_CHECKPOINT_NAME = re.compile(r"^round-(\d{4,})\.pt$")

#: Run-config keys a resumed run may change: where and how the run executes, not what it
#: computes. Every other key must equal the checkpoint's (:func:`check_resume_config`).
#: ``num-server-rounds`` may grow (or shrink down to the checkpoint's round).
RESUME_MAY_CHANGE = frozenset(
    {
        "resume",
        "output-dir",
        "data-dir",
        "device",
        "round-timeout",
        "checkpoint-every",
        "num-server-rounds",
        "collusion-dir",
        "collusion-timeout",
    }
)


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be read back; the message lists each file and why."""


@dataclass(frozen=True)
class Checkpoint:
    """One ``round-NNNN.pt`` read back: the state of the run after round :attr:`round`.

    ``payload`` keys (version 1): ``version``, ``round``, ``model`` (state_dict),
    ``strategy`` (``RobustStrategy.state_dict()``: pipeline, server-momentum velocity,
    reputation), ``config`` (the flat run config), ``rng`` (:func:`rng_state`), ``loop``
    (what the round loop carries from round to round), ``row`` (the round's
    ``metrics.jsonl`` row), ``run_started`` (wall-clock start of the first attempt) and
    ``resumed_from`` (rounds earlier attempts resumed from).
    """

    round: int
    path: Path
    payload: Mapping[str, Any]

    @property
    def model(self) -> dict[str, torch.Tensor]:
        """The global model's state_dict after :attr:`round`."""
        return dict(self.payload["model"])

    @property
    def strategy(self) -> dict[str, Any]:
        """The strategy's state after :attr:`round` (empty when none was saved)."""
        return dict(self.payload.get("strategy") or {})

    @property
    def config(self) -> dict[str, Any]:
        """The flat run config of the run that wrote the checkpoint."""
        return dict(self.payload.get("config") or {})

    @property
    def rng(self) -> dict[str, Any]:
        """Random-generator states (:func:`rng_state`) after :attr:`round`."""
        return dict(self.payload.get("rng") or {})

    @property
    def loop(self) -> dict[str, Any]:
        """The round loop's own state after :attr:`round` (node count, elapsed time, ...)."""
        return dict(self.payload.get("loop") or {})

    @property
    def row(self) -> dict[str, Any] | None:
        """The ``metrics.jsonl`` row of :attr:`round`, when the checkpoint holds it."""
        row = self.payload.get("row")
        return dict(row) if row is not None else None


def rng_state() -> dict[str, Any]:
    """The states of every random generator the server process draws from.

    Python's ``random`` (Flower's ``FedAvg`` samples nodes with ``random.sample``),
    NumPy's global generator, torch's CPU generator and, when CUDA is in use, every
    CUDA device's generator. Plain tuples, lists and tensors, so that a checkpoint
    loads with ``torch.load(weights_only=True)``.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back generator states taken by :func:`rng_state` (missing ones are left alone)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_paths(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(round, path)`` of every ``checkpoints/round-NNNN.pt`` in ``run_dir``, newest first.

    Temporary files of an interrupted write (``.round-NNNN.pt.tmp``) are not checkpoints.
    """
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def load_latest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The newest checkpoint of ``run_dir`` that reads back, or None when there is none.

    Checkpoints are replaced atomically, so a crash leaves whole files; a file that
    still does not load (a truncated copy, a disk error) is skipped for the one before
    it. Raises :class:`CheckpointError` when checkpoints exist but none loads: starting
    over from round 1 would silently throw their work away.
    """
    problems = []
    for server_round, path in checkpoint_paths(run_dir):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn or foreign file: fall back to an older one
            problems.append(f"{path.name}: {type(exc).__name__}: {exc}")
            continue
        if not isinstance(payload, Mapping) or "model" not in payload:
            problems.append(f"{path.name}: not a Bastion checkpoint (no 'model' entry)")
            continue
        version = payload.get("version")
        if version != CHECKPOINT_VERSION:
            problems.append(
                f"{path.name}: checkpoint version {version!r}; this server reads version "
                f"{CHECKPOINT_VERSION} (written with resume support)"
            )
            continue
        if int(payload.get("round", -1)) != server_round:
            problems.append(f"{path.name}: holds round {payload.get('round')!r}")
            continue
        if problems:
            log(
                WARNING,
                "[bastion] newer checkpoints did not load, resuming from %s: %s",
                path.name,
                "; ".join(problems),
            )
        return Checkpoint(server_round, path, payload)
    if problems:
        raise CheckpointError(
            f"key 'resume': no checkpoint in {Path(run_dir) / 'checkpoints'} can be resumed "
            "from:\n  " + "\n  ".join(problems)
        )
    return None


def check_resume_config(
    saved: Mapping[str, Any], new: Mapping[str, Any], server_round: int
) -> None:
    """Refuse to resume a run whose config changes what the checkpointed run computes.

    Every key except :data:`RESUME_MAY_CHANGE` must be equal in ``saved`` (the
    checkpoint's config) and ``new``; a key one of them lacks (a checkpoint from an
    older version) counts as its default. ``num-server-rounds`` must be at least
    ``server_round``. Raises :class:`~common.config.ConfigError` naming every key
    that differs, with both values.
    """
    defaults = RunConfig().to_flat()
    problems = []
    for key in sorted(set(saved) | set(new)):
        if key in RESUME_MAY_CHANGE:
            continue
        before = saved.get(key, defaults.get(key, "<unset>"))
        after = new.get(key, defaults.get(key, "<unset>"))
        if before != after:
            problems.append(f"key {key!r}: checkpoint has {before!r}, this run has {after!r}")
    rounds = new.get("num-server-rounds", defaults["num-server-rounds"])
    if int(rounds) < server_round:
        problems.append(
            f"key 'num-server-rounds': value {rounds!r} is below the checkpoint's round "
            f"{server_round}; allowed: >= {server_round}"
        )
    if problems:
        raise ConfigError(
            f"key 'resume': cannot continue the run from its round-{server_round:04d} "
            "checkpoint; the config differs in:\n  "
            + "\n  ".join(problems)
            + "\nallowed to change on resume: "
            + ", ".join(sorted(RESUME_MAY_CHANGE))
        )


def _write_rows(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    _write_atomic(path, "".join(json.dumps(dict(r)) + "\n" for r in rows).encode())


def rewind_run_dir(run_dir: str | Path, ckpt: Checkpoint) -> tuple[list[dict], list[dict]]:
    """Make ``run_dir`` look as it did right after ``ckpt``'s round; idempotent.

    ``metrics.jsonl`` keeps the rows of rounds ``0..ckpt.round`` (the checkpoint's own
    row is put back when the crash came between checkpoint and row), in round order,
    one per round; ``diagnostics.jsonl`` keeps the rows of rounds ``<= ckpt.round``;
    both are replaced atomically. A ``summary.json`` (of an earlier attempt) is
    removed: the resumed run writes its own. Returns the kept metrics and diagnostics
    rows.
    """
    run_dir = Path(run_dir)
    by_round: dict[int, dict[str, Any]] = {}
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        rnd = row.get("round")
        if isinstance(rnd, int) and 0 <= rnd <= ckpt.round:
            by_round.setdefault(rnd, row)  # the first attempt's row of a round wins
    if ckpt.round not in by_round and ckpt.row is not None:
        by_round[ckpt.round] = _clean(ckpt.row)
    metrics = [by_round[r] for r in sorted(by_round)]
    diagnostics = [
        row
        for row in read_jsonl(run_dir / "diagnostics.jsonl")
        if not isinstance(row.get("round"), int) or row["round"] <= ckpt.round
    ]
    _write_rows(run_dir / "metrics.jsonl", metrics)
    _write_rows(run_dir / "diagnostics.jsonl", diagnostics)
    (run_dir / "summary.json").unlink(missing_ok=True)
    for tmp in (run_dir / "checkpoints").glob(".round-*.pt.tmp*"):
        tmp.unlink(missing_ok=True)  # an interrupted checkpoint write
    return metrics, diagnostics


class RunResults:
    """Writes one run's results into ``run_dir`` as the rounds go.

    With ``resume=True`` and a checkpoint in ``run_dir``, the folder is continued
    instead of set aside: :attr:`resumed` is the newest readable checkpoint (its config
    checked against ``config`` by :func:`check_resume_config`, which raises before
    anything in the folder changes), the files are rewound to its round
    (:func:`rewind_run_dir`) and :attr:`rounds` holds the rows kept. Without a
    checkpoint, ``resume=True`` starts a fresh run like ``resume=False``.
    """

    def __init__(
        self, run_dir: str | Path, config: Mapping[str, Any], *, resume: bool = False
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config = dict(config)
        #: the checkpoint this run continues from (None: a fresh run)
        self.resumed: Checkpoint | None = load_latest_checkpoint(self.run_dir) if resume else None
        self.rounds: list[dict[str, Any]] = []
        # (round, node label, epsilon) of every node that reported its DP epsilon
        self.node_epsilons: list[tuple[int, str, float]] = []
        self.started = time.time()
        #: rounds this run and earlier attempts resumed from, oldest first
        self.resumed_from: list[int] = []
        if self.resumed is None:
            self.moved_previous = _set_aside_previous_run(self.run_dir)
        else:
            ckpt = self.resumed
            check_resume_config(ckpt.config, self.config, ckpt.round)
            self.moved_previous = None
            metrics, diagnostics = rewind_run_dir(self.run_dir, ckpt)
            self.rounds = metrics
            for row in diagnostics:
                self._note_epsilon(row)
            self.started = float(ckpt.payload.get("run_started", self.started))
            self.resumed_from = [*ckpt.payload.get("resumed_from", []), ckpt.round]
        (self.run_dir / "checkpoints").mkdir(exist_ok=True)
        _write_atomic(self.run_dir / "config.json", json.dumps(self.config, indent=2).encode())

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
                self._note_epsilon(row)

    def _note_epsilon(self, row: Mapping[str, Any]) -> None:
        """Remember a diagnostics row's DP epsilon for :meth:`plot_privacy`."""
        if row.get("dp_epsilon") is not None and row.get("round") is not None:
            who = row.get("partition_id")
            label = f"partition {who}" if who is not None else f"node {row.get('node_id')}"
            self.node_epsilons.append((int(row["round"]), label, float(row["dp_epsilon"])))

    def checkpoint(
        self,
        server_round: int,
        state: Mapping[str, torch.Tensor],
        strategy_state: Mapping[str, Any] | None = None,
        *,
        rng: Mapping[str, Any] | None = None,
        loop: Mapping[str, Any] | None = None,
        row: Mapping[str, Any] | None = None,
    ) -> Path:
        """Save what a resumed server needs after ``server_round`` (see :class:`Checkpoint`).

        The global model, the strategy's state, the random generators' states, the round
        loop's own state and the round's metrics row, with the run config and the run's
        start time. Atomic and durable: written to a temporary file, flushed to disk,
        then renamed over ``round-NNNN.pt``, so a crash leaves either the old file or
        the whole new one.
        """
        path = self.run_dir / "checkpoints" / f"round-{server_round:04d}.pt"
        tmp = path.with_name(f".{path.name}.tmp")
        payload: dict[str, Any] = {
            "version": CHECKPOINT_VERSION,
            "round": server_round,
            "model": dict(state),
            "config": self.config,
            "run_started": self.started,
            "resumed_from": list(self.resumed_from),
        }
        if strategy_state is not None:
            payload["strategy"] = dict(strategy_state)
        if rng is not None:
            payload["rng"] = dict(rng)
        if loop is not None:
            payload["loop"] = dict(loop)
        if row is not None:
            payload["row"] = _clean(dict(row))
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
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
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4.4))
        fig.suptitle(run_title(self.run_dir, self.config), fontsize="medium")
        ax_acc.plot(rounds, [r["central_accuracy"] for r in rows], "o-", label="central test")
        fed = [
            (r["round"], r["federated_accuracy"])
            for r in self.rounds
            if r.get("federated_accuracy") is not None
        ]
        if fed:
            ax_acc.plot(
                *zip(*fed, strict=True), "s--", label="clients' local test (median over nodes)"
            )
        ax_acc.set(xlabel="round", ylabel="accuracy", ylim=(0, 1), title="Accuracy")
        ax_acc.grid(alpha=0.3)
        ax_acc.legend()
        ax_loss.plot(rounds, [r["central_loss"] for r in rows], "o-", label="central test")
        train = [
            (r["round"], r["train_loss"]) for r in self.rounds if r.get("train_loss") is not None
        ]
        if train:
            ax_loss.plot(*zip(*train, strict=True), "^--", label="clients' train")
        elif self.config.get("dp"):  # say why the clients' curve is missing
            ax_loss.plot([], [], " ", label="clients' train: withheld with DP")
        ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
        ax_loss.grid(alpha=0.3)
        ax_loss.legend()
        for ax in (ax_acc, ax_loss):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        return save_figure(fig, self.run_dir / "accuracy_loss.png")

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

        curves: dict[str, list[tuple[int, float]]] = {}
        for rnd, label, eps in self.node_epsilons:
            curves.setdefault(label, []).append((rnd, eps))
        # every node's own curve; up to LEGEND_NODES named in a legend beside the axes,
        # more coloured along a colour bar of their order (the legend would not fit)
        many = len(curves) > LEGEND_NODES
        fig, ax = plt.subplots(figsize=(8.5 if not many else 8, 4.6))
        cmap = plt.get_cmap("viridis")
        ordered = sorted(curves.items(), key=lambda kv: _label_order(kv[0]))
        ring = min(3.0, 10.0 / max(1, len(ordered) - 1))  # marker size step
        for i, (label, points) in enumerate(ordered):
            ax.plot(
                *zip(*sorted(points), strict=True),
                "-",
                color=cmap(i / max(1, len(ordered) - 1)) if many else f"C{i % 10}",
                alpha=0.8,
                linewidth=1.2,
                label=None if many else label,
                zorder=2,
                # hollow markers of shrinking size: nodes that spent the same epsilon
                # (same sample rate and rounds) show as rings inside each other
                marker="." if many else "o",
                fillstyle="full" if many else "none",
                markersize=4 if many else 4 + (len(ordered) - 1 - i) * ring,
            )
        if rows:
            # drawn under the nodes' curves (it coincides with the highest of them)
            ax.plot(
                [r["round"] for r in rows],
                [float(r["max_dp_epsilon"]) for r in rows],
                "-",
                color="black",
                alpha=0.25,
                linewidth=6,
                label="max over nodes",
                zorder=1,
            )
        delta = self.config.get("dp-delta")
        title = "Privacy spent per node" + (f" (delta = {float(delta):g})" if delta else "")
        ax.set(xlabel="round", ylabel="epsilon (whole run so far)", title=title)
        fig.suptitle(run_title(self.run_dir, self.config), fontsize="medium")
        if many:
            bar = fig.colorbar(
                plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(ordered) - 1)),
                ax=ax,
            )
            bar.set_ticks([0, len(ordered) - 1], labels=[ordered[0][0], ordered[-1][0]])
            bar.set_label(f"each of the {len(ordered)} nodes, in this order")
        if self.max_epsilon() == math.inf:  # infinite points are not drawn: say why
            ax.text(
                0.5,
                0.5,
                "epsilon = inf: some node trained without noise (dp-noise-multiplier = 0)",
                transform=ax.transAxes,
                ha="center",
                wrap=True,
            )
        finite = [e for _, _, e in self.node_epsilons if math.isfinite(e)]
        ax.set_ylim(0, 1.1 * max(finite) if finite and max(finite) > 0 else None)
        ax.grid(alpha=0.3)
        if many:  # the colour bar is beside the axes: the one legend entry goes inside
            ax.legend(fontsize="small", loc="upper left")
        else:
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return save_figure(fig, self.run_dir / "privacy_epsilon.png")

    def write_summary(self, **fields: Any) -> dict[str, Any]:
        """Write ``summary.json`` from the rounds so far plus ``fields``; return it.

        When some node reported a DP epsilon, ``max_epsilon`` (the largest over nodes
        and rounds) is included unless ``fields`` sets it.
        """
        summary = summarize_rounds(self.rounds)
        # the ServerApp's own time; ``bastion run`` replaces wall_seconds with its
        # end-to-end figure (record_outcome) and keeps this one as serverapp_seconds
        seconds = round(time.time() - self.started, 3)
        summary |= {"wall_seconds": seconds, "serverapp_seconds": seconds}
        summary["run_dir"] = str(self.run_dir)
        if self.resumed_from:
            summary["resumed_from"] = list(self.resumed_from)
        if (eps := self.max_epsilon()) is not None:
            summary["max_epsilon"] = eps
        summary |= fields
        _write_atomic(self.run_dir / "summary.json", json.dumps(_clean(summary), indent=2).encode())
        return summary


#: the privacy plot names up to this many nodes in its legend (more: a colour bar)
LEGEND_NODES = 16


def _label_order(label: str) -> tuple[str, int]:
    """Sort key of a node label (``partition 10`` after ``partition 9``)."""
    kind, _, number = label.rpartition(" ")
    return (kind, int(number)) if number.lstrip("-").isdigit() else (label, 0)


def summarize_rounds(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The accuracy fields of ``summary.json`` from ``metrics.jsonl`` rows: final, initial
    and best central accuracy, final loss, and the last round reached (0: none)."""
    rows = list(rows)
    evaluated = [r for r in rows if r.get("central_accuracy") is not None]
    last = evaluated[-1] if evaluated else {}
    return {
        "final_accuracy": last.get("central_accuracy"),
        "final_loss": last.get("central_loss"),
        "initial_accuracy": evaluated[0].get("central_accuracy") if evaluated else None,
        "best_accuracy": max((r["central_accuracy"] for r in evaluated), default=None),
        "rounds": max((int(r["round"]) for r in rows if "round" in r), default=0),
    }


def record_outcome(
    run_dir: str | Path,
    status: str,
    reason: str | None,
    *,
    since: float,
    only_if_missing: bool = False,
    **fields: Any,
) -> dict[str, Any]:
    """Write the outcome of one attempt at a run into ``run_dir/summary.json``; return it.

    Used by the launcher (``bastion run``), which sees what the ServerApp cannot: a
    SuperLink that died, a timeout, Ctrl-C. The ServerApp's own summary of this attempt
    (a ``summary.json`` written at or after ``since``, a ``time.time()``) is kept and
    completed; without one (the ServerApp never started, or was killed) the accuracy
    fields come from ``metrics.jsonl`` (:func:`summarize_rounds`). ``status`` and
    ``reason`` replace the ServerApp's unless it completed the run (a stop that came
    after the last round does not undo it) or this attempt has no reason of its own;
    with ``only_if_missing`` they are used only when the ServerApp wrote no summary.
    """
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    summary: dict[str, Any] = {}
    try:
        if path.stat().st_mtime >= since:
            summary = json.loads(path.read_text())
    except (OSError, ValueError):
        summary = {}
    wrote = bool(summary)
    if not wrote:
        summary = summarize_rounds(read_jsonl(run_dir / "metrics.jsonl"))
        summary["run_dir"] = str(run_dir.resolve())
    ours = not (only_if_missing and wrote)
    if ours and summary.get("status") != "completed" and (reason or "status" not in summary):
        summary["status"] = status
        summary["reason"] = reason
    summary |= fields
    _write_atomic(path, json.dumps(_clean(summary), indent=2).encode())
    return summary
