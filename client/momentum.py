"""Client momentum on a node: the state file that carries it across rounds and restarts.

With run-config ``client-momentum`` beta > 0, a node replies with ``global + m_hat_t``,
its bias-corrected momentum (:mod:`task.momentum`, Karimireddy, He & Jaggi 2021,
Algorithm 2; Allouah et al. 2023), instead of its trained model. Flower starts a
fresh ClientApp process for every message, so ``m`` lives in a file under the node's
:func:`~client.state.state_dir`, one per (run, batch cell, partition):
``momentum-run-<id>[-cell-<c>]-partition-<p>.pt``, a ``torch.save`` of ``version``,
``beta``, ``t`` (rounds folded in), ``round`` (the server round of the last one) and
``m`` (one tensor per floating-point array). The run id is the one the DP ledger uses
(``ledger-run``): a resumed run continues its first attempt's momentum.

Each round: read the file, fold in this round's update, write the file (a temporary
file, then ``os.replace``: a reader sees the old or the new state, never half of
one), then reply. So a SuperNode killed at any point comes back with the momentum of
the last round it finished, and a node that missed rounds (not sampled, down)
continues from its stored ``m`` with ``t + 1``.

A file that exists but cannot be used (torn by something outside Bastion, another
version, another model or beta) is renamed ``<name>.unusable`` and the node starts
afresh (``t = 1``, so it sends its raw update, as a node without momentum does), with
a warning in its log. Unlike the privacy ledger, where a fresh start would under-count
the privacy spent, losing momentum costs only variance for a while; refusing to train
would take an honest node out of the rest of the run.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.common import log

from client.state import state_dir, state_file
from common.config import NodeConfig
from task.momentum import WorkerMomentum, momentum_reply

__all__ = ["MomentumStore", "momentum_path"]

_VERSION = 1


def momentum_path(
    directory: Path, run_id: int | str, partition_id: int, batch_cell: int = -1
) -> Path:
    """The momentum file of one partition in one run (one cell of a batch run)."""
    return state_file(directory, "momentum", run_id, partition_id, batch_cell, suffix=".pt")


class MomentumStore:
    """One node's client momentum in one run (cell), in a file that outlives the process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_node(cls, node: NodeConfig, run_id: int | str, batch_cell: int = -1) -> MomentumStore:
        """The store of ``node``'s partition under its :func:`~client.state.state_dir`."""
        return cls(momentum_path(state_dir(node), run_id, node.partition_id, batch_cell))

    def load(self) -> WorkerMomentum | None:
        """The stored momentum; ``None`` without a file, or (set aside, with a warning)
        when the file cannot be read."""
        try:
            data: Any = torch.load(self.path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            self._set_aside(f"it cannot be read ({type(exc).__name__}: {exc})")
            return None
        try:
            if data["version"] != _VERSION:
                raise ValueError(f"unknown version {data['version']!r}")
            m = dict(data["m"])
            if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in m.items()):
                raise TypeError("'m' is not a mapping of names to tensors")
            return WorkerMomentum(
                m=m, t=int(data["t"]), server_round=int(data["round"]), beta=float(data["beta"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            self._set_aside(f"its content is not a momentum state ({exc})")
            return None

    def save(self, momentum: WorkerMomentum) -> None:
        """Write ``momentum`` atomically (temporary file, then ``os.replace``)."""
        payload = {
            "version": _VERSION,
            "beta": momentum.beta,
            "t": momentum.t,
            "round": momentum.server_round,
            "m": momentum.m,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        torch.save(payload, tmp)
        os.replace(tmp, self.path)

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(self.path.name + ".unusable")
        os.replace(self.path, aside)
        log(
            WARNING,
            "[bastion] client momentum file %s is unusable: %s; moved to %s, this node's "
            "momentum starts afresh (t = 1)",
            self.path,
            why,
            aside.name,
        )

    def reply(
        self,
        global_state: Mapping[str, torch.Tensor],
        trained_state: Mapping[str, torch.Tensor],
        *,
        beta: float,
        server_round: int,
    ) -> dict[str, torch.Tensor]:
        """This round's reply state dict ``global + m_hat_t``; the new momentum is on
        disk before it returns (:func:`task.momentum.momentum_reply`)."""
        previous = self.load()
        if previous is not None:
            problem = previous.matches(global_state, beta)
            if problem is not None:
                self._set_aside(problem)
                previous = None
            elif previous.server_round >= server_round:
                # a resumed ServerApp replays the rounds after its last checkpoint; the
                # node cannot take back what it folded in then (docs/AGGREGATION.md)
                log(
                    WARNING,
                    "[bastion] client momentum: round %d again, the stored momentum is of "
                    "round %d (a resumed run?); continuing from it",
                    server_round,
                    previous.server_round,
                )
        reply, momentum = momentum_reply(
            global_state, trained_state, beta=beta, previous=previous, server_round=server_round
        )
        self.save(momentum)
        return reply
