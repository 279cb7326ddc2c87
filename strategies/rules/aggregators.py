"""Robust aggregation rules over an ``(n, d)`` tensor of client deltas.

Every rule is a small callable object::

    out = rule.aggregate(x, num_byzantine=f)   # AggregationOutput
    vec = rule(x, num_byzantine=f)             # == out.vector, shape (d,)

``x`` holds one client delta (update minus current global model) per row, on
CPU or CUDA; ``out.vector`` has ``x``'s dtype and device. The diagnostics
(``selected``, ``scores``, ``weights``) are small CPU tensors (int64 indices,
float64 values) so callers can log them without device syncs of their own.

``num_byzantine`` (``f``) can be fixed when the rule is built and overridden
per call (the strategy passes the ``f`` left after pre-aggregation). Rules
that do not need it ignore it, except that median, geometric median and
centered clipping refuse an ``f`` at or above ``n / 2`` (their breakdown
point). Only :class:`Mean` accepts ``weights``; every robust rule raises if
weights are given, because client-reported sample counts are attacker
controlled and must never weight a robust rule.

No Flower imports here: see ``strategies/rules/registry.py`` for construction by
name and ``docs/AGGREGATION.md`` for the preconditions and numerics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from common.options import Option
from strategies.rules import _kernels as K

__all__ = [
    "AggregationOutput",
    "Aggregator",
    "Bulyan",
    "CenteredClipping",
    "GeometricMedian",
    "Krum",
    "Mean",
    "Median",
    "MultiKrum",
    "TrimmedMean",
    "validate_updates",
]


class AggregationOutput(NamedTuple):
    """Result of one aggregation.

    vector:   the aggregate, shape ``(d,)``, same dtype/device as the input.
    selected: int64 CPU indices of the inputs the rule used (Krum's pick,
              Multi-Krum's ``m`` best in score order, Bulyan's ``theta``
              selected in pick order), or ``None``.
    scores:   float64 CPU per-input score (Krum scores; distances to the
              geometric median; distances to the clipping centre), or ``None``.
    weights:  float64 CPU per-input coefficients when the output is a
              combination of the inputs (mean, Krum, Multi-Krum, geometric
              median, centered clipping -- see each rule), or ``None``.
    """

    vector: Tensor
    selected: Tensor | None = None
    scores: Tensor | None = None
    weights: Tensor | None = None


# --------------------------------------------------------------------------- #
# Validation helpers                                                           #
# --------------------------------------------------------------------------- #
def validate_updates(x: object, rule: str) -> Tensor:
    """Check that ``x`` is a non-empty 2-D floating tensor ``(n, d)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{rule} expects a torch.Tensor of shape (n, d), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(
            f"{rule} expects a 2-D tensor (n, d) of client deltas, got shape {tuple(x.shape)}"
        )
    n, d = x.shape
    if n == 0:
        raise ValueError(f"{rule} needs at least one update, got n=0")
    if d == 0:
        raise ValueError(f"{rule} needs updates with at least one coordinate, got d=0")
    if not x.is_floating_point():
        raise ValueError(f"{rule} expects a floating-point tensor, got dtype {x.dtype}")
    return x


def check_num_byzantine(rule: str, value: object, *, allow_none: bool = True) -> int | None:
    """Validate a Byzantine count: ``None`` (when allowed) or an int >= 0."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{rule} needs num_byzantine (f)")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{rule}: num_byzantine must be an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{rule}: num_byzantine must be >= 0, got {value}")
    return value


def _positive(
    rule: str, name: str, value: object, *, integer: bool = False, allow_zero: bool = False
) -> Any:
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type:
        kind = "an int" if integer else "a number"
        raise ValueError(f"{rule}: {name} must be {kind}, got {value!r}")
    if not math.isfinite(float(value)) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{rule}: {name} must be finite and {bound}, got {value!r}")
    return value


def _cpu64(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


# --------------------------------------------------------------------------- #
# Base classes                                                                 #
# --------------------------------------------------------------------------- #
class NamedStep:
    """What aggregators and pre-aggregators share: a name, the run-config keys they
    read, build parameters for ``repr``, and (empty by default) checkpointable state.

    A concrete step declares ``name`` and ``options`` once, on its class; defining the
    class registers it in its family's :attr:`registry` (:class:`Aggregator`,
    :class:`~strategies.rules.preaggregators.PreAggregator`), from which the names the
    run config allows, ``build_aggregator`` / ``build_preaggregator`` and the mapping
    from run config to parameters (:mod:`strategies.rules.from_config`) all derive.
    """

    name: ClassVar[str] = "step"
    #: the run-config keys the step reads and the parameters they feed
    options: ClassVar[tuple[Option, ...]] = ()
    #: concrete steps of a family by name, in the order their classes are defined
    registry: ClassVar[dict[str, type[NamedStep]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "registry" in cls.__dict__:  # a family's base class: a registry of its own
            return
        if "name" in cls.__dict__:  # a concrete step (helpers such as _GroupsOfS have none)
            if cls.name in cls.registry:
                raise TypeError(
                    f"step name {cls.name!r} is already taken by {cls.registry[cls.name]}"
                )
            cls.registry[cls.name] = cls

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state (empty for stateless steps)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        if state:
            raise ValueError(f"{self.name} is stateless, got state keys {sorted(state)}")

    def params(self) -> dict[str, Any]:
        """Build parameters (for logging and ``repr``)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class Aggregator(NamedStep):
    """Base class: input validation, ``f`` resolution, ``__call__``,
    (empty) state. Subclasses implement :meth:`_aggregate`."""

    name: ClassVar[str] = "aggregator"
    registry: ClassVar[dict[str, type[NamedStep]]] = {}
    #: whether the rule cannot run without ``f``
    needs_num_byzantine: ClassVar[bool] = False
    #: whether ``f`` is checked against the breakdown point ``n > 2f``
    majority_rule: ClassVar[bool] = False
    #: whether ``weights`` is accepted
    accepts_weights: ClassVar[bool] = False

    def __init__(self, *, num_byzantine: int | None = None) -> None:
        self.num_byzantine = check_num_byzantine(self.name, num_byzantine)

    # -- public API --------------------------------------------------------- #
    def aggregate(
        self,
        x: Tensor,
        *,
        num_byzantine: int | None = None,
        weights: Tensor | Sequence[float] | None = None,
    ) -> AggregationOutput:
        """Aggregate the rows of ``x``; see the class docstring for the rule."""
        x = validate_updates(x, self.name)
        f = check_num_byzantine(self.name, num_byzantine)
        if f is None:
            f = self.num_byzantine
        if f is None and self.needs_num_byzantine:
            raise ValueError(
                f"{self.name} needs num_byzantine (f): pass it to build_aggregator or to the call"
            )
        n = x.shape[0]
        if f is not None and self.majority_rule and not n > 2 * f:
            raise ValueError(f"{self.name} needs n > 2f, got n={n}, f={f}")
        if weights is not None and not self.accepts_weights:
            raise ValueError(
                f"{self.name} does not take weights: robust rules never weight by "
                "client-reported sample counts (only 'mean' accepts weights)"
            )
        with torch.no_grad():
            return self._aggregate(x, f, weights)

    def __call__(
        self,
        x: Tensor,
        *,
        num_byzantine: int | None = None,
        weights: Tensor | Sequence[float] | None = None,
    ) -> Tensor:
        """Same as ``aggregate(...).vector``."""
        return self.aggregate(x, num_byzantine=num_byzantine, weights=weights).vector

    def params(self) -> dict[str, Any]:
        """Build parameters (for logging and ``repr``)."""
        return {"num_byzantine": self.num_byzantine}

    # -- subclass hook ------------------------------------------------------ #
    def _aggregate(
        self, x: Tensor, f: int | None, weights: Tensor | Sequence[float] | None
    ) -> AggregationOutput:
        raise NotImplementedError


# --------------------------------------------------------------------------- #
# Mean                                                                         #
# --------------------------------------------------------------------------- #
class Mean(Aggregator):
    """Arithmetic mean ``sum_i w_i x_i`` (FedAvg's aggregation, McMahan et al.
    2017, Algorithm 1) -- *not* robust: one Byzantine row moves it anywhere.

    Optional ``weights`` (length ``n``, finite, non-negative, positive sum) are
    normalised to sum to one; the default is uniform. Accumulated in float64.
    ``num_byzantine`` is accepted and ignored. ``weights`` in the output are
    the normalised weights.
    """

    name = "mean"
    accepts_weights = True

    def _aggregate(self, x, f, weights):
        n = x.shape[0]
        if weights is None:
            w = torch.full((n,), 1.0 / n, dtype=torch.float64)
        else:
            w = _cpu64(torch.as_tensor(weights)).flatten()
            if w.numel() != n:
                raise ValueError(f"mean: weights must have n={n} entries, got {w.numel()}")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError("mean: weights must be finite and non-negative")
            total = float(w.sum())
            if not total > 0:
                raise ValueError("mean: weights must have a positive sum")
            w = w / total
        vec = K.combine_rows(x, w)
        if not K.all_finite(vec):
            bad = [i for i in K.nonfinite_rows(x) if w[i] > 0]
            if bad:
                raise ValueError(
                    f"mean: input rows {bad[:20]} contain NaN or infinite values; "
                    "the rule needs finite updates"
                )
            raise ValueError(f"mean: the weighted mean overflows {x.dtype}")
        return AggregationOutput(vec, weights=w)


# --------------------------------------------------------------------------- #
# Coordinate-wise rules                                                        #
# --------------------------------------------------------------------------- #
class Median(Aggregator):
    """Coordinate-wise median (Yin, Chen, Kannan & Bartlett 2018,
    "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
    Definition 1 / Algorithm 1 option I).

    For even ``n`` each coordinate is the mean of its two middle values (the
    usual definition; ``torch.median`` would return the lower one). Robust
    while ``f < n / 2``: if ``num_byzantine`` is given, ``n > 2f`` is checked.
    Computed in column chunks with a pruned min/max sorting network; bit-
    identical to sorting each column.
    """

    name = "median"
    majority_rule = True

    def _aggregate(self, x, f, weights):
        return AggregationOutput(K.coordinate_median(x, self.name))


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin, Chen, Kannan & Bartlett 2018,
    Definition 2 / Algorithm 1 option II, with beta = f / n): per coordinate
    drop the ``f`` largest and ``f`` smallest values and average the other
    ``n - 2f`` (accumulated in float64, rounded once). Requires ``n > 2f``.
    """

    name = "trimmed-mean"
    needs_num_byzantine = True

    def _aggregate(self, x, f, weights):
        n = x.shape[0]
        if not n > 2 * f:
            raise ValueError(f"trimmed-mean needs n > 2f, got n={n}, f={f}")
        return AggregationOutput(K.coordinate_trimmed_mean(x, f, self.name))


# --------------------------------------------------------------------------- #
# Krum family                                                                  #
# --------------------------------------------------------------------------- #
def _distances(x: Tensor, rule: str) -> Tensor:
    """Pairwise squared distances (float64, CPU) from the mean-centred Gram."""
    return _cpu64(K.sq_dists_from_gram(K.centered_gram(x, rule)))


def _krum_requirement(rule: str, n: int, f: int) -> None:
    if not n >= 2 * f + 3:
        raise ValueError(f"{rule} needs n >= 2f + 3, got n={n}, f={f}")


class Krum(Aggregator):
    """Krum (Blanchard, El Mhamdi, Guerraoui & Stainer 2017, "Machine Learning
    with Adversaries: Byzantine Tolerant Gradient Descent", Sec. 4).

    ``score(i) = sum of ||x_i - x_j||^2 over the n - f - 2 rows j != i
    closest to x_i``; the output is the row with the smallest score. An exact
    tie is broken by the next-nearest distances, then by the lower index
    (``_kernels.krum_order``), so the pick does not depend on the order of
    the inputs. Requires ``n >= 2f + 3``.

    Distances come from the mean-centred Gram matrix accumulated in float64
    (see ``_kernels.centered_gram``), so the pick equals a direct float64
    computation's even when the updates share a large component.
    Output: ``selected = [i*]``, ``scores`` = all Krum scores, ``weights`` =
    the one-hot vector of the pick.
    """

    name = "krum"
    needs_num_byzantine = True

    def _aggregate(self, x, f, weights):
        n = x.shape[0]
        _krum_requirement(self.name, n, f)
        order, scores = K.krum_order(_distances(x, self.name), n - f - 2)
        best = order[0]
        onehot = torch.zeros(n, dtype=torch.float64)
        onehot[best] = 1.0
        return AggregationOutput(
            x[best].clone(), torch.tensor([best], dtype=torch.int64), scores, onehot
        )


class MultiKrum(Aggregator):
    """Multi-Krum (Blanchard et al. 2017, Sec. 4 "Multi-Krum"; as used in
    El Mhamdi, Guerraoui & Rouault 2018): the mean of the ``m`` rows with the
    smallest Krum scores (ties broken as in :class:`Krum`). ``m`` defaults to ``n - f``
    and must satisfy ``1 <= m <= n - f``; requires ``n >= 2f + 3``.

    Output: ``selected`` = the ``m`` indices in increasing score order,
    ``scores`` = all Krum scores, ``weights`` = ``1/m`` on the selected rows.
    """

    name = "multi-krum"
    needs_num_byzantine = True
    options = (
        Option(
            "multi-krum-m",
            param="m",
            default=0,
            ge=0,
            le=100_000,
            off=0,
            help="rows Multi-Krum averages (0: n - f)",
        ),
    )

    def __init__(self, *, num_byzantine: int | None = None, m: int | None = None) -> None:
        super().__init__(num_byzantine=num_byzantine)
        self.m = None if m is None else _positive(self.name, "m", m, integer=True)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "m": self.m}

    def _aggregate(self, x, f, weights):
        n = x.shape[0]
        _krum_requirement(self.name, n, f)
        m = n - f if self.m is None else self.m
        if not 1 <= m <= n - f:
            raise ValueError(f"multi-krum needs 1 <= m <= n - f, got m={m}, n={n}, f={f}")
        order, scores = K.krum_order(_distances(x, self.name), n - f - 2)
        chosen = torch.tensor(order[:m], dtype=torch.int64)
        w = torch.zeros(n, dtype=torch.float64)
        w[chosen] = 1.0 / m
        return AggregationOutput(K.combine_rows(x, w), chosen, scores, w)


class Bulyan(Aggregator):
    """Bulyan (El Mhamdi, Guerraoui & Rouault 2018, "The Hidden Vulnerability
    of Distributed Learning in Byzantium", ICML 2018, PMLR 80:3521-3530: the
    Bulyan rule with Krum as the inner rule).

    1. Select ``theta = n - 2f`` rows by iterated Krum: pick the row with the
       smallest Krum score among the remaining set ``R``, move it to the
       selection, recompute the scores on what remains. On ``R`` the score
       sums the ``max(1, |R| - f - 2)`` nearest other rows (the paper's
       ``|R| - f - 2``; the floor of one neighbour, as in Flower's
       implementation, keeps the last picks meaningful when ``|R| < f + 3``);
       score ties are broken as in :class:`Krum`.
    2. Per coordinate, average the ``beta = theta - 2f`` selected values
       closest to the coordinate-wise median of the selected rows.

    Requires ``n >= 4f + 3``. Output: ``selected`` = the ``theta`` indices in
    pick order, ``scores`` = the Krum scores over all ``n`` rows (first
    iteration).
    """

    name = "bulyan"
    needs_num_byzantine = True

    def _aggregate(self, x, f, weights):
        n = x.shape[0]
        if not n >= 4 * f + 3:
            raise ValueError(f"bulyan needs n >= 4f + 3, got n={n}, f={f}")
        dist = _distances(x, self.name)
        theta = n - 2 * f
        remaining = list(range(n))
        picks: list[int] = []
        first_scores: Tensor | None = None
        while len(picks) < theta:
            sub = dist[remaining][:, remaining]
            order, scores = K.krum_order(sub, max(1, len(remaining) - f - 2))
            if first_scores is None:
                first_scores = scores
            pick = remaining[order[0]]
            picks.append(pick)
            remaining.remove(pick)
        selected = torch.tensor(picks, dtype=torch.int64)
        vec = K.bulyan_coordinate_phase(x, selected, f, self.name)
        return AggregationOutput(vec, selected, first_scores)


# --------------------------------------------------------------------------- #
# Geometric median                                                             #
# --------------------------------------------------------------------------- #
class GeometricMedian(Aggregator):
    """Geometric median by the smoothed Weiszfeld algorithm (Pillutla, Kakade
    & Harchaoui, "Robust Aggregation for Federated Learning", IEEE TSP 2022 /
    arXiv 2019, Algorithm 3 -- RFA), with uniform weights ``alpha_i = 1/n``.

    Starting from the mean ``v_0``, repeat ``beta_i = alpha_i / max(nu,
    ||v_k - x_i||)``, ``v_{k+1} = sum_i beta_i x_i / sum_i beta_i`` at most
    ``max_iter`` times, stopping early once the objective ``sum_i alpha_i
    ||v - x_i||`` decreases by less than ``tol`` times its value.

    Every iterate is a convex combination ``v = sum_i w_i x_i``, so
    ``||v - x_j||^2 = w^T G w - 2 (G w)_j + G_jj`` needs only the ``n x n``
    centred Gram matrix: the iterations cost ``O(n^2)`` each and the update
    vector is formed once at the end. Client-reported sample counts are never
    used (``weights`` is rejected). Robust while ``f < n / 2`` (``n > 2f`` is
    checked when ``num_byzantine`` is given).

    Output: ``weights`` = the final combination ``w``, ``scores`` = the
    distances ``||v - x_i||``.
    """

    name = "geometric-median"
    majority_rule = True
    options = (
        Option("gm-max-iter", param="max_iter", default=100, ge=1, le=100_000),
        Option("gm-nu", param="nu", default=1e-6, gt=0, help="smoothing of Weiszfeld's step"),
        Option("gm-tol", param="tol", default=1e-10, ge=0, help="stopping tolerance"),
    )

    def __init__(
        self,
        *,
        num_byzantine: int | None = None,
        max_iter: int = 100,
        nu: float = 1e-6,
        tol: float = 1e-10,
    ) -> None:
        super().__init__(num_byzantine=num_byzantine)
        self.max_iter = _positive(self.name, "max_iter", max_iter, integer=True)
        self.nu = float(_positive(self.name, "nu", nu))
        self.tol = float(_positive(self.name, "tol", tol, allow_zero=True))
        #: iterations used by the last call (diagnostic)
        self.last_iterations = 0

    def params(self) -> dict[str, Any]:
        return {**super().params(), "max_iter": self.max_iter, "nu": self.nu, "tol": self.tol}

    def _aggregate(self, x, f, weights):
        gram = _cpu64(K.centered_gram(x, self.name))
        w, dist, iters = weiszfeld_on_gram(gram, nu=self.nu, max_iter=self.max_iter, tol=self.tol)
        self.last_iterations = iters
        return AggregationOutput(K.combine_rows(x, w), None, dist, w)


def weiszfeld_on_gram(
    gram: Tensor, *, nu: float, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, int]:
    """Smoothed Weiszfeld iterations (Pillutla et al. 2022, Algorithm 3) on a
    Gram matrix ``G`` (float64, ``n x n``) with uniform weights.

    Returns ``(w, dist, iterations)``: the final iterate's coefficients over
    the inputs (non-negative, summing to one), its distances to the inputs,
    and the number of Weiszfeld steps taken.
    """
    n = gram.shape[0]
    alpha = 1.0 / n
    diag = gram.diagonal()

    def distances(w: Tensor) -> Tensor:
        gw = gram @ w
        sq = (w @ gw) - 2.0 * gw + diag
        return sq.clamp_(min=0.0).sqrt_()

    w = torch.full((n,), alpha, dtype=torch.float64)
    dist = distances(w)
    objective = alpha * float(dist.sum())
    iters = 0
    for _ in range(max_iter):
        beta = alpha / dist.clamp(min=nu)
        w_new = beta / beta.sum()
        dist_new = distances(w_new)
        obj_new = alpha * float(dist_new.sum())
        iters += 1
        if obj_new > objective:  # rounding noise at convergence: keep the better point
            break
        w, dist = w_new, dist_new
        done = objective - obj_new <= tol * obj_new
        objective = obj_new
        if done:
            break
    return w, dist, iters


# --------------------------------------------------------------------------- #
# Centered clipping                                                            #
# --------------------------------------------------------------------------- #
class CenteredClipping(Aggregator):
    """Centered clipping (Karimireddy, He & Jaggi 2021, "Learning from History
    for Byzantine Robust Optimization", ICML, Algorithm 2 / Eq. (CC)).

    ``v`` starts at the previous round's aggregate (zero in the first round)
    and is updated ``iterations`` times (the paper's ``L``; default 1, the
    value used in the authors' experiments)::

        v <- v + (1/n) sum_i clip_tau(x_i - v),  clip_tau(z) = z min(1, tau/||z||)

    The result becomes the next round's starting point; :meth:`state_dict`
    and :meth:`load_state_dict` checkpoint it and :meth:`reset` forgets it.
    Robust while ``f < n / 2`` (``n > 2f`` is checked when ``num_byzantine`` is
    given).

    The radius. A fixed ``tau`` (default 10, as in the authors' code) must be
    matched to the scale of the updates: an update of norm 0.4 is never clipped
    at tau = 10 (then CC is the mean), and a fixed tau lags when the scale of the
    updates changes during training. With ``radius_scale = c > 0`` the radius
    follows the data instead: in every iteration

        tau = c * median_i ||x_i - v||

    the median of that iteration's distances to the current centre. The paper's
    analysis (Karimireddy, He & Jaggi 2021, Theorem III) sets tau from the honest
    spread around the centre; the median distance is an estimate of that spread
    that ``f < n / 2`` attackers cannot move past the honest distances (at least
    ``n - f > n / 2`` of the distances are honest, so the median lies between the
    smallest and the largest honest distance). Each attacker then moves ``v`` by
    at most ``c * median / n`` per iteration. ``last_radius`` holds the radius of
    the last iteration (the fixed ``tau`` when ``radius_scale`` is 0).

    Output: the aggregate equals ``(1 - sum(weights)) * v_0 + sum_i
    weights_i x_i`` where ``v_0`` is the starting point; ``scores`` are the
    distances ``||x_i - v||`` in the last iteration.
    """

    name = "centered-clipping"
    majority_rule = True
    options = (
        Option("cc-tau", param="tau", default=10.0, gt=0, help="clipping radius"),
        Option("cc-iterations", param="iterations", default=1, ge=1, le=1000),
        Option(
            "cc-radius-scale",
            param="radius_scale",
            default=0.0,
            ge=0,
            le=1e6,
            help="0: the fixed radius cc-tau; c > 0: radius = c x the median distance "
            "to the centre, recomputed each iteration",
        ),
    )

    def __init__(
        self,
        *,
        num_byzantine: int | None = None,
        tau: float = 10.0,
        iterations: int = 1,
        radius_scale: float = 0.0,
    ) -> None:
        super().__init__(num_byzantine=num_byzantine)
        self.tau = float(_positive(self.name, "tau", tau))
        self.iterations = _positive(self.name, "iterations", iterations, integer=True)
        scale = float(radius_scale)
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(
                f"{self.name}: radius_scale must be a finite number >= 0 (0: the fixed "
                f"tau), got {radius_scale!r}"
            )
        self.radius_scale = scale
        self.last_radius = self.tau
        self._previous: Tensor | None = None

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "tau": self.tau,
            "iterations": self.iterations,
            "radius_scale": self.radius_scale,
        }

    def reset(self) -> None:
        """Forget the previous aggregate (the next call starts from zero)."""
        self._previous = None

    def state_dict(self) -> dict[str, Any]:
        """``{"previous": Tensor (d,) on CPU, or None}``."""
        prev = None if self._previous is None else self._previous.detach().to("cpu").clone()
        return {"previous": prev}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"previous"}:
            raise ValueError(
                f"centered-clipping: state must have exactly the key 'previous', "
                f"got {sorted(state)}"
            )
        prev = state["previous"]
        if prev is not None and (not isinstance(prev, Tensor) or prev.dim() != 1):
            raise ValueError("centered-clipping: state['previous'] must be a 1-D tensor or None")
        self._previous = None if prev is None else prev.detach().clone()

    def _aggregate(self, x, f, weights):
        n, d = x.shape
        if self._previous is None:
            v = torch.zeros(d, dtype=x.dtype, device=x.device)
        else:
            if self._previous.numel() != d:
                raise ValueError(
                    f"centered-clipping: the previous aggregate has d={self._previous.numel()}, "
                    f"the input has d={d}; call reset() when the model changes"
                )
            v = self._previous.to(device=x.device, dtype=x.dtype)
        coef = torch.zeros(n, dtype=torch.float64)
        dist = torch.zeros(n, dtype=torch.float64)
        for _ in range(self.iterations):
            dist = _cpu64(K.row_sq_norms(x, v)).sqrt_()
            if not bool(torch.isfinite(dist).all()):
                K.assert_finite(x, self.name)
                raise ValueError("centered-clipping: distances overflow float64")
            tau = self.tau
            if self.radius_scale > 0:
                tau = self.radius_scale * float(torch.quantile(dist, 0.5))
            self.last_radius = tau
            # a radius of 0 (half the rows at the centre) moves nothing
            scale = torch.where(dist > tau, tau / dist.clamp(min=1e-300), 1.0) / n
            # v_new = v + sum_i scale_i (x_i - v) = (1 - sum scale) v + sum_i scale_i x_i
            keep = 1.0 - float(scale.sum())
            v = K.combine_rows(x, scale, base=v, base_weight=keep)
            coef = coef * keep + scale
        self._previous = v.detach().clone()
        return AggregationOutput(v, None, dist, coef)
