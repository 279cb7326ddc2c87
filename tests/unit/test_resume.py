"""Crash safety of the ServerApp: checkpoints, resume, rewinding the run directory.

The last test runs the real round loop (``server.app._run_one``) against a fake Grid
whose clients answer deterministically, kills it after a round (an exception out of
the Grid, as a SIGKILL would end it) and resumes it: the resumed run must end with
the model of the uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.config import ConfigError, RunConfig
from common.rundir import (
    RESUME_MAY_CHANGE,
    CheckpointError,
    RunResults,
    check_resume_config,
    load_latest_checkpoint,
    restore_rng_state,
    rng_state,
)
from strategies.rules.reputation import Reputation
from strategies.strategy import RobustStrategy


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def _strategy_with_state() -> RobustStrategy:
    """A strategy whose velocity and reputation are not empty."""
    strategy = RobustStrategy(server_momentum=0.9, reputation=Reputation())
    strategy._velocity = torch.arange(5, dtype=torch.float64) / 7
    strategy.reputation.load_state_dict(
        {
            "11": {
                "score": 0.25,
                "last_evidence": 1.0,
                "rounds_observed": 2,
                "times_quarantined": 0,
                "quarantined_from": 0,
                "quarantined_until": 0,
            }
        }
    )
    return strategy


def test_checkpoint_round_trip_restores_model_strategy_and_random_generators(tmp_path) -> None:
    config = RunConfig(server_momentum=0.9).to_flat()
    res = RunResults(tmp_path, config)
    model = {"w": torch.randn(3, 2), "b": torch.zeros(2)}
    strategy = _strategy_with_state()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    rng = rng_state()
    expected = _draws()
    res.checkpoint(
        2,
        model,
        strategy.state_dict(),
        rng=rng,
        loop={"num_clients": 4, "elapsed_seconds": 12.5, "node_partitions": {11: 0, 12: 1}},
        row={"round": 2, "central_accuracy": 0.5},
    )

    _draws()  # the generators move on; the checkpoint must not
    ckpt = load_latest_checkpoint(tmp_path)  # weights_only=True: plain data and tensors only
    assert ckpt is not None and ckpt.round == 2
    assert ckpt.path == tmp_path / "checkpoints" / "round-0002.pt"
    assert all(torch.equal(ckpt.model[k], v) for k, v in model.items())
    assert ckpt.config == config and ckpt.row == {"round": 2, "central_accuracy": 0.5}
    assert ckpt.loop == {
        "num_clients": 4,
        "elapsed_seconds": 12.5,
        "node_partitions": {11: 0, 12: 1},
    }
    restore_rng_state(ckpt.rng)
    assert _draws() == expected  # python random, numpy and torch continue as before

    fresh = RobustStrategy(server_momentum=0.9, reputation=Reputation())
    fresh.load_state_dict(ckpt.strategy)
    assert torch.equal(fresh._velocity, strategy._velocity)
    assert fresh.reputation.state_dict() == strategy.reputation.state_dict()
    assert fresh.reputation.score(11) == 0.25


def _run_dir_killed_in_round_3(tmp_path: Path, config: dict) -> RunResults:
    """Rounds 0..2 done and checkpointed, round 3's rows written, no round-3 checkpoint
    (killed between its diagnostics/row and its checkpoint)."""
    res = RunResults(tmp_path, config)
    res.log_round({"round": 0, "central_accuracy": 0.1, "central_loss": 2.3})
    for rnd in (1, 2, 3):
        res.log_nodes([{"round": rnd, "node_id": n, "status": "accepted"} for n in (5, 6)])
        row = {"round": rnd, "central_accuracy": 0.1 + rnd / 10, "central_loss": 1.0}
        if rnd < 3:
            res.checkpoint(rnd, {"w": torch.full((2,), float(rnd))}, {}, row=row)
        res.log_round(row)
    res.write_summary(status="failed", error="killed")
    return res


def test_resume_drops_the_rows_of_the_round_in_flight_and_keeps_the_folder(tmp_path) -> None:
    config = RunConfig().to_flat()
    _run_dir_killed_in_round_3(tmp_path, config)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 4, "central_acc')  # a line torn by the kill

    res = RunResults(tmp_path, config | {"resume": True}, resume=True)
    assert res.resumed is not None and res.resumed.round == 2
    assert res.moved_previous is None and not list(tmp_path.glob("previous-*"))
    assert [r["round"] for r in _rows(tmp_path / "metrics.jsonl")] == [0, 1, 2]
    assert [r["round"] for r in res.rounds] == [0, 1, 2]
    assert [d["round"] for d in _rows(tmp_path / "diagnostics.jsonl")] == [1, 1, 2, 2]
    assert not (tmp_path / "summary.json").exists()  # the failed attempt's summary is gone
    assert res.resumed_from == [2]

    res.log_round({"round": 3, "central_accuracy": 0.7, "central_loss": 0.5})
    summary = res.write_summary(status="completed")
    assert [r["round"] for r in _rows(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    assert summary["resumed_from"] == [2] and summary["initial_accuracy"] == 0.1


def test_resume_puts_back_a_row_lost_between_checkpoint_and_row(tmp_path) -> None:
    config = RunConfig().to_flat()
    res = RunResults(tmp_path, config)
    res.log_round({"round": 0, "central_accuracy": 0.1, "central_loss": 2.3})
    res.checkpoint(1, {"w": torch.ones(2)}, {}, row={"round": 1, "central_accuracy": 0.6})
    # killed before log_round(1)
    again = RunResults(tmp_path, config, resume=True)
    assert [r["round"] for r in _rows(tmp_path / "metrics.jsonl")] == [0, 1]
    assert again.rounds[1]["central_accuracy"] == 0.6


def test_resume_refuses_a_config_that_changes_what_the_run_computes(tmp_path) -> None:
    config = RunConfig().to_flat()
    _run_dir_killed_in_round_3(tmp_path, config)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    changed = config | {"aggregator": "median", "seed": 7, "resume": True}
    with pytest.raises(ConfigError) as err:
        RunResults(tmp_path, changed, resume=True)
    text = str(err.value)
    assert "'resume'" in text and "round-0002" in text
    assert "key 'aggregator': checkpoint has 'mean', this run has 'median'" in text
    assert "key 'seed': checkpoint has 0, this run has 7" in text
    # refused before anything in the folder changed
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before

    with pytest.raises(ConfigError, match="'num-server-rounds': value 1 is below"):
        check_resume_config(config, config | {"num-server-rounds": 1}, 2)
    # where and how long the run goes may change
    check_resume_config(
        config, config | {"round-timeout": 5.0, "num-server-rounds": 50, "device": "cpu"}, 2
    )
    assert "lr" not in RESUME_MAY_CHANGE and "server-momentum" not in RESUME_MAY_CHANGE


def test_checkpoints_are_replaced_atomically(tmp_path, monkeypatch) -> None:
    res = RunResults(tmp_path, {})
    res.checkpoint(2, {"w": torch.ones(2)})

    def torn_save(obj: object, fh: object) -> None:  # the process dies mid-write
        fh.write(b"PK\x03\x04 half a zip")  # type: ignore[attr-defined]
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        res.checkpoint(2, {"w": torch.zeros(2)})
    monkeypatch.undo()
    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt is not None and torch.equal(ckpt.model["w"], torch.ones(2))  # old file intact
    assert (tmp_path / "checkpoints" / ".round-0002.pt.tmp").exists()  # the torn temp file


def test_an_unreadable_newest_checkpoint_falls_back_and_none_readable_is_an_error(
    tmp_path,
) -> None:
    res = RunResults(tmp_path, {})
    res.checkpoint(1, {"w": torch.ones(2)})
    res.checkpoint(2, {"w": torch.zeros(2)})
    (tmp_path / "checkpoints" / "round-0002.pt").write_bytes(b"truncated")
    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.round == 1

    (tmp_path / "checkpoints" / "round-0001.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"round-0002\.pt.*\n.*round-0001\.pt"):
        load_latest_checkpoint(tmp_path)
    assert load_latest_checkpoint(tmp_path / "elsewhere") is None


def test_resume_without_a_checkpoint_starts_a_fresh_run(tmp_path) -> None:
    first = RunResults(tmp_path, {})
    first.log_round({"round": 0, "central_accuracy": 0.1, "central_loss": 2.0})
    again = RunResults(tmp_path, {"resume": True}, resume=True)
    assert again.resumed is None and again.moved_previous is not None  # set aside, as before
    assert not (tmp_path / "metrics.jsonl").exists()


# ----------------------------------------------------------- the round loop itself
NODES = (101, 102, 103, 104)


class Crash(BaseException):
    """What ends the ServerApp process in the middle of a round."""


class FakeGrid:
    """Four nodes that answer at once; a node's update depends only on the global model
    it receives, the round and the node, so a run is a function of the server alone."""

    def __init__(self, crash_in_round: int | None = None, run_id: int = 1) -> None:
        self.crash_in_round = crash_in_round
        self.run = SimpleNamespace(run_id=run_id)  # Flower's Grid.run
        self.ledger_runs: list[int] = []  # "ledger-run" of every training message
        self.pushed: dict[str, Message] = {}
        self.trained: list[tuple[int, int]] = []  # (round, node) of every training message

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            config = msg.content.config_records.get("config", {})
            if msg.metadata.message_type == "train":
                rnd = int(config["server-round"])
                if rnd == self.crash_in_round:
                    raise Crash(f"killed in round {rnd}")
                self.trained.append((rnd, msg.metadata.dst_node_id))
                self.ledger_runs.append(int(config["ledger-run"]))
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.pushed[msg.object_id] = msg
            ids.append(msg.object_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        out = []
        for mid in message_ids:
            ins = self.pushed.pop(mid)
            node = ins.metadata.dst_node_id
            rnd = int(ins.content.config_records["config"]["server-round"])
            state = ins.content.array_records["arrays"].to_torch_state_dict()
            gen = torch.Generator().manual_seed(rnd * 1000 + node)
            new = {k: v - 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
            metrics = {"num-examples": 10, "partition-id": NODES.index(node), "train-loss": 1.0}
            content = RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord(metrics)})
            out.append(Message(content, reply_to=ins))
        return out


def test_a_killed_and_resumed_run_ends_with_the_uninterrupted_runs_model(tmp_path) -> None:
    """Server momentum, node sampling (2 of 4 nodes with Python's ``random``, as Flower's
    FedAvg does) and the round counter all carry across the kill."""
    from server.app import _run_one

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    flat = {
        "num-server-rounds": 4,
        "server-momentum": 0.9,
        "fraction-train": 0.5,
        "round-timeout": 5.0,
        "seed": 3,
    }
    random.seed(42)
    reference = FakeGrid()
    _run_one(reference, RunConfig.from_flat(flat | {"output-dir": str(tmp_path / "ref")}))

    out = tmp_path / "crash"
    random.seed(42)
    killed = FakeGrid(crash_in_round=3, run_id=5)
    with pytest.raises(Crash):
        _run_one(killed, RunConfig.from_flat(flat | {"output-dir": str(out)}))
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"

    random.seed(999)  # a new process: different state until the checkpoint's is restored
    resumed = FakeGrid(run_id=9)  # a resumed run is a new Flower run
    _run_one(resumed, RunConfig.from_flat(flat | {"output-dir": str(out), "resume": True}))

    assert [r for r, _ in resumed.trained] == [3, 3, 4, 4]  # round 3 is next, once
    assert killed.trained + resumed.trained == reference.trained  # same nodes sampled
    # DP nodes go on accounting in the first attempt's privacy ledger (client.privacy)
    assert set(killed.ledger_runs) == set(resumed.ledger_runs) == {5}
    final = torch.load(out / "checkpoints" / "round-0004.pt", weights_only=True)
    expect = torch.load(tmp_path / "ref" / "checkpoints" / "round-0004.pt", weights_only=True)
    for key, value in expect["model"].items():
        assert torch.equal(final["model"][key], value), key
    assert torch.equal(final["strategy"]["velocity"], expect["strategy"]["velocity"])
    after_2 = torch.load(tmp_path / "ref" / "checkpoints" / "round-0002.pt", weights_only=True)
    # rounds 3 and 4 moved the model: the equality above is not trivial
    assert any(not torch.equal(after_2["model"][k], v) for k, v in expect["model"].items())

    rows = _rows(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    ref_rows = _rows(tmp_path / "ref" / "metrics.jsonl")
    assert [r["central_accuracy"] for r in rows] == [r["central_accuracy"] for r in ref_rows]
    diags = _rows(out / "diagnostics.jsonl")
    assert [d["round"] for d in diags] == [1, 1, 2, 2, 3, 3, 4, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"] == [2]
    assert summary["num_clients"] == 4


def test_bastion_run_resume_checks_the_checkpoint_before_starting_anything(
    tmp_path, capsys
) -> None:
    from bastion.cli import _checked_run_config, build_run_config, find_app_dir, make_parser

    def args(*extra: str):
        return make_parser().parse_args(["run", "--clients", "3", *extra])

    assert _checked_run_config(args("--resume")) is None
    assert "--resume (key 'resume') needs --output-dir" in capsys.readouterr().err

    out = str(tmp_path / "run")
    cfg, _ = build_run_config(args("--output-dir", out), find_app_dir())
    RunResults(out, cfg.to_flat()).checkpoint(1, {"w": torch.ones(2)})
    checked = _checked_run_config(args("--output-dir", out, "--resume"))
    assert checked is not None and checked[1].resume and checked[2]["resume"] is True

    assert _checked_run_config(args("--output-dir", out, "--resume", "--seed", "5")) is None
    assert "key 'seed': checkpoint has 0, this run has 5" in capsys.readouterr().err


def test_resume_is_refused_where_it_cannot_be_faithful() -> None:
    with pytest.raises(ConfigError, match="'resume' is true and key 'batch-file' is set"):
        RunConfig.from_flat({"resume": True, "batch-file": "cells.json"})
    assert RunConfig.from_flat({"resume": True}).resume
