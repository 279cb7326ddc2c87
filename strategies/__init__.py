"""Bastion's robust core: aggregation rules and pre-aggregation steps over ``(n, d)``
update tensors (no Flower imports), and the Flower strategy that applies them.

>>> from strategies import build_aggregator, build_preaggregator, compose
>>> krum = build_aggregator("krum", num_byzantine=2)
>>> pipeline = compose([build_preaggregator("resample", s=2)], krum)

``RobustStrategy`` is imported lazily so that the pure functions stay free of Flower.
"""

from __future__ import annotations

from typing import Any

from strategies.aggregators import AggregationOutput
from strategies.preaggregators import PreAggregationOutput
from strategies.registry import (
    AGGREGATORS,
    PREAGGREGATORS,
    Pipeline,
    PipelineOutput,
    build_aggregator,
    build_preaggregator,
    compose,
)

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
        from strategies.strategy import RobustStrategy

        return RobustStrategy
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")
