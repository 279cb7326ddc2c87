"""Pre-aggregation steps (``strategies/rules/preaggregators.py``) and their
composition (``strategies.rules.registry.Pipeline``): hand-computed cases, the
Byzantine-count rules, mixing matrices, seeding and checkpointing."""

from __future__ import annotations

import math

import pytest
import torch

from strategies.rules.preaggregators import PreAggregationOutput
from strategies.rules.registry import build_aggregator, build_preaggregator, compose


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def randn(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- #
# clip                                                                         #
# --------------------------------------------------------------------------- #
def test_clip_by_hand():
    # (3,4) has norm 5 -> scaled by 1/5 to (0.6, 0.8); (0.3, 0.4) (norm 0.5) kept
    out = build_preaggregator("clip", max_norm=1.0)(t([[3, 4], [0.3, 0.4]]), num_byzantine=1)
    assert isinstance(out, PreAggregationOutput)
    assert torch.allclose(out.updates, t([[0.6, 0.8], [0.3, 0.4]]))
    assert out.num_byzantine == 1
    assert torch.allclose(out.mixing, torch.diag(torch.tensor([0.2, 1.0], dtype=torch.float64)))


def test_clip_bounds_norms():
    x = randn(8, 500) * torch.logspace(-2, 2, 8)[:, None]
    out = build_preaggregator("clip", max_norm=3.0)(x, num_byzantine=0)
    norms = out.updates.double().norm(dim=1)
    assert bool((norms <= 3.0 * (1 + 1e-6)).all())
    small = x.double().norm(dim=1) <= 3.0
    assert torch.equal(out.updates[small], x[small])


# --------------------------------------------------------------------------- #
# resample                                                                     #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(("n", "s"), [(10, 2), (7, 3), (3, 2), (5, 5), (4, 1), (25, 4)])
def test_resample_structure(n, s):
    x = randn(n, 64, seed=n * 10 + s)
    out = build_preaggregator("resample", s=s, seed=3)(x, num_byzantine=1)
    mix = out.mixing
    assert mix.shape == (n, n) and out.updates.shape == (n, 64)
    # each output averages exactly s distinct inputs with weight 1/s
    assert ((mix != 0).sum(dim=1) == s).all()
    assert torch.allclose(mix[mix != 0], torch.full_like(mix[mix != 0], 1.0 / s))
    # each input is used at most s times (with T = n outputs: exactly s times)
    assert ((mix != 0).sum(dim=0) == s).all()
    assert torch.allclose(out.updates.double(), mix @ x.double(), atol=1e-6)
    assert out.num_byzantine == min(s * 1, n)


def test_resample_byzantine_count_rule():
    x = randn(10, 4)
    assert build_preaggregator("resample", s=2)(x, num_byzantine=3).num_byzantine == 6
    assert build_preaggregator("resample", s=4)(x, num_byzantine=3).num_byzantine == 10
    assert build_preaggregator("resample", s=3)(x, num_byzantine=0).num_byzantine == 0


def test_resample_never_gets_stuck_on_small_inputs():
    # n=3, s=2 is the smallest case where the literal draw can run out of
    # distinct inputs; many seeds must all succeed with the exact structure.
    x = randn(3, 2)
    for seed in range(200):
        mix = build_preaggregator("resample", s=2, seed=seed)(x, num_byzantine=0).mixing
        assert ((mix != 0).sum(dim=0) == 2).all() and ((mix != 0).sum(dim=1) == 2).all()


def test_resample_rejects_s_above_n():
    with pytest.raises(ValueError, match="resample needs 1 <= s <= n, got s=4, n=3"):
        build_preaggregator("resample", s=4)(randn(3, 2), num_byzantine=0)


def test_resample_is_seeded_and_uses_fresh_randomness_each_round():
    x = randn(12, 8)
    a = build_preaggregator("resample", s=2, seed=11)
    b = build_preaggregator("resample", s=2, seed=11)
    first_a, first_b = a(x, num_byzantine=1).mixing, b(x, num_byzantine=1).mixing
    assert torch.equal(first_a, first_b)
    assert not torch.equal(a(x, num_byzantine=1).mixing, first_a)


# --------------------------------------------------------------------------- #
# bucket                                                                       #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(("n", "s"), [(10, 2), (10, 3), (7, 7), (5, 9), (6, 1)])
def test_bucket_outputs_are_bucket_means(n, s):
    x = randn(n, 33, seed=n + s)
    out = build_preaggregator("bucket", s=s, seed=5)(x, num_byzantine=2)
    mix = out.mixing
    buckets = math.ceil(n / s)
    assert mix.shape == (buckets, n) and out.updates.shape == (buckets, 33)
    member = mix != 0
    # the buckets partition the inputs
    assert (member.sum(dim=0) == 1).all()
    sizes = member.sum(dim=1).tolist()
    assert sorted(sizes, reverse=True) == [s] * (n // s) + ([n % s] if n % s else [])
    for b in range(buckets):
        idx = torch.nonzero(member[b]).flatten()
        assert torch.allclose(out.updates[b], x[idx].double().mean(0).float(), atol=1e-6)
    assert out.num_byzantine == min(2, buckets)


def test_bucket_byzantine_count_rule():
    x = randn(10, 4)
    assert build_preaggregator("bucket", s=2)(x, num_byzantine=3).num_byzantine == 3
    # 10 inputs in buckets of 4 -> 3 buckets: at most 3 tainted
    assert build_preaggregator("bucket", s=4)(x, num_byzantine=5).num_byzantine == 3


# --------------------------------------------------------------------------- #
# nnm                                                                          #
# --------------------------------------------------------------------------- #
def test_nnm_by_hand():
    # 1-D points 0, 1, 2, 10 with f=1: each output is the mean of the 3 nearest
    # (self included): 0 -> {0,1,2} = 1; 1 -> {1,0,2} = 1; 2 -> {2,1,0} = 1
    # (|2-0| = 2 < |2-10| = 8); 10 -> {10,2,1} = 13/3.
    out = build_preaggregator("nnm")(t([[0], [1], [2], [10]]), num_byzantine=1)
    assert torch.allclose(out.updates, t([[1], [1], [1], [13 / 3]]))
    assert out.num_byzantine == 1
    assert (out.mixing.diagonal() == 1.0 / 3).all()


def test_nnm_precondition():
    with pytest.raises(ValueError, match="nnm needs n > 2f, got n=4, f=2"):
        build_preaggregator("nnm")(randn(4, 3), num_byzantine=2)


def test_nnm_with_f_zero_is_the_mean_everywhere():
    x = randn(6, 10)
    out = build_preaggregator("nnm")(x, num_byzantine=0)
    assert torch.allclose(out.updates, x.mean(0).expand(6, 10), atol=1e-6)


# --------------------------------------------------------------------------- #
# errors, state                                                                #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", ["clip", "resample", "bucket", "nnm"])
def test_preaggregators_need_f_and_2d_input(name):
    params = {"max_norm": 1.0} if name == "clip" else {}
    pre = build_preaggregator(name, **params)
    with pytest.raises(TypeError):
        pre(randn(5, 3))  # num_byzantine is a required keyword
    with pytest.raises(ValueError, match="num_byzantine"):
        pre(randn(5, 3), num_byzantine=-1)
    with pytest.raises(ValueError, match="2-D"):
        pre(torch.zeros(5), num_byzantine=0)


@pytest.mark.parametrize("name", ["clip", "resample", "bucket", "nnm"])
def test_preaggregators_reject_non_finite_rows(name):
    params = {"max_norm": 1.0} if name == "clip" else {}
    x = randn(9, 50)
    x[4, 3] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[4\]"):
        build_preaggregator(name, **params)(x, num_byzantine=1)


@pytest.mark.parametrize("name", ["resample", "bucket"])
def test_randomized_state_round_trip(name):
    x = randn(9, 5)
    a = build_preaggregator(name, seed=1)
    a(x, num_byzantine=1)
    saved = a.state_dict()
    expected = [a(x, num_byzantine=1).mixing for _ in range(3)]
    b = build_preaggregator(name, seed=999)
    b.load_state_dict(saved)
    assert all(torch.equal(b(x, num_byzantine=1).mixing, e) for e in expected)
    with pytest.raises(ValueError, match="generator"):
        b.load_state_dict({})


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("clip", {"max_norm": 0}, "max_norm"),
        ("resample", {"s": 0}, "s"),
        ("bucket", {"s": 1.5}, "int"),
        ("bucket", {"seed": "x"}, "seed"),
    ],
)
def test_bad_parameter_values(name, params, match):
    with pytest.raises(ValueError, match=match):
        build_preaggregator(name, **params)


# --------------------------------------------------------------------------- #
# pipeline                                                                     #
# --------------------------------------------------------------------------- #
def test_pipeline_traces_outputs_to_clients():
    x = randn(10, 40, seed=8)
    x[7] += 100.0  # one Byzantine
    bucket = build_preaggregator("bucket", s=2, seed=0)
    pipe = compose([build_preaggregator("clip", max_norm=1e6), bucket], build_aggregator("krum"))
    out = pipe.aggregate(x, num_byzantine=1)
    assert out.stage_byzantine == (1, 1)
    assert out.num_byzantine == 1
    assert out.mixing.shape == (5, 10)
    # Krum picked one bucket: the client weights are 1/2 on its two members
    assert sorted(out.client_weights[out.client_weights > 0].tolist()) == [0.5, 0.5]
    assert out.client_weights[7] == 0.0  # the outlier's bucket was not picked
    assert torch.allclose(out.vector.double(), out.client_weights @ x.double(), atol=1e-6)


def test_pipeline_equals_manual_chaining_and_checkpoints():
    x = randn(12, 30, seed=9)

    def make():
        return compose(
            [build_preaggregator("resample", s=2, seed=4), build_preaggregator("nnm")],
            build_aggregator("median"),
        )

    pipe = make()
    r1 = build_preaggregator("resample", s=2, seed=4)(x, num_byzantine=2)
    r2 = build_preaggregator("nnm")(r1.updates, num_byzantine=r1.num_byzantine)
    manual = build_aggregator("median")(r2.updates, num_byzantine=r2.num_byzantine)
    out = pipe.aggregate(x, num_byzantine=2)
    assert torch.equal(out.vector, manual)
    assert out.num_byzantine == 4
    assert torch.allclose(out.mixing, r2.mixing @ r1.mixing)
    state = pipe.state_dict()
    nxt = pipe(x, num_byzantine=2)
    other = make()
    other.load_state_dict(state)
    assert torch.equal(other(x, num_byzantine=2), nxt)


def test_pipeline_uses_aggregator_default_f_and_errors_without_one():
    x = randn(9, 6)
    pipe = compose([build_preaggregator("nnm")], build_aggregator("krum", num_byzantine=1))
    assert pipe.aggregate(x).num_byzantine == 1
    with pytest.raises(ValueError, match="pipeline needs num_byzantine"):
        compose([build_preaggregator("nnm")], build_aggregator("median")).aggregate(x)
    # too many Byzantine after resampling: the aggregator's own check fires
    pipe2 = compose([build_preaggregator("resample", s=3)], build_aggregator("krum"))
    with pytest.raises(ValueError, match="krum needs n >= 2f \\+ 3, got n=9, f=6"):
        pipe2(x, num_byzantine=2)


# --------------------------------------------------------------------------- #
# ARC (Allouah et al., ICLR 2025)                                              #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("n", "f", "k"),
    # k = floor(2 (f / n) (n - f)), worked by hand
    [(25, 5, 8), (10, 2, 3), (5, 1, 1), (3, 1, 1), (7, 3, 3), (5, 0, 0), (1, 0, 0)],
)
def test_arc_clips_floor_2f_n_minus_f_over_n_inputs(n, f, k) -> None:
    from strategies.rules.preaggregators import AdaptiveRobustClipping

    assert AdaptiveRobustClipping.clipped_count(n, f) == k


def test_arc_clips_the_largest_to_the_next_largest_norm() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [0.0, 2.0], [30.0, 40.0]])
    # n = 5, f = 1: k = 1; the norm-50 row is clipped to the next largest norm, 10
    out = build_preaggregator("arc")(x, num_byzantine=1)
    expected = x.clone()
    expected[4] = torch.tensor([6.0, 8.0])
    assert torch.allclose(out.updates, expected) and out.num_byzantine == 1
    assert torch.allclose(out.mixing, torch.diag(torch.tensor([1, 1, 1, 1, 0.2]).double()))
    # n = 5, f = 2: k = floor(2 * 2 * 3 / 5) = 2; norms 50 and 10 clipped to 5
    out = build_preaggregator("arc")(x, num_byzantine=2)
    assert torch.allclose(out.updates[4], torch.tensor([3.0, 4.0]))
    assert torch.allclose(out.updates[2], torch.tensor([3.0, 4.0]))
    assert torch.equal(out.updates[[0, 1, 3]], x[[0, 1, 3]])


def test_arc_without_byzantine_changes_nothing() -> None:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    out = build_preaggregator("arc")(x, num_byzantine=0)
    assert torch.equal(out.updates, x)


def test_arc_joins_the_pipeline_after_clip_and_before_nnm() -> None:
    from server.run_config import load_run_config
    from strategies.rules.from_config import pipeline_from_config

    cfg = load_run_config({"arc": True, "nnm": True, "clip-norm": 5.0, "aggregator": "median"})
    assert [s.name for s in pipeline_from_config(cfg).preaggregators] == ["clip", "arc", "nnm"]
