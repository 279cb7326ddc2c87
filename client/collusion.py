"""The colluding attackers' side channel: a shared directory.

The attack papers (Baruch et al. 2019, Xie et al. 2020, Karimireddy et al. 2022)
assume the Byzantine workers coordinate: they pool their honest estimates and all
send the same vector. In a deployment that coordination needs a channel the
server does not provide (a Bastion server never helps an attack). A directory
that every attacker can read and write is the simplest channel that works across
processes on one host, across containers (a shared volume) and across machines
(a network file system); it needs no extra service and leaves an audit trail.

Layout: ``<root>/run-<run id>/round-<r>/<partition id>.pt``, each file one
attacker's honest update delta (``torch.save`` of a 1-D float tensor), written to
a temporary name and renamed, so a reader never sees half a file. Files of round
``r - 2`` are removed by the attacker with the lowest partition id in round ``r``
(every attacker has finished reading them by then: the server does not start
round ``r`` before round ``r - 1``'s replies are in, and those come after the
round ``r - 1`` exchange).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Exchange:
    """What one attacker learned from the side channel in one round."""

    partition_ids: tuple[int, ...]  # sorted; includes the caller's own
    updates: torch.Tensor  # (k, d), rows in partition-id order
    complete: bool  # all expected colluders were heard from before the timeout


@dataclass(frozen=True)
class SharedDirectory:
    """Exchange honest update estimates through ``root`` (see module docstring)."""

    root: Path
    run_id: int
    expected: int  # number of colluders, the caller included
    timeout: float = 60.0

    def _round_dir(self, server_round: int) -> Path:
        return Path(self.root) / f"run-{self.run_id}" / f"round-{server_round}"

    def publish(self, server_round: int, partition_id: int, update: torch.Tensor) -> None:
        """Write this attacker's honest update for ``server_round`` (atomically)."""
        folder = self._round_dir(server_round)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{partition_id}.{os.getpid()}.tmp"
        torch.save(update.detach().to("cpu").reshape(-1).clone(), tmp)
        os.replace(tmp, folder / f"{partition_id}.pt")

    def collect(self, server_round: int) -> dict[int, torch.Tensor]:
        """Wait until ``expected`` updates of ``server_round`` are there or the timeout
        passes; return what is there, by partition id."""
        folder = self._round_dir(server_round)
        deadline = time.monotonic() + self.timeout
        while True:
            names = sorted(p for p in folder.glob("*.pt")) if folder.is_dir() else []
            if len(names) >= self.expected or time.monotonic() >= deadline:
                break
            time.sleep(POLL_SECONDS)
        found: dict[int, torch.Tensor] = {}
        for path in names:
            try:
                found[int(path.stem)] = torch.load(path, weights_only=True)
            except (OSError, RuntimeError, ValueError):
                continue  # a file removed or replaced under us: skip it
        return found

    def exchange(self, server_round: int, partition_id: int, update: torch.Tensor) -> Exchange:
        """Publish ``update``, collect the colluders' updates, clean up old rounds."""
        self.publish(server_round, partition_id, update)
        found = self.collect(server_round)
        found[partition_id] = update.detach().to("cpu").reshape(-1)
        shapes = {tuple(t.shape) for t in found.values()}
        if len(shapes) != 1:
            raise ValueError(
                f"collusion directory {self._round_dir(server_round)} holds updates of "
                f"different shapes {sorted(shapes)}; is it shared with another run?"
            )
        ids = tuple(sorted(found))
        if ids[0] == partition_id and server_round > 2:
            shutil.rmtree(self._round_dir(server_round - 2), ignore_errors=True)
        dtype = update.dtype
        stacked = torch.stack([found[i].to(dtype) for i in ids]).to(update.device)
        return Exchange(ids, stacked, complete=len(ids) >= self.expected)
