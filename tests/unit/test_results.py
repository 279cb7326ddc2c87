"""The run directory: metrics lines, diagnostics, checkpoints, plot, summary; CLI read-back."""

from __future__ import annotations

import json
import math

import torch

from bastion.console import final_table, progress_line, rejection_reasons
from common.rundir import RunResults


def test_rounds_summary_checkpoint_and_plot(tmp_path) -> None:
    res = RunResults(tmp_path / "run", {"dataset": "digits"})
    res.log_round({"round": 0, "central_accuracy": 0.1, "central_loss": 2.3})
    res.log_round({"round": 1, "central_accuracy": 0.8, "central_loss": 0.7, "train_loss": 1.0})
    res.log_round({"round": 2, "central_accuracy": 0.7, "central_loss": math.nan})
    res.checkpoint(2, {"w": torch.ones(3)})
    summary = res.write_summary(status="completed", dataset="digits", num_clients=4)

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [0, 1, 2]
    assert json.loads(lines[2])["central_loss"] is None  # NaN is written as null
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == summary
    assert summary["final_accuracy"] == 0.7 and summary["best_accuracy"] == 0.8
    assert summary["initial_accuracy"] == 0.1 and summary["rounds"] == 2
    assert summary["num_clients"] == 4 and summary["status"] == "completed"
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "round-0002.pt", weights_only=True)
    assert ckpt["round"] == 2 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert (tmp_path / "run" / "accuracy_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"dataset": "digits"}


def test_summary_of_a_failed_run_keeps_what_was_done(tmp_path) -> None:
    res = RunResults(tmp_path, {})
    res.log_round({"round": 0, "central_accuracy": 0.1, "central_loss": 2.3})
    summary = res.write_summary(status="failed", error="RuntimeError: boom")
    assert summary["status"] == "failed" and summary["rounds"] == 0
    assert summary["final_accuracy"] == 0.1


def test_rejection_reasons_are_counted_per_round() -> None:
    rows = [
        {"round": 1, "status": "rejected", "reason": "NaN"},
        {"round": 1, "status": "rejected", "reason": "NaN"},
        {"round": 1, "status": "rejected", "reason": "shape"},
        {"round": 1, "status": "accepted", "reason": ""},
        {"round": 2, "status": "rejected", "reason": "other round"},
    ]
    assert rejection_reasons(rows, {"round": 1, "num_rejected": 3}) == [
        "2 node(s): NaN",
        "1 node(s): shape",
    ]
    assert rejection_reasons(rows, {"round": 1, "num_rejected": 0}) == []


def test_progress_and_table_show_the_round_numbers() -> None:
    row = {
        "round": 2,
        "central_accuracy": 0.91234,
        "central_loss": 0.3,
        "num_accepted": 9,
        "num_rejected": 1,
        "round_seconds": 12.0,
        "overhead_seconds": 11.5,
    }
    line = progress_line(row, 5)
    assert "2/5" in line and "0.9123" in line and "9 ok / 1 rejected" in line
    table = final_table([{"round": 0, "central_accuracy": 0.1}, row])
    assert table.splitlines()[2].split()[:2] == ["2", "0.9123"]
    assert table.splitlines()[1].split()[2] == "-"  # missing values shown as '-'


def test_rule_that_cannot_run_on_the_client_count_is_reported_up_front() -> None:
    from bastion.preflight import check_rule_fits
    from common.config import RunConfig

    # s-resampling multiplies f by s: Krum then needs n >= 2 * (2 * 2) + 3 = 11.
    cfg = RunConfig(aggregator="krum", num_byzantine=2, resampling_s=2)
    problem = check_rule_fits(cfg, 10)
    assert problem and "krum" in problem and "n=10" in problem and "f=4" in problem
    assert check_rule_fits(cfg, 11) is None
    assert check_rule_fits(RunConfig(aggregator="bulyan", num_byzantine=1), 7) is None
    assert "bulyan" in check_rule_fits(RunConfig(aggregator="bulyan", num_byzantine=1), 6)


def test_a_new_run_in_an_old_run_folder_sets_the_old_one_aside(tmp_path) -> None:
    first = RunResults(tmp_path, {"seed": 1})
    first.log_round({"round": 0, "central_accuracy": 0.1, "central_loss": 2.0})
    first.write_summary(status="completed")
    (tmp_path / "logs").mkdir()
    second = RunResults(tmp_path, {"seed": 2})
    second.log_round({"round": 0, "central_accuracy": 0.5, "central_loss": 1.0})
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"round": 0, "central_accuracy": 0.5, "central_loss": 1.0}]  # not mixed
    old = second.moved_previous
    assert old is not None and old.parent == tmp_path and old.name.startswith("previous-")
    assert json.loads((old / "metrics.jsonl").read_text())["central_accuracy"] == 0.1
    assert json.loads((old / "summary.json").read_text())["status"] == "completed"
    assert (tmp_path / "logs").is_dir()  # the launcher's logs stay where they are
    assert RunResults(tmp_path / "fresh", {}).moved_previous is None


def test_an_infinite_epsilon_is_written_as_inf_not_as_no_dp(tmp_path) -> None:
    """A node that trained with noise multiplier 0 reports epsilon = inf. It must stay
    visible as "inf" (strict JSON), unlike a NaN loss (null) or a run without DP."""
    res = RunResults(tmp_path, {})
    res.log_nodes([{"round": 1, "partition_id": 0, "dp_epsilon": math.inf}])
    res.log_round(
        {"round": 1, "central_accuracy": 0.5, "central_loss": 1.0, "max_dp_epsilon": math.inf}
    )
    assert res.max_epsilon() == math.inf
    res.write_summary(status="completed")
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["max_epsilon"] == "inf" and float(on_disk["max_epsilon"]) == math.inf
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["max_dp_epsilon"] == "inf"
    node = json.loads((tmp_path / "diagnostics.jsonl").read_text())
    assert node["dp_epsilon"] == "inf"
    assert res.node_epsilons == [(1, "partition 0", math.inf)]
    assert (tmp_path / "privacy_epsilon.png").read_bytes()[:4] == b"\x89PNG"
