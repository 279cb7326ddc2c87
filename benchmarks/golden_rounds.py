"""Golden outputs of the ServerApp's run on a fake grid, to compare two trees.

A refactor that should not change behaviour is checked by running this script in a
copy of each tree and comparing the JSON files it writes::

    git archive <old> | tar -x -C /tmp/old;  git archive HEAD | tar -x -C /tmp/new
    (cd /tmp/old && PYTHONPATH=/tmp/old python benchmarks/golden_rounds.py /tmp/o1 old.json)
    (cd /tmp/new && PYTHONPATH=/tmp/new python benchmarks/golden_rounds.py /tmp/o2 new.json)
    python -c "import json; a, b = (json.load(open(f)) for f in ('old.json', 'new.json')); \
               print([k for k in a if a[k] != b.get(k)])"

The fake grid answers every train and evaluate message in a fixed order (the order
in which real SuperNodes' replies arrive is not fixed, and bucketing, resampling and
float sums follow it), with deterministic updates: one node stays silent, one sends an
error reply, one a NaN update, one a norm outlier; one scenario crashes mid-run and
resumes. Recorded per scenario: every line of metrics.jsonl and diagnostics.jsonl,
summary.json, config.json, reputation.json, each checkpoint's tensors (SHA-256), and
every log line of Flower's logger, timings aside. Written for issue 15 (layers); the
run-config import covers the layout before it (``bastion.config``) and after.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

try:  # before the layers
    from bastion.config import RunConfig

    load = RunConfig.from_flat
except ImportError:
    from server.run_config import load_run_config as load
from server.app import _run_one

NODES = (101, 102, 103, 104, 105, 106, 107)


class Crash(BaseException):
    pass


class Grid:
    def __init__(self, crash_in_round=None, run_id=3) -> None:
        self.crash_in_round = crash_in_round
        self.run = SimpleNamespace(run_id=run_id)
        self.pushed: dict[str, Message] = {}

    def get_node_ids(self):
        return list(NODES)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            cfg = msg.content.config_records.get("config", {})
            if (
                msg.metadata.message_type == "train"
                and int(cfg["server-round"]) == self.crash_in_round
            ):
                raise Crash("killed")
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.pushed[msg.object_id] = msg
            ids.append(msg.object_id)
        return ids

    def pull_messages(self, message_ids):
        out = []
        for mid in message_ids:
            ins = self.pushed[mid]
            node = ins.metadata.dst_node_id
            if node == 106:  # silent
                continue
            self.pushed.pop(mid)
            cfg = ins.content.config_records["config"]
            if ins.metadata.message_type == "evaluate":
                if node == 104:
                    m = {"eval-loss": float("nan"), "eval-accuracy": 0.5, "num-examples": 3}
                else:
                    m = {
                        "eval-loss": 0.1 * node % 7,
                        "eval-accuracy": (node % 10) / 10,
                        "num-examples": 5,
                    }
                out.append(Message(RecordDict({"metrics": MetricRecord(m)}), reply_to=ins))
                continue
            rnd = int(cfg["server-round"])
            if node == 107 and rnd % 2 == 0:
                out.append(Message(Error(code=0, reason="ClientApp crashed"), reply_to=ins))
                continue
            state = ins.content.array_records["arrays"].to_torch_state_dict()
            gen = torch.Generator().manual_seed(rnd * 1000 + node)
            scale = 30.0 if node == 105 else 0.05
            new = {k: v - scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}
            if node == 104 and rnd == 2:
                k0 = next(iter(new))
                new[k0] = new[k0].clone()
                new[k0].view(-1)[0] = float("nan")
            metrics = {
                "num-examples": 10,
                "partition-id": NODES.index(node),
                "train-loss": 1.0 + node / 1000,
                "train-seconds": 0.25 * (node - 100),
            }
            if node == 105:
                metrics["malicious"] = 1
            if node in (102, 103):
                metrics["dp-epsilon"] = 0.5 * rnd + node / 100
            content = RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord(metrics)})
            out.append(Message(content, reply_to=ins))
        return out


SCENARIOS = {
    "krum": {
        "aggregator": "multi-krum",
        "num-byzantine": 1,
        "server-momentum": 0.9,
        "federated-eval-every": 2,
        "quarantine-threshold": 0.4,
        "reputation-weight-missing": 0.5,
        "checkpoint-every": 2,
        "central-eval-samples": 100,
        "num-server-rounds": 6,
    },
    "mean": {
        "aggregator": "mean",
        "min-accepted-replies": 6,
        "federated-eval-every": 3,
        "num-server-rounds": 4,
        "fraction-train": 0.8,
    },
    "median": {
        "aggregator": "median",
        "num-server-rounds": 3,
        "clip-norm": 1.0,
        "bucketing-s": 2,
        "num-byzantine": 1,
        "max-update-norm": 5.0,
    },
    "resume": {
        "aggregator": "multi-krum",
        "num-byzantine": 1,
        "server-momentum": 0.9,
        "federated-eval-every": 2,
        "quarantine-threshold": 0.4,
        "reputation-weight-missing": 0.5,
        "checkpoint-every": 1,
        "num-server-rounds": 6,
        "crash": 4,
    },
    "krum_bad": {"aggregator": "krum", "num-byzantine": 3, "num-server-rounds": 2},
    "gm_resample": {
        "aggregator": "geometric-median",
        "num-byzantine": 1,
        "resampling-s": 2,
        "gm-max-iter": 50,
        "quarantine-threshold": 0.3,
        "num-server-rounds": 4,
    },
    "cc_chain": {
        "aggregator": "centered-clipping",
        "num-byzantine": 1,
        "cc-tau": 5.0,
        "cc-iterations": 2,
        "bucketing-s": 2,
        "clip-norm": 20.0,
        "nnm": True,
        "num-server-rounds": 4,
        "server-momentum": 0.5,
    },
    "mk_m": {
        "aggregator": "multi-krum",
        "num-byzantine": 1,
        "multi-krum-m": 3,
        "num-server-rounds": 3,
    },
    "gm_defaults": {"aggregator": "geometric-median", "num-server-rounds": 3},
    "cc_defaults": {"aggregator": "centered-clipping", "num-server-rounds": 3},
    "trimmed_bucket": {
        "aggregator": "trimmed-mean",
        "num-byzantine": 1,
        "bucketing-s": 3,
        "num-server-rounds": 3,
    },
    "bulyan_plain": {"aggregator": "bulyan", "num-byzantine": 1, "num-server-rounds": 3},
}


class Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


TIME_KEYS = {
    "time",
    "elapsed_seconds",
    "round_seconds",
    "overhead_seconds",
    "started",
    "finished",
    "duration_seconds",
    "wall_seconds",
    "serverapp_seconds",
}


def norm(obj):
    if isinstance(obj, dict):
        return {k: ("<t>" if k in TIME_KEYS else norm(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [norm(v) for v in obj]
    return obj


def main(out: Path) -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cap = Capture()
    logging.getLogger("flwr").addHandler(cap)
    result = {}
    for name, flat in SCENARIOS.items():
        random.seed(7)
        import numpy as np

        np.random.seed(0)
        cap.lines.clear()
        d = out / name
        flat = flat | {
            "round-timeout": 0.3,
            "seed": 2,
            "output-dir": str(d),
            "min-available-nodes": 2,
        }
        crash = flat.pop("crash", None)
        try:
            if crash:
                try:
                    _run_one(Grid(crash_in_round=crash), load(flat))
                except Crash:
                    result[name + "_crash_summary"] = norm(
                        json.loads((d / "summary.json").read_text())
                    )
                random.seed(99)
                flat = flat | {"resume": True}
                _run_one(Grid(run_id=8), load(flat))
            else:
                _run_one(Grid(), load(flat))
        except Exception as exc:
            result[name + "_exc"] = repr(exc)
        files = {}
        for p in sorted(d.rglob("*")):
            if p.suffix == ".jsonl":
                files[str(p.relative_to(d))] = [
                    norm(json.loads(line)) for line in p.read_text().splitlines()
                ]
            elif p.suffix == ".json":
                files[str(p.relative_to(d))] = norm(json.loads(p.read_text()))
            elif p.suffix == ".pt":
                ck = torch.load(p, weights_only=False)
                h = {}

                def walk(prefix, v, h=h):
                    if isinstance(v, torch.Tensor):
                        h[prefix] = [
                            str(v.dtype),
                            list(v.shape),
                            hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest(),
                        ]
                    elif isinstance(v, dict):
                        for k, x in v.items():
                            walk(f"{prefix}.{k}", x, h)
                    elif isinstance(v, (list, tuple)):
                        for i, x in enumerate(v):
                            walk(f"{prefix}[{i}]", x, h)
                    else:
                        h[prefix] = repr(v) if not isinstance(v, float) else v

                walk("", ck)
                files[str(p.relative_to(d))] = {
                    k: v
                    for k, v in h.items()
                    if "elapsed" not in k
                    and "time" not in k
                    and "started" not in k
                    and "seconds" not in k
                    and "resumed" not in k
                }
            elif p.is_file():
                files[str(p.relative_to(d))] = "<file>"
        result[name] = files
        result[name + "_log"] = [
            re.sub(r"\d+\.\d s\)", "<s>)", line).replace(str(out), "<out>") for line in cap.lines
        ]
    Path(sys.argv[2]).write_text(
        json.dumps(result, indent=1, sort_keys=False, default=repr).replace(str(out), "<out>")
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
