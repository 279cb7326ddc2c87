"""Bastion's ServerApp: the round loop, central evaluation and the run's results.

One round: sample nodes and send them the global model with the round's training
instructions; wait for the replies (up to ``round-timeout``); let the strategy
validate and aggregate them; evaluate the new global model centrally on the
dataset's test split; write metrics, per-node diagnostics and a checkpoint.
Every ``federated-eval-every`` rounds (and after the last one when enabled) the
clients also evaluate the model on their local test splits.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Iterable
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import NamedTuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common import Error, log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from common import protocol
from common.config import RunConfig
from common.rundir import RunResults, default_run_dir, restore_rng_state, rng_state
from server.omniscient import OmniscientAdversary
from server.reputation_report import reputation_summary, write_reputation_report
from strategies.rules.from_config import pipeline_from_config, reputation_from_config
from strategies.strategy import NodeDiagnostics, RobustStrategy
from strategies.validation import MAX_REASON_CHARS, bounded
from task.datasets import load_dataset
from task.models import build_model
from task.training import evaluate, resolve_device

app = ServerApp()

# The stock Grid.send_and_receive sleeps 3 s between polls of the SuperLink; on
# short rounds that is most of the round. We poll faster (push/pull are public Grid
# API), backing off to 1 s while nothing arrives. BASTION_POLL_SECONDS overrides the
# first interval (the overhead benchmark sets 3 to compare with Flower's behaviour).
POLL_SECONDS = float(os.environ.get("BASTION_POLL_SECONDS", "0.1"))
MAX_POLL_SECONDS = max(POLL_SECONDS, 1.0)
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
    cfg = RunConfig.from_flat(context.run_config)
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
    (:func:`strategies.strategy.pipeline_from_config`); ``num_malicious`` and ``attack``
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
    from common.batch import cell_run_config, load_batch

    cells = load_batch(cfg.batch_file)
    batch = RunResults(Path(cfg.output_dir or "runs/batch"), cfg.to_flat())
    failed = 0
    for i in range(len(cells)):
        row: dict[str, object] = {"round": i + 1, "cell": i}
        try:
            cell_cfg = RunConfig.from_flat(cell_run_config(run_config, cfg.batch_file, i))
            results = _run_one(grid, cell_cfg, batch_cell=i)
            row |= {"output_dir": str(results.run_dir), "status": "completed"}
            row["final_accuracy"] = results.rounds[-1].get("central_accuracy")
        except Exception as exc:  # the cell's summary says why; go on with the next
            failed += 1
            row |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        batch.log_round(row | {"time": time.time()})
    batch.write_summary(status="completed", cells=len(cells), failed_cells=failed)


def _run(grid: Grid, cfg: RunConfig, results: RunResults, batch_cell: int = -1) -> None:
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.dataset)
    _, test_set = load_dataset(cfg.dataset, cfg.data_dir or None)
    strategy = RobustStrategy(
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
    )
    arrays = ArrayRecord(model.state_dict())
    # research mode, simulation only (raises on a real federation): see server.omniscient
    adversary = (
        OmniscientAdversary(cfg, grid)
        if cfg.attack_knowledge == "omniscient" and cfg.num_malicious > 0
        else None
    )
    started = time.monotonic()

    quick_set = test_set
    if 0 < cfg.central_eval_samples < len(test_set):
        # a fixed subset for the rounds before the last (long grids: evaluating 10k
        # images each round costs more than the round); the last round uses all
        pick = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(cfg.seed))
        quick_set = test_set.subset(pick[: cfg.central_eval_samples].sort().values.numpy())

    def central(server_round: int) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        subset = test_set if server_round == cfg.num_server_rounds else quick_set
        res = evaluate(model, subset, device=device)
        return {
            "central_loss": res.loss,
            "central_accuracy": res.accuracy,
            "central_samples": len(subset),
        }

    num_clients, first_round = 0, 1
    # DP: nodes account privacy per run in a ledger; a resumed run keeps the first
    # attempt's (client.privacy), so its epsilon covers the rounds before the crash too
    ledger_run = int(grid.run.run_id)
    # partition id each node reported (a node that stops replying cannot say it)
    node_partitions: dict[int, int] = {}
    if results.resumed is not None:  # resume: continue after the checkpoint's round
        ckpt = results.resumed
        model.load_state_dict(ckpt.model)
        arrays = ArrayRecord(model.state_dict())
        strategy.load_state_dict(ckpt.strategy)
        restore_rng_state(ckpt.rng)
        num_clients = int(ckpt.loop.get("num_clients", 0))
        node_partitions = dict(ckpt.loop.get("node_partitions", {}))
        ledger_run = int(ckpt.loop.get("ledger_run", ledger_run))
        started -= float(ckpt.loop.get("elapsed_seconds", 0.0))
        first_round = ckpt.round + 1
        log(
            INFO,
            "[bastion] resuming from checkpoint %s: round %d of %d is next",
            ckpt.path,
            first_round,
            cfg.num_server_rounds,
        )
    else:
        if cfg.resume:
            log(INFO, "[bastion] resume: no checkpoint in %s; starting at round 1", results.run_dir)
        first = central(0)
        results.log_round(
            {
                "round": 0,
                **first,
                "elapsed_seconds": time.monotonic() - started,
                "time": time.time(),
            }
        )
        log(INFO, "[bastion] round 0: central accuracy %.4f", first["central_accuracy"])

    for server_round in range(first_round, cfg.num_server_rounds + 1):
        round_start = time.monotonic()
        instructions = cfg.train_instructions(server_round)
        messages = strategy.configure_train(
            server_round,
            arrays,
            ConfigRecord(
                instructions | {protocol.BATCH_CELL: batch_cell, protocol.LEDGER_RUN: ledger_run}
            ),
            grid,
        )
        online = list(grid.get_node_ids())
        num_clients = max(num_clients, len(online))
        replies, missing = send_and_receive(grid, messages, cfg.round_timeout)
        if adversary is not None:
            adversary.tamper(replies, arrays, int(instructions["round-seed"]))
        round_seconds = time.monotonic() - round_start
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        summary = strategy.last_round
        node_partitions |= {
            d.node_id: d.partition_id for d in summary.nodes if d.partition_id is not None
        }
        nodes = list(summary.nodes) + [
            NodeDiagnostics(
                server_round,
                gone.node_id,
                "rejected",
                gone.reason,
                partition_id=node_partitions.get(gone.node_id),
                no_reply=True,
            )
            for gone in missing.values()
        ]
        # suspicion scores from every node's diagnostics; quarantine from the next round
        quarantined = strategy.reputation.quarantined(server_round)
        nodes += [
            NodeDiagnostics(
                server_round,
                node_id,
                "quarantined",
                "left out: quarantined until round "
                f"{strategy.reputation.nodes[node_id].quarantined_until}",
                partition_id=node_partitions.get(node_id),
            )
            for node_id in quarantined
        ]
        newly_quarantined = strategy.update_reputation(server_round, nodes, online=online)
        for gone in missing.values():
            log(
                WARNING,
                "[bastion] round %d: node %d (partition %s): %s",
                server_round,
                gone.node_id,
                node_partitions.get(gone.node_id, "unknown"),
                gone.reason,
            )
        results.log_nodes(d.to_json() for d in nodes)

        row: dict[str, object] = {"round": server_round, **central(server_round)}
        if cfg.federated_eval_every and (
            server_round % cfg.federated_eval_every == 0 or server_round == cfg.num_server_rounds
        ):
            eval_msgs = strategy.configure_evaluate(
                server_round, arrays, ConfigRecord({protocol.BATCH_CELL: batch_cell}), grid
            )
            eval_replies, _ = send_and_receive(grid, eval_msgs, cfg.round_timeout)
            fed = strategy.aggregate_evaluate(server_round, eval_replies)
            # medians over the nodes whose replies were usable (strategy.aggregate_evaluate)
            row["federated_nodes"] = 0 if fed is None else fed[protocol.NUM_NODES]
            row["federated_rejected"] = [
                {"node_id": n.node_id, "reason": n.reason}
                for n in strategy.last_evaluation
                if n.status == "rejected"
            ]
            if fed is not None:
                row["federated_accuracy"] = fed[protocol.EVAL_ACCURACY]
                row["federated_loss"] = fed[protocol.EVAL_LOSS]
        slowest = summary.slowest_train_seconds
        # DP: the largest whole-run epsilon any replying node reports (client.privacy)
        epsilons = [d.dp_epsilon for d in summary.nodes if d.dp_epsilon is not None]
        row |= {
            "train_loss": summary.train_loss,
            "num_replies": summary.num_replies,
            "num_accepted": summary.num_accepted,
            "num_rejected": summary.num_rejected + len(missing),
            "num_byzantine_after_preaggregation": summary.num_byzantine_after_preaggregation,
            "aggregation_error": summary.aggregation_error,
            "num_malicious_accepted": summary.num_malicious_accepted,
            "malicious_influence": summary.malicious_influence,
            "max_dp_epsilon": max(epsilons) if epsilons else None,
            "quarantined_nodes": quarantined,
            "newly_quarantined_nodes": newly_quarantined,
            "max_suspicion": max((d.suspicion or 0.0 for d in nodes), default=None),
            "round_seconds": round_seconds,
            "slowest_train_seconds": slowest,
            "overhead_seconds": None if slowest is None else round_seconds - slowest,
            "elapsed_seconds": time.monotonic() - started,
            "time": time.time(),
        }
        last = server_round == cfg.num_server_rounds
        if last or (cfg.checkpoint_every and server_round % cfg.checkpoint_every == 0):
            results.checkpoint(
                server_round,
                {k: v.clone() for k, v in model.state_dict().items()},
                strategy.state_dict(),
                rng=rng_state(),
                loop={
                    "num_clients": num_clients,
                    "elapsed_seconds": row["elapsed_seconds"],
                    "node_partitions": node_partitions,
                    "ledger_run": ledger_run,
                },
                row=row,
            )
        results.log_round(row)
        log(
            INFO,
            "[bastion] round %d/%d: central accuracy %.4f (%d accepted, %d rejected, %.1f s)",
            server_round,
            cfg.num_server_rounds,
            row["central_accuracy"],
            summary.num_accepted,
            row["num_rejected"],
            round_seconds,
        )

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
        num_clients=num_clients,
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
