"""The robust rules: aggregation rules and pre-aggregation steps over ``(n, d)`` tensors.

Pure functions and small stateful objects over ``torch.Tensor`` rows, one row per
client update; nothing here imports Flower (an import-linter contract in
``pyproject.toml`` and ``tests/unit/test_layers.py`` keep it so). The Flower
strategy that applies them to replies is :mod:`strategies.strategy`, beside this
package.

>>> from strategies.rules import build_aggregator, build_preaggregator, compose
>>> pipeline = compose([build_preaggregator("bucket", s=2)], build_aggregator("krum"))
"""

from __future__ import annotations

from strategies.rules.aggregators import AggregationOutput, Aggregator
from strategies.rules.preaggregators import PreAggregationOutput, PreAggregator
from strategies.rules.registry import (
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
    "Aggregator",
    "Pipeline",
    "PipelineOutput",
    "PreAggregationOutput",
    "PreAggregator",
    "build_aggregator",
    "build_preaggregator",
    "compose",
]
