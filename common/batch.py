"""Several runs ("cells") inside one Flower run: the experiment grid's fast path.

Starting a Flower run costs ~25 s on 2 cores whatever it does (SuperLink, app
packaging, the simulation process, Ray and its actors, shutdown), more than a
20-round cell of 25 clients takes once running. So the grid runner hands one
Flower run a *batch file*, a JSON list of cells, each the run-config overrides of
one complete Bastion run (with its own ``output-dir``). The ServerApp runs the
cells one after the other, each with a fresh model, strategy and results folder,
and tags every message with the cell's index (``batch-cell`` in the ConfigRecord);
the ClientApp reads the same file and applies that cell's run config. Every cell's
folder ends up exactly as if it had been a run of its own.

The file must be readable at the same path by the ServerApp and every ClientApp:
true in simulation and on one host, which is where the grid runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.config import ConfigError


def write_batch(path: Path, cells: Sequence[Mapping[str, Any]]) -> None:
    """Write the cells' run-config overrides (each with ``output-dir``), atomically."""
    for i, cell in enumerate(cells):
        if not cell.get("output-dir"):
            raise ValueError(f"batch cell {i} has no output-dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps([dict(c) for c in cells], indent=1))
    os.replace(tmp, path)


_CACHE: dict[tuple[str, float], list[dict[str, Any]]] = {}


def load_batch(path: str | Path) -> list[dict[str, Any]]:
    """The cells of a batch file (read once per process and file version)."""
    p = Path(path)
    try:
        key = (str(p.resolve()), p.stat().st_mtime)
    except OSError as exc:
        raise ConfigError(
            f"run config key 'batch-file': value {str(path)!r} is not allowed ({exc}); "
            "allowed: a batch file readable by the ServerApp and every ClientApp"
        ) from None
    if key not in _CACHE:
        cells = json.loads(p.read_text())
        if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
            raise ConfigError(f"batch file {path}: expected a JSON list of objects")
        _CACHE.clear()
        _CACHE[key] = cells
    return _CACHE[key]


def cell_run_config(run_config: Mapping[str, Any], batch_file: str, index: int) -> dict[str, Any]:
    """The flat run config of cell ``index``: the Flower run's config, then the cell's."""
    cells = load_batch(batch_file)
    if not 0 <= index < len(cells):
        raise ConfigError(
            f"train config key 'batch-cell': value {index} is not allowed; allowed: "
            f"0..{len(cells) - 1} (cells in {batch_file})"
        )
    return dict(run_config) | cells[index]
