"""Writing matplotlib figures the one way every Bastion plot is written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def save_figure(fig: Any, path: Path, *, dpi: int = 100, tight: bool = True) -> Path:
    """Save ``fig`` to ``path`` atomically (a reader never sees half a PNG) and close it.

    ``tight``: lay the figure out with ``tight_layout`` first; pass False when the
    caller already did, with arguments of its own (a ``rect`` kept free for a legend).
    """
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path
