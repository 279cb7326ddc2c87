"""The ``bastion`` command.

``bastion run`` starts a real local federation (one SuperLink and N SuperNodes
on loopback, gRPC between them), submits this Flower App with ``flwr run``,
shows each round as it finishes, prints a final table and stops every process
it started, on success, on failure and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_args

from attacks import attack_names
from bastion import security
from bastion.console import RoundPrinter, WallClock, final_table, plural, resume_command
from bastion.defences import (
    DEFENCES,
    RECOMMENDED,
    defences_report,
    fragile_rule_note,
    get_defence,
    with_defence,
)
from bastion.experiment_plots import plot_grid
from bastion.experiments import cell_done, load_grid, only_groups, run_grid, write_tables
from bastion.federation import LocalFederation, ProcessStartError, failure_cause
from bastion.preflight import app_defaults, check_rule_fits
from bastion.simulation import (
    RAY_MISSING_MESSAGE,
    SimulationUnavailableError,
    ray_available,
    run_simulation,
)
from bastion.supernode import LAUNCHERS
from client.state import STATE_DIR_ENV
from common.batch import load_batch
from common.config import ConfigError, RunConfig, format_overrides, parse_overrides
from common.rundir import (
    CheckpointError,
    check_resume_config,
    checkpoint_paths,
    default_run_dir,
    load_latest_checkpoint,
    record_outcome,
    rewind_run_dir,
)
from common.runlog import read_new_rows
from server.run_config import all_keys, load_run_config
from strategies.rules import Aggregator
from task.datasets import DATASETS, load_dataset
from task.partition import PARTITIONERS


def find_app_dir(explicit: str | None = None) -> Path:
    """The Flower App directory (holds ``pyproject.toml`` with ``[tool.flwr.app]``)."""
    candidates = [Path(explicit)] if explicit else [Path.cwd(), Path(__file__).resolve().parents[1]]
    for cand in candidates:
        pyproject = cand / "pyproject.toml"
        if (
            pyproject.is_file()
            and "tool" in (data := tomllib.loads(pyproject.read_text()))
            and ("flwr" in data["tool"])
        ):
            return cand.resolve()
    raise SystemExit(
        "bastion: no Flower App found (a pyproject.toml with [tool.flwr.app]) in "
        + ", ".join(str(c) for c in candidates)
        + "; run from the Bastion checkout or pass --app DIR"
    )


def build_run_config(args: argparse.Namespace, app_dir: Path) -> tuple[RunConfig, dict[str, Any]]:
    """Merge defaults, ``--run-config`` and the flags; validate; return (model, overrides)."""
    overrides: dict[str, Any] = {}
    if args.run_config:
        overrides |= parse_overrides(args.run_config)
    flags = {
        "num-server-rounds": args.rounds,
        "dataset": args.dataset,
        "data-dir": str(Path(args.data_dir).resolve()) if args.data_dir else None,
        "partitioner": args.partitioner,
        "seed": args.seed,
        "aggregator": args.aggregator,
        "num-byzantine": args.num_byzantine,
        "num-malicious": getattr(args, "malicious", None),
        "attack": getattr(args, "attack", None),
        "resume": True if getattr(args, "resume", False) else None,
    }
    overrides |= {k: v for k, v in flags.items() if v is not None}
    preset = getattr(args, "defence", None)
    if preset:  # the preset's keys first: what the user wrote wins
        mine = dict(overrides)
        overrides = with_defence(preset, overrides)
        kept = {k: v for k, v in get_defence(preset).keys.items() if k not in mine}
        changed = sorted(set(get_defence(preset).keys) - set(kept))
        print(
            f"bastion: --defence {preset}: "
            + format_overrides(kept)
            + (f" (yours win for {', '.join(changed)})" if changed else "")
        )
    overrides.setdefault("min-available-nodes", args.clients)
    overrides.setdefault(
        "min-train-nodes", min(args.clients, int(overrides["min-available-nodes"]))
    )
    defaults = app_defaults(app_dir)
    full = defaults | overrides
    output = Path(args.output_dir) if args.output_dir else _fresh_run_dir(full)
    overrides["output-dir"] = str(output.resolve())
    full["output-dir"] = overrides["output-dir"]
    if int(full.get("num-malicious", 0)) > 1 and not full.get("collusion-dir"):
        # the colluding attackers' side channel (client.collusion) for this run
        overrides["collusion-dir"] = full["collusion-dir"] = str(output.resolve() / "collusion")
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(
            f"run config: unknown key(s) {unknown}; known keys: {', '.join(all_keys())}"
        )
    return load_run_config(full), overrides


def _fresh_run_dir(cfg: dict[str, Any]) -> Path:

    return default_run_dir("runs", str(cfg.get("dataset", "run")))


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class RunFailed(Exception):
    """``bastion run`` ends without a completed run; ``status`` is ``failed`` or
    ``interrupted``, ``reason`` goes into ``summary.json``, ``message`` to the console."""

    def __init__(self, status: str, reason: str, message: str, code: int = 1) -> None:
        super().__init__(reason)
        self.status, self.reason, self.message, self.code = status, reason, message, code


def _watch_run(fed: LocalFederation, runner: Any, printer: RoundPrinter, deadline: float) -> None:
    """Print rounds as ``metrics.jsonl`` grows until ``flwr run`` ends; raise
    :class:`RunFailed` when the SuperLink dies or ``deadline`` passes."""
    offset, metrics = 0, printer.diagnostics.with_name("metrics.jsonl")
    if metrics.exists():  # a resumed run: rows before the checkpoint were printed already
        offset = metrics.stat().st_size
    while True:
        new, offset = read_new_rows(metrics, offset)
        finished = runner.popen.poll() is not None
        if finished:  # rows written just before the run ended
            more, offset = read_new_rows(metrics, offset)
            new += more
        for row in new:
            printer.show(row)
        # checked before `finished` counts: `flwr run` ends as soon as its SuperLink is
        # gone, and the SuperLink's death is then the cause (CI saw that order)
        _raise_if_superlink_died(fed)
        if finished:
            return
        if time.monotonic() > deadline:
            reason = "the run did not finish within --timeout"
            raise RunFailed("failed", reason, f"{reason} ({deadline:.0f} s)")
        time.sleep(0.25)


def _raise_if_superlink_died(fed: LocalFederation) -> None:
    """:class:`RunFailed` naming the SuperLink's exit code, the cause from its log, the
    log's path and tail, when the federation's SuperLink is no longer running."""
    dead = [p for p in fed.dead_processes() if p.name == "superlink"]
    if not dead:
        return
    link = dead[0]
    cause = failure_cause(link.log_path)
    reason = f"the SuperLink exited with code {link.popen.returncode}" + (
        f": {cause}" if cause else ""
    )
    raise RunFailed(
        "failed",
        reason,
        f"{reason}\n  its log: {link.log_path}\n  log tail:\n{_tail(link.log_path, 10)}",
    )


def cmd_run(args: argparse.Namespace) -> int:
    """``bastion run``: local federation, live progress, final table, clean shutdown.

    Every attempt ends with a ``summary.json`` whose ``status`` (``completed``,
    ``failed`` or ``interrupted``) and ``reason`` say what happened, and whose
    ``wall_seconds`` is the figure printed on the console.
    """
    clock = getattr(args, "clock", None) or WallClock()
    checked = _checked_run_config(args)
    if checked is None:
        return 2
    app_dir, cfg, overrides = checked
    # Load (and, when online, download) the data once here: a missing dataset fails
    # before any process starts, and the clients then read it from the shared cache
    # instead of downloading it N times at once.

    try:
        train, _ = load_dataset(cfg.dataset, cfg.data_dir or None)
    except (OSError, ValueError) as exc:
        print(f"bastion: dataset {cfg.dataset!r} is not available:\n{exc}", file=sys.stderr)
        return 2
    if len(train) < args.clients:
        print(
            f"bastion: --clients {args.clients} is more than the {len(train)} training "
            f"samples of {cfg.dataset!r}",
            file=sys.stderr,
        )
        return 2
    if cfg.attack_knowledge == "omniscient":
        print(
            "bastion: attack-knowledge='omniscient' is a simulation-only research mode (the "
            "attackers see every honest update of the round, which no deployed server may "
            "give them); use `bastion simulate`, or attack-knowledge='collude' or 'own' here",
            file=sys.stderr,
        )
        return 2
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.resume and (ckpt := load_latest_checkpoint(run_dir)) is not None:
        # what the ServerApp does first (idempotent): progress below starts from here
        rewind_run_dir(run_dir, ckpt)
        print(f"bastion: resuming {run_dir} after round {ckpt.round} ({ckpt.path.name})")
    threads = args.torch_threads or max(1, (os.cpu_count() or 1) // args.clients)
    print(
        f"bastion: {args.clients} SuperNodes + 1 SuperLink on loopback (gRPC Fleet API), "
        f"{plural(cfg.num_server_rounds, 'round')} of {cfg.dataset}/{cfg.partitioner}; "
        f"results in {run_dir}"
    )

    previous = signal.signal(signal.SIGTERM, _term_as_interrupt)
    insecure = bool(getattr(args, "insecure", False))
    if insecure:
        print(
            "bastion: WARNING: --insecure: no TLS and no SuperNode authentication; traffic is "
            "plain text and any process that reaches the Fleet port can join as a SuperNode",
            file=sys.stderr,
        )
    attempt_started = time.time() - 1.0  # summary.json written at or after this is ours
    printer = RoundPrinter(run_dir, cfg.num_server_rounds)
    fed = LocalFederation(
        args.clients,
        run_dir / "logs",
        torch_threads=threads,
        insecure=insecure,
        launcher=args.launcher,
        # a task still running when the server stops waiting for its round is killed
        task_timeout=cfg.round_timeout,
    )
    failure: RunFailed | None = None
    try:
        try:
            fed.start()
        except ProcessStartError as exc:
            raise RunFailed("failed", f"{exc}; log: {exc.log_path}", exc.explain()) from exc
        runner = fed.submit(app_dir, overrides)
        _watch_run(fed, runner, printer, time.monotonic() + args.timeout)
    except RunFailed as exc:
        failure = exc
    except KeyboardInterrupt as exc:
        sig = str(exc) or "Ctrl-C"
        failure = RunFailed("interrupted", f"stopped by {sig}", "interrupted", code=130)
        print("\nbastion: interrupted; stopping the federation", file=sys.stderr)
    finally:
        fed.stop()
        signal.signal(signal.SIGTERM, previous)
        print(
            f"bastion: stopped {plural(len(fed.processes), 'process')} (SuperLink, SuperNodes, "
            "flwr run) and everything they spawned"
        )
    return _report_outcome(args, cfg, run_dir, printer.rows, failure, attempt_started, clock)


def _report_outcome(
    args: argparse.Namespace,
    cfg: RunConfig,
    run_dir: Path,
    rows: list[dict[str, Any]],
    failure: RunFailed | None,
    attempt_started: float,
    clock: WallClock,
) -> int:
    """Write this attempt's outcome into ``summary.json`` and tell the console."""

    wall = round(clock.seconds(), 1)
    if failure is None:  # the run ended by itself: the ServerApp's summary says how
        summary = record_outcome(
            run_dir,
            "failed",
            "the run ended without a summary from the ServerApp (see logs/flwr-run.log)",
            since=attempt_started,
            only_if_missing=True,
            wall_seconds=wall,
        )
    else:
        summary = record_outcome(
            run_dir, failure.status, failure.reason, since=attempt_started, wall_seconds=wall
        )
    if summary.get("status") == "completed":
        print()
        print(final_table(rows, dp=cfg.dp))
        print(
            f"\nfinal accuracy {summary['final_accuracy']:.4f} after "
            f"{plural(int(summary['rounds']), 'round')} ({wall:.0f} s wall); results, "
            f"checkpoints and plots in {run_dir}"
        )
        if summary.get("max_epsilon") is not None:
            print(
                f"privacy: epsilon {summary['max_epsilon']:.2f} at delta "
                f"{summary.get('dp_delta', cfg.dp_delta):g} (the largest any node spent "
                "over the whole run)"
            )
        return 0
    if failure is not None and failure.status == "interrupted":
        message = f"bastion: run interrupted ({failure.reason}) after {wall:.0f} s"
    elif failure is not None:
        message = f"bastion: run failed after {wall:.0f} s: {failure.message}"
    else:
        message = (
            f"bastion: the run did not complete: {summary.get('reason') or 'no reason given'}"
            f"\nflwr run output (tail):\n{_tail(run_dir / 'logs' / 'flwr-run.log')}"
        )
    done = checkpoint_paths(run_dir)
    next_step = (
        f"to continue after round {done[0][0]} (its last checkpoint):\n  "
        + resume_command(getattr(args, "argv", []), run_dir)
        if done
        else "no round was checkpointed: run the same command again to start over"
    )
    print(
        f"{message}\nbastion: summary in {run_dir / 'summary.json'}; {next_step}",
        file=sys.stderr,
    )
    return failure.code if failure is not None else 1


def _checked_run_config(
    args: argparse.Namespace,
) -> tuple[Path, RunConfig, dict[str, Any]] | None:
    """The app directory, validated run config and overrides of ``run``/``simulate``,
    or ``None`` after printing why they cannot run (client count, a config error,
    more attackers than clients, a rule that cannot aggregate that many replies)."""
    if args.clients < 2:
        print("bastion: --clients must be at least 2", file=sys.stderr)
        return None
    app_dir = find_app_dir(args.app)
    try:
        cfg, overrides = build_run_config(args, app_dir)
    except ConfigError as exc:
        print(f"bastion: invalid configuration:\n{exc}", file=sys.stderr)
        return None
    if cfg.num_malicious > args.clients:
        print(
            f"bastion: --malicious {cfg.num_malicious} is more than --clients {args.clients}",
            file=sys.stderr,
        )
        return None
    problem = check_rule_fits(cfg, args.clients) or resume_problem(args, cfg)
    if problem:
        print(f"bastion: {problem}", file=sys.stderr)
        return None
    note = fragile_rule_note(cfg, used_defence=bool(getattr(args, "defence", None)))
    if note:
        print(f"bastion: {note}", file=sys.stderr)
    return app_dir, cfg, overrides


def resume_problem(args: argparse.Namespace, cfg: RunConfig) -> str | None:
    """Why ``resume = true`` cannot continue the run in ``--output-dir``, or ``None``.

    What the ServerApp checks, before any process starts: an output folder to continue,
    a checkpoint there that reads back (none: the run starts at round 1), and a run
    config that matches the checkpoint's (:func:`common.rundir.check_resume_config`).
    """
    if not cfg.resume:
        return None
    if not args.output_dir:
        return "--resume (key 'resume') needs --output-dir: the folder of the run to continue"

    try:
        ckpt = load_latest_checkpoint(cfg.output_dir)
        if ckpt is not None:
            check_resume_config(ckpt.config, cfg.to_flat(), ckpt.round)
    except (CheckpointError, ConfigError) as exc:
        return str(exc)
    return None


def _term_as_interrupt(signum: int, _frame: object) -> None:
    """SIGTERM (``kill``, a container stop) takes the same clean-up path as Ctrl-C."""
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_keys(args: argparse.Namespace) -> int:
    """``bastion keys``: CA, SuperLink certificate and node key pairs, then the next steps."""

    out = Path(args.out).resolve()
    try:
        if args.nodes < 0:
            raise security.SecurityError(
                f"--nodes: value {args.nodes} is not allowed; allowed: 0 or more"
            )
        extra = [n for item in args.san for n in security.parse_sans(item, source="--san")]
        sans = security.default_sans([e.partition(":")[2] for e in extra])
        files = security.ensure_federation_files(out, args.nodes, sans)
    except security.SecurityError as exc:
        print(f"bastion keys: {exc}", file=sys.stderr)
        return 2
    print(keys_report(files))
    return 0


def keys_report(files: Any) -> str:
    """What ``bastion keys`` made, where, and the commands that use it."""
    cert = files.certificates
    d = files.root
    lines = [
        f"CA ({cert.ca}):                 {d / 'ca' / 'ca.crt'}  (key {d / 'ca' / 'ca.key'}: "
        "keep it off the SuperLink if you can)",
        f"SuperLink certificate ({cert.server}): {d / 'superlink' / 'server.crt'}  for "
        + ", ".join(cert.sans),
        f"SuperLink key:                  {d / 'superlink' / 'server.key'}",
        f"CA certificate for SuperNodes and flwr: {files.ca_cert}",
    ]
    for key in files.nodes:
        lines.append(
            f"SuperNode {key.index} ({key.state}): private {key.private_key}  public "
            f"{key.public_key}"
        )
    local = ("DNS:localhost", "IP:127.0.0.1", "IP:::1")
    server = next((s.partition(":")[2] for s in cert.sans if s not in local), "localhost")
    lines += [
        "",
        "Next:",
        "1. SuperLink (copy superlink/ to its host; the Control API stays on loopback):",
        "   flower-superlink " + " ".join(files.superlink_args()),
        "     --disable-runtime-dependency-installation --fleet-api-address 0.0.0.0:9092 "
        "--host 127.0.0.1 --port 9093",
        "2. flwr connection on the SuperLink host ($FLWR_HOME/config.toml):",
        '   [superlink.bastion]  address = "127.0.0.1:9093"',
        f'   root-certificates = "{files.ca_cert}"',
        "3. Register every SuperNode's public key (keeps its node id across restarts):",
    ]
    pubs = [str(k.public_key) for k in files.nodes] or [str(d / "nodes" / "node-<i>.pub")]
    lines += [f"   flwr supernode register {p} bastion" for p in pubs]
    lines += [
        "4. Each SuperNode (copy supernode/ca.crt and its own node-<i>.key to it):",
        f"   bastion supernode -- --superlink {server}:9092 --root-certificates ca.crt "
        "--auth-supernode-private-key node-<i>.key \\",
        '     --node-config "partition-id=<i> num-partitions=<N>"',
        "Revoke a node: flwr supernode unregister <node-id> bastion (see docs/SECURITY.md)",
    ]
    return "\n".join(lines)


def cmd_simulate(args: argparse.Namespace) -> int:
    """``bastion simulate``: the same app on Flower's Simulation Engine (Ray)."""

    checked = _checked_run_config(args)
    if checked is None:
        return 2
    app_dir, cfg, overrides = checked
    print(
        f"bastion: {args.clients} virtual SuperNodes on Flower's Simulation Engine, "
        f"{plural(cfg.num_server_rounds, 'round')} of {cfg.dataset}/{cfg.partitioner}; "
        f"results in {cfg.output_dir}"
    )
    clock = getattr(args, "clock", None) or WallClock()
    attempt_started = time.time() - 1.0
    run_dir = Path(cfg.output_dir)
    printer = RoundPrinter(run_dir, cfg.num_server_rounds)
    colluders = cfg.num_malicious if cfg.attack_knowledge == "collude" else 0
    signal.signal(signal.SIGTERM, _term_as_interrupt)
    failure: RunFailed | None = None
    try:
        result = run_simulation(
            num_supernodes=args.clients,
            run_config=overrides,
            app_dir=app_dir,
            cpus_per_client=args.cpus_per_client,
            min_parallel_clients=colluders or None,
            timeout=args.timeout,
            on_round=printer.show,
        )
        if not result.ok:
            why = f"the simulation did not complete: {result.error}"
            failure = RunFailed("failed", why, why, code=result.exit_code)
    except SimulationUnavailableError as exc:
        print(f"bastion: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("\nbastion: interrupted; the simulation was stopped", file=sys.stderr)
        failure = RunFailed("interrupted", f"stopped by {exc or 'Ctrl-C'}", "", code=130)
    return _report_outcome(args, cfg, run_dir, printer.rows, failure, attempt_started, clock)


def cmd_defences(args: argparse.Namespace) -> int:
    """``bastion defences``: the named defences."""
    print(defences_report())
    return 0


def _echo(line: str) -> None:
    """A progress line, flushed: the grid runs for hours, often with output to a file."""
    print(line, flush=True)


def cmd_grid(args: argparse.Namespace) -> int:
    """``bastion grid FILE``: run an experiment grid (resumable), then table and plots."""

    try:
        grid = load_grid(args.file)
    except (ConfigError, OSError, ValueError, KeyError) as exc:
        print(f"bastion: invalid grid file {args.file}:\n{exc}", file=sys.stderr)
        return 2
    if args.only:
        groups = {"main", *grid.groups}
        unknown = sorted(set(args.only) - groups)
        if unknown:
            print(
                f"bastion: option '--only': value {unknown[0]!r} is not allowed; allowed: "
                f"one of {', '.join(repr(g) for g in sorted(groups))}",
                file=sys.stderr,
            )
            return 2
        grid = only_groups(grid, args.only)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    app_dir = find_app_dir(args.app)
    if not args.report_only:
        runner = _grid_runner(grid.backend, app_dir, args.cell_timeout)
        if runner is None:
            return 2
        signal.signal(signal.SIGTERM, _term_as_interrupt)
        try:
            if grid.backend == "simulation":
                results = run_grid(grid, out, batch_runner=runner, echo=_echo)
            else:
                results = run_grid(grid, out, runner, echo=_echo)
        except KeyboardInterrupt:
            print(
                "\nbastion: interrupted; finished cells are kept (run again to resume)",
                file=sys.stderr,
            )
            return 130
    else:
        results = [
            (c, out / "cells" / c.slug, cell_done(out / "cells" / c.slug)) for c in grid.cells
        ]
    rows = write_tables(results, out, grid.sweeps, grid.labelled)
    plots = plot_grid(results, out, grid.sweeps, grid.labelled)
    done = sum(ok for c, _, ok in results if not c.infeasible)
    infeasible = sum(bool(c.infeasible) for c, _, _ in results)
    print(
        f"grid: {done}/{len(results) - infeasible} cells completed"
        + (f" ({infeasible} infeasible or pruned, not run)" if infeasible else "")
        + f"; table {out / 'results.md'} "
        f"({len(rows)} rows), plots: {', '.join(p.name for p in plots) or 'none'}"
    )
    return 0 if done + infeasible == len(results) else 1


def _grid_runner(backend: str, app_dir: Path, cell_timeout: float) -> Any:
    """A cell runner for ``backend`` ("simulation" or "federation"), or None (printed why)."""
    if backend == "simulation":
        if not ray_available():
            print(f"bastion: {RAY_MISSING_MESSAGE}", file=sys.stderr)
            return None

        def run_batch(
            batch_file: Path, batch_dir: Path, clients: int, on_cell: Callable[[dict], None]
        ) -> int:
            cells = load_batch(batch_file)
            colluders = max(
                (
                    int(c.get("num-malicious", 0))
                    for c in cells
                    if c.get("attack-knowledge", "collude") == "collude"
                ),
                default=0,
            )
            # The nodes' state files (client momentum, DP ledgers; one model-sized file
            # per node and cell) live with the batch and go with it: a grid cell never
            # resumes, it starts over, and hundreds of cells would fill the cache.
            state = batch_dir / "node-state"
            try:
                res = run_simulation(
                    num_supernodes=clients,
                    run_config={"batch-file": str(batch_file), "output-dir": str(batch_dir)},
                    app_dir=app_dir,
                    output_dir=batch_dir,
                    min_parallel_clients=colluders if colluders > 1 else None,
                    timeout=cell_timeout * len(cells),
                    on_round=on_cell,
                    env={STATE_DIR_ENV: str(state)},
                )
            finally:
                shutil.rmtree(state, ignore_errors=True)
            return res.exit_code

        return run_batch

    def run_federation_cell(overrides: dict[str, Any], cell_dir: Path, clients: int) -> int:
        args = [
            "--clients",
            str(clients),
            "--output-dir",
            str(cell_dir),
            "--run-config",
            format_overrides(overrides),
            "--app",
            str(app_dir),
            "--timeout",
            str(cell_timeout),
        ]
        state = cell_dir / "node-state"  # as for a batch: the cell's, removed after it
        try:
            return subprocess.run(
                [sys.executable, "-m", "bastion.cli", "run", *args],
                stdout=subprocess.DEVNULL,
                check=False,
                env=os.environ | {STATE_DIR_ENV: str(state)},
            ).returncode
        finally:
            shutil.rmtree(state, ignore_errors=True)

    return run_federation_cell


def _default(key: str) -> Any:
    """The default of run-config ``key`` (``RunConfig`` mirrors ``pyproject.toml``)."""
    return RunConfig.model_fields[key.replace("-", "_")].default


def _choices(key: str) -> str:
    """``a | b | c``: the values run-config ``key`` allows: the registered rules or
    attacks, or the choices of its ``Literal`` type."""
    named = {
        "aggregator": lambda: tuple(Aggregator.registry),
        "attack": attack_names,
        "dataset": lambda: tuple(DATASETS),
        "partitioner": lambda: PARTITIONERS,
    }
    if key in named:
        return " | ".join(named[key]())
    return " | ".join(get_args(RunConfig.model_fields[key.replace("-", "_")].annotation))


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags ``bastion run`` and ``bastion simulate`` share (defaults: the app's run
    config, named in each help text)."""
    p.add_argument(
        "--rounds",
        type=int,
        help=f"number of server rounds (run-config num-server-rounds; default "
        f"{_default('num-server-rounds')})",
    )
    p.add_argument("--dataset", help=f"{_choices('dataset')} (default {_default('dataset')})")
    p.add_argument(
        "--data-dir",
        help="directory holding the dataset files (default: $BASTION_DATA_DIR, then the "
        "places listed under Data in the README)",
    )
    p.add_argument(
        "--partitioner", help=f"{_choices('partitioner')} (default {_default('partitioner')})"
    )
    p.add_argument(
        "--seed",
        type=int,
        help=f"seed of model init, partitioning and training (default {_default('seed')})",
    )
    p.add_argument(
        "--aggregator", help=f"{_choices('aggregator')} (default {_default('aggregator')})"
    )
    p.add_argument(
        "--num-byzantine",
        type=int,
        help="Byzantine clients the rule must tolerate (f, run-config num-byzantine; default "
        f"{_default('num-byzantine')})",
    )
    p.add_argument(
        "--malicious",
        type=int,
        help="make this many of the clients malicious (run-config num-malicious; which "
        f"ones follows a seeded rule; default {_default('num-malicious')})",
    )
    p.add_argument(
        "--attack",
        help=f"{_choices('attack')} (default {_default('attack')}; parameters: --run-config "
        "'attack-epsilon=... attack-z=... attack-sigma=... attack-scale=... "
        'attack-knowledge="own"\')',
    )
    p.add_argument(
        "--defence",
        help=f"a named defence: pre-aggregation chain, rule and client momentum in one "
        f"(one of {', '.join(DEFENCES)}; recommended: {RECOMMENDED}; needs "
        "--num-byzantine; `bastion defences` lists them; --run-config and the flags win; "
        "default none)",
    )
    p.add_argument("--output-dir", help="results directory (default: a new folder in ./runs/)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir from its newest checkpoint (run-config "
        "resume=true; the config must match the checkpoint's, see docs/RELIABILITY.md)",
    )
    p.add_argument(
        "--run-config",
        default="",
        help='more run-config keys, e.g. "lr=0.05 alpha=0.1" (flwr run syntax; default none)',
    )
    p.add_argument("--app", help="Flower App directory (default: the Bastion checkout)")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch threads per ClientApp (default: cores / clients, at least 1)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="give up after this many seconds (default 3600)",
    )


def make_parser() -> argparse.ArgumentParser:
    """The ``bastion`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="bastion",
        description="Bastion: Byzantine-robust, differentially private federated learning "
        "on Flower.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="train over a real local gRPC federation",
        description="Start one SuperLink and N SuperNodes on loopback (gRPC Fleet API), submit "
        "this app with `flwr run`, show each round, print a final table, stop every process.",
    )
    run.add_argument("--clients", type=int, default=10, help="number of SuperNodes (default 10)")
    run.add_argument(
        "--insecure",
        action="store_true",
        help="turn off TLS and SuperNode authentication (on by default; see docs/SECURITY.md)",
    )
    run.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="warm",
        help="how SuperNodes start ClientApp tasks (default warm): warm forks each task "
        "from a process with torch and Flower loaded (see `bastion supernode`); flower "
        "starts Flower's new process per message",
    )
    _add_run_flags(run)
    run.set_defaults(func=cmd_run)

    keys = sub.add_parser(
        "keys",
        help="make a CA, the SuperLink certificate and SuperNode key pairs",
        description="Make (or reuse) a certificate authority, a SuperLink TLS certificate for "
        "the given names/addresses and one P-384 key pair per SuperNode, and print the "
        "SuperLink, SuperNode and registration commands (see docs/SECURITY.md).",
    )
    keys.add_argument("--out", required=True, help="folder for ca/, superlink/, supernode/, nodes/")
    keys.add_argument(
        "--nodes", type=int, default=0, help="SuperNode key pairs to make (default 0)"
    )
    keys.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="HOST_OR_IP",
        help="a name or address SuperNodes use to reach the SuperLink (repeatable; "
        "localhost, 127.0.0.1 and this host's name are always included)",
    )
    keys.set_defaults(func=cmd_keys)

    sim = sub.add_parser(
        "simulate",
        help="train on Flower's Simulation Engine (Ray), 25-100 virtual clients",
        description="Run the same ServerApp and ClientApp on virtual SuperNodes with Flower's "
        "Simulation Engine (needs the simulation extra: pip install -e '.[simulation]').",
    )
    sim.add_argument("--clients", type=int, default=25, help="virtual SuperNodes (default 25)")
    sim.add_argument(
        "--cpus-per-client", type=int, default=1, help="CPUs per ClientApp actor (default 1)"
    )
    _add_run_flags(sim)
    sim.set_defaults(func=cmd_simulate)

    node = sub.add_parser(
        "supernode",
        help="run a SuperNode whose ClientApp tasks fork from a warm process",
        description="See `bastion supernode --help` (dispatched by bastion.entry before "
        "this parser, so that the long-lived supervisor imports the standard library only).",
        add_help=False,
    )
    node.add_argument("rest", nargs=argparse.REMAINDER)
    node.set_defaults(func=lambda args: _supernode(args.rest))

    presets = sub.add_parser(
        "defences",
        help="list the named defences (--defence) with their keys and evidence",
        description="Print every defence preset: its run-config keys, the equivalent "
        "flwr run --run-config text, and where the evidence for it is.",
    )
    presets.set_defaults(func=cmd_defences)

    grid = sub.add_parser(
        "grid",
        help="run an attack x defence experiment grid (resumable) and report it",
        description="Run every cell of a grid file (TOML, see experiments/*.toml and "
        "docs/ROBUSTNESS.md), skipping finished ones; write results.csv, results.md and plots.",
    )
    grid.add_argument("file", help="grid file (TOML)")
    grid.add_argument("--out", required=True, help="output directory (cells/, tables, plots)")
    grid.add_argument("--app", help="Flower App directory (default: the Bastion checkout)")
    grid.add_argument(
        "--cell-timeout", type=float, default=1800.0, help="seconds per cell (default 1800)"
    )
    grid.add_argument(
        "--report-only", action="store_true", help="only (re)write the table and plots"
    )
    grid.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="GROUP",
        help="run (and report) only these groups: 'main' or a [[sweep]]'s name (repeatable)",
    )
    grid.set_defaults(func=cmd_grid)
    return parser


def _supernode(rest: Sequence[str]) -> int:
    from bastion.supernode import main as supernode_main

    return supernode_main(rest)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bastion`` console script."""
    # Ctrl-C (SIGINT) must stop a run cleanly even when the shell that started us
    # ignores it (background jobs of non-interactive shells inherit SIG_IGN, and
    # Python then never raises KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    clock = WallClock()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    args.argv, args.clock = argv, clock
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
