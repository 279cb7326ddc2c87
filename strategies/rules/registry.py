"""Build aggregation rules and pre-aggregation steps by name, and chain them.

>>> from strategies.rules.registry import build_aggregator, build_preaggregator, compose
>>> krum = build_aggregator("krum", num_byzantine=2)
>>> pipe = compose([build_preaggregator("bucket", s=2, seed=0)], krum)
>>> out = pipe.aggregate(x, num_byzantine=2)        # doctest: +SKIP

Names: :data:`AGGREGATORS` and :data:`PREAGGREGATORS`. Parameters are Python
keywords (``num_byzantine``, ``m``, ``max_iter``, ``nu``, ``tol``, ``tau``,
``iterations``, ``max_norm``, ``s``, ``seed``). An unknown name or parameter
raises ``ValueError`` listing what exists. No Flower imports here.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from strategies.rules.aggregators import AggregationOutput, Aggregator, check_num_byzantine
from strategies.rules.preaggregators import PreAggregationOutput, PreAggregator

__all__ = [
    "AGGREGATORS",
    "PREAGGREGATORS",
    "AggregationOutput",
    "Pipeline",
    "PipelineOutput",
    "PreAggregationOutput",
    "aggregator_parameters",
    "build_aggregator",
    "build_preaggregator",
    "compose",
    "preaggregator_parameters",
]

# Each concrete rule and step registers itself when its class is defined
# (NamedStep.__init_subclass__): the registries are these live views.
_AGGREGATOR_CLASSES: Mapping[str, type[Aggregator]] = MappingProxyType(
    Aggregator.registry  # type: ignore[arg-type]
)
_PREAGGREGATOR_CLASSES: Mapping[str, type[PreAggregator]] = MappingProxyType(
    PreAggregator.registry  # type: ignore[arg-type]
)

#: Names accepted by :func:`build_aggregator` (the rules defined in
#: :mod:`strategies.rules.aggregators`; a rule class defined later registers too).
AGGREGATORS: tuple[str, ...] = tuple(_AGGREGATOR_CLASSES)
#: Names accepted by :func:`build_preaggregator`, in the order a pipeline runs them.
PREAGGREGATORS: tuple[str, ...] = tuple(_PREAGGREGATOR_CLASSES)


def aggregator_class(name: str) -> type[Aggregator]:
    """The registered rule class called ``name`` (``ValueError`` listing the names)."""
    return _lookup(name, _AGGREGATOR_CLASSES, "aggregator")


def preaggregator_classes() -> tuple[type[PreAggregator], ...]:
    """Every registered pre-aggregation step, in the order a pipeline runs them."""
    return tuple(_PREAGGREGATOR_CLASSES.values())


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(cls.__init__)
    return {
        name: p
        for name, p in sig.parameters.items()
        if name != "self" and p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def aggregator_parameters(name: str) -> dict[str, Any]:
    """``{parameter: default}`` of aggregator ``name`` (``inspect.Parameter.empty``
    marks a required parameter)."""
    cls = _lookup(name, _AGGREGATOR_CLASSES, "aggregator")
    return {k: p.default for k, p in _parameters(cls).items()}


def preaggregator_parameters(name: str) -> dict[str, Any]:
    """``{parameter: default}`` of pre-aggregator ``name``."""
    cls = _lookup(name, _PREAGGREGATOR_CLASSES, "pre-aggregator")
    return {k: p.default for k, p in _parameters(cls).items()}


def _lookup(name: str, table: Mapping[str, type], kind: str) -> type:
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"unknown {kind} {name!r}; available: {', '.join(table)}")
    return table[name]


def _build(name: str, params: Mapping[str, Any], table: Mapping[str, type], kind: str) -> Any:
    cls = _lookup(name, table, kind)
    accepted = _parameters(cls)
    listing = ", ".join(accepted) or "(none)"
    for key in params:
        if key not in accepted:
            raise ValueError(f"{kind} {name!r} has no parameter {key!r}; {name} accepts: {listing}")
    missing = [
        k for k, p in accepted.items() if p.default is inspect.Parameter.empty and k not in params
    ]
    if missing:
        raise ValueError(
            f"{kind} {name!r} needs parameter(s) {', '.join(missing)}; {name} accepts: {listing}"
        )
    return cls(**params)


def build_aggregator(name: str, **params: Any) -> Aggregator:
    """Construct aggregation rule ``name`` (one of :data:`AGGREGATORS`).

    Parameters and defaults:

    - ``mean``: ``num_byzantine=None`` (ignored)
    - ``median``: ``num_byzantine=None``
    - ``trimmed-mean``: ``num_byzantine=None`` (required here or per call)
    - ``krum``: ``num_byzantine=None`` (required here or per call)
    - ``multi-krum``: ``num_byzantine=None`` (required), ``m=None`` (= n - f)
    - ``geometric-median``: ``num_byzantine=None``, ``max_iter=100``,
      ``nu=1e-6``, ``tol=1e-10``
    - ``bulyan``: ``num_byzantine=None`` (required here or per call)
    - ``centered-clipping``: ``num_byzantine=None``, ``tau=10.0``, ``iterations=1``,
      ``radius_scale=0.0`` (> 0: the radius follows the median distance)

    Raises ``ValueError`` for an unknown name (listing :data:`AGGREGATORS`),
    an unknown parameter (listing the rule's parameters) or a bad value.
    """
    return _build(name, params, _AGGREGATOR_CLASSES, "aggregator")


def build_preaggregator(name: str, **params: Any) -> PreAggregator:
    """Construct pre-aggregation step ``name`` (one of :data:`PREAGGREGATORS`).

    Parameters and defaults: ``clip``: ``max_norm`` (required); ``resample``:
    ``s=2``, ``seed=0``; ``bucket``: ``s=2``, ``seed=0``; ``nnm``: none.
    """
    return _build(name, params, _PREAGGREGATOR_CLASSES, "pre-aggregator")


class PipelineOutput(NamedTuple):
    """Result of :meth:`Pipeline.aggregate`.

    vector:         the aggregate ``(d,)``.
    num_byzantine:  the ``f`` handed to the aggregator (after pre-aggregation;
                    ``None`` when no ``f`` was given and the rule needs none).
    mixing:         ``(m, n)`` float64 CPU product of the steps' mixing
                    matrices (identity when there are no steps): row ``i``
                    gives the aggregator's input ``i`` over the clients.
    aggregation:    the aggregator's own output (indices refer to its inputs).
    client_weights: ``aggregation.weights @ mixing`` -- each client's
                    coefficient in the aggregate -- when the rule reports
                    weights, else ``None``.
    stage_byzantine: the Byzantine count after each step, in order.
    """

    vector: Tensor
    num_byzantine: int | None
    mixing: Tensor
    aggregation: AggregationOutput
    client_weights: Tensor | None
    stage_byzantine: tuple[int, ...]


class Pipeline:
    """Pre-aggregation steps followed by an aggregation rule.

    ``aggregate(x, num_byzantine=f)`` runs each step on the previous step's
    output, handing on its Byzantine count, then the aggregator with the
    final count; it returns a :class:`PipelineOutput` tracing the result back
    to the clients. ``__call__`` returns just the vector. ``num_byzantine``
    defaults to the aggregator's build-time ``num_byzantine``.
    """

    def __init__(self, preaggregators: Sequence[PreAggregator], aggregator: Aggregator) -> None:
        for p in preaggregators:
            if not callable(p):
                raise ValueError(f"pipeline step {p!r} is not callable")
        if not isinstance(aggregator, Aggregator):
            raise ValueError(f"pipeline aggregator must be an Aggregator, got {aggregator!r}")
        self.preaggregators = list(preaggregators)
        self.aggregator = aggregator

    def aggregate(self, x: Tensor, *, num_byzantine: int | None = None) -> PipelineOutput:
        """Run the steps and the aggregator on the rows of ``x``."""
        f = check_num_byzantine("pipeline", num_byzantine)
        if f is None:
            f = self.aggregator.num_byzantine
        if f is None and self.preaggregators:
            raise ValueError(
                "pipeline needs num_byzantine (f) for its pre-aggregation steps: pass it to "
                "the call or build the aggregator with num_byzantine"
            )
        n = int(x.shape[0]) if isinstance(x, Tensor) and x.dim() >= 1 else 0
        mixing = torch.eye(n, dtype=torch.float64)
        stages: list[int] = []
        updates = x
        for step in self.preaggregators:
            assert f is not None
            res = step(updates, num_byzantine=f)
            updates, f = res.updates, res.num_byzantine
            step_mix = res.mixing
            if step_mix is None:
                raise ValueError(f"pipeline step {step!r} returned no mixing matrix")
            mixing = step_mix @ mixing
            stages.append(f)
        agg = self.aggregator.aggregate(updates, num_byzantine=f)
        client_weights = None if agg.weights is None else agg.weights @ mixing
        return PipelineOutput(agg.vector, f, mixing, agg, client_weights, tuple(stages))

    def __call__(self, x: Tensor, *, num_byzantine: int | None = None) -> Tensor:
        return self.aggregate(x, num_byzantine=num_byzantine).vector

    def state_dict(self) -> dict[str, Any]:
        """State of every step and of the aggregator."""
        return {
            "preaggregators": [p.state_dict() for p in self.preaggregators],
            "aggregator": self.aggregator.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        steps = state.get("preaggregators")
        if steps is None or len(steps) != len(self.preaggregators) or "aggregator" not in state:
            raise ValueError(
                f"pipeline state must hold 'preaggregators' ({len(self.preaggregators)} "
                "entries) and 'aggregator'"
            )
        for p, s in zip(self.preaggregators, steps, strict=True):
            p.load_state_dict(s)
        self.aggregator.load_state_dict(state["aggregator"])

    def __repr__(self) -> str:
        return f"Pipeline({self.preaggregators!r}, {self.aggregator!r})"


def compose(preaggregators: Sequence[PreAggregator], aggregator: Aggregator) -> Pipeline:
    """``Pipeline(preaggregators, aggregator)``."""
    return Pipeline(preaggregators, aggregator)
