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

**Replayed rounds.** A resumed ServerApp sends again the rounds after its last
checkpoint (``checkpoint-every``), and a node may already have folded them in. The
file therefore also keeps the states before the newest (``earlier``: up to
``checkpoint-every`` of them, at least 1, at most :data:`MAX_KEPT` - 1). A message
for round ``r`` continues from the newest state of a round before ``r`` and drops the
states of rounds ``r`` and later (the abandoned attempt's), so a replayed round is
folded in once, exactly as in a run that never stopped. Only when every kept state
is of round ``r`` or later (a replay longer than what is kept) does the node continue
from the oldest of them, with a warning.

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
from collections.abc import Mapping, Sequence
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.common import log

from client.state import state_dir, state_file
from common.config import NodeConfig
from task.momentum import WorkerMomentum, momentum_reply

__all__ = ["MAX_KEPT", "MomentumStore", "momentum_path", "states_to_keep"]

_VERSION = 2  # 1: the newest state only (read, and continued, as a one-state history)

#: the most momentum states a file keeps (the newest and the ones before it)
MAX_KEPT = 16


def states_to_keep(checkpoint_every: int) -> int:
    """How many states a node keeps so that a resumed run's replay is folded in once:
    the newest and the ``checkpoint-every`` before it (a resumed ServerApp replays at
    most the rounds since its last checkpoint), at least 2 (a round delivered again
    after a SuperNode restart), at most :data:`MAX_KEPT`."""
    return min(MAX_KEPT, max(2, checkpoint_every + 1))


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
        """The newest stored momentum; ``None`` without a file, or (set aside, with a
        warning) when the file cannot be read."""
        kept = self.load_all()
        return kept[-1] if kept else None

    def load_all(self) -> list[WorkerMomentum]:
        """Every stored state, oldest first (the newest last); ``[]`` without a file,
        or (set aside, with a warning) when the file cannot be read."""
        try:
            data: Any = torch.load(self.path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return []
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            self._set_aside(f"it cannot be read ({type(exc).__name__}: {exc})")
            return []
        try:
            if data["version"] not in (1, _VERSION):
                raise ValueError(f"unknown version {data['version']!r}")
            beta = float(data["beta"])
            entries = [*data.get("earlier", []), data]
            return [_state(entry, beta) for entry in entries]
        except (KeyError, TypeError, ValueError) as exc:
            self._set_aside(f"its content is not a momentum state ({exc})")
            return []

    def save(self, momentum: WorkerMomentum, earlier: Sequence[WorkerMomentum] = ()) -> None:
        """Write ``momentum``, and the ``earlier`` states kept before it (oldest first),
        atomically (temporary file, then ``os.replace``)."""
        payload = {
            "version": _VERSION,
            "beta": momentum.beta,
            **_entry(momentum),
            "earlier": [_entry(state) for state in earlier],
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
        keep: int = 2,
    ) -> dict[str, torch.Tensor]:
        """This round's reply state dict ``global + m_hat_t``; the new momentum is on
        disk before it returns (:func:`task.momentum.momentum_reply`), with the ``keep``
        - 1 states before it (:func:`states_to_keep`; replayed rounds: module docstring)."""
        if not 1 <= keep <= MAX_KEPT:
            raise ValueError(f"keep must be in 1..{MAX_KEPT}, got {keep}")
        kept = self.load_all()
        problem = next(
            (p for p in (state.matches(global_state, beta) for state in kept) if p), None
        )
        if problem is not None:
            self._set_aside(problem)
            kept = []
        before = [state for state in kept if state.server_round < server_round]
        if len(before) < len(kept):
            # a resumed ServerApp (or a restarted SuperNode) sends a round again
            if before:
                log(
                    WARNING,
                    "[bastion] client momentum: round %d again (a resumed run?); continuing "
                    "from the momentum of round %d, the %d later state(s) are dropped",
                    server_round,
                    before[-1].server_round,
                    len(kept) - len(before),
                )
            else:
                log(
                    WARNING,
                    "[bastion] client momentum: round %d again, and the oldest kept momentum "
                    "is of round %d (the replay is longer than the %d state(s) kept); "
                    "continuing from it",
                    server_round,
                    kept[0].server_round,
                    len(kept),
                )
                before = kept[:1]
        previous = before[-1] if before else None
        reply, momentum = momentum_reply(
            global_state, trained_state, beta=beta, previous=previous, server_round=server_round
        )
        self.save(momentum, earlier=before[-(keep - 1) :] if keep > 1 else ())
        return reply


def _entry(state: WorkerMomentum) -> dict[str, Any]:
    """One state as the file stores it (beta is the file's, shared by all its states)."""
    return {"t": state.t, "round": state.server_round, "m": state.m}


def _state(entry: Mapping[str, Any], beta: float) -> WorkerMomentum:
    """One stored state back; ``TypeError`` when ``m`` is not names to tensors."""
    m = dict(entry["m"])
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in m.items()):
        raise TypeError("'m' is not a mapping of names to tensors")
    return WorkerMomentum(m=m, t=int(entry["t"]), server_round=int(entry["round"]), beta=beta)
