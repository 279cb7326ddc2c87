"""``bastion run`` end to end: a real SuperLink and real SuperNodes talking gRPC on loopback."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from task.datasets import load_dataset
from task.models import build_model
from task.training import evaluate
from tests.integration.conftest import ROOT, bastion_exe, run_bastion, tagged_processes

pytestmark = pytest.mark.integration


def test_three_supernodes_train_digits_over_grpc_and_everything_stops(tmp_path, bastion_env):
    env, tag = bastion_env
    # Started as cron, systemd or an IDE would: the venv is not activated, its bin is
    # not on PATH; Flower's processes must still find their children.
    venv_bin = str(Path(bastion_exe()[0]).parent)
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p != venv_bin
    )
    env.pop("VIRTUAL_ENV", None)
    assert shutil.which("flower-superexec", path=env["PATH"]) is None
    out = tmp_path / "run"
    proc = run_bastion(
        [
            "--clients",
            "3",
            "--rounds",
            "3",
            "--seed",
            "1",
            "--output-dir",
            str(out),
            "--run-config",
            "federated-eval-every=3",
        ],
        env,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Every process bastion started (and all Flower spawned below them) is gone.
    assert tagged_processes(tag) == []

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["rounds"] == 3 and summary["num_clients"] == 3
    assert summary["dataset"] == "digits"
    # Chance is 0.1 on ten classes; training must reach far above it and rise.
    assert summary["final_accuracy"] > 0.6
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.4

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["num_accepted"] == 3 and r["num_rejected"] == 0 for r in rows[1:])
    # Federated evaluation ran on the clients' local test splits in round 3 only.
    assert [r["round"] for r in rows if r.get("federated_accuracy") is not None] == [3]
    assert rows[3]["federated_accuracy"] > 0.6

    diags = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    assert len(diags) == 9
    assert {d["partition_id"] for d in diags} == {0, 1, 2}
    assert len({d["node_id"] for d in diags}) == 3

    # The last checkpoint is the model whose accuracy the summary reports.
    ckpt = torch.load(out / "checkpoints" / "round-0003.pt", weights_only=True)
    model = build_model("digits")
    model.load_state_dict(ckpt["model"])
    _, test = load_dataset("digits")
    assert evaluate(model, test).accuracy == pytest.approx(summary["final_accuracy"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "round-0001.pt",
        "round-0002.pt",
        "round-0003.pt",
    ]
    assert (out / "accuracy_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The SuperNodes really reached the SuperLink over the gRPC Fleet API.
    link_log = (out / "logs" / "superlink.log").read_text()
    assert "Starting Fleet API (gRPC-rere)" in link_log
    assert link_log.count("[Fleet.ActivateNode] Activated node_id") == 3
    # Progress and the final table reached the user, with a legend of its columns.
    assert "round  3/3" in proc.stdout and "final accuracy" in proc.stdout
    assert "overhead s = round wall time - slowest client's training" in proc.stdout
    # One wall-time figure: the console's is summary.json's.
    wall = re.search(r"after 3 rounds \((\d+) s wall\)", proc.stdout)
    assert wall, proc.stdout
    assert int(wall.group(1)) == round(summary["wall_seconds"])
    assert summary["wall_seconds"] >= summary["serverapp_seconds"]
    assert summary["attack"] == "none" and summary["num_malicious"] == 0
    assert summary["defence"] == "mean" and summary["reason"] is None


def test_krum_runs_over_the_federation_and_reports_its_choice(tmp_path, bastion_env):
    env, tag = bastion_env
    out = tmp_path / "run"
    proc = run_bastion(
        [
            "--clients",
            "4",
            "--rounds",
            "2",
            "--aggregator",
            "krum",
            "--num-byzantine",
            "0",
            "--output-dir",
            str(out),
        ],
        env,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert tagged_processes(tag) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["aggregator"] == "krum" and summary["final_accuracy"] > 0.6
    diags = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    for rnd in (1, 2):
        this = [d for d in diags if d["round"] == rnd]
        assert len(this) == 4 and all(d["score"] is not None for d in this)
        chosen = [d for d in this if d["selected"]]
        assert len(chosen) == 1 and chosen[0]["weight"] == 1.0
        assert chosen[0]["score"] == min(d["score"] for d in this)  # Krum picks the lowest


def _start_bastion(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """``bastion ARGS`` in the background, its output (stdout and stderr) on a pipe."""
    return subprocess.Popen(
        [*bastion_exe(), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_until(
    done: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 300
) -> None:
    """Poll ``done`` until true; fail with the output when ``proc`` ends first or at
    ``timeout``."""
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.2)


def test_ctrl_c_stops_every_process(tmp_path, bastion_env):
    env, tag = bastion_env
    out = tmp_path / "run"
    proc = _start_bastion(
        ["run", "--clients", "2", "--rounds", "50", "--output-dir", str(out)], env
    )
    try:
        metrics = out / "metrics.jsonl"
        _wait_until(
            lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2,
            proc,
            "a training round",
        )
        assert tagged_processes(tag), "the federation should be running mid-run"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "interrupted" in output
    assert tagged_processes(tag) == []
    # The attempt's summary says what happened, and the console how to continue.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "Ctrl-C" in summary["reason"]
    assert summary["rounds"] >= 1 and summary["wall_seconds"] > 0
    assert f"--output-dir {out} --resume" in output


def test_superlink_crash_names_its_log_and_the_printed_resume_command_continues(
    tmp_path, bastion_env
):
    """The SuperLink is killed after round 1: the console says it died, where its log
    is and the exact command that continues; summary.json records the failure; that
    command, run as printed, finishes the run from the last checkpoint."""
    env, tag = bastion_env
    out = tmp_path / "run"
    args = ["run", "--clients", "2", "--rounds", "3", "--seed", "2", "--output-dir", str(out)]
    proc = _start_bastion(args, env)
    try:
        _wait_until((out / "checkpoints" / "round-0001.pt").exists, proc, "round 1's checkpoint")
        (link,) = [
            pid
            for pid in tagged_processes(tag)
            if Path(f"/proc/{pid}/cmdline")
            .read_bytes()
            .split(b"\0")[1]
            .endswith(b"flower-superlink")
        ]
        os.kill(link, signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, output
    assert "the SuperLink exited with code -9" in output
    assert f"its log: {out / 'logs' / 'superlink.log'}" in output
    assert tagged_processes(tag) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "SuperLink exited" in summary["reason"]
    printed = re.search(r"^  (bastion run .*--resume)$", output, re.MULTILINE)
    assert printed, output
    command = shlex.split(printed.group(1))
    assert command[1:] == [*args, "--resume"]

    again = run_bastion(command[2:], env, timeout=420)
    assert again.returncode == 0, again.stdout + again.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 3
    assert summary["resumed_from"] and summary["resumed_from"][-1] >= 1
    assert tagged_processes(tag) == []


def test_superlink_that_cannot_start_is_named_with_its_cause(
    tmp_path, bastion_env, monkeypatch, capsys
):
    """The SuperLink's Fleet port is taken: the console names the cause from its log
    and the log file, summary.json records the failure, and nothing is left running."""
    from bastion import cli, federation

    env, tag = bastion_env
    monkeypatch.setenv("BASTION_TEST_TAG", tag)
    monkeypatch.setenv("BASTION_CACHE_DIR", env["BASTION_CACHE_DIR"])
    taken = socket.socket()  # bound, not listening: connecting fails, binding too
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    ports = iter([federation.free_port(), port])
    # LocalFederation picks the Control API port, then the Fleet API port
    monkeypatch.setattr(federation, "free_port", lambda host="127.0.0.1": next(ports))
    out = tmp_path / "run"
    try:
        code = cli.main(["run", "--clients", "2", "--rounds", "1", "--output-dir", str(out)])
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert code == 1, err
    log = out / "logs" / "superlink.log"
    assert "the SuperLink could not start" in err and str(log) in err
    assert f"{port} is already in use" in err  # the cause, from the log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "already in use" in summary["reason"]
    assert summary["rounds"] == 0
    assert tagged_processes(tag) == []


def test_bad_config_fails_before_starting_anything(tmp_path, bastion_env):
    env, tag = bastion_env
    out = tmp_path / "run"
    proc = run_bastion(
        ["--clients", "2", "--output-dir", str(out), "--run-config", "lr=-1 partitioner=zipf"],
        env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "'lr'" in proc.stderr and "-1" in proc.stderr
    assert "'partitioner'" in proc.stderr and "'zipf'" in proc.stderr
    assert not (out / "logs").exists()
    assert tagged_processes(tag) == []


def test_missing_dataset_fails_before_starting_anything(tmp_path, bastion_env):
    env, tag = bastion_env
    env["BASTION_NO_DOWNLOAD"] = "1"  # the test must not depend on the network
    empty = tmp_path / "no-data"
    empty.mkdir()
    out = tmp_path / "run"
    proc = run_bastion(
        [
            "--clients",
            "2",
            "--dataset",
            "mnist",
            "--data-dir",
            str(empty),
            "--output-dir",
            str(out),
        ],
        env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "'mnist'" in proc.stderr and str(empty) in proc.stderr
    assert "train-images-idx3-ubyte" in proc.stderr  # says which files it needs
    assert not (out / "logs").exists()
    assert tagged_processes(tag) == []
