"""Client-side DP-SGD (Abadi et al., 2016) with Opacus (Yousefpour et al., 2021) and
whole-run RDP accounting per node (Mironov, 2017): clipping, noise, accounting, the
persistent ledger, the budget, and the unchanged non-DP path."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import _client_data, _training_set
from client.app import train as client_train
from client.privacy import (
    DP_BUDGET_EXHAUSTED,
    LedgerEntry,
    PrivacyLedger,
    PrivateRound,
    epsilon_of,
    ledger_path,
    resolve_dp,
    state_dir,
)
from common.config import ConfigError, NodeConfig, RunConfig, TrainInstructions
from strategies.strategy import RobustStrategy
from task.datasets import ArrayDataset
from task.models import MODELS, build_model
from task.training import train_local, train_local_dp

ROOT = Path(__file__).resolve().parents[2]
RUN_ID = 4242
NUM_PARTITIONS = 3


@pytest.fixture(autouse=True)
def _task_identity():
    # Message() needs a run id; in a real ClientApp Flower sets it.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    yield


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("BASTION_STATE_DIR", str(path))
    return path


def toy(n: int, shape: tuple[int, ...] = (64,), seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    return ArrayDataset(x, rng.integers(0, 10, n).astype(np.int64))


def params_of(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def fresh(dataset: str = "digits") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(dataset)


def independent_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Epsilon from Opacus' own RDPAccountant, stepped once per DP-SGD step."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


# --- DP-SGD itself -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hooks", "ew", "functorch"])
def test_per_sample_gradients_are_clipped_to_c_before_the_noise(mode: str) -> None:
    c = 0.05
    seen: list[tuple[float, float]] = []

    def inspect(opt: Any) -> None:
        # Opacus' raw per-sample gradients of this step, before noise (sigma = 0)
        samples = [p.grad_sample for p in opt.params]
        raw = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in samples], 1).norm(dim=1)
        factor = (c / (raw + 1e-6)).clamp(max=1.0)
        clipped = [factor.view(-1, *[1] * (g.dim() - 1)) * g for g in samples]
        norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in clipped], 1).norm(dim=1)
        for p, g in zip(opt.params, clipped, strict=True):
            # what the optimizer summed is exactly the clipped per-sample gradients ...
            torch.testing.assert_close(p.summed_grad, g.sum(0), rtol=1e-5, atol=1e-7)
            # ... and, without noise, that sum over the expected batch size is the step
            torch.testing.assert_close(p.grad * opt.expected_batch_size, p.summed_grad)
        seen.append((float(raw.max()), float(norms.max())))

    result = train_local_dp(
        fresh(),
        toy(200),
        lr=0.1,
        steps=4,
        batch_size=20,
        noise_multiplier=0.0,
        max_grad_norm=c,
        grad_sample_mode=mode,
        seed=3,
        step_hook=inspect,
    )
    assert result.steps == 4 and len(seen) == 4
    assert max(clipped for _, clipped in seen) <= c * (1 + 1e-5)
    assert max(raw for raw, _ in seen) > 10 * c  # the bound really had to act


@pytest.mark.parametrize("dataset", sorted(MODELS))
def test_every_model_is_one_opacus_can_train(dataset: str) -> None:
    """Opacus' own validator finds nothing to fix (no BatchNorm, no unsupported layer)."""
    from opacus.validators import ModuleValidator

    assert ModuleValidator.validate(build_model(dataset), strict=False) == []


def test_grad_sample_modes_train_the_same_cnn_without_noise() -> None:
    data = toy(48, (1, 28, 28), seed=1)
    trained = {}
    for mode in ("hooks", "ew", "functorch", "ghost", "ghost-conv", "bookkeeping"):
        model = fresh("fashion-mnist")
        train_local_dp(
            model,
            data,
            lr=0.1,
            momentum=0.9,
            steps=3,
            batch_size=16,
            noise_multiplier=0.0,
            max_grad_norm=0.1,
            grad_sample_mode=mode,
            seed=5,
        )
        trained[mode] = params_of(model)
    start = params_of(fresh("fashion-mnist"))
    assert not torch.equal(trained["hooks"], start)
    for mode in ("ew", "functorch", "ghost", "ghost-conv", "bookkeeping"):
        torch.testing.assert_close(trained[mode], trained["hooks"], rtol=1e-4, atol=1e-6)


def test_noise_is_gaussian_with_standard_deviation_sigma_times_c() -> None:
    sigma, c = 2.0, 0.5
    noise: list[torch.Tensor] = []

    def inspect(opt: Any) -> None:
        noise.append(
            torch.cat(
                [(p.grad * opt.expected_batch_size - p.summed_grad).flatten() for p in opt.params]
            )
        )

    train_local_dp(
        fresh(),
        toy(200),
        lr=0.1,
        steps=2,
        batch_size=20,
        noise_multiplier=sigma,
        max_grad_norm=c,
        grad_sample_mode="hooks",
        seed=1,
        step_hook=inspect,
    )
    all_noise = torch.cat(noise)  # 2 x 9,610 draws
    assert float(all_noise.std()) == pytest.approx(sigma * c, rel=0.03)
    assert abs(float(all_noise.mean())) < 0.03


def test_noise_is_secret_unless_a_seed_is_given() -> None:
    def run(seed: int | None) -> torch.Tensor:
        model = fresh()
        train_local_dp(
            model,
            toy(100),
            lr=0.1,
            steps=2,
            batch_size=10,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            seed=seed,
        )
        return params_of(model)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(None), run(None))


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
def test_empty_poisson_batches_still_take_a_noise_only_step(mode: str) -> None:
    model = fresh()
    result = train_local_dp(
        model,
        toy(4),  # q = 1/4: about a third of the batches are empty
        lr=0.1,
        steps=24,
        batch_size=1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
        seed=2,
    )
    assert result.steps == 24 and result.sample_rate == 0.25
    assert 0 < result.empty_batches < 24
    assert torch.isfinite(params_of(model)).all() and np.isfinite(result.mean_loss)
    # Opacus leaves nothing behind on the model: no hooks, no per-sample attributes
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(not hasattr(p, "grad_sample") and p.grad is None for p in model.parameters())


# --- accounting over the whole run ---------------------------------------------------


def dp_run(**overrides: Any) -> RunConfig:
    base = {"dp": True, "local-steps": 5, "batch-size": 20, "num-server-rounds": 4}
    return RunConfig.from_flat(base | overrides)


def node(**overrides: Any) -> NodeConfig:
    flat = {"partition-id": 0, "num-partitions": NUM_PARTITIONS} | overrides
    return NodeConfig.from_flat(flat, source="node config")


def one_round(
    run: RunConfig, ledger_file: Path, server_round: int, data: ArrayDataset
) -> PrivateRound:
    """One round as a fresh ClientApp process would do it: new objects, same file."""
    dp = resolve_dp(run, node())
    assert dp is not None
    instr = TrainInstructions.from_flat(run.train_instructions(server_round) | {"batch-cell": -1})
    private = PrivateRound.plan(
        dp,
        PrivacyLedger(ledger_file),
        server_round=server_round,
        num_examples=len(data),
        batch_size=instr.batch_size,
        epochs=instr.local_epochs,
        steps=instr.local_steps,
        num_rounds=run.num_server_rounds,
    )
    assert private.refusal is None
    private.train(fresh(), data, instr, seed=server_round)
    return private


def test_epsilon_grows_with_rounds_and_matches_an_independent_rdp_accountant(tmp_path) -> None:
    run = dp_run(**{"dp-noise-multiplier": 1.1, "dp-delta": 1e-5})
    data, path = toy(200), tmp_path / "ledger.json"
    epsilons = [one_round(run, path, r, data).metrics()["dp-epsilon"] for r in (1, 2, 3)]
    assert epsilons[0] > 0 and epsilons[0] < epsilons[1] < epsilons[2]
    for r, eps in enumerate(epsilons, start=1):  # q = 20 / 200, 5 steps a round
        assert eps == pytest.approx(independent_epsilon(1.1, 0.1, 5 * r, 1e-5), rel=1e-9)
    saved = json.loads(path.read_text())["entries"]
    assert [(e["round"], e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in saved] == [
        (r, 1.1, 0.1, 5) for r in (1, 2, 3)
    ]


def test_target_epsilon_plans_the_noise_so_the_planned_run_ends_at_the_target(tmp_path) -> None:
    run = dp_run(**{"dp-target-epsilon": 3.0, "num-server-rounds": 4})
    data, path = toy(200), tmp_path / "ledger.json"
    rounds = [one_round(run, path, r, data) for r in (1, 2, 3, 4)]
    sigmas = {p.noise_multiplier for p in rounds}
    assert len(sigmas) == 1 and sigmas != {run.dp_noise_multiplier}  # planned, the same each round
    final = rounds[-1].metrics()["dp-epsilon"]
    assert 3.0 - 0.05 <= final <= 3.0  # at (and never above) the target after the planned rounds
    assert final == pytest.approx(independent_epsilon(sigmas.pop(), 0.1, 4 * 5, 1e-5), rel=1e-9)
    assert rounds[1].metrics()["dp-epsilon"] < final
    # the planned multiplier is kept in the ledger: later rounds do not search again
    assert list(json.loads(path.read_text())["plans"].values()) == [rounds[0].noise_multiplier]


def test_a_planned_noise_multiplier_is_read_back_not_recomputed(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ledger.json"
    sigma = PrivacyLedger(path).planned_noise_multiplier(2.0, 1e-5, 0.05, 100)

    def no_search(*args: Any) -> float:
        raise AssertionError("searched again")

    monkeypatch.setattr("client.privacy.plan_noise_multiplier", no_search)
    assert PrivacyLedger(path).planned_noise_multiplier(2.0, 1e-5, 0.05, 100) == sigma
    with pytest.raises(AssertionError, match="searched again"):  # another plan is searched
        PrivacyLedger(path).planned_noise_multiplier(2.0, 1e-5, 0.05, 200)


def test_ledger_rejects_an_unreadable_file_instead_of_starting_from_zero(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text("{ not json")
    with pytest.raises(RuntimeError, match="unreadable"):
        PrivacyLedger(path)


def test_epsilon_of_an_empty_history_is_zero() -> None:
    assert epsilon_of([], 1e-5) == 0.0
    # a history is composed as a whole: two entries = one entry with their steps
    assert epsilon_of([(1.0, 0.1, 5), (1.0, 0.1, 7)], 1e-5) == pytest.approx(
        epsilon_of([(1.0, 0.1, 12)], 1e-5), rel=1e-12
    )


# --- the ClientApp: restarts, budget, the unchanged non-DP path ----------------------


def train_message(run: RunConfig, server_round: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(fresh().state_dict()),
            "config": ConfigRecord(run.train_instructions(server_round) | {"batch-cell": -1}),
        }
    )
    msg = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = f"m{server_round}-node1"
    return msg


def call_client(run: RunConfig, server_round: int, **node_config: Any) -> Message:
    """The ClientApp's train function as Flower calls it: fresh objects every message."""
    context = Context(
        run_id=RUN_ID,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": NUM_PARTITIONS} | node_config,
        state=RecordDict(),
        run_config=run.to_flat(),
    )
    return client_train(train_message(run, server_round), context)


def client_run(**overrides: Any) -> RunConfig:
    return RunConfig.from_flat({"dp": True, "local-steps": 3} | overrides)


def test_a_restarted_node_keeps_the_epsilon_it_spent(state) -> None:
    run = client_run()
    first = call_client(run, 1).content["metrics"]
    second = call_client(run, 2).content["metrics"]
    sigma, q = second["dp-noise-multiplier"], second["dp-sample-rate"]
    assert second["dp-rounds"] == 2 and second["steps"] == 3
    assert first["dp-epsilon"] < second["dp-epsilon"]
    assert second["dp-epsilon"] == pytest.approx(independent_epsilon(sigma, q, 6, 1e-5), rel=1e-9)
    # A new process (a restarted SuperNode) finds the same spend in the same file.
    path = ledger_path(state, RUN_ID, 0)
    code = (
        "import sys; from client.privacy import PrivacyLedger; "
        "print(repr(PrivacyLedger(sys.argv[1]).epsilon(1e-5)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(out.stdout) == second["dp-epsilon"]
    third = call_client(run, 3).content["metrics"]
    assert third["dp-epsilon"] == pytest.approx(independent_epsilon(sigma, q, 9, 1e-5), rel=1e-9)
    # DP replies leave out the un-noised training loss
    assert "train-loss" not in third and third["dp-delta"] == 1e-5


def test_a_resumed_run_keeps_accounting_in_the_first_attempts_ledger(state) -> None:
    """A resumed ServerApp is a new Flower run; it sends ``ledger-run`` (the first
    attempt's run id), and the node's epsilon covers the rounds before the crash."""
    run = client_run()
    first = call_client(run, 1).content["metrics"]
    msg = train_message(run, 2)
    msg.content["config"]["ledger-run"] = RUN_ID
    context = Context(
        run_id=RUN_ID + 1,  # the resumed run's own id
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": NUM_PARTITIONS},
        state=RecordDict(),
        run_config=run.to_flat(),
    )
    second = client_train(msg, context).content["metrics"]
    sigma, q = second["dp-noise-multiplier"], second["dp-sample-rate"]
    assert second["dp-rounds"] == 2 and first["dp-epsilon"] < second["dp-epsilon"]
    assert second["dp-epsilon"] == pytest.approx(independent_epsilon(sigma, q, 6, 1e-5), rel=1e-9)
    assert not ledger_path(state, RUN_ID + 1, 0).exists()


def test_noise_multiplier_zero_clips_without_noise_and_spends_infinite_epsilon(state) -> None:
    """sigma = 0 is DP-SGD's clipping with no noise: it trains, promises nothing
    (epsilon = inf in the reply, and in every later round), and any finite budget
    refuses it before training."""
    run = client_run(**{"dp-noise-multiplier": 0.0})
    reply = call_client(run, 1).content["metrics"]
    assert reply["dp-noise-multiplier"] == 0.0 and reply["dp-epsilon"] == float("inf")
    # a later noisy round cannot buy the guarantee back
    noisy = call_client(client_run(), 2).content["metrics"]
    assert noisy["dp-rounds"] == 2 and noisy["dp-epsilon"] == float("inf")
    assert epsilon_of([(1.0, 0.1, 5), (0.0, 0.1, 0)], 1e-5) < float("inf")  # 0 steps: nothing
    refused = call_client(client_run(**{"dp-noise-multiplier": 0.0}), 3, **{"dp-max-epsilon": 1e6})
    assert refused.has_error() and "would bring it to inf" in refused.error.reason
    assert len(PrivacyLedger(ledger_path(state, RUN_ID, 0)).entries) == 2


def test_runs_partitions_and_batch_cells_keep_separate_ledgers(tmp_path) -> None:
    paths = {
        ledger_path(tmp_path, 1, 0),
        ledger_path(tmp_path, 2, 0),
        ledger_path(tmp_path, 1, 1),
        ledger_path(tmp_path, 1, 0, batch_cell=3),
    }
    assert len(paths) == 4 and all(p.parent == tmp_path for p in paths)


def test_state_dir_is_node_config_then_environment_then_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BASTION_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BASTION_STATE_DIR", raising=False)
    assert state_dir(node()) == tmp_path / "cache" / "state"
    monkeypatch.setenv("BASTION_STATE_DIR", str(tmp_path / "env"))
    assert state_dir(node()) == tmp_path / "env"
    assert state_dir(node(**{"state-dir": str(tmp_path / "mine")})) == tmp_path / "mine"


def test_budget_exhaustion_replies_with_an_error_the_strategy_rejects(state) -> None:
    run = client_run()
    ok = call_client(run, 1)
    m = ok.content["metrics"]
    eps1 = m["dp-epsilon"]
    eps2 = epsilon_of([(m["dp-noise-multiplier"], m["dp-sample-rate"], 3)] * 2, 1e-5)
    budget = (eps1 + eps2) / 2  # round 1 fits, round 2 would not

    refused = call_client(run, 2, **{"dp-max-epsilon": budget})
    assert refused.has_error() and not refused.has_content()
    assert refused.error.code == DP_BUDGET_EXHAUSTED
    reason = refused.error.reason
    assert "budget exhausted" in reason and f"dp-max-epsilon={budget:g}" in reason
    assert f"epsilon={eps1:.4f}" in reason and f"{eps2:.4f}" in reason and "not training" in reason
    assert len(PrivacyLedger(ledger_path(state, RUN_ID, 0)).entries) == 1  # nothing spent

    # The strategy rejects it with that reason; the round goes on with the other reply.
    strategy = RobustStrategy(min_available_nodes=1, min_train_nodes=1)

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    global_arrays = train_message(run, 2).content["arrays"]
    for msg in strategy.configure_train(2, global_arrays, ConfigRecord(), Grid()):
        # what the Grid's push does: ids (node 1's is the one train_message gives)
        msg.metadata.__dict__["_message_id"] = f"m2-node{msg.metadata.dst_node_id}"
    to_node_2 = train_message(run, 2)
    to_node_2.metadata.__dict__["_message_id"] = "m2-node2"
    to_node_2.metadata.dst_node_id = 2
    accepted = Message(content=ok.content, reply_to=to_node_2)
    new, _ = strategy.aggregate_train(2, [accepted, refused])
    assert new is not None
    diag = {d.status: d for d in strategy.last_round.nodes}
    assert diag["rejected"].reason.startswith(f"error reply (code {DP_BUDGET_EXHAUSTED})")
    assert "budget exhausted" in diag["rejected"].reason
    assert diag["accepted"].dp_epsilon == eps1


def test_budget_action_warn_trains_past_the_budget_and_warns(state, caplog) -> None:
    run = client_run(**{"dp-budget-action": "warn"})
    eps1 = call_client(run, 1).content["metrics"]["dp-epsilon"]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        logging.getLogger("flwr").addHandler(caplog.handler)
        try:
            reply = call_client(run, 2, **{"dp-max-epsilon": eps1 * 1.01})
        finally:
            logging.getLogger("flwr").removeHandler(caplog.handler)
    assert not reply.has_error()
    assert reply.content["metrics"]["dp-epsilon"] > eps1 * 1.01
    assert "training anyway" in caplog.text and "budget exhausted" in caplog.text


def test_without_dp_the_client_trains_bit_for_bit_as_train_local(state) -> None:
    run = RunConfig.from_flat({"local-steps": 4})
    reply = call_client(run, 1)
    sent = reply.content["arrays"].to_torch_state_dict()
    metrics = reply.content["metrics"]
    assert not any(key.startswith("dp-") for key in metrics) and "train-loss" in metrics

    nconf = node()
    data = _training_set(run, nconf, None, _client_data(run, nconf))
    model = fresh()
    instr = run.train_instructions(1)
    result = train_local(
        model,
        data,
        lr=run.lr,
        momentum=run.momentum,
        weight_decay=run.weight_decay,
        epochs=run.local_epochs,
        steps=run.local_steps,
        batch_size=run.batch_size,
        seed=int(instr["round-seed"]) + 0,
    )
    expected = model.state_dict()
    assert list(sent) == list(expected)
    assert all(torch.equal(sent[k], expected[k]) for k in expected)
    assert metrics["train-loss"] == result.mean_loss
    assert not state.exists()  # no ledger without DP


def test_importing_the_apps_does_not_import_opacus() -> None:
    code = (
        "import sys, client.app, server.app, strategies.strategy; "
        "assert 'opacus' not in sys.modules, 'opacus imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)


# --- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("dp-budget-action", "halt", "'stop', 'warn'"),
        (
            "dp-grad-sample-mode",
            "vmap",
            "'hooks', 'ew', 'functorch', 'ghost', 'ghost-conv', 'bookkeeping'",
        ),
        ("dp-delta", 1.5, "< 1"),
        ("dp-noise-multiplier", -0.5, ">= 0"),
        ("dp-max-grad-norm", -1.0, "> 0"),
        ("dp-target-epsilon", -1.0, ">= 0"),
    ],
)
def test_bad_dp_values_name_key_value_and_what_is_allowed(
    key: str, value: Any, allowed: str
) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flat({key: value})
    text = str(err.value)
    assert repr(key) in text and repr(value) in text and allowed in text


def test_a_target_above_the_budget_is_rejected_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"dp-target-epsilon.*dp-max-epsilon"):
        RunConfig.from_flat({"dp-target-epsilon": 8.0, "dp-max-epsilon": 4.0})
    with pytest.raises(ConfigError, match=r"dp-target-epsilon.*dp-max-epsilon"):
        resolve_dp(dp_run(**{"dp-max-epsilon": 4.0}), node(**{"dp-target-epsilon": 8.0}))


def test_node_config_overrides_the_run_configs_dp_keys() -> None:
    assert resolve_dp(RunConfig.from_flat({}), node()) is None
    mine = resolve_dp(
        RunConfig.from_flat({}),
        node(**{"dp": True, "dp-noise-multiplier": 2.5, "dp-budget-action": "warn"}),
    )
    assert mine is not None and mine.noise_multiplier == 2.5 and mine.budget_action == "warn"
    assert mine.grad_sample_mode == RunConfig().dp_grad_sample_mode
    assert resolve_dp(dp_run(), node(dp=False)) is None
    with pytest.raises(ConfigError, match="dp-grad-sample-mode"):
        node(**{"dp-grad-sample-mode": "fast"})


def test_ledger_entry_is_an_rdp_history_entry() -> None:
    entry = LedgerEntry(round=3, noise_multiplier=1.5, sample_rate=0.02, steps=40)
    assert entry.history == (1.5, 0.02, 40)
