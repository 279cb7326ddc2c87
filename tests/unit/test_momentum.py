"""Client momentum (task.momentum, client.momentum): the rule on hand-computed vectors,
its state file across a simulated restart, one state per (run, cell, partition), and
the ClientApp's replies (honest, attacker, beta = 0 unchanged)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import _client_data
from client.app import train as client_train
from client.momentum import MomentumStore, momentum_path, states_to_keep
from client.privacy import ledger_path
from common.config import NodeConfig, RunConfig
from task.models import build_model
from task.momentum import WorkerMomentum, debiased, momentum_reply, momentum_step
from task.training import train_local

RUN_ID = 4343
BETA = 0.5
# three rounds: the global model each round receives, and the node's update in it
GLOBALS = ([1.0, 1.0], [0.0, 2.0], [-1.0, 0.0])
DELTAS = ([2.0, -4.0], [4.0, 0.0], [0.0, 8.0])
# by hand, beta = 0.5: m_t = 0.5 m_{t-1} + 0.5 delta_t from m_0 = 0
M = ([1.0, -2.0], [2.5, -1.0], [1.25, 3.5])
# m_t / (1 - 0.5^t): divided by 0.5, 0.75, 0.875
M_HAT = ([2.0, -4.0], [10 / 3, -4 / 3], [10 / 7, 4.0])


def vec(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def states(server_round: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Round ``server_round``'s global and trained state dicts (a float array ``w`` and an
    integer buffer ``n``, which the trained model advanced from 3 to 5)."""
    g = vec(GLOBALS[server_round - 1])
    received = {"w": g, "n": torch.tensor(3)}
    trained = {"w": g + vec(DELTAS[server_round - 1]), "n": torch.tensor(5)}
    return received, trained


# --- the rule ------------------------------------------------------------------------


@pytest.mark.parametrize("bias_correction", [True, False])
def test_three_rounds_match_the_hand_computed_momentum(bias_correction: bool) -> None:
    previous = None
    for r in (1, 2, 3):
        received, trained = states(r)
        reply, previous = momentum_reply(
            received,
            trained,
            beta=BETA,
            previous=previous,
            server_round=r,
            bias_correction=bias_correction,
        )
        step = M_HAT[r - 1] if bias_correction else M[r - 1]
        torch.testing.assert_close(previous.m["w"], vec(M[r - 1]), rtol=0, atol=1e-15)
        torch.testing.assert_close(reply["w"], received["w"] + vec(step), rtol=0, atol=1e-15)
        assert reply["n"].item() == 5  # sent as trained
        assert reply["w"].dtype == torch.float64
        assert (previous.t, previous.server_round, list(previous.m)) == (r, r, ["w"])
    # the corrected first step is the update itself; uncorrected it is (1 - beta) of it
    first, _ = momentum_reply(*states(1), beta=0.9, previous=None, server_round=1)
    torch.testing.assert_close(first["w"], states(1)[1]["w"])


def test_the_pieces_and_their_bounds() -> None:
    assert torch.equal(momentum_step(None, vec([2.0]), 0.75), vec([0.5]))
    assert torch.equal(momentum_step(vec([4.0]), vec([2.0]), 0.75), vec([3.5]))
    assert torch.equal(debiased(vec([0.5]), 0.75, 1), vec([2.0]))
    with pytest.raises(ValueError, match="beta"):
        momentum_step(None, vec([1.0]), 1.0)
    with pytest.raises(ValueError, match="t must be >= 1"):
        debiased(vec([1.0]), 0.5, 0)


def test_a_momentum_of_another_model_or_beta_cannot_continue() -> None:
    _, kept = momentum_reply(*states(1), beta=BETA, previous=None, server_round=1)
    assert kept.matches(states(2)[0], BETA) is None
    assert "client-momentum 0.5" in str(kept.matches(states(2)[0], 0.9))
    assert "arrays" in str(kept.matches({"v": vec([0.0, 0.0])}, BETA))
    assert "(3,)" in str(kept.matches({"w": vec([0.0, 0.0, 0.0])}, BETA))
    with pytest.raises(ValueError, match="cannot continue"):
        momentum_reply(*states(2), beta=0.9, previous=kept, server_round=2)


# --- the state file --------------------------------------------------------------------


def test_a_restarted_node_continues_from_the_stored_momentum(tmp_path) -> None:
    path = momentum_path(tmp_path, RUN_ID, 0)
    for r in (1, 2):
        MomentumStore(path).reply(*states(r), beta=BETA, server_round=r)
    # a new process (a restarted SuperNode): a new store object, the same file
    stored = MomentumStore(path).load()
    assert stored is not None and (stored.t, stored.server_round, stored.beta) == (2, 2, BETA)
    torch.testing.assert_close(stored.m["w"], vec(M[1]), rtol=0, atol=1e-15)
    reply = MomentumStore(path).reply(*states(3), beta=BETA, server_round=3)
    torch.testing.assert_close(reply["w"], vec(GLOBALS[2]) + vec(M_HAT[2]), rtol=0, atol=1e-15)
    assert MomentumStore(path).load().t == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left


def test_a_node_that_missed_rounds_continues_with_t_plus_one(tmp_path) -> None:
    store = MomentumStore(momentum_path(tmp_path, RUN_ID, 0))
    store.reply(*states(1), beta=BETA, server_round=1)
    # not sampled in rounds 2-6: round 7 is its second update, t = 2
    store.reply(*states(2), beta=BETA, server_round=7)
    kept = store.load()
    assert (kept.t, kept.server_round) == (2, 7)
    torch.testing.assert_close(kept.m["w"], vec(M[1]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("content", [b"", b"not a torch file", "torn"])
def test_an_unusable_file_is_set_aside_and_the_node_starts_afresh(
    tmp_path, caplog, content: bytes | str
) -> None:
    path = momentum_path(tmp_path, RUN_ID, 0)
    store = MomentumStore(path)
    store.reply(*states(1), beta=BETA, server_round=1)
    if content == "torn":  # the first half of a real state file
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    else:
        path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        reply = store.reply(*states(2), beta=BETA, server_round=2)
    assert "unusable" in caplog.text and "starts afresh" in caplog.text
    assert path.with_name(path.name + ".unusable").exists()
    torch.testing.assert_close(reply["w"], states(2)[1]["w"])  # t = 1: the raw update
    assert store.load().t == 1


def test_a_file_of_another_beta_is_set_aside(tmp_path, caplog) -> None:
    store = MomentumStore(momentum_path(tmp_path, RUN_ID, 0))
    store.reply(*states(1), beta=BETA, server_round=1)
    with caplog.at_level(logging.WARNING):
        store.reply(*states(2), beta=0.9, server_round=2)
    assert "client-momentum 0.5" in caplog.text
    assert (store.load().t, store.load().beta) == (1, 0.9)


def test_runs_cells_and_partitions_keep_separate_momenta(tmp_path) -> None:
    keys = [(1, 0, -1), (2, 0, -1), (1, 1, -1), (1, 0, 3), (1, 0, 4)]
    paths = [momentum_path(tmp_path, run, pid, cell) for run, pid, cell in keys]
    assert len(set(paths)) == len(keys)
    # the DP ledger's name rule, another kind of file in the same directory
    assert {p.parent for p in paths} == {tmp_path}
    assert ledger_path(tmp_path, 1, 0, 3) == tmp_path / "privacy-run-1-cell-3-partition-0.json"
    assert paths[3] == tmp_path / "momentum-run-1-cell-3-partition-0.pt"
    for i, path in enumerate(paths):  # each its own updates: i + 1 times the first
        received, trained = states(1)
        trained = {"w": received["w"] + (i + 1) * vec(DELTAS[0]), "n": trained["n"]}
        MomentumStore(path).reply(received, trained, beta=BETA, server_round=1)
    MomentumStore(paths[0]).reply(*states(2), beta=BETA, server_round=2)
    for i, path in enumerate(paths):
        kept = MomentumStore(path).load()
        assert kept.t == (2 if i == 0 else 1)
        if i:
            torch.testing.assert_close(kept.m["w"], (i + 1) * vec(M[0]), rtol=0, atol=1e-15)


def test_the_file_holds_m_t_and_its_round(tmp_path) -> None:
    path = momentum_path(tmp_path, RUN_ID, 0)
    older = WorkerMomentum(m={"w": vec([2.0])}, t=3, server_round=7, beta=0.5)
    MomentumStore(path).save(
        WorkerMomentum(m={"w": vec([1.0])}, t=4, server_round=9, beta=0.5), earlier=[older]
    )
    data = torch.load(path, weights_only=True)
    assert (data["version"], data["t"], data["round"], data["beta"]) == (2, 4, 9, 0.5)
    assert torch.equal(data["m"]["w"], vec([1.0]))
    assert [(e["t"], e["round"]) for e in data["earlier"]] == [(3, 7)]
    assert torch.equal(data["earlier"][0]["m"]["w"], vec([2.0]))


def test_a_version_1_file_continues_as_a_one_state_history(tmp_path) -> None:
    path = momentum_path(tmp_path, RUN_ID, 0)
    torch.save({"version": 1, "beta": BETA, "t": 1, "round": 1, "m": {"w": vec(M[0])}}, path)
    reply = MomentumStore(path).reply(*states(2), beta=BETA, server_round=2)
    torch.testing.assert_close(reply["w"], vec(GLOBALS[1]) + vec(M_HAT[1]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("keep", [2, 3])
def test_a_replayed_round_is_folded_in_once(tmp_path, caplog, keep: int) -> None:
    """Rounds 1, 2, 3, then a resumed ServerApp sends round 3 again (checkpoint of
    round 2) and round 2 again (keep = 3: a checkpoint of round 1): each replay
    continues from the state before it, so the replies are the hand-computed ones of a
    run that never stopped."""
    path = momentum_path(tmp_path, RUN_ID, 0)
    for r in (1, 2, 3):
        MomentumStore(path).reply(*states(r), beta=BETA, server_round=r, keep=keep)
    assert [s.server_round for s in MomentumStore(path).load_all()] == list(range(4 - keep, 4))
    with caplog.at_level(logging.WARNING):
        again = MomentumStore(path).reply(*states(3), beta=BETA, server_round=3, keep=keep)
    assert "round 3 again" in caplog.text and "from the momentum of round 2" in caplog.text
    torch.testing.assert_close(again["w"], vec(GLOBALS[2]) + vec(M_HAT[2]), rtol=0, atol=1e-15)
    kept = MomentumStore(path).load()
    assert (kept.t, kept.server_round) == (3, 3)
    torch.testing.assert_close(kept.m["w"], vec(M[2]), rtol=0, atol=1e-15)
    if keep == 3:  # rounds 1 and 3 kept: a replay from round 2 on continues from round 1
        again = MomentumStore(path).reply(*states(2), beta=BETA, server_round=2, keep=keep)
        torch.testing.assert_close(again["w"], vec(GLOBALS[1]) + vec(M_HAT[1]), rtol=0, atol=0)
        assert [s.server_round for s in MomentumStore(path).load_all()] == [1, 2]


def test_a_replay_longer_than_the_kept_states_continues_from_the_oldest(tmp_path, caplog) -> None:
    path = momentum_path(tmp_path, RUN_ID, 0)
    for r in (1, 2, 3):
        MomentumStore(path).reply(*states(r), beta=BETA, server_round=r, keep=2)
    with caplog.at_level(logging.WARNING):  # rounds 2 and 3 kept, round 2 sent again
        MomentumStore(path).reply(*states(2), beta=BETA, server_round=2, keep=2)
    assert "the replay is longer than the 2 state(s) kept" in caplog.text
    kept = MomentumStore(path).load_all()
    assert [(s.t, s.server_round) for s in kept] == [(2, 2), (3, 2)]


def test_states_to_keep_follows_checkpoint_every() -> None:
    assert [states_to_keep(c) for c in (0, 1, 2, 5, 15, 16, 1000)] == [2, 2, 3, 6, 16, 16, 16]
    with pytest.raises(ValueError, match=r"keep must be in 1\.\.16"):
        MomentumStore(Path("unused")).reply(*states(1), beta=BETA, server_round=1, keep=0)


# --- the ClientApp --------------------------------------------------------------------


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


def global_model() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("digits").state_dict()


def call_client(run: RunConfig, server_round: int, **node_config: Any) -> dict[str, torch.Tensor]:
    """The ClientApp's train reply as Flower would get it: fresh objects every message."""
    content = RecordDict(
        {
            "arrays": ArrayRecord(global_model()),
            "config": ConfigRecord(run.train_instructions(server_round) | {"batch-cell": -1}),
        }
    )
    msg = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = f"m{server_round}-node1"
    context = Context(
        run_id=RUN_ID,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 3} | node_config,
        state=RecordDict(),
        run_config=run.to_flat(),
    )
    reply = client_train(msg, context)
    return reply.content["arrays"].to_torch_state_dict()


def trained_by_hand(run: RunConfig, server_round: int) -> dict[str, torch.Tensor]:
    """What the ClientApp trains in ``server_round`` (partition 0), without momentum."""
    node = NodeConfig.from_flat({"partition-id": 0, "num-partitions": 3})
    model = build_model("digits")
    model.load_state_dict(global_model())
    instr = run.train_instructions(server_round)
    train_local(
        model,
        _client_data(run, node).train,
        lr=run.lr,
        momentum=run.momentum,
        steps=run.local_steps,
        batch_size=run.batch_size,
        seed=int(instr["round-seed"]),
        device=torch.device("cpu"),
    )
    return model.state_dict()


def client_run(**overrides: Any) -> RunConfig:
    return RunConfig.from_flat({"local-steps": 2} | overrides)


def test_beta_zero_replies_with_the_trained_model_bit_for_bit(state) -> None:
    run = client_run()
    assert run.client_momentum == 0.0  # the default
    reply, expect = call_client(run, 1), trained_by_hand(run, 1)
    assert list(reply) == list(expect)
    for key, value in expect.items():
        assert reply[key].dtype == value.dtype
        assert reply[key].numpy().tobytes() == value.numpy().tobytes()
    assert not state.exists()  # no momentum file either


def test_honest_node_replies_with_its_corrected_momentum_over_rounds(state) -> None:
    run, beta = client_run(**{"client-momentum": 0.8}), 0.8
    g = global_model()
    deltas = [{k: v - g[k] for k, v in trained_by_hand(run, r).items()} for r in (1, 2)]
    first, second = call_client(run, 1), call_client(run, 2)
    for key in g:
        torch.testing.assert_close(first[key], g[key] + deltas[0][key])  # m_hat_1 = delta_1
        # m_hat_2 = (beta (1 - beta) d1 + (1 - beta) d2) / (1 - beta^2)
        m_hat = (beta * deltas[0][key] + deltas[1][key]) / (1 + beta)
        torch.testing.assert_close(second[key], g[key] + m_hat)
    kept = MomentumStore(momentum_path(state, RUN_ID, 0)).load()
    assert (kept.t, kept.server_round, kept.beta) == (2, 2, beta)


def test_an_attacker_attacks_its_own_honest_momentum_and_keeps_it(state) -> None:
    run = client_run(**{"client-momentum": 0.8, "attack-knowledge": "own"})
    honest = [call_client(run, r) for r in (1, 2)]  # its momentum, as an honest node
    (state / momentum_path(state, RUN_ID, 0).name).unlink()
    attacker = {"role": "malicious", "attack": "ipm", "attack-epsilon": 2.0}
    attacked = [call_client(run, r, **attacker) for r in (1, 2)]
    g = global_model()
    for sent, momentum in zip(attacked, honest, strict=True):
        for key in g:  # IPM with k = 1: -epsilon times its own (honest) momentum
            torch.testing.assert_close(sent[key] - g[key], -2.0 * (momentum[key] - g[key]))
    # what it keeps is the honest momentum, not the crafted update
    kept = MomentumStore(momentum_path(state, RUN_ID, 0)).load()
    assert kept.t == 2
    for key in g:
        torch.testing.assert_close(
            kept.m[key] / (1 - 0.8**2), honest[1][key] - g[key], rtol=1e-5, atol=1e-7
        )
