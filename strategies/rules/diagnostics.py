"""Per-client diagnostics of one aggregation: pure torch, no Flower.

What the strategy (:mod:`strategies.strategy`) records about each accepted update
once a :class:`~strategies.rules.registry.Pipeline` has aggregated them:

* :func:`update_norm_problem` -- why one decoded update is unusable (non-finite
  values, an L2 norm above ``max-update-norm`` or beyond float32), or ``None``;
* :func:`geometry_to_aggregate` -- each update's cosine and L2 distance to the
  aggregate, from the row norms measured at decode time and one matrix-vector
  product (no ``(n, d)`` temporary);
* :func:`client_attribution` -- each client's weight in the aggregate, whether the
  rule selected it and its score, where the pipeline defines them;
* :func:`malicious_influence` -- the share of the aggregate owed to the clients
  that declared themselves malicious (experiments' ground truth).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from strategies.rules._kernels import norm64
from strategies.rules.registry import PipelineOutput

__all__ = [
    "AggregateGeometry",
    "ClientAttribution",
    "client_attribution",
    "geometry_to_aggregate",
    "malicious_influence",
    "update_norm_problem",
]


class AggregateGeometry(NamedTuple):
    """Where the updates lie relative to their aggregate.

    norm:      the aggregate's L2 norm, accumulated in float64 (:func:`norm64`).
    cosines:   per update, ``u . a / (|u| |a|)``; ``None`` for every update when the
               aggregate is zero.
    distances: per update, ``|u - a|`` (what reputation calls "far").
    """

    norm: float
    cosines: list[float | None]
    distances: list[float]


class ClientAttribution(NamedTuple):
    """What the aggregate owes each client; ``None`` where the pipeline does not say.

    weights:  each client's coefficient in the aggregate (the rule's weights pushed
              back through the pre-aggregation mixing).
    selected: whether the rule used the client.
    scores:   the rule's per-input score (e.g. Krum's), when its inputs are the clients.
    """

    weights: list[float] | None
    selected: list[bool] | None
    scores: list[float] | None


def update_norm_problem(row: torch.Tensor, norm32: float, limit: float) -> str | None:
    """Why a decoded update (one row, float32 L2 norm ``norm32``) is rejected, or None.

    Non-finite values are counted by kind. A row whose float32 norm overflows but
    whose values are finite gets its norm in float64 (:func:`norm64`), so a 1e30
    update is reported as such. ``limit`` is ``max-update-norm`` (0: no limit); a
    norm beyond float32 is rejected even without a limit (the rules run in float32).
    """
    if math.isfinite(norm32) and (limit <= 0 or norm32 <= limit):
        return None
    nan = int(torch.isnan(row).sum())
    pos, neg = int((row == math.inf).sum()), int((row == -math.inf).sum())
    if nan or pos or neg:
        return f"non-finite update: {nan} NaN, {pos} +Inf, {neg} -Inf values"
    norm = norm32 if math.isfinite(norm32) else norm64(row)
    if limit > 0 and norm > limit:
        return f"update norm {norm:.4g} exceeds max-update-norm {limit:g}"
    return f"update norm {norm:.4g} overflows float32 (values too large)"


def geometry_to_aggregate(
    deltas: torch.Tensor, aggregate: torch.Tensor, row_norms: Sequence[float]
) -> AggregateGeometry:
    """The aggregate's norm and each row's cosine and L2 distance to it.

    ``deltas`` is the ``(n, d)`` float32 matrix of updates, ``aggregate`` the ``(d,)``
    aggregate and ``row_norms`` the rows' L2 norms measured when they were checked.
    One float32 matrix-vector product gives the dot products ``u . a``; the rest is
    float64: ``cos = u . a / (|u| |a|)`` and, with no ``(n, d)`` temporary,
    ``|u - a| = sqrt(max(0, |u|^2 + |a|^2 - 2 u . a))``. Float32 dot products lose
    distances far below ``1e-3 |u|``, which reputation's ratios do not need.
    """
    agg_norm = norm64(aggregate)
    norms = torch.tensor(list(row_norms), dtype=torch.float64)
    dots = (deltas @ aggregate.to(deltas.dtype)).double()
    cosines = dots / (norms * agg_norm).clamp_min(1e-300)
    distances = (norms**2 + agg_norm**2 - 2 * dots).clamp_min(0).sqrt()
    return AggregateGeometry(
        norm=agg_norm,
        cosines=[cos if agg_norm > 0 else None for cos in cosines.tolist()],
        distances=distances.tolist(),
    )


def client_attribution(out: PipelineOutput, n: int) -> ClientAttribution:
    """Per-client weight in the aggregate, selected flag and score, where defined.

    Weights come from the pipeline's ``client_weights`` (the rule's weights pushed
    back through the pre-aggregation mixing). Selection and scores refer to the
    rule's inputs, which are the clients only when no pre-aggregation step mixed
    them (the mixing is the ``n x n`` identity); after mixing, a client counts as
    selected when its weight is non-zero, and no score is given.
    """
    weights = None if out.client_weights is None else out.client_weights.tolist()
    identity = out.mixing.shape == (n, n) and bool(
        torch.equal(out.mixing, torch.eye(n, dtype=out.mixing.dtype))
    )
    selected = scores = None
    if out.aggregation.selected is not None:
        if identity:
            chosen = set(out.aggregation.selected.tolist())
            selected = [i in chosen for i in range(n)]
        elif weights is not None:
            selected = [abs(w) > 0 for w in weights]
    if identity and out.aggregation.scores is not None:
        scores = out.aggregation.scores.tolist()
    return ClientAttribution(weights, selected, scores)


def malicious_influence(
    malicious: Sequence[bool], weights: Sequence[float] | None, selected: Sequence[bool] | None
) -> float | None:
    """Share of the aggregate owed to the clients flagged in ``malicious``.

    With weights: ``sum |w_i|`` over the malicious clients divided by ``sum |w_i|``
    over all (``None`` when all weights are zero). Without weights but with a
    selection: the malicious fraction of the selected clients. ``None`` when the
    rule attributes nothing to single clients (e.g. the coordinate median).
    """
    if weights is not None:
        total = sum(abs(w) for w in weights)
        bad = sum(abs(w) for w, m in zip(weights, malicious, strict=True) if m)
        return bad / total if total > 0 else None
    if selected is not None and any(selected):
        picked = [m for m, s in zip(malicious, selected, strict=True) if s]
        return sum(picked) / len(picked)
    return None
