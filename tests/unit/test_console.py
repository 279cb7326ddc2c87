"""What ``bastion run`` tells the user (``bastion.console``, ``bastion.cli``): round
lines, the final table, failures and the README's flag table (no processes started
here; tests/integration runs the real thing)."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import pytest

from bastion import cli, console, preflight
from bastion.federation import ProcessStartError, failure_cause, with_interpreter_on_path
from common.config import ConfigError, RunConfig
from common.rundir import record_outcome
from server.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[2]
ROW = {"round": 2, "central_accuracy": 0.9, "central_loss": 0.3, "num_accepted": 4}


def _diag(node: int, status: str = "accepted", **extra: object) -> dict:
    return {"round": 2, "node_id": node, "status": status, "malicious": False} | extra


def test_malicious_line_separates_validation_from_what_a_selection_rule_did() -> None:
    diags = [
        _diag(1, malicious=True, selected=False, weight=0.0),
        _diag(2, malicious=True, selected=False, weight=0.0),
        _diag(3, selected=True, weight=1.0),
        _diag(4, "rejected", malicious=True),
        {"round": 1, "node_id": 9, "status": "accepted", "malicious": True},  # other round
    ]
    line = console.malicious_line(ROW | {"malicious_influence": 0.0}, diags)
    assert line == (
        "malicious: 2 of 3 replies passed validation; the rule selected 0 of them, "
        "share of the aggregate 0.00"
    )


def test_malicious_line_for_a_weighting_rule_and_one_that_attributes_nothing() -> None:
    mean = [_diag(1, malicious=True, selected=True, weight=0.25), _diag(2, selected=True)]
    assert console.malicious_line(ROW | {"malicious_influence": 0.25}, mean) == (
        "malicious: 1 of 1 reply passed validation; the rule selected 1 of them, "
        "share of the aggregate 0.25"
    )
    median = [_diag(1, malicious=True), _diag(2)]  # no weights, no selection
    assert console.malicious_line(ROW, median) == (
        "malicious: 1 of 1 reply passed validation; the rule attributes its output to no "
        "single reply"
    )
    skipped = ROW | {"aggregation_error": "krum needs n >= 2f + 3"}
    assert console.malicious_line(skipped, median).endswith("; no aggregate this round")
    assert console.malicious_line(ROW, [_diag(2)]) is None  # nobody declared it


def test_round_line_shows_validation_and_epsilon_with_dp() -> None:
    row = ROW | {"num_rejected": 1, "round_seconds": 3.0, "max_dp_epsilon": 1.234}
    line = console.progress_line(row, 5)
    assert "2/5" in line and "replies 4 ok / 1 rejected" in line and "epsilon 1.23" in line
    assert "epsilon" not in console.progress_line(ROW, 5)


def test_round_printer_reads_diagnostics_as_they_grow(tmp_path, capsys) -> None:
    diags = tmp_path / "diagnostics.jsonl"
    diags.write_text(json.dumps(_diag(1, "rejected", reason="NaN in update")) + "\n")
    printer = console.RoundPrinter(tmp_path, 3)  # rows already there belong to an earlier run
    with open(diags, "a") as fh:
        fh.write(json.dumps(_diag(2, "rejected", reason="update norm too large")) + "\n")
        fh.write(json.dumps(_diag(3, malicious=True, selected=True)) + "\n")
    printer.show(ROW | {"num_rejected": 1, "malicious_influence": 0.5})
    out = capsys.readouterr().out.splitlines()
    assert out[1].strip() == "rejected: 1 node(s): update norm too large"
    assert "1 of 1 reply passed validation; the rule selected 1 of them" in out[2]
    assert printer.rows == [ROW | {"num_rejected": 1, "malicious_influence": 0.5}]


def test_final_table_explains_its_columns_and_the_missing_dp_train_loss() -> None:
    rows = [{"round": 0, "central_accuracy": 0.1}, ROW | {"overhead_seconds": 1.5}]
    table = console.final_table(rows, dp=True)
    assert table.splitlines()[2].split()[3:5] == ["n/a", "(DP)"]
    legend = " ".join(table.split("\n\n", 1)[1].split())
    assert "overhead s = round wall time - slowest client's training" in legend
    assert "n/a with DP" in legend
    assert "n/a" not in console.final_table(rows).splitlines()[2]  # without DP: '-'


def test_plural() -> None:
    assert [console.plural(n, "round") for n in (1, 2)] == ["1 round", "2 rounds"]
    assert console.plural(3, "reply") == "3 replies"
    assert console.plural(2, "process") == "2 processes"


def test_resume_command_keeps_the_flags_and_points_at_the_run(tmp_path) -> None:
    run_dir = tmp_path / "my run"
    argv = ["run", "--clients", "3", "--output-dir", "/old", "--run-config", "lr=0.05 dp=true"]
    cmd = console.resume_command([*argv, "--resume"], run_dir)
    assert shlex.split(cmd) == [
        "bastion",
        "run",
        "--clients",
        "3",
        "--run-config",
        "lr=0.05 dp=true",
        "--output-dir",
        str(run_dir),
        "--resume",
    ]
    assert shlex.split(console.resume_command(["run", f"--output-dir={run_dir}"], run_dir)) == [
        "bastion",
        "run",
        "--output-dir",
        str(run_dir),
        "--resume",
    ]


@pytest.mark.parametrize(
    ("cfg", "clients"),
    [
        (RunConfig(aggregator="krum", num_byzantine=1, resampling_s=2), 6),
        (RunConfig(aggregator="krum", num_byzantine=1, bucketing_s=2), 6),
        (RunConfig(aggregator="bulyan", num_byzantine=2, resampling_s=3), 9),
        (RunConfig(aggregator="multi-krum", num_byzantine=1, fraction_train=0.5), 8),
    ],
)
def test_rule_check_names_the_effective_f_and_the_clients_that_suffice(cfg, clients) -> None:
    problem = preflight.check_rule_fits(cfg, clients)
    assert problem is not None
    need = int(re.search(r"needs at least (\d+) clients \(--clients \1\)", problem).group(1))
    # the count it names works, one fewer does not
    assert preflight.check_rule_fits(cfg, need) is None
    assert preflight.check_rule_fits(cfg, need - 1) is not None
    resampling_s, bucketing_s = cfg.value("resampling-s", 0), cfg.value("bucketing-s", 0)
    if resampling_s:
        f_eff = min(resampling_s * cfg.num_byzantine, clients)
        assert f"you set f={cfg.num_byzantine}" in problem and f"f={f_eff}" in problem
        assert "s*f" in problem
    if bucketing_s:
        assert f"after bucket n={-(-clients // bucketing_s)}" in problem


def test_a_literal_error_lists_the_allowed_values_once() -> None:
    with pytest.raises(ConfigError) as err:
        load_run_config({"aggregator": "krumm"})
    assert str(err.value).count("'multi-krum'") == 1 and "'krumm'" in str(err.value)


def test_failure_cause_is_the_exception_line_of_the_log(tmp_path) -> None:
    log = tmp_path / "superlink.log"
    log.write_text(
        "\x1b[92mINFO \x1b[0m:      Starting Flower SuperLink\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "FileNotFoundError: [Errno 2] No such file or directory: 'flower-superexec'\n"
        "2026-12-04T11:49:37Z ERROR [uvicorn.error] Application startup failed. Exiting.\n"
    )
    assert failure_cause(log) == (
        "FileNotFoundError: [Errno 2] No such file or directory: 'flower-superexec'"
    )
    log.write_text("INFO starting\n2026-12-04 ERROR [x] something broke\nINFO bye\n")
    assert failure_cause(log) == "2026-12-04 ERROR [x] something broke"
    assert failure_cause(tmp_path / "missing.log") is None
    err = ProcessStartError("SuperLink", log, "exited with 3")
    assert str(err) == "the SuperLink could not start: 2026-12-04 ERROR [x] something broke"
    assert str(log) in err.explain() and "exited with 3" in err.explain()


def test_children_find_flower_next_to_this_interpreter() -> None:
    here = str(Path(sys.executable).parent)
    env = with_interpreter_on_path({"PATH": f"/usr/bin{os.pathsep}{here}{os.pathsep}/bin"})
    assert env["PATH"].split(os.pathsep) == [here, "/usr/bin", "/bin"]
    assert with_interpreter_on_path({})["PATH"].split(os.pathsep)[0] == here


def test_record_outcome_without_a_serverapp_summary_counts_the_rounds(tmp_path) -> None:
    rows = [{"round": 0, "central_accuracy": 0.1}, {"round": 1, "central_accuracy": 0.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "rounds": 9}))
    old = time.time() - 3600
    os.utime(tmp_path / "summary.json", (old, old))  # an earlier attempt's
    summary = record_outcome(
        tmp_path, "interrupted", "stopped by Ctrl-C", since=time.time() - 5, wall_seconds=7.0
    )
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["reason"] == "stopped by Ctrl-C"
    assert summary["rounds"] == 1 and summary["final_accuracy"] == 0.8
    assert summary["wall_seconds"] == 7.0


def test_record_outcome_keeps_what_the_serverapp_said(tmp_path) -> None:
    since = time.time() - 5
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"status": "completed", "reason": None, "rounds": 3}))
    done = record_outcome(tmp_path, "interrupted", "stopped by Ctrl-C", since=since)
    assert done["status"] == "completed" and done["reason"] is None  # finished first
    path.write_text(json.dumps({"status": "failed", "reason": "ValueError: boom"}))
    kept = record_outcome(tmp_path, "failed", None, since=since, wall_seconds=3.0)
    assert kept["reason"] == "ValueError: boom" and kept["wall_seconds"] == 3.0
    link = record_outcome(tmp_path, "failed", "the SuperLink exited with code -9", since=since)
    assert link["reason"] == "the SuperLink exited with code -9"
    # a run that ended by itself: the ServerApp's verdict stands; none is a failure
    path.write_text(json.dumps({"status": "failed", "reason": "ValueError: boom"}))
    kept = record_outcome(tmp_path, "failed", "no summary", since=since, only_if_missing=True)
    assert kept["reason"] == "ValueError: boom"
    path.unlink()
    missing = record_outcome(tmp_path, "failed", "no summary", since=since, only_if_missing=True)
    assert missing["status"] == "failed" and missing["reason"] == "no summary"


def _readme_flags() -> dict[str, str]:
    """``--flag`` -> its default cell, from the README's flag table."""
    table = ROOT.joinpath("README.md").read_text().split("| flag | meaning | default |", 1)[1]
    flags = {}
    for line in table.split("\n\n", 1)[0].splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        flags[cells[0].strip("`").split()[0]] = cells[-1]
    return flags


def test_readme_flag_table_matches_the_run_command_and_its_help() -> None:
    parser = cli.make_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    options = {
        opt for action in run._actions for opt in action.option_strings if opt.startswith("--")
    }
    readme = _readme_flags()
    assert set(readme) == options - {"--help"}
    for action in run._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag in (None, "--help"):
            continue
        said = re.search(r"\bdefault:? ([^;)]+)", action.help or "")
        if action.const is True:  # store_true switches are off unless given
            assert readme[flag] == "off", flag
            continue
        assert said, f"{flag}: --help names no default"
        default = said.group(1).split(",")[0].strip()
        cell = readme[flag].strip("`")
        assert default.split()[0].strip("$") in cell or cell.split()[0] in default, (
            flag,
            default,
            readme[flag],
        )
    # the defaults that come from the app's run config are the app's
    assert readme["--rounds"] == str(RunConfig().num_server_rounds)
    assert readme["--dataset"] == RunConfig().dataset
    assert readme["--aggregator"] == RunConfig().aggregator


def test_a_dead_superlink_is_the_cause_even_when_flwr_run_ended_first(tmp_path) -> None:
    # `flwr run` exits as soon as its SuperLink is gone; the watcher must still name the
    # SuperLink (CI once saw the run reported as "ended without a summary")
    from types import SimpleNamespace

    log = tmp_path / "superlink.log"
    log.write_text("Traceback (most recent call last):\nMemoryError: out of memory\n")
    link = SimpleNamespace(name="superlink", log_path=log, popen=SimpleNamespace(returncode=-9))
    fed = SimpleNamespace(dead_processes=lambda: [link])
    runner = SimpleNamespace(popen=SimpleNamespace(poll=lambda: 1))  # already ended
    printer = SimpleNamespace(diagnostics=tmp_path / "diagnostics.jsonl", show=lambda row: None)
    with pytest.raises(cli.RunFailed) as err:
        cli._watch_run(fed, runner, printer, deadline=time.monotonic() + 5)
    assert "the SuperLink exited with code -9: MemoryError: out of memory" in str(err.value)
    alive = SimpleNamespace(dead_processes=lambda: [])
    cli._watch_run(alive, runner, printer, deadline=time.monotonic() + 5)  # a normal end
