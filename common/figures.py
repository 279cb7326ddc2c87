"""Writing matplotlib figures the one way every Bastion plot is written."""

from __future__ import annotations

import os
from collections.abc import Mapping
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


def run_title(run_dir: Path, config: Mapping[str, Any]) -> str:
    """A plot title naming the run: its folder, data, defence, attack and DP settings."""
    cfg = dict(config)
    parts = [f"{cfg.get('dataset', '?')}/{cfg.get('partitioner', '?')}"]
    steps = [
        name
        for name, on in (
            (f"clip {cfg.get('clip-norm')}", float(cfg.get("clip-norm", 0) or 0) > 0),
            ("nnm", bool(cfg.get("nnm"))),
            (f"bucket s={cfg.get('bucketing-s')}", int(cfg.get("bucketing-s", 0) or 0) > 0),
            (f"resample s={cfg.get('resampling-s')}", int(cfg.get("resampling-s", 0) or 0) > 0),
        )
        if on
    ]
    rule = " > ".join([*steps, str(cfg.get("aggregator", "mean"))])
    if int(cfg.get("num-byzantine", 0) or 0):
        rule += f" f={cfg['num-byzantine']}"
    parts.append(rule)
    if int(cfg.get("num-malicious", 0) or 0) and cfg.get("attack", "none") != "none":
        parts.append(f"{cfg['num-malicious']} x {cfg['attack']}")
    if cfg.get("dp"):
        target = float(cfg.get("dp-target-epsilon", 0) or 0)
        sigma = cfg.get("dp-noise-multiplier")
        noise = f"target eps={target:g}" if target > 0 else f"sigma={sigma}"
        parts.append(f"DP {noise} C={cfg.get('dp-max-grad-norm')}")
    return f"{Path(run_dir).name}: " + ", ".join(parts)
