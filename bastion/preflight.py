"""Checks ``bastion`` makes before any process starts: does the run config hold,
and can the configured rule run on the federation's replies at all.

Shared by the launchers (``bastion run`` and ``simulate`` in :mod:`bastion.cli`, the
compose runner in :mod:`bastion.container`, the grid in :mod:`bastion.experiments`).
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import torch

from common.config import RunConfig
from strategies.rules.from_config import pipeline_from_config


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """The run-config defaults of ``[tool.flwr.app.config]``."""
    data = tomllib.loads((app_dir / "pyproject.toml").read_text())
    return dict(data["tool"]["flwr"]["app"]["config"])


def check_rule_fits(cfg: RunConfig, clients: int) -> str | None:
    """Why the aggregation pipeline cannot run with ``clients`` replies, or ``None``.

    Runs the configured pipeline once on random updates of the right count, so a
    rule whose precondition fails (e.g. Krum after s-resampling needs
    n >= 2 s f + 3) is reported before any process starts. The message names the
    Byzantine count the rule gets after the pre-aggregation steps (s-resampling hands
    on s f, bucketing shrinks n to ceil(n / s)) and the fewest clients that would do.
    """
    replies = max(1, int(clients * cfg.fraction_train))
    problem = _pipeline_problem(cfg, replies)
    if problem is None:
        return None
    message = (
        f"aggregator {cfg.aggregator!r} with num-byzantine={cfg.num_byzantine} cannot run "
        f"on {replies} replies per round: {problem}"
    )
    steps = _effective_byzantine(cfg, replies)
    if steps and steps[-1][1:] != (replies, cfg.num_byzantine):
        chain = ", ".join(f"after {name} n={n}, f={f}" for name, n, f in steps)
        why = {
            "resample": "s-resampling lets each Byzantine update reach s of the averaged "
            "inputs, so the rule must tolerate s*f",
            "bucket": "bucketing averages groups of s, so the rule sees ceil(n/s) inputs",
        }
        notes = "; ".join(why[name] for name, _, _ in steps if name in why)
        message += (
            f" (you set f={cfg.num_byzantine} for {replies} replies; the pre-aggregation "
            f"steps change what the rule sees: {chain}" + (f"; {notes})" if notes else ")")
        )
    enough = next(
        (n for n in range(replies + 1, 4 * replies + 64) if _pipeline_problem(cfg, n) is None),
        None,
    )
    if enough is None:
        return message + "; no client count up to 4x this one works: lower num-byzantine or s"
    need = math.ceil(enough / cfg.fraction_train)
    while int(need * cfg.fraction_train) < enough:  # int() rounds the sampled count down
        need += 1
    return message + f"; with these settings it needs at least {need} clients (--clients {need})"


def _pipeline_problem(cfg: RunConfig, replies: int) -> str | None:
    """The configured pipeline's complaint on ``replies`` random updates, or None."""
    try:
        pipeline_from_config(cfg).aggregate(
            torch.randn(replies, 4), num_byzantine=cfg.num_byzantine
        )
    except ValueError as exc:
        return str(exc)
    return None


def _effective_byzantine(cfg: RunConfig, replies: int) -> list[tuple[str, int, int]]:
    """(step name, outputs, Byzantine count it hands on) for each pre-aggregation step
    on ``replies`` updates; empty when a step itself cannot run."""
    updates, f, out = torch.randn(replies, 4), cfg.num_byzantine, []
    try:
        for step in pipeline_from_config(cfg).preaggregators:
            res = step(updates, num_byzantine=f)
            updates, f = res.updates, res.num_byzantine
            out.append((step.name, int(updates.shape[0]), f))
    except ValueError:
        return []
    return out
