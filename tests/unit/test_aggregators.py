"""Hand-computed cases, precondition errors and the registry for the robust
aggregation rules in ``strategies/rules/aggregators.py`` and ``strategies/rules/registry.py``.

Every expected number below is worked out by hand (shown in the comments) or by
an independent float64 brute force written in this file.
"""

from __future__ import annotations

import pytest
import torch

from strategies.rules import _kernels as K
from strategies.rules.aggregators import AggregationOutput
from strategies.rules.registry import (
    AGGREGATORS,
    PREAGGREGATORS,
    build_aggregator,
    build_preaggregator,
)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --------------------------------------------------------------------------- #
# Mean                                                                         #
# --------------------------------------------------------------------------- #
def test_mean_unweighted_and_weighted_by_hand():
    x = t([[1, 2], [3, 4], [5, 0]])
    mean = build_aggregator("mean")
    assert torch.equal(mean(x), t([3, 2]))
    # weights 1,1,2 -> (1 + 3 + 2*5)/4 = 3.5, (2 + 4 + 0)/4 = 1.5
    out = mean.aggregate(x, weights=torch.tensor([1.0, 1.0, 2.0]))
    assert torch.equal(out.vector, t([3.5, 1.5]))
    assert torch.allclose(out.weights, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0, -1.0, 1.0], "non-negative"),
        ([1.0, float("nan"), 1.0], "finite"),
        ([0.0, 0.0, 0.0], "positive sum"),
        ([1.0, 1.0], "n=3"),
    ],
)
def test_mean_rejects_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        build_aggregator("mean")(t([[1], [2], [3]]), weights=torch.tensor(weights))


def test_mean_keeps_precision_with_large_common_component():
    # float32 rows 1e4 + {0, 1e-3 * k}: the exact mean offset is 1e-3 * 2 = 2e-3.
    base = 1e4
    x = torch.tensor([[base + 1e-3 * k] for k in range(5)], dtype=torch.float64).float()
    expected = x.double().mean(0).float()
    assert torch.equal(build_aggregator("mean")(x), expected)


# --------------------------------------------------------------------------- #
# Median and trimmed mean                                                      #
# --------------------------------------------------------------------------- #
def test_median_odd_by_hand():
    # column 0: {1, 3, 2} -> 2 ; column 1: {5, -1, 0} -> 0
    assert torch.equal(build_aggregator("median")(t([[1, 5], [3, -1], [2, 0]])), t([2, 0]))


def test_median_even_is_mean_of_middle_pair():
    # {1, 2, 10, 4}: middle values 2 and 4 -> 3 (torch.median would say 2)
    x = t([[1], [2], [10], [4]])
    assert torch.equal(build_aggregator("median")(x), t([3]))
    assert float(x.median(dim=0).values) == 2.0


def test_median_single_row_is_that_row():
    x = t([[1.5, -2.0, 7.0]])
    assert torch.equal(build_aggregator("median")(x), x[0])


def test_trimmed_mean_by_hand():
    # n=5, f=1: column {10, -100, 1, 2, 3} drops -100 and 10 -> mean(1, 2, 3) = 2
    # column {0, 0, 6, 6, 3} drops one 0 and one 6 -> mean(0, 3, 6) = 3
    x = t([[10, 0], [-100, 0], [1, 6], [2, 6], [3, 3]])
    assert torch.equal(build_aggregator("trimmed-mean", num_byzantine=1)(x), t([2, 3]))
    # f = 0 is the plain mean
    assert torch.equal(build_aggregator("trimmed-mean")(x, num_byzantine=0), x.mean(0))


# --------------------------------------------------------------------------- #
# Krum / Multi-Krum                                                            #
# --------------------------------------------------------------------------- #
# p0=(0,0) p1=(1,0) p2=(0,2) p3=(4,0) p4=(20,20); squared distances:
# d01=1 d02=4 d03=16 d04=800 d12=5 d13=9 d14=761 d23=20 d24=724 d34=656
# f=1 -> n-f-2 = 2 nearest others:
# s0 = 1+4 = 5, s1 = 1+5 = 6, s2 = 4+5 = 9, s3 = 9+16 = 25, s4 = 656+724 = 1380
KRUM_POINTS = [[0, 0], [1, 0], [0, 2], [4, 0], [20, 20]]
KRUM_SCORES = [5.0, 6.0, 9.0, 25.0, 1380.0]


def test_krum_scores_and_pick_by_hand():
    out = build_aggregator("krum", num_byzantine=1).aggregate(t(KRUM_POINTS))
    assert isinstance(out, AggregationOutput)
    assert torch.allclose(out.scores, torch.tensor(KRUM_SCORES, dtype=torch.float64))
    assert out.scores.dtype == torch.float64 and out.scores.device.type == "cpu"
    assert out.selected.tolist() == [0]
    assert out.selected.dtype == torch.int64
    assert torch.equal(out.vector, t([0, 0]))
    assert out.weights.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_multi_krum_by_hand():
    x = t(KRUM_POINTS)
    # default m = n - f = 4: best four are p0..p3 -> mean (1.25, 0.5)
    out = build_aggregator("multi-krum", num_byzantine=1).aggregate(x)
    assert out.selected.tolist() == [0, 1, 2, 3]
    assert torch.allclose(out.vector, t([1.25, 0.5]))
    # m = 2: p0, p1 -> (0.5, 0)
    out2 = build_aggregator("multi-krum", num_byzantine=1, m=2).aggregate(x)
    assert out2.selected.tolist() == [0, 1]
    assert torch.allclose(out2.vector, t([0.5, 0.0]))
    assert out2.weights.tolist() == [0.5, 0.5, 0.0, 0.0, 0.0]


def test_multi_krum_rejects_m_above_n_minus_f():
    with pytest.raises(ValueError, match=r"multi-krum needs 1 <= m <= n - f, got m=5, n=5, f=1"):
        build_aggregator("multi-krum", num_byzantine=1, m=5)(t(KRUM_POINTS))


def _direct_sq_dists64(x: torch.Tensor) -> torch.Tensor:
    """Brute-force float64 pairwise squared distances, no Gram trick."""
    x64 = x.double()
    return torch.stack([((x64 - row) ** 2).sum(dim=1) for row in x64])


def _krum_pick(dist: torch.Tensor, f: int) -> int:
    n = dist.shape[0]
    masked = dist.clone()
    masked.fill_diagonal_(float("inf"))
    scores = masked.sort(dim=1).values[:, : n - f - 2].sum(1)
    return int(scores.argmin())


def test_naive_float32_gram_trick_picks_wrong_where_ours_matches_float64():
    """Realistic large-offset case: full weights of norm 50, honest deltas of
    norm 1e-3..1e-2, four identical Byzantine vectors. The float32 Gram trick
    on the full weights (what a naive implementation does) produces negative
    squared distances and a different Krum pick; ours equals the float64
    brute force both on the full weights and on the deltas."""
    g = torch.Generator().manual_seed(0)
    d, n_honest, f = 20_000, 15, 4
    w0 = torch.randn(d, generator=g, dtype=torch.float64)
    w0 *= 50 / w0.norm()
    norms = torch.linspace(1e-3, 1e-2, n_honest, dtype=torch.float64)
    honest = torch.randn(n_honest, d, generator=g, dtype=torch.float64)
    honest *= (norms / honest.norm(dim=1))[:, None]
    byz = torch.randn(d, generator=g, dtype=torch.float64)
    byz *= 5e-3 / byz.norm()
    weights = (w0 + torch.cat([honest, byz.expand(f, d)])).float()

    reference = _krum_pick(_direct_sq_dists64(weights), f)

    gram32 = weights @ weights.T
    sq = gram32.diagonal()
    naive = sq[:, None] + sq[None, :] - 2 * gram32
    assert (naive < 0).any()
    assert _krum_pick(naive.double(), f) != reference

    krum = build_aggregator("krum", num_byzantine=f)
    assert krum.aggregate(weights).selected.item() == reference
    deltas = weights - w0.float()
    assert krum.aggregate(deltas).selected.item() == _krum_pick(_direct_sq_dists64(deltas), f)


@pytest.mark.parametrize(("n", "d"), [(9, 3001), (19, 20_000), (60, 9_000)])
def test_centered_gram_distances_match_float64_with_offset(n, d):
    # covers the plain, the batched and the block-triangular Gram paths
    g = torch.Generator().manual_seed(1)
    x = (1e3 + 1e-2 * torch.randn(n, d, generator=g, dtype=torch.float64)).float()
    ours = K.sq_dists_from_gram(K.centered_gram(x))
    ref = _direct_sq_dists64(x)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- #
# Bulyan                                                                       #
# --------------------------------------------------------------------------- #
def test_bulyan_selection_and_output_by_hand():
    # 1-D values 0,1,2,3,4,100,-100; n=7, f=1: theta=5, beta=3.
    # Round 1 (|R|=7, 4 neighbours): scores 30,15,10,15,30,big,big -> pick 2
    # Round 2 (|R|=6, 3 nb): 0:1+9+16=26, 1:1+4+9=14, 3:1+4+9=14, 4:26. Tie 1 vs 3
    #   broken by the next-nearest distances: 1 -> (99^2, 101^2), 3 -> (97^2, 103^2);
    #   9409 < 9801 -> pick 3
    # Round 3 (|R|=5, 2 nb): 0:1+16=17, 1:1+9=10, 4:9+16=25 -> pick 1
    # Round 4 (|R|=4, max(1, 1)=1 nb): 0:16, 4:16, tie -> next: 0 -> 100^2,
    #   4 -> 96^2 -> pick 4
    # Round 5 (|R|=3, 1 nb): 0, 100, -100 all score 100^2; next: 0 -> 100^2,
    #   +-100 -> 200^2 -> pick 0
    # Coordinate phase on {0,1,2,3,4}: median 2, 3 closest {1,2,3} -> 2
    x = t([[0], [1], [2], [3], [4], [100], [-100]])
    out = build_aggregator("bulyan", num_byzantine=1).aggregate(x)
    assert out.selected.tolist() == [2, 3, 1, 4, 0]
    assert torch.equal(out.vector, t([2]))
    assert torch.allclose(out.scores[:5], torch.tensor([30.0, 15, 10, 15, 30], dtype=torch.float64))


def test_bulyan_coordinate_phase_by_hand():
    # theta = 5 selected rows, f = 1 -> beta = 3 values closest to the median
    # col 0: {0,1,2,3,7}    med 2, keep {1,2,3}       -> 2
    # col 1: {0,10,11,12,30} med 11, keep {10,11,12}  -> 11
    # col 2: {1,2,3,4,10}   med 3, keep {2,3,4}       -> 3
    # col 3: {-5,0,1,1.5,2} med 1, keep {1,1.5} + tie 0 vs 2 (both at 1): the
    #        larger is dropped -> {0,1,1.5} -> 2.5/3
    # col 4: {9,-4,0,4,-9}  med 0, keep {-4,0,4}      -> 0
    cols = [
        [0, 1, 2, 3, 7],
        [0, 10, 11, 12, 30],
        [1, 2, 3, 4, 10],
        [-5, 0, 1, 1.5, 2],
        [9, -4, 0, 4, -9],
    ]
    x = t(cols).T.contiguous()
    out = K.bulyan_coordinate_phase(x, torch.arange(5), 1)
    assert torch.allclose(out, t([2, 11, 3, 2.5 / 3, 0]))


def _greedy_closest_window_mean(values: list[float], f: int) -> float:
    """Drop 2f times whichever end of the sorted values is farther from their
    median (an exact tie drops the larger value), then average what is left."""
    v = sorted(values)
    m = len(v)
    med = v[(m - 1) // 2] if m % 2 else (v[m // 2 - 1] + v[m // 2]) / 2
    lo, hi = 0, m - 1
    for _ in range(2 * f):
        if med - v[lo] > v[hi] - med:
            lo += 1
        else:
            hi -= 1
    return sum(v[lo : hi + 1]) / (hi - lo + 1)


@pytest.mark.parametrize("theta,f", [(5, 1), (6, 1), (9, 2), (12, 2), (13, 3), (20, 4)])
def test_bulyan_coordinate_phase_matches_greedy_with_many_ties(theta, f):
    # small integers make ties between the two ends (and duplicates) common
    gen = torch.Generator().manual_seed(theta * 31 + f)
    x = torch.randint(-4, 5, (theta + 3, 4000), generator=gen).float()
    selected = torch.randperm(theta + 3, generator=gen)[:theta]
    out = K.bulyan_coordinate_phase(x, selected, f)
    sel = x[selected].T.tolist()
    expected = torch.tensor([_greedy_closest_window_mean(col, f) for col in sel])
    assert torch.allclose(out.double(), expected.double(), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- #
# Geometric median                                                             #
# --------------------------------------------------------------------------- #
def test_geometric_median_one_dimensional_is_median():
    # In 1-D the geometric median of {0, 1, 2, 100, 101} is the median, 2.
    x = t([[0], [1], [2], [100], [101]])
    out = build_aggregator("geometric-median", max_iter=1000).aggregate(x)
    assert abs(float(out.vector[0]) - 2.0) < 1e-3
    assert torch.isclose(out.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_geometric_median_symmetric_cross_is_centre():
    # (+-1, 0), (0, +-1) and (0, 0): by symmetry the minimiser is the origin.
    x = t([[1, 0], [-1, 0], [0, 1], [0, -1], [0, 0]])
    assert torch.allclose(build_aggregator("geometric-median")(x), t([0, 0]), atol=1e-5)


def test_geometric_median_resists_one_huge_outlier():
    # Three points at (0,0), (1,0), (0,1) plus one at 1e6: the mean is dragged
    # to ~2.5e5 but the geometric median stays in the unit square.
    x = t([[0, 0], [1, 0], [0, 1], [1e6, 1e6]])
    v = build_aggregator("geometric-median")(x)
    assert bool((v.abs() <= 1.0).all())


# --------------------------------------------------------------------------- #
# Centered clipping                                                            #
# --------------------------------------------------------------------------- #
def test_centered_clipping_two_rounds_by_hand():
    # tau = 1, one iteration, v0 = 0:
    #   (3,4) has norm 5 -> clipped to (0.6,0.8); (0.3,0.4) has norm 0.5 -> kept
    #   v1 = ((0.6,0.8) + (0.3,0.4)) / 2 = (0.45, 0.6)
    # round 2 from v1 with the same inputs:
    #   (3,4) - v1 = (2.55, 3.4), norm 4.25 -> (0.6, 0.8)
    #   (0.3,0.4) - v1 = (-0.15,-0.2), norm 0.25 -> kept
    #   v2 = v1 + ((0.6,0.8) + (-0.15,-0.2)) / 2 = (0.675, 0.9)
    x = t([[3, 4], [0.3, 0.4]])
    cc = build_aggregator("centered-clipping", tau=1.0)
    out1 = cc.aggregate(x)
    assert torch.allclose(out1.vector, t([0.45, 0.6]))
    assert torch.allclose(out1.scores, torch.tensor([5.0, 0.5], dtype=torch.float64))
    # output = sum_i weights_i x_i (v0 = 0): weights (0.2/2, 1/2)
    assert torch.allclose(out1.weights, torch.tensor([0.1, 0.5], dtype=torch.float64))
    assert torch.allclose(cc(x), t([0.675, 0.9]))


def test_centered_clipping_adaptive_radius_by_hand():
    # v0 = 0; distances 3, 4, 1 -> median 3.
    # c = 1: tau = 3, (0,4) is clipped to (0,3): v = ((3,0) + (0,3) + (-1,0)) / 3
    x = t([[3, 0], [0, 4], [-1, 0]])
    cc = build_aggregator("centered-clipping", radius_scale=1.0)
    assert torch.allclose(cc(x), t([2 / 3, 1.0]))
    assert cc.last_radius == pytest.approx(3.0)
    # c = 0.5: tau = 1.5, (3,0) -> (1.5,0), (0,4) -> (0,1.5), (-1,0) kept
    cc = build_aggregator("centered-clipping", radius_scale=0.5)
    assert torch.allclose(cc(x), t([0.5 / 3, 0.5]))
    # two iterations: the second median is taken around the new centre
    # v1 = (2/3, 1); distances to v1: |(7/3,-1)| = sqrt(58)/3, |(-2/3,3)| = sqrt(85)/3,
    # |(-5/3,-1)| = sqrt(34)/3 -> median sqrt(58)/3: only the second row is clipped
    cc = build_aggregator("centered-clipping", radius_scale=1.0, iterations=2)
    v1 = t([2 / 3, 1.0])
    r = (58**0.5) / 3
    second = (x[1] - v1) * (r / (85**0.5 / 3))
    expected = v1 + ((x[0] - v1) + second + (x[2] - v1)) / 3
    assert torch.allclose(cc(x), expected)
    assert cc.last_radius == pytest.approx(r)


def test_centered_clipping_adaptive_radius_follows_the_scale():
    # the fixed radius is the mean for small updates and clips large ones; the
    # adaptive one gives the same answer at every scale (it is scale-equivariant)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 30, generator=g, dtype=torch.float64)
    for factor in (1e-3, 1.0, 1e3):
        fixed = build_aggregator("centered-clipping", tau=10.0)(x * factor)
        adaptive = build_aggregator("centered-clipping", radius_scale=1.0)(x * factor)
        assert torch.allclose(
            adaptive, build_aggregator("centered-clipping", radius_scale=1.0)(x) * factor
        )
        if factor < 1:
            assert torch.allclose(fixed, (x * factor).mean(0))  # never clips
    # attackers far away cannot raise the radius: it stays between honest distances
    honest = torch.randn(7, 30, generator=g, dtype=torch.float64)
    attack = torch.full((3, 30), 1e6, dtype=torch.float64)
    cc = build_aggregator("centered-clipping", radius_scale=1.0, num_byzantine=3)
    out = cc(torch.cat([honest, attack]))
    norms = honest.norm(dim=1)
    assert float(norms.min()) <= cc.last_radius <= float(norms.max())
    # each attacker moves the centre by at most radius / n
    r = cc.last_radius
    clipped = honest * torch.clamp(r / norms, max=1.0)[:, None]
    assert float((out - clipped.sum(0) / 10).norm()) <= 3 * r / 10 + 1e-9


def test_centered_clipping_radius_scale_is_checked():
    with pytest.raises(ValueError, match="radius_scale"):
        build_aggregator("centered-clipping", radius_scale=-1.0)


def test_centered_clipping_state_dict_round_trip():
    g = torch.Generator().manual_seed(3)
    rounds = [torch.randn(6, 40, generator=g) * 3 for _ in range(3)]
    a = build_aggregator("centered-clipping", tau=2.0, iterations=3)
    a(rounds[0])
    saved = a.state_dict()
    expected = [a(rounds[1]), a(rounds[2])]
    b = build_aggregator("centered-clipping", tau=2.0, iterations=3)
    b.load_state_dict(saved)
    assert torch.equal(b(rounds[1]), expected[0])
    assert torch.equal(b(rounds[2]), expected[1])
    # a fresh rule (no history) starts from zero and differs
    assert not torch.equal(build_aggregator("centered-clipping", tau=2.0)(rounds[1]), expected[0])


def test_centered_clipping_rejects_changed_dimension():
    cc = build_aggregator("centered-clipping")
    cc(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"d=4.*d=5"):
        cc(torch.zeros(3, 5))
    cc.reset()
    assert torch.equal(cc(torch.ones(3, 5)), torch.ones(5))


# --------------------------------------------------------------------------- #
# Preconditions and input checks                                               #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("name", "n", "f", "requirement"),
    [
        ("krum", 5, 2, "n >= 2f + 3"),
        ("multi-krum", 6, 2, "n >= 2f + 3"),
        ("bulyan", 10, 2, "n >= 4f + 3"),
        ("trimmed-mean", 4, 2, "n > 2f"),
        ("median", 6, 3, "n > 2f"),
        ("geometric-median", 4, 2, "n > 2f"),
        ("centered-clipping", 2, 1, "n > 2f"),
    ],
)
def test_precondition_errors_name_rule_n_and_f(name, n, f, requirement):
    with pytest.raises(ValueError) as info:
        build_aggregator(name)(torch.zeros(n, 3), num_byzantine=f)
    msg = str(info.value)
    assert msg == f"{name} needs {requirement}, got n={n}, f={f}"


@pytest.mark.parametrize("name", ["trimmed-mean", "krum", "multi-krum", "bulyan"])
def test_rules_that_need_f_say_so(name):
    with pytest.raises(ValueError, match=f"{name} needs num_byzantine"):
        build_aggregator(name)(torch.zeros(9, 2))


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(3), "2-D"),
        (torch.zeros(2, 3, 4), "2-D"),
        (torch.zeros(0, 3), "n=0"),
        (torch.zeros(3, 0), "d=0"),
        (torch.zeros(3, 2, dtype=torch.int64), "floating"),
    ],
)
def test_bad_shapes_and_dtypes_are_rejected(name, x, match):
    with pytest.raises(ValueError, match=match):
        build_aggregator(name, num_byzantine=0)(x)


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rows_are_named(name, bad):
    x = torch.randn(11, 3000, generator=torch.Generator().manual_seed(0))
    x[7, 2500] = bad
    with pytest.raises(ValueError, match=r"rows \[7\]"):
        build_aggregator(name, num_byzantine=1)(x)


@pytest.mark.parametrize("name", [a for a in AGGREGATORS if a != "mean"])
def test_robust_rules_refuse_weights(name):
    with pytest.raises(ValueError, match="client-reported sample counts"):
        build_aggregator(name, num_byzantine=1)(torch.zeros(9, 2), weights=torch.ones(9))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_num_byzantine_is_rejected(bad):
    with pytest.raises(ValueError, match="num_byzantine"):
        build_aggregator("krum", num_byzantine=bad)
    with pytest.raises(ValueError, match="num_byzantine"):
        build_aggregator("median")(torch.zeros(5, 2), num_byzantine=bad)


def test_inputs_are_not_modified():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(11, 2000, generator=g)
    before = x.clone()
    for name in AGGREGATORS:
        build_aggregator(name, num_byzantine=2)(x)
    for name in PREAGGREGATORS:
        params = {"max_norm": 1.0} if name == "clip" else {}
        build_preaggregator(name, **params)(x, num_byzantine=2)
    assert torch.equal(x, before)


def test_output_dtype_follows_input():
    x = torch.randn(9, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for name in AGGREGATORS:
        assert build_aggregator(name, num_byzantine=1)(x).dtype == torch.float64


# --------------------------------------------------------------------------- #
# Registry                                                                     #
# --------------------------------------------------------------------------- #
def test_registry_names_are_the_ones_the_run_config_accepts():
    # The run config's allowed rule names derive from the registry: every registered
    # rule is accepted, and a name that is not registered is refused with the list.
    from common.config import ConfigError
    from server.run_config import load_run_config

    assert len(set(AGGREGATORS)) == 8
    for name in AGGREGATORS:
        assert load_run_config({"aggregator": name}).aggregator == name
    with pytest.raises(ConfigError) as err:
        load_run_config({"aggregator": "krun"})
    assert "'krun'" in str(err.value) and all(repr(n) in str(err.value) for n in AGGREGATORS)
    # the order a pipeline runs its steps in
    assert PREAGGREGATORS == ("clip", "arc", "nnm", "resample", "bucket")


def test_unknown_aggregator_lists_names():
    with pytest.raises(ValueError) as info:
        build_aggregator("krumm")
    for name in AGGREGATORS:
        assert name in str(info.value)


def test_unknown_preaggregator_lists_names():
    with pytest.raises(ValueError) as info:
        build_preaggregator("shuffle")
    for name in PREAGGREGATORS:
        assert name in str(info.value)


def test_unknown_parameter_names_rule_parameter_and_accepted():
    with pytest.raises(ValueError) as info:
        build_aggregator("geometric-median", iterations=5)
    msg = str(info.value)
    assert "geometric-median" in msg and "'iterations'" in msg
    for accepted in ("num_byzantine", "max_iter", "nu", "tol"):
        assert accepted in msg
    with pytest.raises(ValueError, match=r"'bucket' has no parameter 'size'.*s, seed"):
        build_preaggregator("bucket", size=2)


def test_missing_required_parameter():
    with pytest.raises(ValueError, match=r"clip.*needs parameter.*max_norm"):
        build_preaggregator("clip")


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("geometric-median", {"max_iter": 0}, "max_iter"),
        ("geometric-median", {"nu": -1}, "nu"),
        ("centered-clipping", {"tau": 0}, "tau"),
        ("centered-clipping", {"iterations": 1.5}, "int"),
        ("multi-krum", {"m": 0}, "m"),
    ],
)
def test_bad_parameter_values(name, params, match):
    with pytest.raises(ValueError, match=match):
        build_aggregator(name, **params)


def test_call_time_num_byzantine_overrides_build_time():
    x = t([*KRUM_POINTS, [2, 2]])  # n = 6
    krum = build_aggregator("krum", num_byzantine=2)  # needs n >= 7
    with pytest.raises(ValueError, match="n=6, f=2"):
        krum(x)
    out = krum.aggregate(x, num_byzantine=1)  # 6 >= 5: fine
    assert out.selected.numel() == 1
    assert krum.num_byzantine == 2  # the build-time default is kept
    tm = build_aggregator("trimmed-mean", num_byzantine=0)
    assert torch.equal(tm(t([[0], [1], [100]]), num_byzantine=1), t([1]))


def test_aggregators_are_stateless_except_centered_clipping():
    for name in AGGREGATORS:
        rule = build_aggregator(name)
        if name == "centered-clipping":
            assert rule.state_dict() == {"previous": None}
        else:
            assert rule.state_dict() == {}
            rule.load_state_dict({})
            with pytest.raises(ValueError):
                rule.load_state_dict({"junk": 1})


# --------------------------------------------------------------------------- #
# CUDA (run on a GPU host; skipped here)                                       #
# --------------------------------------------------------------------------- #
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(13, 70_001, generator=g)
    x[:2] += 5.0
    xc = x.cuda()
    for name in AGGREGATORS:
        cpu = build_aggregator(name, num_byzantine=2).aggregate(x)
        gpu = build_aggregator(name, num_byzantine=2).aggregate(xc)
        assert gpu.vector.device.type == "cuda" and gpu.vector.dtype == x.dtype
        if name in ("median", "trimmed-mean", "krum"):
            assert torch.equal(gpu.vector.cpu(), cpu.vector), name
        else:
            assert torch.allclose(gpu.vector.cpu(), cpu.vector, rtol=1e-5, atol=1e-6), name
        if cpu.selected is not None:
            assert torch.equal(gpu.selected, cpu.selected), name
    # centered clipping with the radius that follows the data (median on the device)
    cpu_cc = build_aggregator("centered-clipping", radius_scale=1.0, iterations=3)
    gpu_cc = build_aggregator("centered-clipping", radius_scale=1.0, iterations=3)
    for _ in range(2):  # two rounds: the second starts from the first's aggregate
        expected, got = cpu_cc(x), gpu_cc(xc)
        assert got.device.type == "cuda"
        assert torch.allclose(got.cpu(), expected, rtol=1e-5, atol=1e-6)
        assert gpu_cc.last_radius == pytest.approx(cpu_cc.last_radius, rel=1e-9)
    for name in PREAGGREGATORS:
        params = {"max_norm": 50.0} if name == "clip" else {}
        cpu = build_preaggregator(name, **params)(x, num_byzantine=2)
        gpu = build_preaggregator(name, **params)(xc, num_byzantine=2)
        assert torch.allclose(gpu.updates.cpu(), cpu.updates, rtol=1e-5, atol=1e-6), name
        if name in ("clip", "arc"):
            # diag(scale) from float64 norms reduced on the device: GPU and CPU sum in
            # another order, so they agree to float64 rounding, not bit for bit
            assert torch.allclose(gpu.mixing, cpu.mixing, rtol=1e-12, atol=0.0), name
        else:  # drawn from the step's CPU generator, or exact averages: bit-equal
            assert torch.equal(gpu.mixing, cpu.mixing), name
