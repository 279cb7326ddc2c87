"""Which nodes attack, with what, knowing what: the malicious ClientApp's plan.

A node is malicious when its node config says ``role = "malicious"`` (docker-compose,
real deployments), or, when its node config sets no role, when the run config's
``num-malicious`` rule picks its partition (``bastion run --malicious``, simulation;
see :func:`malicious_partitions`). Honest nodes need no configuration at all.

A malicious node always first trains exactly like an honest one (on its own
partition, or on the whole training set with ``attack-data = "full"``, the
resampling paper's threat model; with labels flipped for ``label-flip``), which
gives it an honest update estimate. Then, by ``attack-knowledge``:

* ``own``: the attack sees only that estimate (``k = 1``);
* ``collude``: the attackers pool their estimates through a shared directory
  (:mod:`client.collusion`), order them by partition id and all compute the same
  malicious vector, as the papers assume;
* ``omniscient``: research mode, simulation only: the node sends its honest
  estimate flagged as malicious and the ServerApp's research hook
  (:mod:`server.omniscient`), outside the strategy, replaces it with the attack
  computed from every honest update of the round.

With run-config ``client-momentum`` > 0 (:mod:`client.momentum`) the honest estimate
is the attacker's own momentum, kept like an honest node's (of its poisoned updates
for ``label-flip``; of honest ones before ``attack-start-round``, when it is honest):
``own`` attacks it, colluders pool their momenta, and the omniscient hook reads the
honest nodes' replies, which are their momenta.

Every malicious reply carries the metric ``malicious = 1`` so that experiments can
score defences against ground truth. A real attacker would not send it; the
strategy never reads it (only the diagnostics record it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attacks.byzantine import (
    DATA_ATTACKS,
    Attack,
    attack_names,
    attack_params,
    build_attack,
    round_seed_param,
)
from attacks.selection import malicious_partitions
from client.collusion import SharedDirectory
from common.config import ConfigError, NodeConfig, RunConfig, overlay


@dataclass(frozen=True)
class AttackPlan:
    """A malicious node's resolved settings (node config over run config)."""

    attack: str
    params: dict[str, Any] = field(default_factory=dict)
    knowledge: str = "collude"
    data: str = "own"
    colluders: int = 1
    collusion_dir: str = ""
    collusion_timeout: float = 60.0
    start_round: int = 1

    @property
    def flips_labels(self) -> bool:
        """``label-flip`` poisons the training labels instead of the update."""
        return self.attack == "label-flip"


def resolve_plan(
    run: RunConfig, node: NodeConfig, *, server_round: int | None = None
) -> AttackPlan | None:
    """This node's attack plan, or ``None`` for an honest node (and for a
    ``role = "malformed"`` node, which trains honestly and breaks its reply
    afterwards: :mod:`client.malformed`).

    With ``server_round`` before the plan's ``attack-start-round``, an attacker's
    plan is checked and then ``None``: the node behaves exactly like an honest one
    (its own data, true labels, an honest update, no ``malicious`` flag).
    """
    if node.role in ("honest", "malformed", "fuzz"):
        return None
    if node.role == "":
        if run.num_malicious == 0:
            return None
        chosen = malicious_partitions(node.num_partitions, run.num_malicious, run.seed)
        if node.partition_id not in chosen:
            return None

    mine = overlay(run, node)  # the node's own attack keys win over the run's
    attack = mine.attack
    if attack == "none":
        raise ConfigError(
            "node config key 'role': value 'malicious' needs an attack; set node config or "
            f"run config key 'attack' to one of {list(attack_names()[1:])}"
        )
    colluders = node.num_colluders or max(run.num_malicious, 1)
    params = attack_params(mine, num_clients=node.num_partitions, num_byzantine=colluders)
    plan = AttackPlan(
        attack=attack,
        params=params,
        knowledge=mine.attack_knowledge,
        data=mine.attack_data,
        colluders=colluders,
        collusion_dir=mine.collusion_dir,
        collusion_timeout=run.collusion_timeout,
        start_round=mine.attack_start_round,
    )
    if (
        plan.knowledge == "collude"
        and plan.colluders > 1
        and not plan.collusion_dir
        and attack in Attack.registry
    ):
        raise ConfigError(
            f"key 'collusion-dir': value '' is not allowed with attack-knowledge='collude' and "
            f"{plan.colluders} colluders; allowed: a directory every attacker can write "
            "(bastion run and bastion simulate set one), or attack-knowledge='own'"
        )
    if server_round is not None and server_round < plan.start_round:
        return None
    return plan


@dataclass(frozen=True)
class Crafted:
    """A malicious update and what the attacker knew when it made it."""

    update: torch.Tensor  # (d,) delta to add to the global model
    known_rows: int  # k: honest estimates the attack used
    colluders_seen: int  # attackers heard from (1 without collusion)


def craft_update(
    plan: AttackPlan,
    own: torch.Tensor,
    *,
    server_round: int,
    round_seed: int,
    partition_id: int,
    run_id: int,
) -> Crafted:
    """Turn the attacker's honest update delta ``own`` (shape ``(d,)``) into the delta
    it sends, according to ``plan``.

    ``label-flip`` and the omniscient mode send ``own`` unchanged (the poisoning
    already happened in training, or the server's research hook replaces it).
    """
    if plan.attack in DATA_ATTACKS or plan.knowledge == "omniscient":
        return Crafted(own, 1, 1)
    known, seen = own[None, :], 1
    if plan.knowledge == "collude" and plan.colluders > 1:
        channel = SharedDirectory(
            root=Path(plan.collusion_dir),
            run_id=run_id,
            expected=plan.colluders,
            timeout=plan.collusion_timeout,
        )
        exchange = channel.exchange(server_round, partition_id, own)
        known, seen = exchange.updates, len(exchange.partition_ids)
    # an attack that draws noise: the same for every colluder of a round, fresh each round
    attack = build_attack(plan.attack, **plan.params, **round_seed_param(plan.attack, round_seed))
    return Crafted(attack(known), int(known.shape[0]), seen)


def apply_attack(
    plan: AttackPlan,
    global_state: Mapping[str, torch.Tensor],
    trained_state: Mapping[str, torch.Tensor],
    **round_info: int,
) -> tuple[dict[str, torch.Tensor], Crafted]:
    """The state dict a malicious node sends: ``global + craft_update(trained - global)``.

    The honest delta is formed per array in the arrays' dtype and flattened in
    state-dict order; the crafted delta is cut back into the same arrays.
    ``round_info`` are :func:`craft_update`'s keyword arguments.
    """
    keys = list(global_state)
    own = torch.cat(
        [
            (trained_state[k].detach().cpu() - global_state[k].detach().cpu()).reshape(-1)
            for k in keys
        ]
    )
    crafted = craft_update(plan, own, **round_info)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for k in keys:
        base = global_state[k].detach().cpu()
        size = base.numel()
        piece = crafted.update[offset : offset + size].reshape(base.shape).to(base.dtype)
        out[k] = base + piece
        offset += size
    return out, crafted
