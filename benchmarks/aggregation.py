"""Robust aggregation: Bastion's rules vs Flower 1.39's strategies, side by side.

For each (rule, n, d) cell, a fresh subprocess (``--cell``) builds n in-memory reply
``Message``s carrying full float32 weights (a global model of norm ~50 plus a small
client delta; the ``f`` Byzantine clients send one identical vector), then times:

- **ours**: ``RobustStrategy.aggregate_train`` on those Messages (decoding, per-reply
  validation, the rule, diagnostics and the new global model included), after
  ``configure_train`` as Flower's ServerApp would call it;
- **ours rule-only**: the same pipeline on a preallocated ``(n, d)`` float32 tensor of
  deltas (no decoding);
- **Flower**: the counterpart strategy's ``aggregate_train(server_round, replies)`` on the
  same Messages (Krum, MultiKrum, FedMedian, FedTrimmedAvg, Bulyan; FedAvg for mean);
- **floor**: one float32 ``X @ X.T`` of the stacked ``(n, d)`` tensor.

Every reply carries the same ``num-examples`` so Flower's example weighting is uniform
and the comparison fair. Peak extra memory is the high-water mark of the process RSS
(``VmHWM`` in ``/proc/self/status``, reset by writing ``5`` to ``/proc/self/clear_refs``
just before the call) minus the RSS just before the call, minus the ``n x d`` float32
buffer the strategy must allocate for its inputs, as a percentage of ``n * d * 4`` bytes.

    python benchmarks/aggregation.py              # default grid (~25 min on 2 cores)
    python benchmarks/aggregation.py --quick      # smoke check (< 1 min)
    python benchmarks/aggregation.py --n 10 25 --d 1e5 1e6 --rules krum median

Never run by the test suite.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RULES = (
    "mean",
    "median",
    "trimmed-mean",
    "krum",
    "multi-krum",
    "bulyan",
    "geometric-median",
    "centered-clipping",
)
FLOWER = {
    "mean": "FedAvg",
    "median": "FedMedian",
    "trimmed-mean": "FedTrimmedAvg",
    "krum": "Krum",
    "multi-krum": "MultiKrum",
    "bulyan": "Bulyan",
}
NUM_EXAMPLES = 100  # identical for every reply: Flower's example weighting is uniform
GB = 1024**3


def num_byzantine(rule: str, n: int) -> int:
    """f = n // 5; Bulyan needs n >= 4f + 3, so it gets the largest f that fits."""
    f = n // 5
    if rule == "bulyan":
        f = min(f, (n - 3) // 4)
    return max(f, 0)


# --------------------------------------------------------------------------- #
# One cell, in its own process                                                 #
# --------------------------------------------------------------------------- #
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Reset the RSS high-water mark; return the current RSS in bytes."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kib("VmRSS") * 1024


def _peak() -> int:
    return _status_kib("VmHWM") * 1024


def _split(d: int) -> list[tuple[str, int]]:
    """A few named arrays of total size d (one big weight, smaller ones)."""
    k = max(d // 20, 1)
    return [("fc1.weight", d - 3 * k), ("fc1.bias", k), ("fc2.weight", k), ("fc2.bias", k)]


class _FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _record(flat: Any, parts: list[tuple[str, int]]) -> Any:
    from flwr.app import Array, ArrayRecord

    arrays, start = OrderedDict(), 0
    for name, size in parts:
        arrays[name] = Array(flat[start : start + size].numpy())
        start += size
    return ArrayRecord(arrays)


def build_case(n: int, d: int, f: int, seed: int = 0) -> tuple[Any, list[Any]]:
    """Global record (norm ~50) and n reply Messages carrying full weights."""
    import torch
    from flwr.app import Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    gen = torch.Generator().manual_seed(seed)
    parts = _split(d)
    g = torch.randn(d, generator=gen)
    g.mul_(50.0 / float(g.norm()))
    drift = torch.randn(d, generator=gen)
    drift.mul_(2e-3 / float(drift.norm()))
    byz = torch.randn(d, generator=gen)
    byz.mul_(5e-2 / float(byz.norm()))
    byz_weights = g + byz
    replies = []
    for i in range(n):
        if i >= n - f:
            w = byz_weights
        else:
            noise = torch.randn(d, generator=gen)
            r = 1e-3 + 9e-3 * float(torch.rand(1, generator=gen))
            w = g + drift + noise.mul_(r / float(noise.norm()))
            del noise
        instr = Message(content=RecordDict(), dst_node_id=i + 1, message_type=MessageType.TRAIN)
        instr.metadata.__dict__["_message_id"] = f"m{i + 1}"
        content = RecordDict(
            {
                "arrays": _record(w, parts),
                "metrics": MetricRecord({"num-examples": NUM_EXAMPLES, "train-loss": 0.1}),
            }
        )
        replies.append(Message(content=content, reply_to=instr))
        del w
    return _record(g, parts), replies


def _flower_strategy(rule: str, n: int, f: int) -> Any:
    from flwr.serverapp import strategy as fs

    common = {"min_available_nodes": 1, "min_train_nodes": 1}
    if rule == "mean":
        return fs.FedAvg(**common)
    if rule == "median":
        return fs.FedMedian(**common)
    if rule == "trimmed-mean":
        beta = f / n
        if int(beta * n) != f:  # make Flower cut exactly f per side
            beta += 1e-9
        return fs.FedTrimmedAvg(beta=beta, **common)
    if rule == "krum":
        return fs.Krum(num_malicious_nodes=f, **common)
    if rule == "multi-krum":
        return fs.MultiKrum(num_malicious_nodes=f, num_nodes_to_select=n - f, **common)
    if rule == "bulyan":
        return fs.Bulyan(num_malicious_nodes=f, **common)
    raise ValueError(rule)


def _ours(rule: str, f: int) -> Any:
    from strategies import build_aggregator, compose
    from strategies.strategy import RobustStrategy

    params = {"num_byzantine": f} if rule != "mean" else {}
    return RobustStrategy(
        pipeline=compose([], build_aggregator(rule, **params)),
        num_byzantine=f,
        min_available_nodes=1,
        min_train_nodes=1,
    )


def _configured(strategy: Any, global_record: Any, n: int) -> Any:
    """``strategy`` after ``configure_train`` for nodes 1..n, with the message ids
    a Grid's push would give (the ``m<node>`` the replies of :func:`build_case`
    answer). A round's messages are answered once: configure again before each
    ``aggregate_train``, and pass it a copy of the replies (it empties a list)."""
    from flwr.app import ConfigRecord

    grid = _FakeGrid(list(range(1, n + 1)))
    for msg in strategy.configure_train(1, global_record, ConfigRecord(), grid):
        msg.metadata.__dict__["_message_id"] = f"m{msg.metadata.dst_node_id}"
    return strategy


def _snapshot(replies: list[Any]) -> list[list[tuple[str, Any]]]:
    return [list(m.content.array_records["arrays"].items()) for m in replies]


def _restore(replies: list[Any], snap: list[list[tuple[str, Any]]]) -> None:
    """Flower's FedMedian/FedTrimmedAvg/Bulyan pop the arrays out of the replies."""
    from flwr.app import ArrayRecord

    for msg, items in zip(replies, snap, strict=True):
        msg.content.array_records["arrays"] = ArrayRecord(OrderedDict(items))


def _flat64(record: Any) -> Any:
    import numpy as np

    return np.concatenate(
        [np.asarray(a, dtype=np.float64).ravel() for a in record.to_numpy_ndarrays()]
    )


def _gram64(x: Any) -> Any:
    """Float64 Gram matrix of the float32 rows of x, in column chunks."""
    import torch

    n, d = x.shape
    gram = torch.zeros((n, n), dtype=torch.float64)
    step = 1 << 20
    for s in range(0, d, step):
        c = x[:, s : s + step].double()
        gram += c @ c.T
    return gram


def _timeit(fn: Any, reps: int, before: Any = None) -> float:
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times)


def _warm_up(rules: list[str]) -> None:
    """One small run of every path, so lazy imports and thread pools are not timed."""
    import torch

    n, d = 7, 2000
    g, replies = build_case(n, d, 1, seed=1)
    snap = _snapshot(replies)
    for rule in rules:
        f = num_byzantine(rule, n)
        _configured(_ours(rule, f), g, n).aggregate_train(1, list(replies))
        _ours(rule, f).pipeline.aggregate(torch.randn(n, d), num_byzantine=f)
        if rule in FLOWER:
            _flower_strategy(rule, n, f).aggregate_train(1, replies)
            _restore(replies, snap)
    x = torch.randn(n, d)
    _ = x @ x.T


def run_cell(
    rule: str, n: int, d: int, reps: int, flower: bool, g: Any, replies: list[Any]
) -> dict[str, Any]:
    import numpy as np
    import torch
    from flwr.serverapp.strategy.multikrum import compute_distances, select_multikrum

    from strategies.layout import ModelLayout

    f = num_byzantine(rule, n)
    res: dict[str, Any] = {"rule": rule, "n": n, "d": d, "f": f, "reps": reps}
    input_bytes = n * d * 4

    # ours, memory (first call, fresh high-water mark)
    ours = _configured(_ours(rule, f), g, n)
    base = _reset_peak()
    t0 = time.perf_counter()
    new, _ = ours.aggregate_train(1, list(replies))
    first = time.perf_counter() - t0
    res["ours_peak_extra_pct"] = 100.0 * (_peak() - base - input_bytes) / input_bytes
    ours_flat = _flat64(new)
    ours_selected = [i for i, nd in enumerate(ours.last_round.nodes) if nd.selected]
    del new
    res["ours_s"] = (
        first
        if reps == 1
        else _timeit(
            lambda: ours.aggregate_train(1, list(replies)),
            reps,
            before=lambda: _configured(ours, g, n),
        )
    )

    # decode cost alone (what aggregate_train spends before the rule)
    layout = ModelLayout.of(g)
    x = torch.empty((n, d), dtype=torch.float32)

    def decode() -> None:
        gflat = layout.flatten(g)
        for i, m in enumerate(replies):
            layout.flatten_into(m.content.array_records["arrays"], x[i])
            x[i].sub_(gflat)

    res["decode_s"] = _timeit(decode, reps)

    # ours rule-only on the preallocated deltas, and its memory
    pipe = ours.pipeline
    base = _reset_peak()
    pipe.aggregate(x, num_byzantine=f)
    res["rule_peak_extra_pct"] = 100.0 * (_peak() - base) / input_bytes
    res["rule_s"] = _timeit(lambda: pipe.aggregate(x, num_byzantine=f), reps)

    # physical floor: one float32 X @ X.T
    res["floor_s"] = _timeit(lambda: x @ x.T, reps)

    # float64 reference for the Krum family
    g_flat = _flat64(g)
    krum_family = rule in ("krum", "multi-krum", "bulyan")
    k = {"krum": 1, "multi-krum": n - f, "bulyan": n - 2 * f}.get(rule, 0)
    if krum_family:
        # squared distances of the deltas (= of the weights) from a float64 Gram matrix
        gram = _gram64(x)
        sq = gram.diagonal()
        d64 = (sq[:, None] + sq[None, :] - 2 * gram).numpy()
        ref = np.argsort(_krum_scores_from_dist(d64, f), kind="stable").tolist()[:k]
        res["ours_selected"] = ours_selected
        res["ref64_order"] = ref
        res["ours_vs_ref64_same"] = sorted(ours_selected) == sorted(ref)
    x = torch.empty(0)  # free the n x d buffer before Flower runs
    gc.collect()

    if flower and rule in FLOWER:
        strat = _flower_strategy(rule, n, f)
        snap = _snapshot(replies)
        arrays, _ = strat.aggregate_train(1, replies)
        _restore(replies, snap)
        fl_flat = _flat64(arrays)
        del arrays
        res["flower_s"] = _timeit(
            lambda: strat.aggregate_train(1, replies), reps, before=lambda: _restore(replies, snap)
        )
        _restore(replies, snap)
        diff = float(np.max(np.abs(ours_flat - fl_flat)))
        res["max_abs_diff"] = diff
        res["rel_to_aggregate"] = diff / float(np.linalg.norm(fl_flat))
        res["rel_to_update"] = diff / max(float(np.linalg.norm(fl_flat - g_flat)), 1e-300)
        if krum_family:
            contents = [m.content for m in replies]
            picked = select_multikrum(contents, f, k)
            ids = {id(c): i for i, c in enumerate(contents)}
            res["flower_selected"] = [ids[id(c)] for c in picked]
            recs = [m.content.array_records["arrays"] for m in replies]
            d32 = compute_distances(recs).astype(np.float64)
            del recs
            off = ~np.eye(n, dtype=bool)
            # error of Flower's float32 squared distances, relative to the median distance
            res["flower_dist_rel_err"] = float(
                np.max(np.abs(d32[off] - d64[off])) / np.median(d64[off])
            )
            res["flower_neg_dist"] = int((d32[off] < 0).sum())
            res["flower_vs_ref64_same"] = sorted(res["flower_selected"]) == sorted(ref)
    return res


def _krum_scores_from_dist(dist: Any, f: int) -> Any:
    import numpy as np

    dist = dist.copy()
    n = dist.shape[0]
    np.fill_diagonal(dist, np.inf)
    k = max(1, n - f - 2)
    return np.sort(dist, axis=1)[:, :k].sum(1)


def run_group(n: int, d: int, reps: int, ours_rules: list[str], flower_rules: list[str]) -> None:
    """All rules for one (n, d) in this process: the Messages are built once."""
    _warm_up(ours_rules)
    g, replies = build_case(n, d, n // 5)
    for rule in ours_rules:
        res = run_cell(rule, n, d, reps, rule in flower_rules, g, replies)
        print(json.dumps(res), flush=True)


# --------------------------------------------------------------------------- #
# Driver                                                                       #
# --------------------------------------------------------------------------- #
def _mem_estimate_gb(rule: str, n: int, d: int, flower: bool) -> float:
    """Rough peak of one cell in copies of n x d float32: the Messages, plus ours (deltas and
    the decode buffer) or Flower's copies (decoded list, np.stack, partition/argpartition)."""
    copy = n * d * 4 / GB
    flower_copies = {
        "mean": 0.5,
        "median": 3,
        "trimmed-mean": 3,
        "krum": 2.2,
        "multi-krum": 2.2,
        "bulyan": 4.5,
    }
    peak = 1 + 2.5
    if flower and rule in FLOWER:
        peak = max(peak, 1 + flower_copies[rule])
    return copy * peak + 0.8


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "–" if v is None else format(v, spec)


def _agreement(r: dict[str, Any]) -> str:
    parts = []
    if "max_abs_diff" in r:
        parts.append(f"{r['rel_to_aggregate']:.0e} (upd {r['rel_to_update']:.0e})")
    if "ours_selected" in r:
        ours, ref = r["ours_selected"], r["ref64_order"]
        fl = r.get("flower_selected")
        if r["rule"] == "krum":
            parts.append(f"pick ours {ours} f64 {ref}" + (f" Flower {fl}" if fl else ""))
        else:
            if r["rule"] == "multi-krum":  # Bulyan's own selection is iterated Krum
                parts.append("ours=f64 set " + ("yes" if r["ours_vs_ref64_same"] else "no"))
            if fl is not None:
                parts.append("Flower=f64 set " + ("yes" if r["flower_vs_ref64_same"] else "no"))
        if "flower_dist_rel_err" in r:
            parts.append(f"Flower dist err {r['flower_dist_rel_err']:.0e}")
    return "; ".join(parts) or "–"


def _row(r: dict[str, Any]) -> str:
    dtxt = f"{r['d']:.1e}".replace("e+0", "e")
    head = f"| {r['rule']} | {r['n']} | {dtxt} | {r.get('f', '')} |"
    if "skipped" in r:
        return head + f" skipped ({r['skipped']}) |" + " |" * 8
    fl = r.get("flower_s")
    if r["rule"] not in FLOWER:
        flower_txt = "no counterpart"
    else:
        flower_txt = _fmt(fl) if fl is not None else (r.get("flower_skip") or "–")
    ratio = f"{fl / r['ours_s']:.1f}x" if fl is not None else "–"
    return (
        head + f" {r['ours_s']:.3g} | {r['rule_s']:.3g} | {r['decode_s']:.3g} | {flower_txt} "
        f"| {ratio} | {r['floor_s']:.3g} | {r['ours_s'] / r['floor_s']:.1f} "
        f"| {r['ours_peak_extra_pct']:.0f}% ({r['rule_peak_extra_pct']:.0f}%) | {_agreement(r)} |"
    )


HEADER = (
    "| rule | n | d | f | ours s | ours rule-only s | decode s | Flower s | Flower/ours "
    "| floor X@X.T s | ours/floor | ours peak extra mem (rule-only) | agreement |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _summary(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    done = [r for r in results if "skipped" not in r]

    def check(label: str, rules: tuple[str, ...], ok: Any, min_d: int = 0) -> None:
        cells = [r for r in done if r["rule"] in rules and r["d"] >= min_d]
        cells = [r for r in cells if ok(r) is not None]
        bad = [r for r in cells if not ok(r)]
        if not cells:
            lines.append(f"- {label}: no measured cells")
            return
        verdict = (
            "met"
            if not bad
            else "missed in " + ", ".join(f"{r['rule']} {r['n']}x{r['d']:.2g}" for r in bad)
        )
        lines.append(f"- {label}: {verdict} ({len(cells) - len(bad)}/{len(cells)} cells)")

    for key, what in (("ours_s", "full path, decoding included"), ("rule_s", "rule only")):

        def ratio(r: dict[str, Any], x: float, key: str = key) -> bool | None:
            return None if "flower_s" not in r else r["flower_s"] / r[key] >= x

        lines.append(f"{what}:")
        check(
            "median, trimmed mean, Bulyan >= 5x faster than Flower",
            ("median", "trimmed-mean", "bulyan"),
            lambda r, ratio=ratio: ratio(r, 5),
        )
        check(
            "Krum, Multi-Krum >= 2x faster than Flower",
            ("krum", "multi-krum"),
            lambda r, ratio=ratio: ratio(r, 2),
        )
        check(
            "Krum, Multi-Krum within 2x of the X@X.T floor",
            ("krum", "multi-krum"),
            lambda r, key=key: r[key] / r["floor_s"] <= 2,
        )
        mem = "ours_peak_extra_pct" if key == "ours_s" else "rule_peak_extra_pct"
        check(
            "peak extra memory <= 10% (mean, median, trimmed mean, Krum, Multi-Krum; d >= 1e5)",
            ("mean", "median", "trimmed-mean", "krum", "multi-krum"),
            lambda r, mem=mem: r[mem] <= 10,
            min_d=100_000,
        )
    return lines


def _plan(
    a: argparse.Namespace, n: int, d: int, rates: dict[str, float], frates: dict[str, float]
) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Which rules run ours / Flower in the (n, d) group, and the skipped records."""
    skipped, ours_rules, flower_rules = [], [], []
    for rule in a.rules:
        rec: dict[str, Any] = {"rule": rule, "n": n, "d": d, "f": num_byzantine(rule, n)}
        est = rates.get(rule, 0.0) * n * d
        if _mem_estimate_gb(rule, n, d, flower=False) > a.max_gb:
            rec["skipped"] = f"> {a.max_gb:g} GB estimated"
        elif est > a.max_flower_s:
            rec["skipped"] = f"ours ~{est:.0f} s per repetition estimated"
        if "skipped" in rec:
            skipped.append(rec)
            continue
        ours_rules.append(rule)
        if rule not in FLOWER:
            continue
        fest = frates.get(rule, 0.0) * n * d
        if _mem_estimate_gb(rule, n, d, flower=True) > a.max_gb:
            rec["flower_skip"] = f"skipped (> {a.max_gb:g} GB est.)"
        elif fest > a.max_flower_s:
            rec["flower_skip"] = f"skipped (~{fest:.0f} s est.)"
        else:
            flower_rules.append(rule)
            continue
        skipped.append(rec)  # carries only the Flower skip reason; merged below
    return skipped, ours_rules, flower_rules


def phases(n: int, d: int, reps: int = 3) -> None:
    """Where ``RobustStrategy.aggregate_train`` (rule ``mean``) spends its time, step by step."""
    import torch

    from strategies.layout import ModelLayout
    from strategies.validation import check_train_reply

    f = n // 5
    g, replies = build_case(n, d, f)
    strategy = _configured(_ours("mean", f), g, n)
    strategy.aggregate_train(1, list(replies))
    layout = ModelLayout.of(g)
    totals: dict[str, float] = {}

    def t(label: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        out = fn()
        totals[label] = totals.get(label, 0.0) + time.perf_counter() - t0
        return out

    for _ in range(reps):
        _configured(strategy, g, n)
        t("aggregate_train, whole", lambda: strategy.aggregate_train(1, list(replies)))
        x = t("torch.empty((n, d))", lambda: torch.empty((n, d)))
        t("first touch of a fresh (n, d) buffer (the strategy reuses its own)", x.zero_)
        t("check_train_reply x n", lambda: [check_train_reply(m, layout) for m in replies])
        t(
            "flatten_into(minus=global) x n (decode + delta, one pass)",
            lambda x=x: [
                layout.flatten_into(m.content.array_records["arrays"], x[i], minus=g)
                for i, m in enumerate(replies)
            ],
        )
        t(
            "vector_norm(x, dim=1): norms + finiteness check",
            lambda x=x: torch.isfinite(torch.linalg.vector_norm(x, dim=1)),
        )
        out = t("pipeline (mean)", lambda x=x: strategy.pipeline.aggregate(x, num_byzantine=f))
        t("diagnostics matvec", lambda x=x, out=out: (x @ out.vector).double())
        t(
            "new global: add_scaled (chunked float64 sum + Array serialisation)",
            lambda out=out: layout.add_scaled(g, out.vector, 1.0),
        )
    for label, total in totals.items():
        print(f"| {label} | {1000 * total / reps:.1f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[10, 25, 100])
    p.add_argument("--d", type=float, nargs="+", default=[1e5, 1e6, 1.1e7])
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    p.add_argument("--quick", action="store_true", help="tiny grid, smoke check")
    p.add_argument("--reps", type=int, default=3, help="repetitions (median); 1 for big cells")
    p.add_argument(
        "--single-rep-above",
        type=float,
        default=1e8,
        help="cells with n*d at or above this run once (default 1e8)",
    )
    p.add_argument("--max-gb", type=float, default=16.0, help="skip cells estimated above this")
    p.add_argument(
        "--max-flower-s",
        type=float,
        default=60.0,
        help="skip a run (Flower or ours) estimated above this per repetition",
    )
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--report", type=Path, help="re-print the table of a --json file, run nothing")
    p.add_argument(
        "--phases", nargs=2, metavar=("N", "D"), help="time the steps of aggregate_train, then exit"
    )
    p.add_argument("--group", nargs=3, metavar=("N", "D", "REPS"), help=argparse.SUPPRESS)
    p.add_argument("--ours", nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--flower", nargs="*", default=[], help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.group:
        run_group(int(a.group[0]), int(float(a.group[1])), int(a.group[2]), a.ours, a.flower)
        return 0

    if a.phases:
        print(f"| step (n={a.phases[0]}, d={a.phases[1]}) | ms |\n|---|---|")
        phases(int(a.phases[0]), int(float(a.phases[1])))
        return 0
    if a.report:
        results = json.loads(a.report.read_text())
        print(HEADER)
        for r in results:
            print(_row(r))
        print("\nTargets:")
        for line in _summary(results):
            print(line)
        return 0

    if a.quick:
        a.n, a.d, a.rules = [10], [1e4], ["median", "krum", "bulyan"]
    sizes = sorted({(n, int(d)) for n in a.n for d in a.d}, key=lambda c: (c[0] * c[1], c[0]))
    results: list[dict[str, Any]] = []
    rates: dict[str, float] = {}  # ours seconds per n*d element, from the largest cell so far
    frates: dict[str, float] = {}  # same for Flower
    start, load = time.time(), os.getloadavg()[0]
    env = os.environ | {  # large blocks always mmap'd: freed memory leaves the RSS
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "MALLOC_TRIM_THRESHOLD_": "131072",
    }
    for n, d in sizes:
        skipped, ours_rules, flower_rules = _plan(a, n, d, rates, frates)
        reps = 1 if n * d >= a.single_rep_above else a.reps
        got: dict[str, dict[str, Any]] = {}
        if ours_rules:
            cmd = [
                sys.executable,
                __file__,
                "--group",
                str(n),
                str(d),
                str(reps),
                "--ours",
                *ours_rules,
                "--flower",
                *flower_rules,
            ]
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("{"):
                    r = json.loads(line)
                    got[r["rule"]] = r
                    print(_row(r) + f"  [{time.time() - start:.0f} s]", file=sys.stderr, flush=True)
            err = proc.stderr.read() if proc.stderr else ""
            if proc.wait() != 0:
                print(f"group n={n} d={d} failed: {err[-500:]}", file=sys.stderr)
        for rec in skipped:
            if "flower_skip" in rec and rec["rule"] in got:
                got[rec["rule"]]["flower_skip"] = rec["flower_skip"]
            elif "skipped" in rec:
                got[rec["rule"]] = rec
        for rule in a.rules:
            r = got.get(rule) or {
                "rule": rule,
                "n": n,
                "d": d,
                "f": num_byzantine(rule, n),
                "skipped": "failed (see stderr)",
            }
            results.append(r)
            if "ours_s" in r:
                rates[rule] = r["ours_s"] / (n * d)
            if "flower_s" in r:
                frates[rule] = r["flower_s"] / (n * d)

    results.sort(key=lambda r: (RULES.index(r["rule"]), r["n"], r["d"]))
    print(HEADER)
    for r in results:
        print(_row(r))
    print()
    print(
        f"f = n // 5 Byzantine clients in the data and for every rule but Bulyan (largest f with "
        f"n >= 4f + 3); every reply has num-examples = {NUM_EXAMPLES}; times are medians of "
        f"{a.reps} (1 where n*d >= {a.single_rep_above:.0e}); total {time.time() - start:.0f} s; "
        f"1-min load at start: {load:.2f}"
    )
    print()
    print("Targets:")
    for line in _summary(results):
        print(line)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
