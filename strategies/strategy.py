"""The Flower adapter: Message API in, flat update deltas through a rule, Message API out.

:class:`RobustStrategy` subclasses Flower's Message-API ``FedAvg`` for node
sampling and message construction and replaces everything on the reply side:

1. each reply is validated on its own (:mod:`strategies.validation`: identity,
   size, records, arrays, metrics); a bad reply is dropped with a recorded,
   bounded reason while the round goes on. Any exception raised while one reply
   is checked or decoded is that reply's rejection, never the round's;
2. accepted replies are decoded into one preallocated ``(n, d)`` float32 tensor
   of *deltas* from the current global model (differences of nearby numbers are
   exact in floating point, full weights are not); a row with a non-finite value
   or an L2 norm above ``max-update-norm`` is dropped too;
3. a :class:`~strategies.rules.registry.Pipeline` (pre-aggregation steps such as
   clipping or s-resampling, then a robust rule such as Krum) maps the deltas
   to one delta (``(n, d) -> (d,)``); client-reported ``num-examples`` never
   weights anything (nor in federated evaluation: the median over nodes);
4. the server optimizer applies it: ``v <- server_momentum * v + delta``,
   ``global <- global + server_lr * v``;
5. per-node diagnostics (accepted/rejected and why, update norm, cosine to the
   aggregate, the client's weight in the aggregate, selected or not, the rule's
   score) are kept in :attr:`RobustStrategy.last_round`.

A rule whose preconditions fail for this round (e.g. Krum needs n >= 2f + 3
and too few replies were accepted), or fewer accepted replies than
``min-accepted-replies``, leaves the model unchanged for the round and records
why (``aggregation_error``); the run goes on.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import protocol
from strategies.layout import ModelLayout
from strategies.rules._kernels import coordinate_median, norm64
from strategies.rules.registry import Pipeline, build_aggregator, compose
from strategies.rules.reputation import Reputation
from strategies.validation import (
    DEFAULT_MAX_REPLY_BYTES,
    DEFAULT_MAX_UPDATE_NORM,
    MAX_REASON_CHARS,
    ReplyLedger,
    bounded,
    check_evaluate_reply,
    check_train_reply,
    failure_reason,
)


@dataclass
class NodeDiagnostics:
    """What the strategy saw of one node in one round."""

    round: int
    node_id: int
    status: str  # "accepted" or "rejected"
    reason: str = ""
    partition_id: int | None = None
    num_examples: float | None = None
    train_loss: float | None = None
    train_seconds: float | None = None
    update_norm: float | None = None
    cosine_to_aggregate: float | None = None
    weight: float | None = None
    selected: bool | None = None
    score: float | None = None
    # ground truth a Bastion attacker declares for experiments (metric "malicious");
    # recorded here, never used by the aggregation
    malicious: bool = False
    # epsilon the node reports having spent over the whole run so far (metric
    # "dp-epsilon", client.privacy; RDP accounting, Mironov 2017); None without DP
    dp_epsilon: float | None = None
    # L2 distance of the update to the round's aggregate (float64 from the norms and
    # the dot product); what reputation calls "far"
    distance_to_aggregate: float | None = None
    # rejected because nothing came back (round timeout, or the SuperLink reported the
    # node offline), as opposed to what the node sent
    no_reply: bool = False
    # the node's suspicion score after this round (strategies.rules.reputation)
    suspicion: float | None = None

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (NaN becomes None)."""
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
        }


@dataclass
class RoundSummary:
    """Counts and timings of one training round's replies."""

    num_replies: int = 0
    num_accepted: int = 0
    num_rejected: int = 0
    train_loss: float | None = None
    slowest_train_seconds: float | None = None
    num_byzantine_after_preaggregation: int | None = None
    aggregation_error: str | None = None
    num_malicious_accepted: int = 0
    # share of the aggregate owed to declared-malicious replies: their share of the
    # rule's client weights, or of the selected clients for selection rules without
    # weights; None when the rule attributes nothing to single clients (median)
    malicious_influence: float | None = None
    nodes: list[NodeDiagnostics] = field(default_factory=list)


@dataclass
class EvaluationNode:
    """One node's federated-evaluation reply: used (its metrics) or dropped (why)."""

    node_id: int
    status: str  # "accepted" or "rejected"
    reason: str = ""
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    # what the node says it evaluated on; a diagnostic, never a weight
    num_examples: int | None = None


class RobustStrategy(FedAvg):
    """FedAvg's node sampling; per-reply validation and a robust pipeline over deltas."""

    def __init__(
        self,
        *,
        pipeline: Pipeline | None = None,
        num_byzantine: int = 0,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        reputation: Reputation | None = None,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
        max_update_norm: float = DEFAULT_MAX_UPDATE_NORM,
        min_accepted_replies: int = 1,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
        )
        self.pipeline = pipeline or compose([], build_aggregator("mean"))
        self.num_byzantine = num_byzantine
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self._velocity: torch.Tensor | None = None
        self._buffer: torch.Tensor | None = None
        self._global: ArrayRecord | None = None
        self._layout: ModelLayout | None = None
        self.last_round = RoundSummary()
        self.last_evaluation: list[EvaluationNode] = []
        # the messages of the current round (their ids are set when they are pushed)
        self._train_sent: list[Message] = []
        self._evaluate_sent: list[Message] = []
        self.reputation = reputation or Reputation()
        # reply limits (strategies.validation; run-config keys of the same names, 0: none)
        self.max_reply_bytes = max_reply_bytes
        self.max_update_norm = max_update_norm
        self.min_accepted_replies = max(1, min_accepted_replies)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed server needs besides the model: rule state and server momentum.

        A deep copy: later rounds do not change a state taken earlier.
        """
        return copy.deepcopy(
            {
                "pipeline": self.pipeline.state_dict(),
                "velocity": self._velocity,
                "reputation": self.reputation.state_dict(),
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        state = copy.deepcopy(dict(state))
        self.pipeline.load_state_dict(state["pipeline"])
        self._velocity = state["velocity"]
        self.reputation.load_state_dict(state.get("reputation", {}))

    def summary(self) -> None:
        """Log the configuration (Flower calls this at start)."""
        log(
            INFO,
            "RobustStrategy: %r, f=%d, server_lr=%s, server_momentum=%s",
            self.pipeline,
            self.num_byzantine,
            self.server_lr,
            self.server_momentum,
        )
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model the replies will be compared to, then sample nodes
        (leaving out the nodes :attr:`reputation` has quarantined for this round)."""
        self._global = arrays
        self._layout = ModelLayout.of(arrays)
        self._train_sent = self._without_quarantined(
            server_round, super().configure_train(server_round, arrays, config, grid)
        )
        return self._train_sent

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's evaluation sampling, without the quarantined nodes."""
        self._evaluate_sent = self._without_quarantined(
            server_round, super().configure_evaluate(server_round, arrays, config, grid)
        )
        return self._evaluate_sent

    def _without_quarantined(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        banned = set(self.reputation.quarantined(server_round))
        if banned:
            kept = [m for m in out if m.metadata.dst_node_id not in banned]
            log(
                INFO,
                "round %d: %d quarantined node(s) left out: %s",
                server_round,
                len(out) - len(kept),
                sorted(banned),
            )
            out = kept
        return out

    def update_reputation(
        self, server_round: int, nodes: list[NodeDiagnostics], online: Iterable[int]
    ) -> list[int]:
        """Fold the round's diagnostics (all of them, timeouts included) into the
        suspicion scores, write each node's score into its diagnostics and return the
        nodes newly quarantined (from the next round on)."""
        newly = self.reputation.observe(
            server_round, nodes, online=online, min_remaining=2 * self.num_byzantine + 1
        )
        for diag in nodes:
            diag.suspicion = self.reputation.score(diag.node_id)
        if newly:
            log(
                WARNING,
                "round %d: quarantined (suspicion >= %.2f), node: last round out: %s",
                server_round,
                self.reputation.config.quarantine_threshold,
                {n: self.reputation.nodes[n].quarantined_until for n in newly},
            )
        return newly

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, aggregate the accepted deltas, return the new global model.

        Each reply is checked for identity (:class:`~strategies.validation.ReplyLedger`:
        an answer to a message of this round, from its node, the node's first) and
        content; whatever one reply raises while checked or decoded is recorded as
        its rejection (:func:`~strategies.validation.failure_reason`). A list passed
        as ``replies`` is emptied as the replies are consumed, so that the caller
        keeps no reference: each reply is freed once rejected or decoded.
        """
        if self._global is None or self._layout is None:
            raise RuntimeError("aggregate_train called before configure_train")
        layout = self._layout
        pending = _take_all(replies)
        summary = RoundSummary(num_replies=len(pending))
        deltas = self._buffer_for(len(pending), layout.dim)
        # the ids were set when the messages were pushed; then let them go (each
        # references the global model it carried)
        ledger, self._train_sent = ReplyLedger.of(self._train_sent), []
        decoded: list[NodeDiagnostics] = []
        while pending:
            msg = pending.pop()
            diag = NodeDiagnostics(round=server_round, node_id=_node_of(msg), status="accepted")
            summary.nodes.append(diag)
            try:
                ledger.admit(msg)
                check_train_reply(msg, layout, max_reply_bytes=self.max_reply_bytes)
                layout.flatten_into(
                    msg.content.array_records[protocol.ARRAYS],
                    deltas[len(decoded)],
                    minus=self._global,
                )
                metrics = msg.content.metric_records[protocol.METRICS]
                diag.partition_id = _int_or_none(metrics.get(protocol.PARTITION_ID))
                diag.num_examples = float(metrics[protocol.NUM_EXAMPLES])
                diag.train_loss = _float_or_none(metrics.get(protocol.TRAIN_LOSS))
                diag.train_seconds = _float_or_none(metrics.get(protocol.TRAIN_SECONDS))
                diag.malicious = metrics.get(protocol.MALICIOUS) == 1
                diag.dp_epsilon = _float_or_none(metrics.get(protocol.DP_EPSILON))
            except Exception as exc:  # anything from this one reply is its rejection
                diag.partition_id = diag.num_examples = diag.train_loss = None
                diag.train_seconds = diag.dp_epsilon = None
                diag.malicious = False
                self._reject(server_round, diag, failure_reason(exc))
                continue
            finally:
                del msg  # a rejected reply is freed here, an accepted one once decoded
            decoded.append(diag)

        # One pass over the decoded rows: their norms, which are also the finiteness
        # check (a row holding NaN/Inf, or too large for float32, has no finite norm)
        # and the max-update-norm check.
        norms = torch.linalg.vector_norm(deltas[: len(decoded)], dim=1)
        accepted: list[NodeDiagnostics] = []
        kept: list[int] = []
        for i, (diag, norm) in enumerate(zip(decoded, norms.tolist(), strict=True)):
            problem = _update_norm_problem(deltas[i], norm, self.max_update_norm)
            if problem is None:
                diag.update_norm = norm
                accepted.append(diag)
                kept.append(i)
            else:
                self._reject(server_round, diag, problem)
        for j, i in enumerate(kept):  # close the gaps left by rejected rows (rare)
            if i != j:
                deltas[j].copy_(deltas[i])
        summary.num_accepted = len(accepted)
        summary.num_rejected = summary.num_replies - len(accepted)
        self.last_round = summary
        if len(accepted) < self.min_accepted_replies:
            summary.aggregation_error = (
                f"{len(accepted)} of {summary.num_replies} replies accepted, fewer than "
                f"min-accepted-replies {self.min_accepted_replies}; the global model is unchanged"
            )
            log(WARNING, "round %d: %s", server_round, summary.aggregation_error)
            return None, None

        deltas = deltas[: len(accepted)]
        try:
            out = self.pipeline.aggregate(deltas, num_byzantine=self.num_byzantine)
        except ValueError as exc:  # a rule's precondition, e.g. n >= 2f + 3 for Krum
            summary.aggregation_error = str(exc)
            log(WARNING, "round %d: aggregation skipped, model unchanged: %s", server_round, exc)
            return None, None
        aggregate = out.vector
        summary.num_byzantine_after_preaggregation = out.num_byzantine
        agg_norm = norm64(aggregate)
        # Diagnostics only: a float32 matvec and the row norms measured above.
        row_norms = torch.tensor([d.update_norm for d in accepted], dtype=torch.float64)
        dots = (deltas @ aggregate.to(deltas.dtype)).double()
        cosines = dots / (row_norms * agg_norm).clamp_min(1e-300)
        # |u - a|^2 = |u|^2 + |a|^2 - 2 u.a: no (n, d) temporary; float32 dot products
        # lose distances far below 1e-3 |u|, which reputation's ratios do not need
        distances = (row_norms**2 + agg_norm**2 - 2 * dots).clamp_min(0).sqrt()
        weights, selected, scores = _client_attribution(out, len(accepted))
        for i, (diag, cos) in enumerate(zip(accepted, cosines.tolist(), strict=True)):
            diag.cosine_to_aggregate = cos if agg_norm > 0 else None
            diag.distance_to_aggregate = float(distances[i])
            diag.weight = None if weights is None else weights[i]
            diag.selected = None if selected is None else selected[i]
            diag.score = None if scores is None else scores[i]
        summary.num_malicious_accepted = sum(d.malicious for d in accepted)
        summary.malicious_influence = _malicious_influence(accepted, weights, selected)
        step = aggregate
        if self.server_momentum:
            if self._velocity is None or self._velocity.shape != step.shape:
                self._velocity = torch.zeros(step.shape, dtype=torch.float64)
            self._velocity.mul_(self.server_momentum).add_(step.to("cpu", torch.float64))
            step = self._velocity
        # Without server momentum the aggregate is ours alone (rules return fresh
        # tensors; centered clipping keeps a copy), so the new model is built in it.
        new_global = layout.add_scaled(
            self._global, step, self.server_lr, overwrite_step=step is aggregate
        )

        losses = [d.train_loss for d in accepted if d.train_loss is not None]
        times = [d.train_seconds for d in accepted if d.train_seconds is not None]
        summary.train_loss = sum(losses) / len(losses) if losses else None
        summary.slowest_train_seconds = max(times) if times else None
        metrics = MetricRecord(
            {
                protocol.NUM_ACCEPTED: summary.num_accepted,
                protocol.NUM_REJECTED: summary.num_rejected,
                protocol.AGGREGATE_NORM: agg_norm,
            }
            | ({protocol.TRAIN_LOSS: summary.train_loss} if summary.train_loss is not None else {})
        )
        return new_global, metrics

    def _buffer_for(self, n: int, d: int) -> torch.Tensor:
        """An ``(n, d)`` float32 buffer for decoded deltas, reused across rounds.

        Touching a fresh multi-GB allocation costs as much as filling it; the server
        holds the buffer between rounds instead.
        """
        if self._buffer is None or self._buffer.shape[1] != d or self._buffer.shape[0] < n:
            self._buffer = None  # free the old one before allocating the new one
            self._buffer = torch.empty((n, d), dtype=torch.float32)
        return self._buffer[:n]

    def _reject(self, server_round: int, diag: NodeDiagnostics, reason: str) -> None:
        reason = bounded(reason, MAX_REASON_CHARS)
        diag.status, diag.reason = "rejected", reason
        log(
            WARNING, "round %d: rejected reply from node %d: %s", server_round, diag.node_id, reason
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The median over nodes of the evaluation loss and accuracy of well-formed
        replies, unweighted; ``None`` when no reply is usable.

        Each reply is checked like a training reply's identity, size and metrics
        (:func:`~strategies.validation.check_evaluate_reply`: every value finite,
        accuracy in [0, 1]); a bad one is dropped with a reason. Reported
        ``num-examples`` never weights anything: one node claiming 2^62 examples
        cannot set the result, and a node moves a median only within the other
        nodes' values. Per-node outcomes are in :attr:`last_evaluation`; the
        returned record has ``eval-loss``, ``eval-accuracy``, ``num-nodes`` and the
        reported ``num-examples`` summed (a diagnostic).
        """
        ledger, self._evaluate_sent = ReplyLedger.of(self._evaluate_sent), []
        nodes: list[EvaluationNode] = []
        pending = _take_all(replies)
        while pending:
            msg = pending.pop()
            node = EvaluationNode(node_id=_node_of(msg), status="accepted")
            nodes.append(node)
            try:
                ledger.admit(msg)
                loss, acc = check_evaluate_reply(msg, max_reply_bytes=self.max_reply_bytes)
                count = msg.content.metric_records[protocol.METRICS][protocol.NUM_EXAMPLES]
                node.eval_loss, node.eval_accuracy = loss, acc
                node.num_examples = int(count)  # type: ignore[arg-type]
            except Exception as exc:  # anything from this one reply is its rejection
                node.eval_loss = node.eval_accuracy = node.num_examples = None
                node.status = "rejected"
                node.reason = bounded(failure_reason(exc), MAX_REASON_CHARS)
                log(
                    WARNING,
                    "round %d: evaluation reply from node %d dropped: %s",
                    server_round,
                    node.node_id,
                    node.reason,
                )
        self.last_evaluation = nodes
        used = [n for n in nodes if n.status == "accepted"]
        if not used:
            return None
        # the rules' coordinate median: for even n, s/2 + s'/2 (no overflow at 1.7e308)
        values = torch.tensor([[n.eval_loss, n.eval_accuracy] for n in used], dtype=torch.float64)
        loss, accuracy = coordinate_median(values).tolist()
        return MetricRecord(
            {
                protocol.EVAL_LOSS: loss,
                protocol.EVAL_ACCURACY: accuracy,
                protocol.NUM_NODES: len(used),
                protocol.NUM_EXAMPLES: sum(n.num_examples or 0 for n in used),
            }
        )


def _take_all(replies: Iterable[Message]) -> list[Message]:
    """The replies in order, reversed for popping; a list passed in is emptied so
    that the caller keeps no reference to them."""
    pending = list(replies)
    if isinstance(replies, list):
        replies.clear()
    pending.reverse()
    return pending


def _node_of(msg: Message) -> int:
    """The node id a reply names as its source (0 if it does not say)."""
    try:
        return int(msg.metadata.src_node_id)
    except (TypeError, ValueError):
        return 0


def _update_norm_problem(row: torch.Tensor, norm32: float, limit: float) -> str | None:
    """Why a decoded update (one row, float32 L2 norm ``norm32``) is rejected, or None.

    Non-finite values are counted by kind. A row whose float32 norm overflows but
    whose values are finite gets its norm in float64 (:func:`norm64`), so a 1e30
    update is reported as such. ``limit`` is ``max-update-norm`` (0: no limit); a
    norm beyond float32 is rejected even without a limit (the rules run in float32).
    """
    if math.isfinite(norm32) and (limit <= 0 or norm32 <= limit):
        return None
    nan = int(torch.isnan(row).sum())
    pos, neg = int((row == math.inf).sum()), int((row == -math.inf).sum())
    if nan or pos or neg:
        return f"non-finite update: {nan} NaN, {pos} +Inf, {neg} -Inf values"
    norm = norm32 if math.isfinite(norm32) else norm64(row)
    if limit > 0 and norm > limit:
        return f"update norm {norm:.4g} exceeds max-update-norm {limit:g}"
    return f"update norm {norm:.4g} overflows float32 (values too large)"


def _client_attribution(
    out: Any, n: int
) -> tuple[list[float] | None, list[bool] | None, list[float] | None]:
    """Per-client weight in the aggregate, selected flag and score, where defined.

    Weights come from the pipeline's ``client_weights`` (the rule's weights pushed
    back through the pre-aggregation mixing). Selection and scores refer to the
    rule's inputs, which are the clients only when no pre-aggregation step mixed them.
    """
    weights = None if out.client_weights is None else out.client_weights.tolist()
    identity = out.mixing.shape == (n, n) and bool(
        torch.equal(out.mixing, torch.eye(n, dtype=out.mixing.dtype))
    )
    selected = scores = None
    if out.aggregation.selected is not None:
        if identity:
            chosen = set(out.aggregation.selected.tolist())
            selected = [i in chosen for i in range(n)]
        elif weights is not None:
            selected = [abs(w) > 0 for w in weights]
    if identity and out.aggregation.scores is not None:
        scores = out.aggregation.scores.tolist()
    return weights, selected, scores


def _malicious_influence(
    nodes: list[NodeDiagnostics], weights: list[float] | None, selected: list[bool] | None
) -> float | None:
    """Share of the aggregate owed to declared-malicious nodes (see RoundSummary)."""
    if weights is not None:
        total = sum(abs(w) for w in weights)
        bad = sum(abs(w) for w, d in zip(weights, nodes, strict=True) if d.malicious)
        return bad / total if total > 0 else None
    if selected is not None and any(selected):
        picked = [d for d, s in zip(nodes, selected, strict=True) if s]
        return sum(d.malicious for d in picked) / len(picked)
    return None


def _float_or_none(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None
