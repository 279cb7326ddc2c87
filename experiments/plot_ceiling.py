"""Figure: a defence's accuracy per attack against the free-rider ceiling and the target.

The *ceiling* is what the honest shards alone reach: the attackers are free riders
that send a zero update (Lin, Du & Liu 2019, "Free-riders in federated learning"),
so their partitions' data is lost and nothing else is done to the model. Every
attack's bar is drawn against three lines: the defence's own free-rider accuracy
(mean ± sd over seeds), clean FedAvg with all nodes honest, and the issue's target
(clean FedAvg minus ``--margin``). What lies between the ceiling and a bar is what
the attack costs beyond the data its nodes hold; what lies between clean FedAvg and
the ceiling, no defence can win back.

Reads a grid's ``results.csv`` (``bastion grid FILE --out DIR --report-only --only
G ...`` writes one holding the named groups)::

    python experiments/plot_ceiling.py runs/heterogeneity-stage2/results.csv \\
        --partitioner label-sorted --defence "preset m0.5" \\
        --ceiling "attack=free riders" --out docs/figures/ceiling-label-sorted.png

``--ceiling COLUMN=VALUE`` (repeatable) picks the free-rider rows among the
defence's rows (default: ``attack=free riders``); they are drawn as the ceiling, not
as a bar.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

from bastion.experiments import mean_std
from common.figures import save_figure


def _accuracies(rows: list[dict[str, str]], **match: str) -> list[float]:
    """Final accuracies of the completed rows whose columns equal ``match``."""
    return [
        float(r["final_accuracy"])
        for r in rows
        if r["status"] == "completed" and all(r.get(k) == v for k, v in match.items())
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, help="a grid's results.csv")
    parser.add_argument("--partitioner", required=True)
    parser.add_argument("--defence", required=True, help="the defence label whose bars are drawn")
    parser.add_argument(
        "--ceiling",
        action="append",
        metavar="COLUMN=VALUE",
        help="a column the free-rider rows have (repeatable; default: attack=free riders)",
    )
    parser.add_argument("--fedavg", default="mean", help="the FedAvg defence label (clean rows)")
    parser.add_argument("--margin", type=float, default=0.05, help="the target: FedAvg - margin")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    pairs = [item.split("=", 1) for item in args.ceiling or ["attack=free riders"]]
    if any(len(pair) != 2 for pair in pairs):
        parser.error(f"--ceiling takes COLUMN=VALUE, got {args.ceiling}")
    free_riders = dict(pairs)
    with args.csv.open(newline="") as f:
        # a sweep's partition axis is its "partition" column, a fixed one "partitioner"
        rows = [
            r
            for r in csv.DictReader(f)
            if args.partitioner in (r.get("partitioner"), r.get("partition"))
        ]
    ceiling = _accuracies(rows, defence=args.defence, **free_riders)
    per_attack: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        riders = all(r.get(k) == v for k, v in free_riders.items())
        if r["defence"] == args.defence and r["status"] == "completed" and not riders:
            per_attack[r["attack"]].append(float(r["final_accuracy"]))
    fedavg = _accuracies(rows, defence=args.fedavg, attack="none")
    missing = [
        what
        for what, got in (("defence", per_attack), ("ceiling", ceiling), ("FedAvg", fedavg))
        if not got
    ]
    if missing:
        print(f"plot_ceiling: no completed rows for {', '.join(missing)} in {args.csv}")
        return 2

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(per_attack)
    stats = [mean_std(per_attack[a]) for a in attacks]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(attacks) + 2.5), 4.2))
    xs = range(len(attacks))
    ax.bar(xs, [m for m, _ in stats], 0.6, yerr=[sd for _, sd in stats], capsize=2, alpha=0.8)
    for x, a in zip(xs, attacks, strict=True):
        ax.plot([x] * len(per_attack[a]), per_attack[a], "k.", markersize=3)
    c_mean, c_sd = mean_std(ceiling)
    f_mean, _ = mean_std(fedavg)
    ax.axhspan(c_mean - c_sd, c_mean + c_sd, color="tab:green", alpha=0.12)
    lines = [
        (c_mean, "tab:green", "-", f"ceiling: attackers send nothing ({c_mean:.3f} ± {c_sd:.3f})"),
        (f_mean, "tab:gray", "--", f"clean FedAvg, all nodes honest ({f_mean:.3f})"),
        (
            f_mean - args.margin,
            "tab:red",
            ":",
            f"target: FedAvg − {100 * args.margin:.0f} points ({f_mean - args.margin:.3f})",
        ),
    ]
    for y, color, style, label in lines:
        ax.axhline(y, color=color, linestyle=style, linewidth=1.2, label=label, zorder=3)
    ax.set_xticks(list(xs), attacks, rotation=30, ha="right")
    ax.set(ylabel="final accuracy", ylim=(0, 1))
    ax.grid(axis="y", alpha=0.3)
    # below the axes, so that no bar hides behind it
    fig.legend(fontsize=8, loc="lower center", ncol=3, frameon=False)
    seeds = max(len(v) for v in per_attack.values())
    ax.set_title(
        f"{args.defence}, {args.partitioner}: mean ± sd over {seeds} seeds (dots: each seed)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, args.out, dpi=110, tight=False)
    print(f"plot_ceiling: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
