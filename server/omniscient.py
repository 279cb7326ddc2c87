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
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from attacks.byzantine import DATA_ATTACKS, attack_params, build_attack, round_seed_param
from common import protocol
from common.config import RunConfig
from strategies.layout import ModelLayout
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


class OmniscientAdversary:
    """Replaces flagged replies' updates with an attack on all honest updates."""

    def __init__(self, cfg: RunConfig, grid: Grid) -> None:
        if not running_in_simulation(grid):
            raise OmniscientRefused(
                "run config key 'attack-knowledge': value 'omniscient' is only allowed in "
                f"simulation (the ServerApp got a {type(grid).__name__}, i.e. real SuperNodes); "
                "allowed here: 'own' or 'collude'"
            )
        self.cfg = cfg

    def _params(self, num_replies: int, num_malicious: int, round_seed: int) -> dict[str, Any]:
        params = attack_params(
            self.cfg, num_clients=num_replies, num_byzantine=max(num_malicious, 1)
        )
        # an attack that draws noise: the same for every attacker of a round
        return params | round_seed_param(self.cfg.attack, round_seed)

    def tamper(self, replies: list[Message], global_arrays: ArrayRecord, round_seed: int) -> int:
        """Rewrite, in place, the update of every well-formed reply flagged malicious.

        The attack's ``known`` rows are the well-formed honest replies' finite deltas
        in partition-id order. Returns how many replies were rewritten (0 when the
        attack is a data attack such as label flip, or when no usable honest reply
        exists).
        """
        if self.cfg.attack == "none" or self.cfg.attack in DATA_ATTACKS:
            return 0
        layout = ModelLayout.of(global_arrays)
        honest: list[tuple[int, Message]] = []
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
                pid = metrics.get(protocol.PARTITION_ID)
                honest.append((pid if isinstance(pid, int) else 1 << 62, msg))
        if not malicious or not honest:
            return 0
        honest.sort(key=lambda item: item[0])
        base = layout.flatten(global_arrays)
        known = torch.stack(
            [layout.flatten(m.content.array_records[protocol.ARRAYS]) - base for _, m in honest]
        )
        # A diverged honest node's update (nan/inf) is one the strategy rejects: the
        # attackers know it is useless and compute from the others.
        known = known[torch.isfinite(known).all(dim=1)]
        if len(known) == 0:
            return 0
        params = self._params(len(replies), len(malicious), round_seed)
        update = build_attack(self.cfg.attack, **params)(known)
        crafted = layout.add_scaled(global_arrays, update, 1.0)
        for msg in malicious:
            msg.content[protocol.ARRAYS] = crafted
        return len(malicious)
