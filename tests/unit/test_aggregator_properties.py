"""Property tests (hypothesis) for the robust aggregation core.

References are independent float64 brute forces written here (direct
pairwise differences, full sorts), never the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies.rules import _kernels as K
from strategies.rules.registry import build_aggregator, build_preaggregator

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(min_value=0, max_value=2**31 - 1)


def gaussian(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@st.composite
def problems(draw, min_n=3, max_n=12, max_d=6, rule_min_n=None):
    """(x, f) with continuous random rows (no ties) and a valid f for the rule."""
    n = draw(st.integers(min_value=min_n, max_value=max_n))
    d = draw(st.integers(min_value=1, max_value=max_d))
    x = gaussian(n, d, draw(seeds)) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return x, n


# f allowed by each rule for a given n
F_MAX = {
    "mean": lambda n: 0,
    "median": lambda n: (n - 1) // 2,
    "trimmed-mean": lambda n: (n - 1) // 2,
    "krum": lambda n: (n - 3) // 2,
    "multi-krum": lambda n: (n - 3) // 2,
    "geometric-median": lambda n: (n - 1) // 2,
    "bulyan": lambda n: (n - 3) // 4,
    "centered-clipping": lambda n: (n - 1) // 2,
}
DETERMINISTIC = list(F_MAX)
TRANSLATION = ["median", "trimmed-mean", "krum", "multi-krum", "geometric-median", "bulyan"]


def _rule(name: str):
    if name == "geometric-median":
        return build_aggregator(name, max_iter=500, tol=0.0)
    return build_aggregator(name)


# --------------------------------------------------------------------------- #
# Brute-force references                                                       #
# --------------------------------------------------------------------------- #
def direct_dists(x: torch.Tensor) -> np.ndarray:
    a = x.double().numpy()
    return ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)


def ref_krum_scores(dist: np.ndarray, f: int, k: int | None = None) -> np.ndarray:
    n = dist.shape[0]
    k = n - f - 2 if k is None else k
    return np.array([np.sort(np.delete(dist[i], i))[:k].sum() for i in range(n)])


def ref_krum_order(dist: np.ndarray, k: int) -> list[int]:
    """Indices by (score, next-nearest distances in increasing order, index)."""
    n = dist.shape[0]
    rows = [np.sort(np.delete(dist[i], i)) for i in range(n)]
    return sorted(range(n), key=lambda i: (rows[i][:k].sum(), list(rows[i][k:]), i))


def ref_bulyan(x: torch.Tensor, f: int) -> tuple[list[int], np.ndarray]:
    dist = direct_dists(x)
    a = x.double().numpy()
    n = a.shape[0]
    theta, beta = n - 2 * f, n - 4 * f
    remaining = list(range(n))
    picks = []
    while len(picks) < theta:
        sub = dist[np.ix_(remaining, remaining)]
        pick = remaining[ref_krum_order(sub, max(1, len(remaining) - f - 2))[0]]
        picks.append(pick)
        remaining.remove(pick)
    sel = a[picks]
    med = np.median(sel, axis=0)
    out = np.empty(a.shape[1])
    for j in range(a.shape[1]):
        order = np.argsort(np.abs(sel[:, j] - med[j]), kind="stable")[:beta]
        out[j] = sel[order, j].mean()
    return picks, out


def gm_objective(x: torch.Tensor, v: torch.Tensor) -> float:
    return float((x.double() - v.double()).norm(dim=1).sum())


def ref_nnm(x: torch.Tensor, f: int) -> np.ndarray:
    dist = direct_dists(x)
    a = x.double().numpy()
    n = a.shape[0]
    out = np.empty_like(a)
    for i in range(n):
        others = [j for j in np.argsort(dist[i], kind="stable") if j != i]
        out[i] = a[[i, *others[: n - f - 1]]].mean(axis=0)
    return out


# --------------------------------------------------------------------------- #
# Invariances                                                                  #
# --------------------------------------------------------------------------- #
@SETTINGS
@given(data=st.data(), name=st.sampled_from(DETERMINISTIC), prob=problems(min_n=7))
def test_permutation_invariance(data, name, prob):
    x, n = prob
    f = data.draw(st.integers(0, F_MAX[name](n)))
    perm = torch.from_numpy(np.random.default_rng(data.draw(seeds)).permutation(n))
    a = _rule(name).aggregate(x, num_byzantine=f)
    b = _rule(name).aggregate(x[perm], num_byzantine=f)
    scale = float(x.abs().max())
    if name in ("median", "krum"):
        assert torch.equal(a.vector, b.vector)
    elif name == "geometric-median":
        # the minimiser need not be unique (e.g. even n in 1-D): compare objectives
        fa, fb = gm_objective(x, a.vector), gm_objective(x, b.vector)
        assert abs(fa - fb) <= 1e-7 * max(fa, fb) + 1e-12 * scale
    else:  # float64 sums in a different order: rounding-level differences
        assert torch.allclose(a.vector, b.vector, rtol=1e-9, atol=1e-9 * scale)
    if name in ("krum", "multi-krum"):
        assert sorted(perm[b.selected].tolist()) == sorted(a.selected.tolist())


@SETTINGS
@given(data=st.data(), name=st.sampled_from(TRANSLATION), prob=problems(min_n=7))
def test_translation_equivariance(data, name, prob):
    x, n = prob
    f = data.draw(st.integers(0, F_MAX[name](n)))
    shift = gaussian(1, x.shape[1], data.draw(seeds))[0] * data.draw(st.sampled_from([1.0, 1e3]))
    a = _rule(name).aggregate(x, num_byzantine=f)
    b = _rule(name).aggregate(x + shift, num_byzantine=f)
    scale = float(x.abs().max()) + float(shift.abs().max())
    if name == "geometric-median":  # compare objectives (minimiser may not be unique)
        fa, fb = gm_objective(x, a.vector), gm_objective(x + shift, b.vector)
        assert abs(fa - fb) <= 1e-7 * max(fa, fb) + 1e-9 * scale
        return
    assert torch.allclose(b.vector, a.vector + shift, rtol=0, atol=1e-9 * scale)
    if a.selected is not None:
        assert torch.equal(a.selected, b.selected)


# --------------------------------------------------------------------------- #
# Robustness to far outliers                                                   #
# --------------------------------------------------------------------------- #
@SETTINGS
@given(
    name=st.sampled_from(["median", "trimmed-mean", "bulyan", "krum", "multi-krum"]),
    n_honest=st.integers(5, 12),
    f=st.integers(1, 3),
    d=st.integers(1, 5),
    seed=seeds,
    magnitude=st.sampled_from([1e2, 1e4, 1e6]),
)
def test_far_outliers_do_not_escape_the_honest_range(name, n_honest, f, d, seed, magnitude):
    n = n_honest + f
    if name == "bulyan" and n < 4 * f + 3:
        n_honest = 4 * f + 3 - f
        n = n_honest + f
    if name in ("krum", "multi-krum") and n < 2 * f + 3:
        n_honest, n = f + 3, 2 * f + 3
    honest = gaussian(n_honest, d, seed, torch.float32)
    outliers = gaussian(f, d, seed + 1, torch.float32)
    outliers = outliers / outliers.norm(dim=1, keepdim=True) * magnitude
    rng = np.random.default_rng(seed)
    order = torch.from_numpy(rng.permutation(n))
    x = torch.cat([honest, outliers])[order]
    is_honest = order < n_honest
    out = build_aggregator(name, num_byzantine=f).aggregate(x)
    lo, hi = honest.min(dim=0).values, honest.max(dim=0).values
    eps = 1e-6 * (1 + float(honest.abs().max()))
    assert bool((out.vector >= lo - eps).all() and (out.vector <= hi + eps).all())
    if name in ("krum", "multi-krum"):
        assert bool(is_honest[out.selected].all())


# --------------------------------------------------------------------------- #
# Agreement with float64 brute force                                           #
# --------------------------------------------------------------------------- #
@SETTINGS
@given(
    prob=problems(min_n=5, max_n=14, max_d=40),
    data=st.data(),
    offset=st.sampled_from([0.0, 10.0, 1e4]),
)
def test_krum_and_multi_krum_match_brute_force(prob, data, offset):
    x, n = prob
    x = (x + offset).float()  # float32 updates sharing a large component
    f = data.draw(st.integers(0, (n - 3) // 2))
    dist = direct_dists(x)
    scores = ref_krum_scores(dist, f)
    order = ref_krum_order(dist, n - f - 2)
    out = build_aggregator("krum", num_byzantine=f).aggregate(x)
    assert out.selected.item() == order[0]
    np.testing.assert_allclose(
        out.scores.numpy(), scores, rtol=1e-9, atol=1e-12 * float(scores.max())
    )
    m = data.draw(st.integers(1, n - f))
    mk = build_aggregator("multi-krum", num_byzantine=f, m=m).aggregate(x)
    best = order[:m]
    assert mk.selected.tolist() == best
    expected = x.double()[best].mean(0)
    assert torch.allclose(mk.vector.double(), expected, rtol=1e-6, atol=1e-6 * (1 + offset))


@SETTINGS
@given(prob=problems(min_n=7, max_n=15, max_d=5), data=st.data())
def test_bulyan_matches_brute_force(prob, data):
    x, n = prob
    f = data.draw(st.integers(0, (n - 3) // 4))
    picks, expected = ref_bulyan(x, f)
    out = build_aggregator("bulyan", num_byzantine=f).aggregate(x)
    assert out.selected.tolist() == picks
    np.testing.assert_allclose(
        out.vector.numpy(), expected, rtol=1e-12, atol=1e-12 * float(x.abs().max())
    )


@SETTINGS
@given(prob=problems(min_n=3, max_n=12, max_d=5), data=st.data())
def test_nnm_matches_brute_force(prob, data):
    x, n = prob
    f = data.draw(st.integers(0, (n - 1) // 2))
    out = build_preaggregator("nnm")(x, num_byzantine=f)
    np.testing.assert_allclose(
        out.updates.numpy(), ref_nnm(x, f), rtol=1e-12, atol=1e-12 * float(x.abs().max())
    )
    assert out.num_byzantine == f


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.sampled_from([1, 7, 1500, 5003]),
    seed=seeds,
    kind=st.sampled_from(["normal", "ties", "wide"]),
    data=st.data(),
)
def test_chunked_median_and_trimmed_mean_equal_full_sort(n, d, seed, kind, data):
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(n, d, generator=g)
    elif kind == "ties":  # many equal values, signed zeros
        x = torch.randint(-2, 3, (n, d), generator=g).float()
        x[x == 0] = -0.0
    else:  # magnitudes from 1e-30 to 1e30
        x = torch.randn(n, d, generator=g) * 10 ** torch.randint(-30, 31, (n, d), generator=g)
    ref = torch.sort(x, dim=0).values
    med = ref[n // 2] if n % 2 else (ref[n // 2 - 1] + ref[n // 2]) / 2
    assert torch.equal(K.coordinate_median(x), med)
    f = data.draw(st.integers(0, (n - 1) // 2))
    kept = ref.double()[f : n - f]
    tm = kept.sum(0).div(n - 2 * f).float()
    ours = K.coordinate_trimmed_mean(x, f)
    if kind != "wide":
        # the float64 sum of the kept values is exact here, so any order gives
        # the same correctly rounded mean
        assert torch.equal(ours, tm)
    else:
        # 60 decades per column: the float64 sum itself rounds, and its order
        # (ours: network order; reference: ascending) can differ at ~1e-16
        # of the largest kept magnitude
        bound = 1e-15 * kept.abs().max(dim=0).values + tm.double().abs() * 2.0**-23
        assert bool(((ours.double() - tm.double()).abs() <= bound).all())


@settings(max_examples=4, deadline=None)
@given(n=st.sampled_from([129, 140]), seed=seeds)
def test_large_n_falls_back_to_sort_with_same_result(n, seed):
    x = torch.randn(n, 300, generator=torch.Generator().manual_seed(seed))
    ref = torch.sort(x, dim=0).values
    med = ref[n // 2] if n % 2 else (ref[n // 2 - 1] + ref[n // 2]) / 2
    assert torch.equal(K.coordinate_median(x), med)
    assert torch.equal(
        K.coordinate_trimmed_mean(x, 10), ref.double()[10 : n - 10].sum(0).div(n - 20).float()
    )


@pytest.mark.parametrize("n", list(range(1, 19)))
def test_sorting_network_sorts_all_zero_one_inputs(n):
    # 0-1 principle (Knuth, TAOCP 5.3.4): a comparator network sorts every
    # input iff it sorts every 0/1 input.
    v = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(np.int8)
    for a, b in K.sorting_network(n):
        lo, hi = np.minimum(v[:, a], v[:, b]), np.maximum(v[:, a], v[:, b])
        v[:, a], v[:, b] = lo, hi
    assert (np.diff(v, axis=1) >= 0).all()


# --------------------------------------------------------------------------- #
# Geometric median optimality                                                  #
# --------------------------------------------------------------------------- #
@SETTINGS
@given(prob=problems(min_n=3, max_n=12, max_d=6))
def test_geometric_median_first_order_optimality(prob):
    x, n = prob
    a = x.double()
    # Input x_k is the minimiser iff || sum_{i != k} unit(x_k - x_i) || <= 1
    # (the non-smooth regime, where Weiszfeld converges sublinearly): skip
    # those and the near-degenerate ones.
    for k in range(n):
        diff = a[k] - torch.cat([a[:k], a[k + 1 :]])
        if float((diff / diff.norm(dim=1, keepdim=True)).sum(0).norm()) < 1.05:
            return
    rule = build_aggregator("geometric-median", max_iter=3000, tol=0.0, nu=1e-12)
    v = rule.aggregate(x).vector.double()
    diff = v - a
    dist = diff.norm(dim=1)
    grad = (diff / dist[:, None]).sum(0)
    assert float(grad.norm()) < 1e-5 * n
    # and it beats the mean and every input as a candidate
    scale = float(dist.max())
    best = gm_objective(x, v)
    assert best <= gm_objective(x, a.mean(0)) + 1e-12 * scale * n
    assert all(best <= gm_objective(x, row) + 1e-12 * scale * n for row in a)


# --------------------------------------------------------------------------- #
# Pre-aggregation structure                                                    #
# --------------------------------------------------------------------------- #
@SETTINGS
@given(n=st.integers(1, 30), data=st.data(), seed=seeds)
def test_resample_mixing_structure(n, data, seed):
    s = data.draw(st.integers(1, n))
    f = data.draw(st.integers(0, n))
    x = gaussian(n, 3, seed)
    out = build_preaggregator("resample", s=s, seed=seed)(x, num_byzantine=f)
    used = out.mixing != 0
    assert bool((used.sum(dim=1) == s).all())  # each output averages exactly s inputs
    assert bool((used.sum(dim=0) <= s).all())  # each input used at most s times
    assert torch.allclose(
        out.mixing[used], torch.full((int(used.sum()),), 1.0 / s, dtype=torch.float64)
    )
    assert torch.allclose(out.updates, out.mixing @ x, rtol=1e-12, atol=1e-12)
    assert out.num_byzantine == min(s * f, n)


@SETTINGS
@given(n=st.integers(1, 30), data=st.data(), seed=seeds)
def test_bucket_mixing_structure(n, data, seed):
    s = data.draw(st.integers(1, n + 2))
    f = data.draw(st.integers(0, n))
    x = gaussian(n, 3, seed)
    out = build_preaggregator("bucket", s=s, seed=seed)(x, num_byzantine=f)
    used = out.mixing != 0
    assert bool((used.sum(dim=0) == 1).all())  # every input in exactly one bucket
    for b in range(out.mixing.shape[0]):
        idx = torch.nonzero(used[b]).flatten()
        assert torch.allclose(out.updates[b], x[idx].mean(0), rtol=1e-12, atol=1e-12)
    assert out.num_byzantine == min(f, -(-n // s))
