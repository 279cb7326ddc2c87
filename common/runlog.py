"""Reading a run directory's JSON-lines files (written by :mod:`common.rundir`).

Kept free of torch and Flower imports: the CLI, the simulation launcher and the
experiment runner read runs while they are being written, and import this early.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_new_rows(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines appended to ``path`` since byte ``offset``, and the new offset.

    A line still being written (no newline yet) is left for the next call; a
    missing file gives no rows.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except FileNotFoundError:
        return [], offset
    complete = chunk[: chunk.rfind(b"\n") + 1]
    rows = [json.loads(line) for line in complete.decode().splitlines() if line.strip()]
    return rows, offset + len(complete)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of ``path`` (none if it does not exist)."""
    return read_new_rows(Path(path), 0)[0]
