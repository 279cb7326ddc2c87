"""How much of the honest updates' size survives averaging: the signal ratio of a run.

    rho_t = || mean of the honest updates of round t || / median_i || honest update i ||

Robust averaging lets every attacker move the aggregate by about as much as one honest
update (clipping bounds it by an honest norm, centered clipping by the radius), while
the honest clients together move it by ``(n - f) * ||mean||``. When

    rho_t < f / (n - f)

(0.25 at n = 25, f = 5) the attackers can cancel the honest progress of the round: an
attack opposite the honest mean (IPM, or the adaptive attack's search) then stalls the
model whatever the averaging rule. This is the heterogeneity lower bound (no rule's
error is below order ``f/n * zeta^2`` for honest dissimilarity ``zeta^2``; Karimireddy,
He & Jaggi 2022; Allouah et al. 2023) seen in one round's numbers. Heterogeneous shards
(label-sorted data) and well-trained models (small, noisy honest updates) both push rho
down; client momentum raises it only where the spread is stochastic noise.

Computed from a run's ``diagnostics.jsonl`` (one row per node and round, see
``server.diagnostics``) in two ways, each exact where it applies:

- **clean runs with a weighted mean**: the aggregate is ``sum_i w_i h_i``, so its norm is
  ``sum_i w_i ||h_i|| cos(h_i, aggregate)`` (each row's ``update_norm``,
  ``cosine_to_aggregate`` and ``weight``);
- **IPM runs** (Xie, Koyejo & Gupta 2020): an omniscient attacker sends
  ``-epsilon * mean(honest)``, so ``||mean(honest)|| = ||attack|| / epsilon``.

    python -m bastion.signal_ratio runs/.../cells/CELL [--ipm-epsilon EPS]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from common.runlog import read_jsonl


def _by_round(rows: Iterable[Mapping[str, Any]]) -> dict[int, list[Mapping[str, Any]]]:
    rounds: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("update_norm") is not None and row.get("status") == "accepted":
            rounds[int(row["round"])].append(row)
    return dict(sorted(rounds.items()))


def signal_ratio_mean(rows: Iterable[Mapping[str, Any]]) -> dict[int, float]:
    """rho per round of a run whose aggregate is the weighted mean of the accepted
    (all honest) replies: ``sum_i w_i ||h_i|| cos_i / sum_i w_i`` over the median norm.
    Rounds whose rows lack a cosine or a weight are left out."""
    ratios: dict[int, float] = {}
    for rnd, replies in _by_round(rows).items():
        if any(r.get("malicious") for r in replies):
            raise ValueError(f"round {rnd}: malicious replies; use an attack-free run")
        if any(r.get("cosine_to_aggregate") is None or r.get("weight") is None for r in replies):
            continue
        total = sum(float(r["weight"]) for r in replies)
        norm = sum(
            float(r["update_norm"]) * float(r["cosine_to_aggregate"]) * float(r["weight"])
            for r in replies
        )
        ratios[rnd] = norm / total / statistics.median(float(r["update_norm"]) for r in replies)
    return ratios


def signal_ratio_ipm(rows: Iterable[Mapping[str, Any]], epsilon: float) -> dict[int, float]:
    """rho per round of an omniscient IPM run: the attackers' norm over ``epsilon`` is
    the honest mean's norm; the denominator is the honest replies' median norm."""
    if not epsilon > 0:
        raise ValueError(f"epsilon: value {epsilon!r} is not allowed; allowed: > 0")
    ratios: dict[int, float] = {}
    for rnd, replies in _by_round(rows).items():
        honest = [float(r["update_norm"]) for r in replies if not r.get("malicious")]
        attack = [float(r["update_norm"]) for r in replies if r.get("malicious")]
        if honest and attack:
            ratios[rnd] = attack[0] / epsilon / statistics.median(honest)
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bastion.signal_ratio", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("cell", type=Path, help="a run's (or grid cell's) output directory")
    parser.add_argument(
        "--ipm-epsilon", type=float, default=0.0, help="the run's IPM epsilon (IPM runs)"
    )
    args = parser.parse_args(argv)
    path = args.cell / "diagnostics.jsonl"
    if not path.is_file():
        print(f"signal_ratio: {path}: no such file", file=sys.stderr)
        return 2
    try:
        rows = read_jsonl(path)
        ratios = (
            signal_ratio_ipm(rows, args.ipm_epsilon)
            if args.ipm_epsilon
            else signal_ratio_mean(rows)
        )
    except (OSError, ValueError) as exc:
        print(f"signal_ratio: {path}: {exc}", file=sys.stderr)
        return 2
    print("| round | rho |\n|---|---|")
    for rnd, rho in ratios.items():
        print(f"| {rnd} | {rho:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
