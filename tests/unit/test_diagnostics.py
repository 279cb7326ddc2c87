"""The pure per-client diagnostics (strategies.rules.diagnostics), each checked against
an independent calculation (numpy float64, or the definition worked by hand)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from strategies import build_aggregator, compose
from strategies.rules.aggregators import AggregationOutput
from strategies.rules.diagnostics import (
    client_attribution,
    geometry_to_aggregate,
    malicious_influence,
    update_norm_problem,
)
from strategies.rules.registry import PipelineOutput


def _geometry_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    gen = torch.Generator().manual_seed(seed)
    deltas = torch.randn((5, 40), generator=gen, dtype=torch.float32)
    aggregate = torch.randn(40, generator=gen, dtype=torch.float32) * 0.5
    norms = torch.linalg.vector_norm(deltas, dim=1).tolist()
    return deltas, aggregate, norms


def test_cosines_and_distances_match_numpy_in_float64() -> None:
    deltas, aggregate, norms = _geometry_inputs()
    got = geometry_to_aggregate(deltas, aggregate, norms)
    u, a = deltas.numpy().astype(np.float64), aggregate.numpy().astype(np.float64)
    assert got.norm == pytest.approx(np.linalg.norm(a), rel=1e-12)
    want_cos = u @ a / (np.linalg.norm(u, axis=1) * np.linalg.norm(a))
    want_dist = np.linalg.norm(u - a, axis=1)
    assert got.cosines == pytest.approx(want_cos.tolist(), rel=1e-5)
    assert got.distances == pytest.approx(want_dist.tolist(), rel=1e-5)


def test_a_row_equal_to_the_aggregate_has_cosine_one_and_distance_near_zero() -> None:
    deltas, aggregate, _ = _geometry_inputs(1)
    deltas[2] = aggregate
    norms = torch.linalg.vector_norm(deltas, dim=1).tolist()
    got = geometry_to_aggregate(deltas, aggregate, norms)
    assert got.cosines[2] == pytest.approx(1.0, abs=1e-6)
    # |u|^2 + |a|^2 - 2 u.a in float32 dot products: exact to ~1e-3 |u|
    assert got.distances[2] == pytest.approx(0.0, abs=1e-3 * norms[2])


def test_a_zero_aggregate_has_no_cosines_and_distances_equal_to_the_norms() -> None:
    deltas, _, norms = _geometry_inputs(2)
    got = geometry_to_aggregate(deltas, torch.zeros(40), norms)
    assert got.norm == 0.0
    assert got.cosines == [None] * 5
    assert got.distances == pytest.approx(norms, rel=1e-12)


def _output(
    n: int,
    *,
    mixing: torch.Tensor | None = None,
    selected: list[int] | None = None,
    scores: list[float] | None = None,
    weights: list[float] | None = None,
) -> PipelineOutput:
    mix = torch.eye(n, dtype=torch.float64) if mixing is None else mixing
    rule_weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)
    aggregation = AggregationOutput(
        torch.zeros(3),
        None if selected is None else torch.tensor(selected, dtype=torch.int64),
        None if scores is None else torch.tensor(scores, dtype=torch.float64),
        rule_weights,
    )
    client_weights = None if rule_weights is None else rule_weights @ mix
    return PipelineOutput(torch.zeros(3), 1, mix, aggregation, client_weights, ())


def test_without_mixing_selection_and_scores_are_the_clients() -> None:
    got = client_attribution(_output(4, selected=[2, 0], scores=[4.0, 3.0, 2.0, 1.0]), 4)
    assert got.weights is None
    assert got.selected == [True, False, True, False]
    assert got.scores == [4.0, 3.0, 2.0, 1.0]


def test_after_mixing_a_client_is_selected_when_its_weight_is_not_zero() -> None:
    # two buckets: (client 0 + client 1) / 2 and (client 2 + client 3) / 2; the rule
    # takes the second bucket
    mixing = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]], dtype=torch.float64)
    out = _output(4, mixing=mixing, selected=[1], scores=[9.0, 1.0], weights=[0.0, 1.0])
    got = client_attribution(out, 4)
    assert got.weights == [0.0, 0.0, 0.5, 0.5]
    assert got.selected == [False, False, True, True]
    assert got.scores is None  # the scores are the buckets', not the clients'


def test_a_mixed_rule_without_weights_attributes_no_selection() -> None:
    mixing = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    got = client_attribution(_output(2, mixing=mixing, selected=[0]), 2)
    assert got == (None, None, None)


def test_the_mean_through_a_real_pipeline_weighs_each_client_one_nth() -> None:
    out = compose([], build_aggregator("mean")).aggregate(torch.randn(4, 6))
    got = client_attribution(out, 4)
    assert got.weights == pytest.approx([0.25] * 4)
    assert got.selected is None and got.scores is None


def test_malicious_influence_is_the_share_of_absolute_weight() -> None:
    # |0.5| + |-0.25| + |0.25| = 1; the malicious client holds 0.25 of it
    assert malicious_influence([False, True, False], [0.5, -0.25, 0.25], None) == 0.25
    assert malicious_influence([True, True], [0.0, 0.0], None) is None


def test_malicious_influence_without_weights_is_the_malicious_share_of_the_selected() -> None:
    # selected: clients 0, 1, 3; of these only client 0 is malicious
    got = malicious_influence([True, False, True, False], None, [True, True, False, True])
    assert got == pytest.approx(1 / 3)
    assert malicious_influence([True], None, [False]) is None
    assert malicious_influence([True], None, None) is None


def test_a_finite_update_within_the_limit_has_no_problem() -> None:
    row = torch.tensor([3.0, 4.0])
    assert update_norm_problem(row, 5.0, 5.0) is None
    assert update_norm_problem(row, 5.0, 0.0) is None  # 0: no limit


def test_non_finite_values_are_counted_by_kind() -> None:
    row = torch.tensor([math.nan, math.inf, -math.inf, -math.inf, 1.0])
    got = update_norm_problem(row, math.nan, 1e6)
    assert got == "non-finite update: 1 NaN, 1 +Inf, 2 -Inf values"


def test_a_norm_over_the_limit_is_reported_with_the_limit() -> None:
    assert update_norm_problem(torch.tensor([30.0, 40.0]), 50.0, 10.0) == (
        "update norm 50 exceeds max-update-norm 10"
    )


def test_a_float32_overflow_gets_its_float64_norm() -> None:
    row = torch.full((3,), 1e30, dtype=torch.float32)
    norm32 = float(torch.linalg.vector_norm(row))
    assert norm32 == math.inf  # (1e30)^2 overflows float32
    want = math.sqrt(3) * float(np.float32(1e30))
    assert update_norm_problem(row, norm32, 0.0) == (
        f"update norm {want:.4g} overflows float32 (values too large)"
    )
    assert update_norm_problem(row, norm32, 1e6) == (
        f"update norm {want:.4g} exceeds max-update-norm 1e+06"
    )


def test_the_module_imports_no_flower() -> None:
    code = (
        "import sys, strategies.rules.diagnostics; "
        "sys.exit(any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
