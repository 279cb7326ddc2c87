"""Bastion's ClientApp: local training and evaluation on a node's own partition.

Each SuperNode runs this app for every message the ServerApp sends it. The node's
``--node-config`` says which partition it holds (``partition-id``,
``num-partitions``, optionally its own ``data-dir``); the run config says which
dataset and partitioner; each round's ``ConfigRecord`` carries the training
hyper-parameters chosen by the server.

Reply contract (what :mod:`strategies` validates): a ``train`` reply holds one
``ArrayRecord`` ``"arrays"`` with the full updated model (same keys, shapes and
dtypes as the global model it received) and one ``MetricRecord`` ``"metrics"``
with ``num-examples``, ``train-loss``, ``train-seconds``, ``steps`` and
``partition-id``. A node training with differential privacy (:mod:`client.privacy`)
adds ``dp-epsilon`` (spent over the whole run so far), ``dp-delta``,
``dp-noise-multiplier``, ``dp-sample-rate`` and ``dp-rounds``, and leaves out
``train-loss`` (a statistic of its training data that DP-SGD does not protect); a
node whose privacy budget is spent replies with an error message instead. A node
with node config ``role = "malformed"`` trains honestly, then breaks its reply on
purpose, one kind of :mod:`client.malformed`'s corpus per round; one with
``role = "fuzz"`` byte-mutates one ``.npy`` header of its reply every round.

With run-config ``client-momentum`` > 0 every node (attackers too, before they
attack) replies with the global model plus its momentum over the rounds it trained
(:mod:`client.momentum`) instead of its trained model; an attacker's honest estimate
is that momentum.
"""

from __future__ import annotations

import os

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from attacks import check_attack_config, label_flip
from client.malformed import fuzzed_node_reply, malformed_node_reply
from client.malicious import AttackPlan, apply_attack, resolve_plan
from client.momentum import MomentumStore, states_to_keep
from client.privacy import PrivateRound, budget_error_reply, resolve_dp
from common import protocol
from common.batch import cell_run_config
from common.config import NodeConfig, RunConfig, TrainInstructions
from task.datasets import ArrayDataset, num_classes
from task.federated import ClientData, PartitionSpec, load_client_data, training_set
from task.models import build_model
from task.training import evaluate as evaluate_model
from task.training import resolve_device, train_local

app = ClientApp()


def _setup(context: Context, msg: Message) -> tuple[RunConfig, NodeConfig]:
    run = RunConfig.from_flat(context.run_config)
    cell = msg.content.config_records.get(protocol.CONFIG, {}).get(protocol.BATCH_CELL, -1)
    if run.batch_file and isinstance(cell, int) and cell >= 0:
        # one cell of a batch run: its own run config (see common.batch)
        run = RunConfig.from_flat(cell_run_config(context.run_config, run.batch_file, cell))
    check_attack_config(run)  # every node, honest or not, refuses an unknown attack
    node = NodeConfig.from_flat(context.node_config, source="node config")
    threads = int(os.environ.get("BASTION_TORCH_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    return run, node


def _client_data(run: RunConfig, node: NodeConfig) -> ClientData:
    """This node's local train/test split (the node's data-dir wins over the run's)."""
    spec = PartitionSpec(
        dataset=run.dataset,
        num_partitions=node.num_partitions,
        partitioner=run.partitioner,
        seed=run.seed,
        alpha=run.alpha,
        classes_per_partition=run.classes_per_partition,
        test_fraction=run.local_test_fraction,
    )
    return load_client_data(spec, node.partition_id, node.data_dir or run.data_dir)


def _training_set(
    run: RunConfig, node: NodeConfig, plan: AttackPlan | None, data: ClientData
) -> ArrayDataset:
    """The data a node trains on: its partition, or for an attacker with
    ``attack-data = "full"`` the whole training set; labels flipped for ``label-flip``."""
    if plan is None:
        return data.train
    train = data.train
    if plan.data == "full":
        train = training_set(run.dataset, node.data_dir or run.data_dir or None)
    if plan.flips_labels:
        train = ArrayDataset(train.x, label_flip(train.y, num_classes(run.dataset)))
    return train


def _model_from(state: dict[str, torch.Tensor], dataset: str) -> torch.nn.Module:
    model = build_model(dataset)
    model.load_state_dict(state, strict=True)  # copies: ``state`` stays the global model
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's partition and reply with it."""
    run, node = _setup(context, msg)
    instr = TrainInstructions.from_flat(msg.content[protocol.CONFIG], source="train config")
    plan = resolve_plan(run, node, server_round=instr.server_round)
    data = _client_data(run, node)
    device = resolve_device(run.device)
    global_state = msg.content[protocol.ARRAYS].to_torch_state_dict()
    model = _model_from(global_state, run.dataset)
    train_set = _training_set(run, node, plan, data)
    dp = resolve_dp(run, node)
    # a resumed run keeps the first attempt's node state (privacy ledger, momentum)
    state_run = instr.ledger_run or context.run_id
    private: PrivateRound | None = None
    if dp is not None:  # DP-SGD, accounted over the whole run (client.privacy)
        private = PrivateRound.for_node(
            dp,
            node,
            instr,
            run_id=state_run,
            num_examples=len(train_set),
            run=run,
        )
        if private.refusal is not None:
            return budget_error_reply(msg, private.refusal)
        result = private.train(model, train_set, instr, device=device)
    else:
        result = train_local(
            model,
            train_set,
            **instr.sgd_params(),  # type: ignore[arg-type]
            seed=instr.round_seed + node.partition_id,
            device=device,
        )
    values: dict[str, int | float] = {
        protocol.NUM_EXAMPLES: result.num_examples,
        protocol.TRAIN_LOSS: result.mean_loss,
        protocol.TRAIN_SECONDS: result.seconds,
        protocol.STEPS: result.steps,
        protocol.PARTITION_ID: node.partition_id,
    }
    if private is not None:
        del values[protocol.TRAIN_LOSS]
        values |= private.metrics()
    state = model.to("cpu").state_dict()
    if run.client_momentum > 0:  # the node's momentum instead of its update (client.momentum)
        store = MomentumStore.for_node(node, state_run, instr.batch_cell)
        state = store.reply(
            global_state,
            state,
            beta=run.client_momentum,
            server_round=instr.server_round,
            keep=states_to_keep(run.checkpoint_every),
        )
    if plan is not None:  # with client momentum, the attack starts from the node's momentum
        state, crafted = apply_attack(
            plan,
            global_state,
            state,
            server_round=instr.server_round,
            round_seed=instr.round_seed,
            partition_id=node.partition_id,
            run_id=int(context.run_id),
        )
        # Ground truth for experiments (see client.malicious); the strategy ignores it.
        values |= {
            protocol.NUM_EXAMPLES: len(data.train),
            protocol.MALICIOUS: 1,
            protocol.KNOWN_ROWS: crafted.known_rows,
            protocol.COLLUDERS_SEEN: crafted.colluders_seen,
        }
    content = RecordDict(
        {protocol.ARRAYS: ArrayRecord(state), protocol.METRICS: MetricRecord(values)}
    )
    if node.role == "malformed":  # a broken/hostile node: see client.malformed
        content = malformed_node_reply(
            content,
            kinds_text=node.malformed_kinds,
            server_round=instr.server_round,
            partition_id=node.partition_id,
            node_id=int(context.node_id),
            max_reply_bytes=run.max_reply_bytes,
        )
    elif node.role == "fuzz":  # byte-mutated .npy headers: see client.malformed
        content = fuzzed_node_reply(
            content,
            server_round=instr.server_round,
            partition_id=node.partition_id,
            node_id=int(context.node_id),
        )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this node's local test split."""
    run, node = _setup(context, msg)
    data = _client_data(run, node)
    result = evaluate_model(
        _model_from(msg.content[protocol.ARRAYS].to_torch_state_dict(), run.dataset),
        data.test,
        device=resolve_device(run.device),
    )
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES: result.num_examples,
            protocol.EVAL_LOSS: result.loss,
            protocol.EVAL_ACCURACY: result.accuracy,
            protocol.PARTITION_ID: node.partition_id,
        }
    )
    return Message(content=RecordDict({protocol.METRICS: metrics}), reply_to=msg)
