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
   or an L2 norm above ``max-update-norm`` is dropped too, and with ``dp-check`` an
   update inconsistent with the run's declared DP-SGD noise
   (:mod:`strategies.rules.dpcheck`: too short to carry it, or a near-duplicate of
   another);
3. a :class:`~strategies.rules.registry.Pipeline` (pre-aggregation steps such as
   clipping or s-resampling, then a robust rule such as Krum) maps the deltas
   to one delta (``(n, d) -> (d,)``); client-reported ``num-examples`` never
   weights anything (nor in federated evaluation: the median over nodes);
4. the server optimizer applies it: ``v <- server_momentum * v + delta``,
   ``global <- global + server_lr * v``;
5. per-node diagnostics (accepted/rejected and why, update norm, cosine to the
   aggregate, the client's weight in the aggregate, selected or not, the rule's
   score; the pure math is :mod:`strategies.rules.diagnostics`) come back in a
   :class:`RoundOutcome` with the new model, the round's counts and, from
   :meth:`RobustStrategy.train_round`, the silent and quarantined nodes and the
   reputation changes.

Bastion's round loop calls :meth:`RobustStrategy.train_round` and
:meth:`RobustStrategy.evaluate_round` and reads what they return; Flower's
``aggregate_train`` / ``aggregate_evaluate`` stay thin wrappers over them, so the
strategy still runs under Flower's own ``strategy.start()``.

A rule whose preconditions fail for this round (e.g. Krum needs n >= 2f + 3
and too few replies were accepted), or fewer accepted replies than
``min-accepted-replies``, leaves the model unchanged for the round and records
why (``aggregation_error``); the run goes on.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
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
from strategies.rules._kernels import coordinate_median
from strategies.rules.diagnostics import (
    client_attribution,
    geometry_to_aggregate,
    malicious_influence,
    update_norm_problem,
)
from strategies.rules.dpcheck import DPCheck
from strategies.rules.registry import Pipeline, PipelineOutput, build_aggregator, compose
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


@dataclass
class RoundOutcome:
    """What one training round came to (:meth:`RobustStrategy.train_round`).

    ``summary`` covers the replies: counts, timings, the aggregation error and each
    reply's diagnostics. :meth:`RobustStrategy.close_round` adds the nodes that sent
    nothing and the quarantined ones to ``nodes``, each node's suspicion after the
    round, and the reputation changes.
    """

    server_round: int
    summary: RoundSummary
    # the new global model; None: unchanged this round (see aggregation_error)
    arrays: ArrayRecord | None = None
    # what Flower's aggregate_train returns with the model
    metrics: MetricRecord | None = None
    # every node's diagnostics: the replies, then the nodes that sent nothing, then the
    # quarantined nodes
    nodes: list[NodeDiagnostics] = field(default_factory=list)
    # messages that got no reply (timeout, or the SuperLink reported the node offline)
    num_missing: int = 0
    # nodes that sat this round out, and those quarantined from the next round on
    quarantined: list[int] = field(default_factory=list)
    newly_quarantined: list[int] = field(default_factory=list)

    @property
    def replies(self) -> list[NodeDiagnostics]:
        """The diagnostics of the replies, in the order received."""
        return self.summary.nodes

    @property
    def aggregation_error(self) -> str | None:
        """Why the global model is unchanged this round (None when it moved)."""
        return self.summary.aggregation_error

    @property
    def num_rejected(self) -> int:
        """Rejected replies plus the messages that got no reply."""
        return self.summary.num_rejected + self.num_missing

    @property
    def reported_partitions(self) -> dict[int, int]:
        """The partition id each replying node reported (where it did)."""
        return {d.node_id: d.partition_id for d in self.replies if d.partition_id is not None}

    @property
    def max_dp_epsilon(self) -> float | None:
        """The largest whole-run epsilon a reply reported (None without DP)."""
        epsilons = [d.dp_epsilon for d in self.replies if d.dp_epsilon is not None]
        return max(epsilons) if epsilons else None

    @property
    def suspicion(self) -> dict[int, float]:
        """Each node's suspicion score after the round (set by ``close_round``)."""
        return {d.node_id: d.suspicion for d in self.nodes if d.suspicion is not None}

    @property
    def max_suspicion(self) -> float | None:
        """The highest suspicion score after the round over all nodes (no score: 0)."""
        return max((d.suspicion or 0.0 for d in self.nodes), default=None)


@dataclass
class EvaluationOutcome:
    """What one round of federated evaluation came to (:meth:`RobustStrategy.evaluate_round`)."""

    # median loss and accuracy over the usable replies; None when none was usable
    metrics: MetricRecord | None
    nodes: list[EvaluationNode] = field(default_factory=list)

    @property
    def rejected(self) -> list[EvaluationNode]:
        """The replies that were dropped, with why."""
        return [n for n in self.nodes if n.status == "rejected"]


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
        dp_check: DPCheck | None = None,
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
        # run-config dp-check: replies inconsistent with the declared DP-SGD noise
        self.dp_check = dp_check
        self._dp_metrics: dict[int, dict[str, object]] = {}

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
        """Flower's ``aggregate_train``: :meth:`aggregate_round`'s new global model and
        metrics, ``(None, None)`` when the model stays unchanged for the round.

        For callers of Flower's API (its ``strategy.start()``, tests, benchmarks) the
        round's counts and per-reply diagnostics are kept in :attr:`last_round`;
        Bastion's loop calls :meth:`train_round`, which returns them.
        """
        outcome = self.aggregate_round(server_round, replies)
        self.last_round = outcome.summary
        return outcome.arrays, outcome.metrics

    def train_round(
        self,
        server_round: int,
        replies: Iterable[Message],
        *,
        missing: Iterable[tuple[int, str]] = (),
        partitions: Mapping[int, int] | None = None,
        online: Iterable[int] = (),
    ) -> RoundOutcome:
        """One training round's replies in, the round's :class:`RoundOutcome` out.

        :meth:`aggregate_round` on the replies, then :meth:`close_round`: the nodes that
        sent nothing (``missing``: ``(node_id, reason)`` pairs) and the nodes
        quarantined for this round join the diagnostics, and every node's suspicion
        is updated from them (``online``: the nodes connected this round;
        ``partitions``: the partition each node reported in earlier rounds).
        """
        outcome = self.aggregate_round(server_round, replies)
        return self.close_round(
            outcome, missing=missing, partitions=partitions or {}, online=online
        )

    def aggregate_round(self, server_round: int, replies: Iterable[Message]) -> RoundOutcome:
        """Validate each reply, aggregate the accepted deltas, step the global model.

        Each reply is checked for identity (:class:`~strategies.validation.ReplyLedger`:
        an answer to a message of this round, from its node, the node's first) and
        content; whatever one reply raises while checked or decoded is recorded as
        its rejection (:func:`~strategies.validation.failure_reason`). A list passed
        as ``replies`` is emptied as the replies are consumed, so that the caller
        keeps no reference: each reply is freed once rejected or decoded.

        The outcome's ``arrays`` is the new global model, or ``None`` (the model is
        unchanged) with the reason in ``aggregation_error``; its ``nodes`` are the
        replies' diagnostics until :meth:`close_round` adds the silent and
        quarantined nodes.
        """
        if self._global is None or self._layout is None:
            raise RuntimeError("train_round or aggregate_train called before configure_train")
        layout, global_arrays = self._layout, self._global
        summary, deltas, decoded = self._decode_replies(
            server_round, replies, layout, global_arrays
        )
        accepted, norms = self._check_norms(server_round, deltas, decoded)
        if self.dp_check is not None:
            accepted, norms = self._check_dp(server_round, deltas, accepted, norms)
        summary.num_accepted = len(accepted)
        summary.num_rejected = summary.num_replies - len(accepted)
        outcome = RoundOutcome(server_round, summary, nodes=list(summary.nodes))
        if len(accepted) < self.min_accepted_replies:
            summary.aggregation_error = (
                f"{len(accepted)} of {summary.num_replies} replies accepted, fewer than "
                f"min-accepted-replies {self.min_accepted_replies}; the global model is unchanged"
            )
            log(WARNING, "round %d: %s", server_round, summary.aggregation_error)
            return outcome

        deltas = deltas[: len(accepted)]
        accepted, norms, deltas, trial = self._trials_last(server_round, accepted, norms, deltas)
        out = self._aggregate(
            server_round, deltas[: len(accepted) - trial], summary, warn=not trial
        )
        if out is None and trial:
            # The rule's own precondition fails without the trial rows (Krum's
            # n >= 2f + 3, Bulyan's n >= 4f + 3): a skipped round costs every node's
            # update, a round without probation costs at most the returning nodes'
            # judgement, so nobody is on trial this round.
            log(
                INFO,
                "round %d: %s without the %d node(s) on trial; they are aggregated this round",
                server_round,
                summary.aggregation_error,
                trial,
            )
            summary.aggregation_error, trial = None, 0
            out = self._aggregate(server_round, deltas, summary)
        if out is None:
            return outcome
        for diag in accepted[len(accepted) - trial :]:
            diag.reason = PROBATION_REASON
        agg_norm = _record_diagnostics(summary, accepted, norms, deltas, out, trial)
        outcome.arrays = self._server_step(layout, global_arrays, out.vector)
        outcome.metrics = _summarize_training(summary, accepted, agg_norm)
        return outcome

    def close_round(
        self,
        outcome: RoundOutcome,
        *,
        missing: Iterable[tuple[int, str]],
        partitions: Mapping[int, int],
        online: Iterable[int],
    ) -> RoundOutcome:
        """Complete ``outcome`` with the nodes that sent nothing and the quarantined ones,
        and update reputation from every node's diagnostics.

        ``missing`` holds ``(node_id, reason)`` of each message that got no reply (a
        "rejected" entry with ``no_reply``); each node quarantined for this round gets
        a "quarantined" entry. Neither can report its partition: it comes from
        ``partitions`` (earlier rounds) and this round's replies. Suspicion scores are
        written into all the diagnostics; nodes newly quarantined sit out from the
        next round on. Returns ``outcome``, its ``nodes``, ``num_missing``,
        ``quarantined`` and ``newly_quarantined`` filled in.
        """
        server_round = outcome.server_round
        known = dict(partitions) | outcome.reported_partitions
        gone = list(missing)
        nodes = list(outcome.replies) + [
            NodeDiagnostics(
                server_round,
                node_id,
                "rejected",
                reason,
                partition_id=known.get(node_id),
                no_reply=True,
            )
            for node_id, reason in gone
        ]
        # suspicion scores from every node's diagnostics; quarantine from the next round
        quarantined = self.reputation.quarantined(server_round)
        nodes += [
            NodeDiagnostics(
                server_round,
                node_id,
                "quarantined",
                "left out: quarantined until round "
                f"{self.reputation.nodes[node_id].quarantined_until}",
                partition_id=known.get(node_id),
            )
            for node_id in quarantined
        ]
        outcome.newly_quarantined = self.update_reputation(server_round, nodes, online=online)
        outcome.nodes, outcome.num_missing, outcome.quarantined = nodes, len(gone), quarantined
        return outcome

    def _decode_replies(
        self,
        server_round: int,
        replies: Iterable[Message],
        layout: ModelLayout,
        global_arrays: ArrayRecord,
    ) -> tuple[RoundSummary, torch.Tensor, list[NodeDiagnostics]]:
        """Check each reply and decode the good ones into rows of the delta buffer.

        Returns the round's summary (one diagnostics entry per reply, in
        :func:`reply_order_key` order), the ``(n, d)`` buffer whose first
        ``len(decoded)`` rows hold the decoded deltas from ``global_arrays`` and the
        decoded replies' diagnostics, in row order. A reply that fails a check is
        rejected with its reason.
        """
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
                    minus=global_arrays,
                )
                metrics = msg.content.metric_records[protocol.METRICS]
                diag.partition_id = _int_or_none(metrics.get(protocol.PARTITION_ID))
                diag.num_examples = float(metrics[protocol.NUM_EXAMPLES])
                diag.train_loss = _float_or_none(metrics.get(protocol.TRAIN_LOSS))
                diag.train_seconds = _float_or_none(metrics.get(protocol.TRAIN_SECONDS))
                diag.malicious = metrics.get(protocol.MALICIOUS) == 1
                diag.dp_epsilon = _float_or_none(metrics.get(protocol.DP_EPSILON))
                if self.dp_check is not None:  # what the node declares about its noise
                    self._dp_metrics[diag.node_id] = {
                        k: metrics[k] for k in _DP_DECLARED if k in metrics
                    }
            except Exception as exc:  # anything from this one reply is its rejection
                diag.partition_id = diag.num_examples = diag.train_loss = None
                diag.train_seconds = diag.dp_epsilon = None
                diag.malicious = False
                self._reject(server_round, diag, failure_reason(exc))
                continue
            finally:
                del msg  # a rejected reply is freed here, an accepted one once decoded
            decoded.append(diag)
        return summary, deltas, decoded

    def _check_norms(
        self, server_round: int, deltas: torch.Tensor, decoded: list[NodeDiagnostics]
    ) -> tuple[list[NodeDiagnostics], list[float]]:
        """Reject the decoded rows that are non-finite or too large; move the others up.

        One pass over the decoded rows: their norms, which are also the finiteness
        check (a row holding NaN/Inf, or too large for float32, has no finite norm)
        and the max-update-norm check (:func:`update_norm_problem`). Returns the
        accepted replies' diagnostics and their update norms; their deltas are then
        the first rows of ``deltas``, in the same order.
        """
        norms = torch.linalg.vector_norm(deltas[: len(decoded)], dim=1)
        accepted: list[NodeDiagnostics] = []
        accepted_norms: list[float] = []
        kept: list[int] = []
        for i, (diag, norm) in enumerate(zip(decoded, norms.tolist(), strict=True)):
            problem = update_norm_problem(deltas[i], norm, self.max_update_norm)
            if problem is None:
                diag.update_norm = norm
                accepted.append(diag)
                accepted_norms.append(norm)
                kept.append(i)
            else:
                self._reject(server_round, diag, problem)
        _close_gaps(deltas, kept)
        return accepted, accepted_norms

    def _check_dp(
        self,
        server_round: int,
        deltas: torch.Tensor,
        accepted: list[NodeDiagnostics],
        norms: list[float],
    ) -> tuple[list[NodeDiagnostics], list[float]]:
        """Reject the accepted rows that are inconsistent with the run's declared DP-SGD
        (:meth:`strategies.rules.dpcheck.DPCheck.reasons`) and move the others up, as
        :meth:`_check_norms` does; the rejected keep their norms in the diagnostics."""
        assert self.dp_check is not None
        metrics, self._dp_metrics = [self._dp_metrics.get(d.node_id, {}) for d in accepted], {}
        if not accepted:
            return accepted, norms
        reasons = self.dp_check.reasons(
            deltas[: len(accepted)], metrics, labels=[f"node {d.node_id}" for d in accepted]
        )
        kept = [i for i, reason in enumerate(reasons) if reason is None]
        for diag, reason in zip(accepted, reasons, strict=True):
            if reason is not None:
                self._reject(server_round, diag, reason)
        _close_gaps(deltas, kept)
        return [accepted[i] for i in kept], [norms[i] for i in kept]

    def _trials_last(
        self,
        server_round: int,
        accepted: list[NodeDiagnostics],
        norms: list[float],
        deltas: torch.Tensor,
    ) -> tuple[list[NodeDiagnostics], list[float], torch.Tensor, int]:
        """Move the replies of nodes on trial (back from quarantine, with probation on:
        :meth:`Reputation.on_trial`) behind the others; return the reordered replies,
        norms and rows, and how many trial rows are at the end (0: nothing moved).

        The rule then aggregates the rows before them only. When that would leave the
        rule fewer than ``2 f + 1`` rows, nobody is on trial this round; when it leaves
        fewer than the rule itself needs, :meth:`aggregate_round` aggregates everyone.
        """
        on_trial = set(self.reputation.on_trial(server_round))
        trial = [i for i, d in enumerate(accepted) if d.node_id in on_trial]
        if not trial or len(accepted) - len(trial) < 2 * self.num_byzantine + 1:
            return accepted, norms, deltas, 0
        regular = [i for i, d in enumerate(accepted) if d.node_id not in on_trial]
        order = regular + trial
        deltas = deltas[torch.tensor(order, device=deltas.device)]  # a copy, reordered
        log(
            INFO,
            "round %d: %d node(s) back from quarantine on trial (not aggregated): %s",
            server_round,
            len(trial),
            sorted(on_trial),
        )
        return [accepted[i] for i in order], [norms[i] for i in order], deltas, len(trial)

    def _aggregate(
        self, server_round: int, deltas: torch.Tensor, summary: RoundSummary, *, warn: bool = True
    ) -> PipelineOutput | None:
        """The pipeline's aggregate of the accepted rows; ``None``, with the reason in
        ``summary.aggregation_error``, when a rule's precondition fails this round
        (logged as a skipped round unless ``warn`` is false: the caller retries)."""
        try:
            out = self.pipeline.aggregate(deltas, num_byzantine=self.num_byzantine)
        except ValueError as exc:  # a rule's precondition, e.g. n >= 2f + 3 for Krum
            summary.aggregation_error = str(exc)
            if warn:
                log(
                    WARNING, "round %d: aggregation skipped, model unchanged: %s", server_round, exc
                )
            return None
        summary.num_byzantine_after_preaggregation = out.num_byzantine
        return out

    def _server_step(
        self, layout: ModelLayout, global_arrays: ArrayRecord, aggregate: torch.Tensor
    ) -> ArrayRecord:
        """The server optimizer: ``v <- server_momentum * v + delta``, then
        ``global <- global + server_lr * v`` (``v`` is the aggregate without momentum)."""
        step = aggregate
        if self.server_momentum:
            if self._velocity is None or self._velocity.shape != step.shape:
                self._velocity = torch.zeros(step.shape, dtype=torch.float64)
            self._velocity.mul_(self.server_momentum).add_(step.to("cpu", torch.float64))
            step = self._velocity
        # Without server momentum the aggregate is ours alone (rules return fresh
        # tensors; centered clipping keeps a copy), so the new model is built in it.
        return layout.add_scaled(
            global_arrays, step, self.server_lr, overwrite_step=step is aggregate
        )

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
        """Flower's ``aggregate_evaluate``: :meth:`evaluate_round`'s metrics (``None``
        when no reply is usable); the per-node outcomes are kept in
        :attr:`last_evaluation` for callers of Flower's API."""
        outcome = self.evaluate_round(server_round, replies)
        self.last_evaluation = outcome.nodes
        return outcome.metrics

    def evaluate_round(self, server_round: int, replies: Iterable[Message]) -> EvaluationOutcome:
        """The median over nodes of the evaluation loss and accuracy of well-formed
        replies, unweighted, and each node's outcome.

        Each reply is checked like a training reply's identity, size and metrics
        (:func:`~strategies.validation.check_evaluate_reply`: every value finite,
        accuracy in [0, 1]); a bad one is dropped with a reason. Reported
        ``num-examples`` never weights anything: one node claiming 2^62 examples
        cannot set the result, and a node moves a median only within the other
        nodes' values. The outcome's ``metrics`` (``None`` when no reply is usable)
        has ``eval-loss``, ``eval-accuracy``, ``num-nodes`` and the reported
        ``num-examples`` summed (a diagnostic).
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
        used = [n for n in nodes if n.status == "accepted"]
        if not used:
            return EvaluationOutcome(None, nodes)
        # the rules' coordinate median: for even n, s/2 + s'/2 (no overflow at 1.7e308)
        values = torch.tensor([[n.eval_loss, n.eval_accuracy] for n in used], dtype=torch.float64)
        loss, accuracy = coordinate_median(values).tolist()
        metrics = MetricRecord(
            {
                protocol.EVAL_LOSS: loss,
                protocol.EVAL_ACCURACY: accuracy,
                protocol.NUM_NODES: len(used),
                protocol.NUM_EXAMPLES: sum(n.num_examples or 0 for n in used),
            }
        )
        return EvaluationOutcome(metrics, nodes)


#: the reason recorded for a node on trial (``quarantine-probation``)
PROBATION_REASON = "probation: judged against the aggregate, not part of it"

#: the reply metrics dp-check compares with the run's declared DP-SGD
_DP_DECLARED = (
    protocol.NUM_EXAMPLES,
    protocol.STEPS,
    protocol.DP_NOISE_MULTIPLIER,
    protocol.DP_SAMPLE_RATE,
)


def _close_gaps(deltas: torch.Tensor, kept: list[int]) -> None:
    """Move the kept rows ``kept`` (increasing) of ``deltas`` to its first rows."""
    for j, i in enumerate(kept):
        if i != j:
            deltas[j].copy_(deltas[i])


def reply_order_key(msg: Message) -> tuple[bool, int, int]:
    """Where a reply's row goes among the round's rows: by the partition id the node
    reported, then by node id (a reply that reports none goes last).

    The replies of a round arrive in an order that changes from run to run, and
    whatever depends on the rows' order (the random groups of bucketing and
    resampling, a tie in Krum, float summation) would too; in this order a fixed
    ``seed`` reproduces a run. The adaptive attack's simulation of the round
    (:func:`server.omniscient.strategy_aggregate`) orders its rows the same way.
    """
    try:
        metrics = msg.content.metric_records[protocol.METRICS]
        partition = _int_or_none(metrics.get(protocol.PARTITION_ID))
    except Exception:  # a malformed reply: decoding rejects it with its reason
        partition = None
    return (partition is None, partition if partition is not None else 0, _node_of(msg))


def _take_all(replies: Iterable[Message]) -> list[Message]:
    """The replies in :func:`reply_order_key` order, reversed for popping; a list
    passed in is emptied so that the caller keeps no reference to them."""
    pending = sorted(replies, key=reply_order_key)  # stable: a node's first reply first
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


def _record_diagnostics(
    summary: RoundSummary,
    accepted: list[NodeDiagnostics],
    norms: list[float],
    deltas: torch.Tensor,
    out: PipelineOutput,
    trial: int = 0,
) -> float:
    """Write each accepted reply's place in the aggregate into its diagnostics (cosine
    and distance to the aggregate, weight, selected, score) and the round's malicious
    counts into ``summary``; return the aggregate's L2 norm.

    ``deltas`` holds the accepted updates in the order of ``accepted``, ``norms``
    their L2 norms (:mod:`strategies.rules.diagnostics` computes the rest). The last
    ``trial`` of them were judged but not aggregated: weight 0, no selection or score.
    """
    geometry = geometry_to_aggregate(deltas, out.vector, norms)
    aggregated = len(accepted) - trial
    weights, selected, scores = client_attribution(out, aggregated)
    for i, diag in enumerate(accepted):
        diag.cosine_to_aggregate = geometry.cosines[i]
        diag.distance_to_aggregate = geometry.distances[i]
        if i >= aggregated:
            diag.weight, diag.selected, diag.score = 0.0, None, None
            continue
        diag.weight = None if weights is None else weights[i]
        diag.selected = None if selected is None else selected[i]
        diag.score = None if scores is None else scores[i]
    summary.num_malicious_accepted = sum(d.malicious for d in accepted[:aggregated])
    summary.malicious_influence = malicious_influence(
        [d.malicious for d in accepted[:aggregated]], weights, selected
    )
    return geometry.norm


def _summarize_training(
    summary: RoundSummary, accepted: list[NodeDiagnostics], agg_norm: float
) -> MetricRecord:
    """Set the round's mean training loss and slowest training time (over the accepted
    replies that report them) in ``summary``; return the metrics Flower's
    ``aggregate_train`` returns with the new model."""
    losses = [d.train_loss for d in accepted if d.train_loss is not None]
    times = [d.train_seconds for d in accepted if d.train_seconds is not None]
    summary.train_loss = sum(losses) / len(losses) if losses else None
    summary.slowest_train_seconds = max(times) if times else None
    return MetricRecord(
        {
            protocol.NUM_ACCEPTED: summary.num_accepted,
            protocol.NUM_REJECTED: summary.num_rejected,
            protocol.AGGREGATE_NORM: agg_norm,
        }
        | ({protocol.TRAIN_LOSS: summary.train_loss} if summary.train_loss is not None else {})
    )


def _float_or_none(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None
