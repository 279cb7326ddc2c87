"""dp-check: updates inconsistent with the declared DP-SGD noise (strategies.rules.dpcheck)."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from common.config import ConfigError, NodeConfig, RunConfig
from server.run_config import load_run_config
from strategies.rules.dpcheck import (
    DPCheck,
    DPSGDDeclaration,
    dp_consistency,
    noise_coefficients,
    noise_floor,
    noise_sum_of_squares,
)
from strategies.rules.from_config import dp_check_from_config
from strategies.strategy import RobustStrategy
from task.models import MODELS
from task.training import dp_num_steps, dp_sample_rate, train_local_dp
from tests.unit.test_strategy import FakeGrid, pushed, reply
from tests.unit.test_training import fresh_model, toy_data

D = 184_586  # MnistCNN's parameters, the dimension of docs/PRIVACY.md's sweep
# docs/PRIVACY.md's sweep: 5 local steps, batch 64 of 1,920 examples, lr 0.05, momentum 0.9
SWEEP = DPSGDDeclaration(
    noise_multiplier=1.0,
    max_grad_norm=5.0,
    lr=0.05,
    momentum=0.9,
    weight_decay=0.0,
    batch_size=64,
    local_epochs=1,
    local_steps=5,
)
N_EXAMPLES = 1920


def dp_metrics(decl: DPSGDDeclaration = SWEEP, n: int = N_EXAMPLES, **over) -> dict:
    """The DP metrics an honest node following ``decl`` replies with."""
    values = {
        "num-examples": n,
        "steps": decl.steps(n),
        "dp-noise-multiplier": decl.noise_multiplier,
        "dp-sample-rate": decl.sample_rate(n),
        "dp-epsilon": 1.0,
    }
    return values | over


# ---- the formula ----------------------------------------------------------------------


def test_noise_coefficients_are_torch_sgds_response_to_the_noise() -> None:
    # SGD from p_0 = 0 on gradients that are pure noise: the final delta is exactly
    # sum_t c_t z_t (weight decay and momentum included)
    steps, lr, mu, wd = 7, 0.1, 0.9, 0.05
    z = torch.randn(steps, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    sgd = torch.optim.SGD([p], lr=lr, momentum=mu, weight_decay=wd)
    for t in range(steps):
        p.grad = z[t].clone()
        sgd.step()
    c = torch.tensor(noise_coefficients(steps, lr, mu, wd), dtype=torch.float64)
    assert torch.allclose(p.detach(), c @ z, rtol=1e-12, atol=1e-15)
    assert noise_sum_of_squares(steps, lr, mu, wd) == pytest.approx(float((c**2).sum()), rel=1e-12)


def test_noise_coefficients_without_weight_decay_are_the_geometric_sums() -> None:
    steps, lr, mu = 5, 0.05, 0.9
    want = [-lr * (1 - mu ** (steps - t + 1)) / (1 - mu) for t in range(1, steps + 1)]
    assert noise_coefficients(steps, lr, mu) == pytest.approx(want, rel=1e-12)
    assert noise_coefficients(3, 0.5) == [-0.5, -0.5, -0.5]  # plain SGD: each step once


def test_noise_std_of_the_sweep_by_hand() -> None:
    # s = sigma C / B * sqrt(sum_t c_t^2), c_t = -lr (1 - 0.9^(6-t)) / 0.1
    c = [0.05 * (1 - 0.9**k) / 0.1 for k in range(1, 6)]  # 0.05, 0.095, 0.1355, ...
    s = 1.0 * 5.0 / 64 * math.sqrt(sum(x * x for x in c))
    assert SWEEP.noise_std(N_EXAMPLES) == pytest.approx(s, rel=1e-12)
    assert s == pytest.approx(0.024875, rel=1e-4)
    # the noise norm s sqrt(d): 10.69, what docs/PRIVACY.md's diagnostics showed at sigma 1
    assert s * math.sqrt(D) == pytest.approx(10.687, rel=1e-3)


@pytest.mark.parametrize("n", [1, 5, 63, 64, 65, 100, 1920, 2401])
@pytest.mark.parametrize(("epochs", "steps"), [(1, 0), (3, 0), (1, 5)])
def test_declaration_follows_task_training(n: int, epochs: int, steps: int) -> None:
    decl = DPSGDDeclaration(1.0, 5.0, 0.05, 0.9, 0.0, 64, epochs, steps)
    rate = dp_sample_rate(n, 64)
    assert decl.sample_rate(n) == rate
    assert decl.steps(n) == dp_num_steps(n, 64, epochs=epochs, steps=steps)
    # the expected batch size train_local_dp hands Opacus
    assert decl.expected_batch_size(n) == max(1, round(rate * n))


def test_real_dp_sgd_updates_carry_the_predicted_noise() -> None:
    # Opacus end to end (ghost clipping, momentum and weight decay): each update is
    # at least s^2 d long up to the chi-square's spread, the part that the noise adds
    # (the same batches without noise subtracted) is s^2 d up to that spread, and the
    # check passes the updates
    data = toy_data(256)
    decl = DPSGDDeclaration(1.0, 1.0, 0.1, 0.9, 0.01, 32, 1, 6)
    s = decl.noise_std(len(data))

    def update(sigma: float, seed: int) -> tuple[torch.Tensor, dict]:
        model = fresh_model()
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        result = train_local_dp(
            model,
            data,
            lr=0.1,
            momentum=0.9,
            weight_decay=0.01,
            steps=6,
            batch_size=32,
            noise_multiplier=sigma,
            max_grad_norm=1.0,
            grad_sample_mode="ghost",
            seed=seed,
        )
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        declared = {"steps": result.steps, "dp-sample-rate": result.sample_rate}
        return after - before, dp_metrics(decl, len(data)) | declared

    noisy = [update(1.0, seed) for seed in range(4)]
    x = torch.stack([row for row, _ in noisy]).double()
    noise = x - torch.stack([update(0.0, seed)[0] for seed in range(4)]).double()
    d = x.shape[1]
    spread = 5 * math.sqrt(2 / d)  # five chi-square standard deviations
    whole = (x.norm(dim=1) ** 2 / (s * s * d)).tolist()
    added = (noise.norm(dim=1) ** 2 / (s * s * d)).tolist()
    assert all(r > 1 - spread for r in whole), whole
    assert all(abs(r - 1) < spread for r in added), added
    assert DPCheck(decl).reasons(x.float(), [m for _, m in noisy]) == [None] * 4


def test_every_model_entry_is_a_trained_parameter() -> None:
    # the noise lives in the trainable parameters; the check takes d = the update's length
    for name, cls in MODELS.items():
        model = cls()
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trained == sum(v.numel() for v in model.state_dict().values()), name


def test_noise_floor_is_below_the_exact_chi_square_quantile() -> None:
    stats = pytest.importorskip("scipy.stats")
    for d in (1_000, D):
        for a in (1e-3, 1e-6, 1e-9):
            floor = noise_floor(d, a)
            assert 0 < floor < stats.chi2.ppf(a, d)
    # at the sweep's size the floor is 2% under d: squared norms 0.98 s^2 d and up pass
    assert noise_floor(D, 1e-6 / 55) / D == pytest.approx(0.98, abs=0.005)
    assert noise_floor(10, 1e-6) == 0.0  # too few dimensions to tell anything


# ---- the check on simulated rounds ----------------------------------------------------


def honest_round(n: int, s: float, gen: torch.Generator, signal_norm: float = 0.35) -> torch.Tensor:
    """n honest DP updates: a signal (a shared direction plus a client-specific mix of
    4 directions; norm ``signal_norm``, by default about what MnistCNN's updates had
    without noise), plus N(0, s^2 I) each."""
    basis = torch.randn(5, D, generator=gen)
    basis /= basis.norm(dim=1, keepdim=True)
    mix = torch.cat([torch.ones(n, 1), 0.5 * torch.randn(n, 4, generator=gen)], dim=1)
    signal = mix @ basis
    signal *= signal_norm / signal.norm(dim=1, keepdim=True)
    return signal.add_(torch.randn(n, D, generator=gen), alpha=s)


def test_honest_rounds_are_never_rejected_at_the_default_alpha() -> None:
    # 200 rounds of 10 honest updates at MnistCNN's d (2,000 norm and 9,000 pair tests);
    # the signals range from MnistCNN's (3% of the noise norm) to as long as the noise
    gen = torch.Generator().manual_seed(0)
    s = SWEEP.noise_std(N_EXAMPLES)
    rejected = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~1 MB per kernel call: thread hand-offs cost more (2-core box)
    try:
        for draw in range(200):
            signal = (0.35, 3.5, 10.0)[draw % 3]
            x = honest_round(10, s, gen, signal)
            rejected += sum(r is not None for r in dp_consistency(x, [s] * 10, alpha=1e-6))
    finally:
        torch.set_num_threads(threads)
    assert rejected == 0


def test_ipm_copies_are_too_short_for_their_noise() -> None:
    gen = torch.Generator().manual_seed(1)
    s = SWEEP.noise_std(N_EXAMPLES)
    honest = honest_round(8, s, gen)
    ipm = (-0.1 * honest.mean(dim=0)).expand(5, D)  # five attackers, one vector
    x = torch.cat([honest, ipm])
    reasons = dp_consistency(x, [s] * 13, alpha=1e-6)
    assert reasons[:8] == [None] * 8
    for reason in reasons[8:]:
        assert reason is not None and "is below" in reason and "the least a DP-SGD update" in reason


def test_copies_that_carry_one_noise_draw_are_near_duplicates() -> None:
    # five attackers agree on IPM plus ONE draw of the right noise: long enough, but at
    # distance 0 from each other
    gen = torch.Generator().manual_seed(2)
    s = SWEEP.noise_std(N_EXAMPLES)
    honest = honest_round(8, s, gen)
    shared = -0.1 * honest.mean(dim=0) + s * torch.randn(D, generator=gen)
    x = torch.cat([honest, shared.expand(5, D)])
    reasons = dp_consistency(x, [s] * 13, alpha=1e-6, labels=[f"node {i}" for i in range(13)])
    assert reasons[:8] == [None] * 8
    assert all(r is not None and "near-duplicate of node" in r for r in reasons[8:])
    assert "and 3 more" in str(reasons[8])


def test_a_mimic_and_its_original_are_both_dropped() -> None:
    # nothing tells the copy from the original: both go (the attacker trades itself for
    # one honest node; honest minus Byzantine stays the same)
    gen = torch.Generator().manual_seed(3)
    s = SWEEP.noise_std(N_EXAMPLES)
    honest = honest_round(8, s, gen)
    x = torch.cat([honest, honest[3:4]])
    labels = [f"node {i}" for i in range(9)]
    reasons = dp_consistency(x, [s] * 9, alpha=1e-6, labels=labels)
    assert [i for i, r in enumerate(reasons) if r is not None] == [3, 8]
    assert "near-duplicate of node 8" in str(reasons[3])
    assert "near-duplicate of node 3" in str(reasons[8])
    assert "both of such a pair are dropped" in str(reasons[8])


def test_an_attacker_with_fresh_noise_of_the_declared_scale_passes() -> None:
    # the documented limit: the check sees noise, not intent
    gen = torch.Generator().manual_seed(4)
    s = SWEEP.noise_std(N_EXAMPLES)
    honest = honest_round(8, s, gen)
    ipm = -0.1 * honest.mean(dim=0) + s * torch.randn(2, D, generator=gen)
    assert dp_consistency(torch.cat([honest, ipm]), [s] * 10, alpha=1e-6) == [None] * 10


def test_short_rows_take_no_part_in_the_pair_test() -> None:
    # a zero update is ~1 noise norm from every honest one, under the pair floor of
    # ~sqrt(2) noise norms; it must not drag honest updates out as "near-duplicates"
    gen = torch.Generator().manual_seed(5)
    s = SWEEP.noise_std(N_EXAMPLES)
    x = torch.cat([honest_round(6, s, gen), torch.zeros(1, D)])
    reasons = dp_consistency(x, [s] * 7, alpha=1e-6)
    assert reasons[:6] == [None] * 6 and "is below" in str(reasons[6])


# ---- the reply's own DP metrics -------------------------------------------------------


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        ({"num-examples": N_EXAMPLES}, "declares no DP-SGD"),
        (dp_metrics(**{"dp-noise-multiplier": 0.5}), "dp-noise-multiplier = 0.5"),
        (dp_metrics(steps=2), "steps = 2"),
        (dp_metrics(**{"dp-sample-rate": 0.5}), "dp-sample-rate = 0.5"),
    ],
)
def test_a_reply_whose_dp_metrics_disagree_with_the_run_is_rejected(metrics, match) -> None:
    check = DPCheck(SWEEP)
    gen = torch.Generator().manual_seed(6)
    x = honest_round(4, SWEEP.noise_std(N_EXAMPLES), gen)
    reasons = check.reasons(x, [dp_metrics()] * 3 + [metrics])
    assert reasons[:3] == [None] * 3
    assert reasons[3] is not None and match in reasons[3]


def test_noise_scale_follows_the_nodes_data_size() -> None:
    # a node with fewer examples than the batch size divides by its size: more noise
    decl = DPSGDDeclaration(1.0, 5.0, 0.05, 0.9, 0.0, 64, 1, 5)
    assert decl.noise_std(32) == pytest.approx(2 * decl.noise_std(1920))
    check = DPCheck(decl)
    gen = torch.Generator().manual_seed(7)
    x = honest_round(3, decl.noise_std(1920), gen)
    x[2] = decl.noise_std(32) * torch.randn(D, generator=gen)
    metrics = [dp_metrics(decl), dp_metrics(decl), dp_metrics(decl, 32)]
    assert check.reasons(x, metrics) == [None] * 3
    # the same small node's update judged by a big node's scale passes too (longer); a
    # big node's update claimed by a small node does not (too short for its noise)
    metrics[0] = dp_metrics(decl, 32)
    reasons = check.reasons(x, metrics)
    assert reasons[0] is not None and "is below" in reasons[0]


# ---- the run config -------------------------------------------------------------------


DP_RUN = {"dp": True, "dp-noise-multiplier": 1.0, "dp-max-grad-norm": 5.0, "local-steps": 5}


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ({"dp-check": True}, "when 'dp' is false"),
        (DP_RUN | {"dp-check": True, "dp-noise-multiplier": 0.0}, "'dp-noise-multiplier' is 0"),
        (DP_RUN | {"dp-check": True, "dp-target-epsilon": 8.0}, "'dp-target-epsilon' is 8"),
    ],
)
def test_dp_check_without_known_noise_is_refused(values, why) -> None:
    with pytest.raises(ConfigError) as info:
        load_run_config(values)
    text = str(info.value)
    assert "key 'dp-check': value True is not allowed" in text and why in text
    assert "allowed: false, or true with dp = true" in text


def test_dp_check_from_config() -> None:
    assert dp_check_from_config(RunConfig()) is None
    check = dp_check_from_config(
        load_run_config(DP_RUN | {"dp-check": True, "dp-check-alpha": 1e-4, "lr": 0.05})
    )
    assert check is not None and check.alpha == 1e-4
    assert check.declaration == DPSGDDeclaration(1.0, 5.0, 0.05, 0.9, 0.0, 32, 5, 5)


def test_a_node_cannot_set_the_servers_check() -> None:
    node = NodeConfig.from_flat(
        {"partition-id": 0, "num-partitions": 2, "dp-check": True, "dp-noise-multiplier": 2.0}
    )
    assert node.overrides == {"dp-noise-multiplier": 2.0}


# ---- in the strategy ------------------------------------------------------------------


@pytest.fixture
def _task_identity():
    # Message() needs a run id; in a real ServerApp Flower sets it.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


@pytest.mark.usefixtures("_task_identity")
def test_strategy_rejects_inconsistent_replies_with_reasons_and_goes_on() -> None:
    dim = 60_000
    decl = SWEEP
    s = decl.noise_std(N_EXAMPLES)
    gen = torch.Generator().manual_seed(8)
    honest = (0.01 * torch.randn(dim, generator=gen)) + s * torch.randn(6, dim, generator=gen)
    ipm = -0.1 * honest.mean(dim=0)
    base = OrderedDict(w=np.zeros(dim, np.float32))
    strategy = RobustStrategy(
        min_available_nodes=1, min_train_nodes=1, dp_check=DPCheck(decl, alpha=1e-6)
    )
    record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in base.items()))
    pushed(strategy.configure_train(1, record, ConfigRecord(), FakeGrid(list(range(1, 10)))))
    replies = [reply(i + 1, {"w": honest[i].numpy()}, dp_metrics()) for i in range(6)]
    replies += [
        reply(7 + k, {"w": ipm.numpy()}, dp_metrics(malicious=1)) for k in range(2)
    ]  # IPM: too short
    replies.append(reply(9, {"w": honest[0].numpy()}, dp_metrics(malicious=1)))  # mimic of 1
    outcome = strategy.train_round(1, replies)
    nodes = {d.node_id: d for d in outcome.replies}
    assert outcome.arrays is not None and outcome.aggregation_error is None
    assert {i for i, d in nodes.items() if d.status == "rejected"} == {1, 7, 8, 9}
    assert "is below" in nodes[7].reason and nodes[7].malicious
    assert nodes[7].update_norm == pytest.approx(float(ipm.norm()), rel=1e-5)
    assert "near-duplicate of node 9" in nodes[1].reason
    assert "near-duplicate of node 1" in nodes[9].reason
    assert outcome.summary.num_accepted == 5 and outcome.summary.num_rejected == 4
    # the aggregate (mean) is the mean of honest updates 2..6
    want = honest[1:6].mean(dim=0).numpy()
    got = outcome.arrays["w"].numpy()
    assert np.allclose(got, want, atol=1e-5)
