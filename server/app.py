"""Bastion's ServerApp: the round loop, central evaluation and the run's results.

One round: sample nodes and send them the global model with the round's training
instructions; wait for the replies (up to ``round-timeout``); let the strategy
validate and aggregate them; evaluate the new global model centrally on the
dataset's test split; write metrics, per-node diagnostics and a checkpoint.
Every ``federated-eval-every`` rounds (and after the last one when enabled) the
clients also evaluate the model on their local test splits.

The loop (:func:`_run`) reads as its phases: :func:`setup_run`,
:func:`start_or_resume`, then per round :func:`train_round` (the strategy returns a
:class:`~strategies.strategy.RoundOutcome`), central evaluation
(:class:`CentralEvaluation`), :func:`evaluate_round` when due and
:func:`record_round`; :func:`finish_run` writes the summary. What the loop carries
from round to round is a :class:`LoopState`.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import NamedTuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common import Error, log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from attacks.byzantine import AdaptiveChoice
from common import protocol
from common.batch import cell_run_config, load_batch
from common.config import RunConfig
from common.rundir import (
    Checkpoint,
    RunResults,
    default_run_dir,
    restore_rng_state,
    rng_state,
)
from server.omniscient import OmniscientAdversary
from server.reputation_report import reputation_summary, write_reputation_report
from server.run_config import load_run_config
from strategies.rules.from_config import (
    dp_check_from_config,
    pipeline_from_config,
    reputation_from_config,
)
from strategies.strategy import RobustStrategy, RoundOutcome
from strategies.validation import MAX_REASON_CHARS, bounded
from task.datasets import ArrayDataset, load_dataset
from task.models import build_model
from task.training import evaluate, resolve_device

app = ServerApp()

# The stock Grid.send_and_receive sleeps 3 s between polls of the SuperLink; on
# short rounds that is most of the round. We poll faster (push/pull are public Grid
# API), backing off to 0.5 s while nothing arrives (a warm round takes about a second:
# a longer back-off would be a visible share of it). BASTION_POLL_SECONDS overrides
# the first interval (the overhead benchmark sets 3 to compare with Flower's behaviour).
POLL_SECONDS = float(os.environ.get("BASTION_POLL_SECONDS", "0.1"))
MAX_POLL_SECONDS = max(POLL_SECONDS, 0.5)
# an instruction outlives its round by this much (pull latency), then the SuperLink
# drops it; a reply inherits what is left of its instruction's TTL
TTL_MARGIN_SECONDS = 5.0


NO_REPLY_REASON = "no reply within round-timeout"


class NoReply(NamedTuple):
    """A message that got no reply from its node: the node it went to, and why."""

    node_id: int
    reason: str


def superlink_error_reason(error: Error) -> str:
    """Why the SuperLink answered in a node's place (an error reply it generated).

    Flower 1.39 (``flwr.server.superlink.linkstate.utils``): NODE_UNAVAILABLE when the
    node missed its heartbeats (offline after 2 x its 30 s interval), MESSAGE_UNAVAILABLE
    when the instruction expired or was removed, REPLY_MESSAGE_UNAVAILABLE when the
    node's reply expired before it was pulled.
    """
    code = int(error.code)
    if code == ErrorCode.NODE_UNAVAILABLE:
        what = "node unavailable (SuperLink reported it offline: no heartbeat in time)"
    elif code == ErrorCode.MESSAGE_UNAVAILABLE:
        what = "instruction unavailable (SuperLink: expired or removed before a reply)"
    elif code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE:
        what = "reply unavailable (SuperLink: the node's reply expired)"
    else:
        what = "error reply from the SuperLink"
    return f"{what}; error code {code}: {bounded(str(error.reason))}"


def send_and_receive(
    grid: Grid, messages: Iterable[Message], timeout: float
) -> tuple[list[Message], dict[str, NoReply]]:
    """Push ``messages`` and pull replies until all arrived or ``timeout`` passed.

    Returns the nodes' replies and ``{message_id: NoReply}`` of the messages that got
    none: no reply within ``timeout``, or an error reply the SuperLink generated in the
    node's place (:func:`superlink_error_reason`). Such a reply names the SuperLink as
    its source (``src_node_id`` is Flower's ``SUPERLINK_NODE_ID``, 1), so the node is
    found through ``reply_to_message_id``: the id of the instruction it answers.

    Every message lives ``timeout`` (+ :data:`TTL_MARGIN_SECONDS`) seconds: Flower's
    default is 12 hours, so a node that was cut off during a round and comes back
    later would first pull the closed round's instruction and train on it for
    nothing (spending privacy budget with DP); with this TTL the SuperLink drops it.
    """
    messages = list(messages)
    for msg in messages:
        msg.metadata.ttl = timeout + TTL_MARGIN_SECONDS
    ids = list(grid.push_messages(messages))
    sent = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages, strict=True)}
    waiting = dict(sent)
    replies: list[Message] = []
    unanswered: dict[str, NoReply] = {}
    deadline, pause = time.monotonic() + timeout, POLL_SECONDS
    while waiting and time.monotonic() < deadline:
        got = list(grid.pull_messages(list(waiting)))
        for reply in got:
            mid = reply.metadata.reply_to_message_id
            waiting.pop(mid, None)
            node_id = sent.get(mid)
            if reply.has_error() and node_id is not None and reply.metadata.src_node_id != node_id:
                unanswered[mid] = NoReply(node_id, superlink_error_reason(reply.error))
            else:
                replies.append(reply)
        if waiting:
            time.sleep(pause)
            pause = min(pause * 1.5, MAX_POLL_SECONDS) if not got else POLL_SECONDS
    return replies, unanswered | {mid: NoReply(n, NO_REPLY_REASON) for mid, n in waiting.items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of federated training and write the results
    (or, with ``batch-file``, every cell of the batch one after the other)."""
    cfg = load_run_config(context.run_config)  # every key, rule and attack checked
    if cfg.batch_file:
        _run_batch(grid, dict(context.run_config), cfg)
        return
    _run_one(grid, cfg)


def _run_one(grid: Grid, cfg: RunConfig, batch_cell: int = -1) -> RunResults:
    """One Bastion run; its summary says "failed" (and the error is re-raised) on failure."""
    run_dir = Path(cfg.output_dir) if cfg.output_dir else default_run_dir("runs", cfg.dataset)
    results = RunResults(run_dir, cfg.to_flat(), resume=cfg.resume)
    log(INFO, "[bastion] results go to %s", results.run_dir)
    try:
        _run(grid, cfg, results, batch_cell)
    except BaseException as exc:
        reason = bounded(f"{type(exc).__name__}: {exc}", MAX_REASON_CHARS)
        results.write_summary(
            status="failed",
            reason=reason,
            error=reason,
            **run_description(cfg),
            traceback=traceback.format_exc(),
        )
        log(ERROR, "[bastion] run failed: %s", exc)
        raise
    return results


def run_description(cfg: RunConfig) -> dict[str, object]:
    """What ``summary.json`` says the run was: data, attack, defence and DP settings.

    ``defence`` names the pre-aggregation steps and the rule in the order they run
    (:func:`strategies.rules.from_config.pipeline_from_config`); ``num_malicious`` and ``attack``
    are the run config's attackers (nodes that declare themselves malicious through
    their own node config are counted in ``malicious_nodes_declared``). With DP,
    ``dp_noise_multiplier`` is ``None`` when each node calibrates sigma to
    ``dp_target_epsilon`` itself.
    """
    pipeline = pipeline_from_config(cfg)
    steps = [step.name for step in pipeline.preaggregators]
    out: dict[str, object] = {
        "dataset": cfg.dataset,
        "partitioner": cfg.partitioner,
        "seed": cfg.seed,
        "aggregator": cfg.aggregator,
        "num_byzantine": cfg.num_byzantine,
        "preaggregation": steps,
        "defence": " -> ".join([*steps, pipeline.aggregator.name]),
        "attack": cfg.attack if cfg.num_malicious > 0 else "none",
        "num_malicious": cfg.num_malicious if cfg.attack != "none" else 0,
        "dp": cfg.dp,
    }
    if cfg.dp:
        out |= {
            "dp_noise_multiplier": None if cfg.dp_target_epsilon > 0 else cfg.dp_noise_multiplier,
            "dp_target_epsilon": cfg.dp_target_epsilon or None,
            "dp_max_grad_norm": cfg.dp_max_grad_norm,
            "dp_delta": cfg.dp_delta,
        }
    return out


def _run_batch(grid: Grid, run_config: dict[str, object], cfg: RunConfig) -> None:
    """Every cell of ``batch-file`` as a run of its own (see :mod:`common.batch`).

    A failing cell is recorded in its own summary and the batch goes on; the batch's
    ``output-dir`` gets one ``metrics.jsonl`` row per finished cell and a summary.
    """
    cells = load_batch(cfg.batch_file)
    batch = RunResults(Path(cfg.output_dir or "runs/batch"), cfg.to_flat())
    failed = 0
    for i in range(len(cells)):
        row: dict[str, object] = {"round": i + 1, "cell": i}
        try:
            cell_cfg = load_run_config(cell_run_config(run_config, cfg.batch_file, i))
            results = _run_one(grid, cell_cfg, batch_cell=i)
            row |= {"output_dir": str(results.run_dir), "status": "completed"}
            row["final_accuracy"] = results.rounds[-1].get("central_accuracy")
        except Exception as exc:  # the cell's summary says why; go on with the next
            failed += 1
            row |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        batch.log_round(row | {"time": time.time()})
    batch.write_summary(status="completed", cells=len(cells), failed_cells=failed)


# ------------------------------------------------------------------ the round loop
@dataclass
class ServerRun:
    """The fixed parts of one run: its config, the Grid, where the results go, the
    strategy, central evaluation and (research mode) the omniscient adversary."""

    cfg: RunConfig
    grid: Grid
    results: RunResults
    strategy: RobustStrategy
    central: CentralEvaluation
    adversary: OmniscientAdversary | None
    batch_cell: int = -1


@dataclass
class LoopState:
    """What the round loop carries from one round to the next (a checkpoint keeps it)."""

    arrays: ArrayRecord  # the global model
    started: float  # time.monotonic() at the start (moved back by a resumed run's time)
    # DP: nodes account privacy per run in a ledger; a resumed run keeps the first
    # attempt's (client.privacy), so its epsilon covers the rounds before the crash too
    ledger_run: int
    num_clients: int = 0  # the most nodes connected in any round
    # partition id each node reported (a node that stops replying cannot say it)
    node_partitions: dict[int, int] = field(default_factory=dict)
    first_round: int = 1  # the round the loop starts with

    def checkpoint_loop(self, elapsed_seconds: object) -> dict[str, object]:
        """The checkpoint's ``loop`` entry: what a resumed run restores."""
        return {
            "num_clients": self.num_clients,
            "elapsed_seconds": elapsed_seconds,
            "node_partitions": self.node_partitions,
            "ledger_run": self.ledger_run,
        }


class TrainedRound(NamedTuple):
    """A training round as the loop saw it: the strategy's outcome, how long the
    round took from the instructions to the last reply and, when the omniscient
    adaptive attack ran, what it chose (the metrics row's ``adaptive_*`` entries)."""

    outcome: RoundOutcome
    seconds: float
    adaptive: dict[str, object] | None = None


class CentralEvaluation:
    """The global model evaluated on the server's test split.

    With ``central-eval-samples`` the rounds before the last use a fixed subset (long
    grids: evaluating 10k images each round costs more than the round); the last
    round uses all of it.
    """

    def __init__(
        self, model: torch.nn.Module, test_set: ArrayDataset, device: torch.device, cfg: RunConfig
    ) -> None:
        self.model = model
        self.device = device
        self.test_set = test_set
        self.final_round = cfg.num_server_rounds
        self.quick_set = test_set
        if 0 < cfg.central_eval_samples < len(test_set):
            pick = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(cfg.seed))
            self.quick_set = test_set.subset(pick[: cfg.central_eval_samples].sort().values.numpy())

    def __call__(self, arrays: ArrayRecord, server_round: int) -> dict[str, float]:
        """Load ``arrays`` into the model; its ``central_*`` metrics after ``server_round``."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        subset = self.test_set if server_round == self.final_round else self.quick_set
        res = evaluate(self.model, subset, device=self.device)
        return {
            "central_loss": res.loss,
            "central_accuracy": res.accuracy,
            "central_samples": len(subset),
        }

    def model_state(self) -> dict[str, torch.Tensor]:
        """A copy of the weights last evaluated (what a checkpoint keeps)."""
        return {k: v.clone() for k, v in self.model.state_dict().items()}


def _run(grid: Grid, cfg: RunConfig, results: RunResults, batch_cell: int = -1) -> None:
    """One run: round 0 (or resume after a checkpoint), the rounds, the summary."""
    run, state = setup_run(grid, cfg, results, batch_cell)
    start_or_resume(run, state)
    for server_round in range(state.first_round, cfg.num_server_rounds + 1):
        trained = train_round(run, state, server_round)
        row: dict[str, object] = {"round": server_round, **run.central(state.arrays, server_round)}
        if federated_eval_due(cfg, server_round):
            row |= evaluate_round(run, state.arrays, server_round)
        record_round(run, state, trained, row)
    finish_run(run, state)


def build_strategy(cfg: RunConfig) -> RobustStrategy:
    """The run config's strategy: its pipeline, reputation, server optimizer and limits."""
    return RobustStrategy(
        pipeline=pipeline_from_config(cfg),
        num_byzantine=cfg.num_byzantine,
        server_lr=cfg.server_lr,
        server_momentum=cfg.server_momentum,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_train_nodes,
        min_available_nodes=cfg.min_available_nodes,
        reputation=reputation_from_config(cfg),
        max_reply_bytes=cfg.max_reply_bytes,
        max_update_norm=cfg.max_update_norm,
        min_accepted_replies=cfg.min_accepted_replies,
        dp_check=dp_check_from_config(cfg),
    )


def setup_run(
    grid: Grid, cfg: RunConfig, results: RunResults, batch_cell: int = -1
) -> tuple[ServerRun, LoopState]:
    """The seeded initial model, the strategy, the test split and the adversary; the
    loop's state before round 1 (the clock starts here)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.dataset)
    _, test_set = load_dataset(cfg.dataset, cfg.data_dir or None)
    strategy = build_strategy(cfg)
    arrays = ArrayRecord(model.state_dict())
    # research mode, simulation only (raises on a real federation): see server.omniscient
    adversary = (
        OmniscientAdversary(cfg, grid, strategy)
        if cfg.attack_knowledge == "omniscient" and cfg.num_malicious > 0
        else None
    )
    started = time.monotonic()
    central = CentralEvaluation(model, test_set, device, cfg)
    run = ServerRun(cfg, grid, results, strategy, central, adversary, batch_cell)
    return run, LoopState(arrays=arrays, started=started, ledger_run=int(grid.run.run_id))


def start_or_resume(run: ServerRun, state: LoopState) -> None:
    """Resume after the newest checkpoint's round (``resume`` with a checkpoint), or
    evaluate the initial model centrally and record it as round 0."""
    if run.results.resumed is not None:
        resume(run, state, run.results.resumed)
        return
    if run.cfg.resume:
        log(INFO, "[bastion] resume: no checkpoint in %s; starting at round 1", run.results.run_dir)
    first = run.central(state.arrays, 0)
    run.results.log_round(
        {
            "round": 0,
            **first,
            "elapsed_seconds": time.monotonic() - state.started,
            "time": time.time(),
        }
    )
    log(INFO, "[bastion] round 0: central accuracy %.4f", first["central_accuracy"])


def resume(run: ServerRun, state: LoopState, ckpt: Checkpoint) -> None:
    """Restore the model, the strategy, the random generators and the loop's state
    from ``ckpt``; the next round is the one after the checkpoint's."""
    run.central.model.load_state_dict(ckpt.model)
    state.arrays = ArrayRecord(run.central.model.state_dict())
    run.strategy.load_state_dict(ckpt.strategy)
    restore_rng_state(ckpt.rng)
    state.num_clients = int(ckpt.loop.get("num_clients", 0))
    state.node_partitions = dict(ckpt.loop.get("node_partitions", {}))
    state.ledger_run = int(ckpt.loop.get("ledger_run", state.ledger_run))
    state.started -= float(ckpt.loop.get("elapsed_seconds", 0.0))
    state.first_round = ckpt.round + 1
    log(
        INFO,
        "[bastion] resuming from checkpoint %s: round %d of %d is next",
        ckpt.path,
        state.first_round,
        run.cfg.num_server_rounds,
    )


def train_round(run: ServerRun, state: LoopState, server_round: int) -> TrainedRound:
    """Send the global model to the sampled nodes, wait for their replies and let the
    strategy aggregate them (:meth:`RobustStrategy.train_round`).

    The loop's state gets the new global model (when the round produced one), the
    node count and the partitions the nodes reported; every node's diagnostics go
    to ``diagnostics.jsonl``.
    """
    cfg, grid, strategy = run.cfg, run.grid, run.strategy
    round_start = time.monotonic()
    instructions = cfg.train_instructions(server_round)
    messages = strategy.configure_train(
        server_round,
        state.arrays,
        ConfigRecord(
            instructions
            | {protocol.BATCH_CELL: run.batch_cell, protocol.LEDGER_RUN: state.ledger_run}
        ),
        grid,
    )
    online = list(grid.get_node_ids())
    state.num_clients = max(state.num_clients, len(online))
    replies, missing = send_and_receive(grid, messages, cfg.round_timeout)
    adaptive = None
    if run.adversary is not None:
        run.adversary.tamper(
            replies, state.arrays, int(instructions["round-seed"]), server_round=server_round
        )
        adaptive = adaptive_metrics(run.adversary.last_choice)
    round_seconds = time.monotonic() - round_start
    outcome = strategy.train_round(
        server_round,
        replies,
        missing=missing.values(),
        partitions=state.node_partitions,
        online=online,
    )
    if outcome.arrays is not None:
        state.arrays = outcome.arrays
    state.node_partitions |= outcome.reported_partitions
    for gone in missing.values():
        log(
            WARNING,
            "[bastion] round %d: node %d (partition %s): %s",
            server_round,
            gone.node_id,
            state.node_partitions.get(gone.node_id, "unknown"),
            gone.reason,
        )
    run.results.log_nodes(d.to_json() for d in outcome.nodes)
    return TrainedRound(outcome, round_seconds, adaptive)


def adaptive_metrics(choice: AdaptiveChoice | None) -> dict[str, object] | None:
    """The metrics row's record of the adaptive attack's choice this round: the base
    attack, the factor (ALIE's z or IPM's epsilon), the damage (L2 distance of the
    aggregate to the honest mean) and how many aggregations the search ran."""
    if choice is None:
        return None
    return {
        "adaptive_base": choice.base,
        "adaptive_factor": choice.factor,
        "adaptive_damage": choice.damage,
        "adaptive_evals": len(choice.probes),
    }


def federated_eval_due(cfg: RunConfig, server_round: int) -> bool:
    """Whether the nodes evaluate the model after ``server_round``: every
    ``federated-eval-every`` rounds and after the last (0: never)."""
    return bool(cfg.federated_eval_every) and (
        server_round % cfg.federated_eval_every == 0 or server_round == cfg.num_server_rounds
    )


def evaluate_round(run: ServerRun, arrays: ArrayRecord, server_round: int) -> dict[str, object]:
    """Federated evaluation: the nodes evaluate ``arrays`` on their local test splits.

    Returns the metrics row's ``federated_*`` entries: the medians over the nodes
    whose replies were usable (:meth:`RobustStrategy.evaluate_round`), how many, and
    the dropped replies with why.
    """
    strategy = run.strategy
    messages = strategy.configure_evaluate(
        server_round, arrays, ConfigRecord({protocol.BATCH_CELL: run.batch_cell}), run.grid
    )
    replies, _ = send_and_receive(run.grid, messages, run.cfg.round_timeout)
    evaluation = strategy.evaluate_round(server_round, replies)
    fed = evaluation.metrics
    out: dict[str, object] = {
        "federated_nodes": 0 if fed is None else fed[protocol.NUM_NODES],
        "federated_rejected": [
            {"node_id": n.node_id, "reason": n.reason} for n in evaluation.rejected
        ],
    }
    if fed is not None:
        out["federated_accuracy"] = fed[protocol.EVAL_ACCURACY]
        out["federated_loss"] = fed[protocol.EVAL_LOSS]
    return out


def training_metrics(trained: TrainedRound, started: float) -> dict[str, object]:
    """The metrics row's training entries, in the row's order: the strategy's counts,
    reputation and timings (``started``: the loop's clock start)."""
    outcome, round_seconds = trained.outcome, trained.seconds
    summary = outcome.summary
    slowest = summary.slowest_train_seconds
    return {
        "train_loss": summary.train_loss,
        "num_replies": summary.num_replies,
        "num_accepted": summary.num_accepted,
        "num_rejected": outcome.num_rejected,
        "num_byzantine_after_preaggregation": summary.num_byzantine_after_preaggregation,
        "aggregation_error": outcome.aggregation_error,
        "num_malicious_accepted": summary.num_malicious_accepted,
        "malicious_influence": summary.malicious_influence,
        # DP: the largest whole-run epsilon any replying node reports (client.privacy)
        "max_dp_epsilon": outcome.max_dp_epsilon,
        "quarantined_nodes": outcome.quarantined,
        "newly_quarantined_nodes": outcome.newly_quarantined,
        "max_suspicion": outcome.max_suspicion,
        "round_seconds": round_seconds,
        "slowest_train_seconds": slowest,
        "overhead_seconds": None if slowest is None else round_seconds - slowest,
        "elapsed_seconds": time.monotonic() - started,
        "time": time.time(),
    }


def checkpoint_due(cfg: RunConfig, server_round: int) -> bool:
    """Whether ``server_round`` ends with a checkpoint: the last round, and every
    ``checkpoint-every`` rounds (0: only the last)."""
    last = server_round == cfg.num_server_rounds
    return last or bool(cfg.checkpoint_every and server_round % cfg.checkpoint_every == 0)


def record_round(
    run: ServerRun, state: LoopState, trained: TrainedRound, row: dict[str, object]
) -> None:
    """Complete the round's metrics row (``row`` holds its central and federated
    evaluation), checkpoint when due, append the row to ``metrics.jsonl`` and log."""
    cfg, outcome = run.cfg, trained.outcome
    server_round = outcome.server_round
    row |= training_metrics(trained, state.started)
    row |= trained.adaptive or {}
    if checkpoint_due(cfg, server_round):
        run.results.checkpoint(
            server_round,
            run.central.model_state(),
            run.strategy.state_dict(),
            rng=rng_state(),
            loop=state.checkpoint_loop(row["elapsed_seconds"]),
            row=row,
        )
    run.results.log_round(row)
    log(
        INFO,
        "[bastion] round %d/%d: central accuracy %.4f (%d accepted, %d rejected, %.1f s)",
        server_round,
        cfg.num_server_rounds,
        row["central_accuracy"],
        outcome.summary.num_accepted,
        row["num_rejected"],
        trained.seconds,
    )


def finish_run(run: ServerRun, state: LoopState) -> None:
    """The reputation report and ``summary.json`` of a completed run."""
    cfg, results = run.cfg, run.results
    standings = write_reputation_report(results.run_dir, cfg.quarantine_threshold)
    # with DP, max_epsilon (null when every node refused) and dp_delta are always there
    epsilon = results.max_epsilon()
    # (run_description carries dp_delta when the run config turns DP on; nodes may turn
    # it on through their own node config)
    dp_fields = {"max_epsilon": epsilon} | ({} if cfg.dp else {"dp_delta": cfg.dp_delta})
    summary = results.write_summary(
        status="completed",
        reason=None,
        **run_description(cfg),
        num_clients=state.num_clients,
        malicious_nodes_declared=sum(1 for s in standings.values() if s["malicious"]),
        **reputation_summary(standings),
        **(dp_fields if cfg.dp or epsilon is not None else {}),
    )
    log(
        INFO,
        "[bastion] done: final accuracy %.4f after %d rounds; results in %s",
        summary["final_accuracy"],
        summary["rounds"],
        results.run_dir,
    )
