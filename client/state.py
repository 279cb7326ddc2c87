"""Where a node keeps what must outlive its ClientApp processes and its restarts.

Flower starts a fresh ClientApp process for every message, and a SuperNode may be
restarted mid-run, so a node's per-run state lives in files: the DP privacy ledger
(:mod:`client.privacy`) and the client momentum (:mod:`client.momentum`). Both are
kept per (run id, batch cell, partition id) in one directory, :func:`state_dir`, and
named by :func:`state_file`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from common.config import NodeConfig
from task.cache import cache_dir

__all__ = ["STATE_DIR_ENV", "state_dir", "state_file"]

#: Environment variable naming the directory of the nodes' state files.
STATE_DIR_ENV = "BASTION_STATE_DIR"

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def state_dir(node: NodeConfig) -> Path:
    """Where this node keeps its state files (privacy ledger, client momentum).

    The node config's ``state-dir``; else ``$BASTION_STATE_DIR``; else ``state/``
    under Bastion's cache directory (``$BASTION_CACHE_DIR``, by default
    ``~/.cache/bastion``, so ``~/.cache/bastion/state``).
    """
    if node.state_dir:
        return Path(node.state_dir).expanduser()
    env = os.environ.get(STATE_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()

    return cache_dir() / "state"


def state_file(
    directory: Path,
    kind: str,
    run_id: int | str,
    partition_id: int,
    batch_cell: int = -1,
    *,
    suffix: str,
) -> Path:
    """The ``kind`` state file (``privacy``, ``momentum``) of one partition in one run
    (one cell of a batch run): ``<kind>-run-<id>[-cell-<c>]-partition-<p><suffix>``."""
    cell = f"-cell-{batch_cell}" if batch_cell >= 0 else ""
    name = _SAFE.sub("_", f"{kind}-run-{run_id}{cell}-partition-{partition_id}{suffix}")
    return Path(directory) / name
