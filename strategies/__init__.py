"""Bastion's robust aggregation: the pure rules (:mod:`strategies.rules`) and the
Flower strategy that applies them to replies (:mod:`strategies.strategy`).

>>> from strategies import build_aggregator, build_preaggregator, compose
>>> krum = build_aggregator("krum", num_byzantine=2)
>>> pipeline = compose([build_preaggregator("resample", s=2)], krum)
>>> from strategies import RobustStrategy       # imports Flower

``RobustStrategy`` is resolved on first use (PEP 562 ``__getattr__``): importing
Flower's server side costs about 0.6 s and pulls gRPC and protobuf, which the rules
(benchmarks, notebooks, the client's attack math) do not need, so ``import
strategies`` and ``import strategies.rules`` stay free of Flower.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from strategies.rules import (
    AGGREGATORS,
    PREAGGREGATORS,
    AggregationOutput,
    Pipeline,
    PipelineOutput,
    PreAggregationOutput,
    build_aggregator,
    build_preaggregator,
    compose,
)

if TYPE_CHECKING:
    from strategies.strategy import RobustStrategy

__all__ = [
    "AGGREGATORS",
    "PREAGGREGATORS",
    "AggregationOutput",
    "Pipeline",
    "PipelineOutput",
    "PreAggregationOutput",
    "RobustStrategy",
    "build_aggregator",
    "build_preaggregator",
    "compose",
]


def __getattr__(name: str) -> Any:
    if name == "RobustStrategy":
        # measured import cost (see the module docstring): only on first use
        from strategies.strategy import RobustStrategy

        return RobustStrategy
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")
