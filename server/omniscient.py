"""Omniscient attackers: a research mode for simulation only.

The attack papers' threat model (Baruch et al. 2019; Xie, Koyejo & Gupta 2020;
Karimireddy, He & Jaggi 2022) lets the Byzantine workers see every honest update
of the round before they answer. No deployed client can know that: the honest
updates are computed at the same time as its own and go only to the server. To
reproduce the papers anyway, this module sits in the ServerApp's round loop,
*after* the replies arrive and *before* the strategy sees them, and replaces the
update of every reply flagged ``malicious = 1`` by the attack computed from all
honest updates of the round. It is deliberately not part of the strategy, and it
refuses to run unless the ServerApp's grid is Flower's simulation grid
(``InMemoryGrid``), so a server talking to real SuperNodes never helps an attack.

The adaptive attack (:class:`attacks.byzantine.Adaptive`) also needs the server's
aggregation: :func:`strategy_aggregate` gives it the strategy's own pipeline, run on a
deep copy for every evaluation so that the live strategy's state (centered clipping's
previous aggregate, the generators of resample and bucket) is not changed by the
search. The attackers thereby know this round's random draws of the server, the worst
case the papers' threat model allows.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, Message
from flwr.common import log
from flwr.serverapp import Grid

from attacks.byzantine import (
    DATA_ATTACKS,
    Adaptive,
    AdaptiveChoice,
    Aggregate,
    attack_params,
    build_attack,
    round_seed_param,
)
from common import protocol
from common.config import RunConfig
from strategies.layout import ModelLayout
from strategies.strategy import RobustStrategy, reply_order_key
from strategies.validation import check_train_reply


class OmniscientRefused(RuntimeError):
    """Omniscient attackers were asked for outside Flower's simulation engine."""


def running_in_simulation(grid: Grid) -> bool:
    """True when ``grid`` is the Simulation Engine's in-memory grid.

    A ServerApp started by a SuperLink for real SuperNodes gets an ``HttpGrid``;
    ``flwr run`` on a simulation federation (and ``flwr.simulation.run_simulation``)
    gives it an ``InMemoryGrid`` whose nodes are simulated in the same runtime.
    """
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def strategy_aggregate(strategy: RobustStrategy, order: Sequence[int]) -> Aggregate:
    """The aggregation ``strategy`` will run this round, as a function of the rows the
    adaptive attack builds (its ``known`` rows, then the ``f`` malicious copies).

    ``order`` lists those rows' indices in the order the strategy decodes the replies
    (:func:`~strategies.strategy.reply_order_key`; ``known`` itself is in
    partition-id order). Like the
    strategy, the function drops a row that is non-finite or longer than
    ``max-update-norm``, leaves the model unchanged (a zero delta) with fewer rows
    than ``min-accepted-replies`` or when the rule's precondition fails, and runs the
    pipeline with the strategy's ``num-byzantine``; every call runs a deep copy of the
    live pipeline, which it leaves unchanged.

    What differs from the round the strategy then runs: the strategy decodes the
    crafted reply as ``(global + update) - global`` in float32 (equal to the update up
    to rounding), and replies it would refuse for their identity or size
    (:class:`~strategies.validation.ReplyLedger`, ``max-reply-bytes``) are rows here.
    """
    rows = list(order)
    limit = strategy.max_update_norm
    needed = strategy.min_accepted_replies

    def aggregate(x: torch.Tensor) -> torch.Tensor:
        x = x[rows]
        norms = torch.linalg.vector_norm(x, dim=1).tolist()
        keep = [i for i, n in enumerate(norms) if math.isfinite(n) and (limit <= 0 or n <= limit)]
        if len(keep) < needed:
            return torch.zeros(x.shape[1], dtype=x.dtype)
        if len(keep) < len(rows):
            x = x[keep]
        try:
            pipeline = copy.deepcopy(strategy.pipeline)
            return pipeline.aggregate(x, num_byzantine=strategy.num_byzantine).vector
        except ValueError:  # a rule's precondition: the strategy leaves the model unchanged
            return torch.zeros(x.shape[1], dtype=x.dtype)

    return aggregate


class OmniscientAdversary:
    """Replaces flagged replies' updates with an attack on all honest updates.

    ``strategy`` is the run's strategy, read (never changed) by the adaptive attack,
    which needs it; the other attacks do not look at it.
    """

    def __init__(self, cfg: RunConfig, grid: Grid, strategy: RobustStrategy | None = None) -> None:
        if not running_in_simulation(grid):
            raise OmniscientRefused(
                "run config key 'attack-knowledge': value 'omniscient' is only allowed in "
                f"simulation (the ServerApp got a {type(grid).__name__}, i.e. real SuperNodes); "
                "allowed here: 'own' or 'collude'"
            )
        if cfg.attack == Adaptive.name and strategy is None:
            raise ValueError(
                "the adaptive attack needs the run's strategy: pass strategy= to "
                "OmniscientAdversary"
            )
        self.cfg = cfg
        self.strategy = strategy
        #: what the adaptive attack chose in the last round it ran (None: not run)
        self.last_choice: AdaptiveChoice | None = None

    def _params(self, num_replies: int, num_malicious: int, round_seed: int) -> dict[str, Any]:
        params = attack_params(
            self.cfg, num_clients=num_replies, num_byzantine=max(num_malicious, 1)
        )
        # an attack that draws noise: the same for every attacker of a round
        return params | round_seed_param(self.cfg.attack, round_seed)

    def tamper(
        self,
        replies: list[Message],
        global_arrays: ArrayRecord,
        round_seed: int,
        server_round: int = 0,
    ) -> int:
        """Rewrite, in place, the update of every well-formed reply flagged malicious.

        The attack's ``known`` rows are the well-formed honest replies' finite deltas
        in partition-id order. Returns how many replies were rewritten (0 when the
        attack is a data attack such as label flip, or when no usable honest reply
        exists). The adaptive attack's choice is logged and kept in
        :attr:`last_choice`.
        """
        self.last_choice = None
        if self.cfg.attack == "none" or self.cfg.attack in DATA_ATTACKS:
            return 0
        layout = ModelLayout.of(global_arrays)
        honest: list[Message] = []
        malicious: list[Message] = []
        for msg in replies:
            try:
                check_train_reply(msg, layout)
            except Exception:  # RejectedReply or anything else from this one reply:
                continue  # the strategy will reject it with its reason
            metrics = msg.content.metric_records[protocol.METRICS]
            if metrics.get(protocol.MALICIOUS) == 1:
                malicious.append(msg)
            else:
                honest.append(msg)
        if not malicious or not honest:
            return 0
        honest.sort(key=reply_order_key)  # partition-id order, the strategy's own
        base = layout.flatten(global_arrays)
        known = torch.stack(
            [layout.flatten(m.content.array_records[protocol.ARRAYS]) - base for m in honest]
        )
        # A diverged honest node's update (nan/inf) is one the strategy rejects: the
        # attackers know it is useless and compute from the others.
        finite = torch.isfinite(known).all(dim=1)
        known = known[finite]
        if len(known) == 0:
            return 0
        params = self._params(len(replies), len(malicious), round_seed)
        if self.cfg.attack == Adaptive.name:
            assert self.strategy is not None  # checked in __init__
            rows = [msg for msg, ok in zip(honest, finite.tolist(), strict=True) if ok]
            rows += malicious
            # the strategy's rows are the replies in reply_order_key order
            order = sorted(range(len(rows)), key=lambda i: reply_order_key(rows[i]))
            attack = build_attack(
                self.cfg.attack, **params, aggregate=strategy_aggregate(self.strategy, order)
            )
            assert isinstance(attack, Adaptive)
            choice = attack.search(known)
            self.last_choice = choice
            update = choice.vector
            log(
                INFO,
                "[bastion] adaptive attack round %d: %s %s=%.6g damage=%.6g (%d evaluations)",
                server_round,
                choice.base,
                "z" if choice.base == "alie" else "epsilon",
                choice.factor,
                choice.damage,
                len(choice.probes),
            )
        else:
            update = build_attack(self.cfg.attack, **params)(known)
        crafted = layout.add_scaled(global_arrays, update, 1.0)
        for msg in malicious:
            msg.content[protocol.ARRAYS] = crafted
        return len(malicious)
