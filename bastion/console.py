"""What ``bastion run`` and ``bastion simulate`` print: each round as it finishes, the
final table with a legend of its columns, the run's one wall-time figure and the
command that continues a run that stopped.

Pure text from ``metrics.jsonl`` and ``diagnostics.jsonl`` rows (no torch, no Flower):
the compose runner prints the same table.
"""

from __future__ import annotations

import os
import shlex
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.runlog import read_new_rows


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def plural(count: int, noun: str) -> str:
    """``"1 round"``, ``"3 rounds"``, ``"2 replies"``, ``"5 processes"``."""
    if count == 1:
        return f"{count} {noun}"
    if noun.endswith("y"):
        return f"{count} {noun[:-1]}ies"
    return f"{count} {noun}{'es' if noun.endswith('s') else 's'}"


def process_seconds(now: float | None = None) -> float | None:
    """Seconds since this process was started (Linux ``/proc``), or None elsewhere.

    What ``time`` reports for the command, interpreter start-up and imports included.
    """
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    started = int(fields[19]) / ticks  # field 22 of stat: start time after boot
    return max(0.0, (uptime if now is None else now) - started)


class WallClock:
    """The one wall-time figure of a command: from the start of this process (what
    ``time`` measures) when ``/proc`` tells it, else from this object's creation."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._before = process_seconds() or 0.0

    def seconds(self) -> float:
        return self._before + time.monotonic() - self._t0


def progress_line(row: dict[str, Any], total: int) -> str:
    """One line of live progress for a round's metrics row.

    Validation's verdict (replies ``ok`` / ``rejected``) and, with DP, the largest
    whole-run epsilon any node reported so far; what the rule did with malicious
    replies is :func:`malicious_line`'s.
    """
    if row["round"] == 0:
        acc = _fmt(row.get("central_accuracy"), ".4f")
        return f"round  0/{total}  accuracy {acc}  (initial model)"
    line = (
        f"round {row['round']:>2}/{total}  accuracy {_fmt(row.get('central_accuracy'), '.4f')}  "
        f"loss {_fmt(row.get('central_loss'), '.4f')}  "
        f"replies {row.get('num_accepted', 0)} ok / {row.get('num_rejected', 0)} rejected  "
        f"{_fmt(row.get('round_seconds'), '.1f')} s"
    )
    if row.get("max_dp_epsilon") is not None:
        line += f"  epsilon {_fmt(row['max_dp_epsilon'], '.2f')}"
    return line


def malicious_line(row: dict[str, Any], diagnostics: list[dict[str, Any]]) -> str | None:
    """What happened to the round's declared-malicious replies, or None when there were none.

    Separates validation (how many passed it) from what the rule did with those that
    did: how many it selected and their share of the aggregate (``malicious_influence``:
    their share of the rule's client weights, or of the selected replies), or that the
    rule attributes its output to no single reply (median, trimmed mean).
    """
    mine = [d for d in diagnostics if d.get("round") == row["round"] and d.get("malicious")]
    if not mine:
        return None
    valid = [d for d in mine if d.get("status") == "accepted"]
    text = f"malicious: {len(valid)} of {plural(len(mine), 'reply')} passed validation"
    if not valid:
        return text
    if row.get("aggregation_error"):
        return text + "; no aggregate this round"
    selected = [d.get("selected") for d in valid if d.get("selected") is not None]
    if selected:
        text += f"; the rule selected {sum(map(bool, selected))} of them"
    if row.get("malicious_influence") is not None:
        sep = ", " if selected else "; "
        text += f"{sep}share of the aggregate {row['malicious_influence']:.2f}"
    elif not selected:
        text += "; the rule attributes its output to no single reply"
    return text


def rejection_reasons(rows: list[dict[str, Any]], row: dict[str, Any], most: int = 3) -> list[str]:
    """Distinct reasons (with node counts) why replies of ``row``'s round were rejected,
    from that round's ``diagnostics.jsonl`` rows."""
    if not row.get("num_rejected"):
        return []
    counts: dict[str, int] = {}
    for diag in rows:
        if diag.get("round") == row["round"] and diag.get("status") == "rejected":
            counts[diag["reason"]] = counts.get(diag["reason"], 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    return [f"{n} node(s): {reason[:300]}" for reason, n in ranked[:most]]


class RoundPrinter:
    """Prints each round of a run as its rows arrive: :func:`progress_line`, then the
    rejected replies' reasons, the malicious replies' fate and a skipped aggregation.

    Reads ``diagnostics.jsonl`` incrementally (the ServerApp writes a round's node rows
    before its metrics row).
    """

    def __init__(self, run_dir: Path, total: int) -> None:
        self.diagnostics = Path(run_dir) / "diagnostics.jsonl"
        self.total = total
        self._offset = self.diagnostics.stat().st_size if self.diagnostics.exists() else 0
        self._diags: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []

    def lines(self, row: dict[str, Any]) -> list[str]:
        """The console lines for one metrics row."""
        new, self._offset = read_new_rows(self.diagnostics, self._offset)
        self._diags = [d for d in self._diags + new if d.get("round", 0) >= row["round"]]
        out = [progress_line(row, self.total)]
        out += [f"          rejected: {r}" for r in rejection_reasons(self._diags, row)]
        if (mal := malicious_line(row, self._diags)) is not None:
            out.append(f"          {mal}")
        if row.get("aggregation_error"):
            out.append(
                f"          aggregation skipped, model unchanged: {row['aggregation_error']}"
            )
        return out

    def show(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        for line in self.lines(row):
            print(line, flush=True)


TABLE_LEGEND = (
    "accuracy, loss: central test set after the round; train loss: clients' mean "
    "(n/a with DP: clients withhold it); accepted/rejected: replies that passed/failed "
    "validation; round s: round wall time; overhead s = round wall time - slowest "
    "client's training"
)


def final_table(rows: list[dict[str, Any]], dp: bool = False) -> str:
    """A plain-text table of every round's metrics, and a legend of its columns."""
    head = (
        "round",
        "accuracy",
        "loss",
        "train loss",
        "accepted",
        "rejected",
        "round s",
        "overhead s",
    )
    lines = [" ".join(f"{h:>10}" for h in head)]
    for r in rows:
        train = _fmt(r.get("train_loss"), ".4f")
        cells = (
            str(r["round"]),
            _fmt(r.get("central_accuracy"), ".4f"),
            _fmt(r.get("central_loss"), ".4f"),
            "n/a (DP)" if dp and r["round"] > 0 and r.get("train_loss") is None else train,
            _fmt(r.get("num_accepted"), "d"),
            _fmt(r.get("num_rejected"), "d"),
            _fmt(r.get("round_seconds"), ".2f"),
            _fmt(r.get("overhead_seconds"), ".2f"),
        )
        lines.append(" ".join(f"{c:>10}" for c in cells))
    return "\n".join([*lines, "", *textwrap.wrap(TABLE_LEGEND, 90)])


def resume_command(argv: Sequence[str], run_dir: Path) -> str:
    """The ``bastion`` command line that continues ``argv``'s run in ``run_dir``:
    the same flags, ``--output-dir run_dir`` and ``--resume``."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--output-dir":
            skip = True
        elif not arg.startswith("--output-dir=") and arg != "--resume":
            kept.append(arg)
    return shlex.join(["bastion", *kept, "--output-dir", str(run_dir), "--resume"])
