"""A one-dimensional maximiser for an attack factor: expand, then refine.

The adaptive attack (:class:`attacks.byzantine.Adaptive`) picks the factor of a base
attack (IPM's epsilon, ALIE's z) that does the most damage through the server's
aggregation. Damage as a function of the factor is not smooth (a selection rule such
as Krum keeps the attack up to some factor and drops it beyond), so the search only
compares values. It is the line search of ByzFL's ``Optimal_InnerProductManipulation``
and ``Optimal_ALittleIsEnough`` (``byzfl/attacks/attacks.py``, ``_expansion_phase``
and ``_contraction_phase``; the attacks of Allouah, Farhadkhani, Guerraoui, Gupta,
Pinot & Stephan (2023), "Fixing by mixing: a recipe for optimal Byzantine ML under
heterogeneity", AISTATS 2023, PMLR 206:1232-1300), bounded above:

1. **Expansion.** Evaluate ``lower``; then ``best + step``, doubling the step after
   each improvement, until a proposal is no better (the step is then multiplied by
   ``ratio``) or the top of the range is reached.
2. **Refinement.** Propose ``best + step`` and multiply the step by ``ratio``
   after each proposal, moving ``best`` when a proposal is better, until the
   evaluations are spent.

Differences from ByzFL: proposals are clamped to ``upper`` (ByzFL has no upper bound),
a proposal above ``upper`` in the refinement is skipped without spending an
evaluation, a factor already evaluated is not evaluated again, and the search ends
early when nothing is left to propose (the best factor is ``upper``). Pure Python: no
torch, no Flower.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["Probe", "line_maximize"]


class Probe(NamedTuple):
    """One evaluation: the factor tried and the objective's value there."""

    factor: float
    value: float


def line_maximize(
    objective: Callable[[float], float],
    *,
    lower: float,
    upper: float,
    step: float,
    evals: int,
    ratio: float = 0.8,
) -> list[Probe]:
    """Every probe of the expand-then-refine search over ``[lower, upper]``, in order.

    ``objective`` maps a factor to the value to maximise; a non-finite value counts as
    ``-inf`` (never better than anything). At most ``evals`` (>= 1) evaluations; the
    first is at ``lower``. ``step`` > 0 is the first step, ``ratio`` in ``(0.5, 1)``
    ByzFL's contraction ratio. The best probe is the first one with the largest value
    (ties keep the smaller factor evaluated first). Raises ``ValueError`` for bad bounds.
    """
    if not (math.isfinite(lower) and math.isfinite(upper) and lower <= upper):
        raise ValueError(f"line_maximize: need finite lower <= upper, got [{lower}, {upper}]")
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"line_maximize: step must be a finite float > 0, got {step}")
    if not 0.5 < ratio < 1.0:
        raise ValueError(f"line_maximize: ratio must lie in (0.5, 1), got {ratio}")
    if evals < 1:
        raise ValueError(f"line_maximize: evals must be >= 1, got {evals}")
    probes: list[Probe] = []
    seen: dict[float, float] = {}

    def probe(x: float) -> float:
        value = float(objective(x))
        if not math.isfinite(value):
            value = -math.inf
        seen[x] = value
        probes.append(Probe(x, value))
        return value

    best_x, best_y = lower, probe(lower)
    delta = step
    # expansion: double the step while it pays
    while len(probes) < evals and best_x < upper:
        x = min(best_x + delta, upper)
        y = probe(x)
        if y > best_y:
            best_x, best_y = x, y
            delta *= 2
        else:
            delta *= ratio
            break
    # refinement: shrinking steps above the best factor
    while len(probes) < evals and best_x < upper:
        x = best_x + delta
        delta *= ratio
        if x > upper or x in seen or x == best_x:
            if delta <= abs(best_x) * 1e-15 or delta < 1e-300:
                break  # nothing left to propose in floating point
            continue
        y = probe(x)
        if y > best_y:
            best_x, best_y = x, y
    return probes
