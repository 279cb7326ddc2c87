"""The Flower adapter: Message API in, flat update deltas through a rule, Message API out.

:class:`BastionStrategy` subclasses Flower's Message-API ``FedAvg`` for node
sampling and message construction and replaces everything on the reply side:

1. each reply is validated on its own (:mod:`strategies.validation`); a bad
   reply is dropped with a recorded reason while the round goes on;
2. accepted replies are decoded into one preallocated ``(n, d)`` float32 tensor
   of *deltas* from the current global model (differences of nearby numbers are
   exact in floating point, full weights are not);
3. an aggregation rule maps the deltas to one delta (``(n, d) -> (d,)``);
4. the new global model is ``global + server_lr * delta``;
5. per-node diagnostics (accepted/rejected and why, update norm, cosine to the
   aggregate, weight) are kept in :attr:`BastionStrategy.last_diagnostics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.layout import ModelLayout
from strategies.validation import (
    METRICS_KEY,
    RejectedReply,
    check_finite,
    check_train_reply,
)

AggregateFn = Callable[[torch.Tensor], torch.Tensor]


def plain_mean(deltas: torch.Tensor) -> torch.Tensor:
    """Unweighted mean of the rows of ``deltas`` (accumulated in float64)."""
    return deltas.mean(dim=0, dtype=torch.float64).to(deltas.dtype)


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
    nodes: list[NodeDiagnostics] = field(default_factory=list)


class BastionStrategy(FedAvg):
    """FedAvg's sampling with per-reply validation and a pluggable rule over deltas."""

    def __init__(
        self,
        *,
        aggregate_fn: AggregateFn = plain_mean,
        server_lr: float = 1.0,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
        )
        self.aggregate_fn = aggregate_fn
        self.server_lr = server_lr
        self._global: ArrayRecord | None = None
        self._layout: ModelLayout | None = None
        self.last_round = RoundSummary()

    def summary(self) -> None:
        """Log the configuration (Flower calls this at start)."""
        log(INFO, "BastionStrategy: rule=%s server_lr=%s", self.aggregate_fn, self.server_lr)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model the replies will be compared to, then sample nodes."""
        self._global = arrays
        self._layout = ModelLayout.of(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, aggregate the accepted deltas, return the new global model."""
        if self._global is None or self._layout is None:
            raise RuntimeError("aggregate_train called before configure_train")
        layout, replies = self._layout, list(replies)
        summary = RoundSummary(num_replies=len(replies))
        global_flat = layout.flatten(self._global)
        deltas = torch.empty((len(replies), layout.dim), dtype=torch.float32)
        accepted: list[NodeDiagnostics] = []
        for msg in replies:
            diag = NodeDiagnostics(
                round=server_round, node_id=int(msg.metadata.src_node_id), status="accepted"
            )
            try:
                check_train_reply(msg, layout)
                metrics = msg.content.metric_records[METRICS_KEY]
                row = deltas[len(accepted)]
                layout.flatten_into(msg.content.array_records["arrays"], row)
                check_finite("update", row)
                row.sub_(global_flat)
                diag.partition_id = _int_or_none(metrics.get("partition-id"))
                diag.num_examples = float(metrics["num-examples"])
                diag.train_loss = _float_or_none(metrics.get("train-loss"))
                diag.train_seconds = _float_or_none(metrics.get("train-seconds"))
                diag.update_norm = float(row.norm(dtype=torch.float64))
                accepted.append(diag)
            except RejectedReply as exc:
                diag.status, diag.reason = "rejected", str(exc)
                log(
                    WARNING,
                    "round %d: rejected reply from node %d: %s",
                    server_round,
                    diag.node_id,
                    exc,
                )
            summary.nodes.append(diag)
        summary.num_accepted = len(accepted)
        summary.num_rejected = len(replies) - len(accepted)
        self.last_round = summary
        if not accepted:
            log(
                WARNING,
                "round %d: no acceptable replies; the global model is unchanged",
                server_round,
            )
            return None, None

        deltas = deltas[: len(accepted)]
        aggregate = self.aggregate_fn(deltas)
        agg_norm = float(aggregate.norm(dtype=torch.float64))
        cosines = (deltas.double() @ aggregate.double()) / (
            torch.linalg.vector_norm(deltas.double(), dim=1) * agg_norm
        ).clamp_min(1e-300)
        for diag, cos in zip(accepted, cosines.tolist(), strict=True):
            diag.cosine_to_aggregate = cos if agg_norm > 0 else None
            diag.weight = 1.0 / len(accepted)
        new_global = global_flat.double() + self.server_lr * aggregate.double()

        losses = [d.train_loss for d in accepted if d.train_loss is not None]
        times = [d.train_seconds for d in accepted if d.train_seconds is not None]
        summary.train_loss = sum(losses) / len(losses) if losses else None
        summary.slowest_train_seconds = max(times) if times else None
        metrics = MetricRecord(
            {
                "num-accepted": summary.num_accepted,
                "num-rejected": summary.num_rejected,
                "aggregate-norm": agg_norm,
            }
            | ({"train-loss": summary.train_loss} if summary.train_loss is not None else {})
        )
        return layout.unflatten(new_global), metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the evaluation metrics of well-formed replies."""
        total, loss_sum, acc_sum = 0, 0.0, 0.0
        for msg in replies:
            if msg.has_error() or set(msg.content.metric_records.keys()) != {METRICS_KEY}:
                continue
            m = msg.content.metric_records[METRICS_KEY]
            n, loss, acc = m.get("num-examples"), m.get("eval-loss"), m.get("eval-accuracy")
            if (
                not isinstance(n, int)
                or n <= 0
                or not all(isinstance(v, float) and math.isfinite(v) for v in (loss, acc))
            ):
                continue
            total, loss_sum, acc_sum = total + n, loss_sum + n * loss, acc_sum + n * acc
        if total == 0:
            return None
        return MetricRecord(
            {"eval-loss": loss_sum / total, "eval-accuracy": acc_sum / total, "num-examples": total}
        )


def _float_or_none(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None
