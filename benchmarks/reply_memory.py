"""Peak memory of the ServerApp against the size of one reply: Flower's part and Bastion's.

A reply reaches the ServerApp as Flower 1.39 pulls it: the object contents the
SuperLink holds (the ``Message``, its records, each ``Array`` cut into 5 MiB
``ArrayChunk``\\s) are pulled and inflated into a ``Message``
(``flwr.supercore.inflatable.inflatable_utils.inflate_object_from_contents``, what
``Grid.pull_messages`` runs). Then Bastion's strategy checks it and aggregates.
For each reply size, in a fresh process, this prints:

* ``contents``: the pulled object contents, held while Flower inflates;
* ``Flower peak``: the peak above the contents while ``inflate`` runs, and what
  the inflated ``Message`` holds afterwards (``message``);
* ``Bastion peak``: the peak above that while ``RobustStrategy.aggregate_train``
  runs on the reply, and ``after``: what is still held above the baseline once it
  returned (the reply is freed when it is rejected, and when it is decoded).

Two replies per size: ``rejected``, a model of 1 MiB plus a padded array that
takes the reply past ``max-reply-bytes`` (the ``oversized-array`` kind), and
``accepted``, a model as large as the reply (one float32 array), decoded into the
round's ``(n, d)`` buffer. Peaks are the kernel's (VmHWM, reset through
``/proc/self/clear_refs``), in MiB.

    python benchmarks/reply_memory.py                 # 64, 256 and 512 MiB
    python benchmarks/reply_memory.py --sizes 16 64   # sizes in MiB
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

MiB = 2**20


def _status(field: str) -> float:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> None:
    """Set the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(size_mib: int, kind: str) -> dict[str, float]:
    """One measurement in this process: see the module docstring."""
    import gc

    import numpy as np
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
    from flwr.supercore.task_identity import TaskIdentity

    from strategies.strategy import RobustStrategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    # random bytes: Flower stores equal chunks once (objects are content-addressed)
    rng = np.random.default_rng(0)
    size = size_mib * MiB
    model_floats = size // 4 if kind == "accepted" else MiB // 4
    global_record = ArrayRecord(OrderedDict(w=Array(np.zeros(model_floats, np.float32))))

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [1]

    strategy = RobustStrategy(
        min_available_nodes=1, min_train_nodes=1, max_reply_bytes=size // 2 + 4 * MiB
    )
    sent = list(strategy.configure_train(1, global_record, ConfigRecord(), Grid()))
    sent[0].metadata.__dict__["_message_id"] = "m1"
    if kind == "accepted":
        strategy.max_reply_bytes = 2 * size
        payload = Array(rng.random(model_floats, np.float32))
    else:  # the model's array with zero bytes appended: past max-reply-bytes
        honest = Array(rng.random(model_floats, np.float32))
        payload = Array(
            dtype="float32",
            shape=(model_floats,),
            stype="numpy.ndarray",
            data=honest.data + rng.bytes(size - len(honest.data)),
        )
    reply = Message(
        RecordDict(
            {
                "arrays": ArrayRecord(OrderedDict(w=payload)),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        ),
        reply_to=sent[0],
    )
    # what the SuperLink hands the ServerApp: the deflated objects
    objects = get_all_nested_objects(reply)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    reply_id = reply.object_id
    del objects, reply, payload
    gc.collect()
    # the baseline counts the (n, d) buffer the round decodes into: the server holds it
    strategy._buffer_for(1, model_floats)
    baseline = _status("VmRSS")
    held = sum(len(c) for c in contents.values()) / MiB

    _reset_peak()
    msg = inflate_object_from_contents(reply_id, contents)
    flower_peak = _status("VmHWM")
    del contents
    gc.collect()
    message = _status("VmRSS")

    _reset_peak()
    replies = [msg]
    del msg
    strategy.aggregate_train(1, replies)
    bastion_peak = _status("VmHWM")
    gc.collect()
    after = _status("VmRSS")
    status = strategy.last_round.nodes[0].status
    return {
        "size_mib": size_mib,
        "kind": kind,
        "status": status,
        "contents": held,
        "flower_peak": flower_peak - baseline,
        "message": message - baseline + held,
        "bastion_peak": bastion_peak - message,
        "after": after - baseline + held,
    }


def main() -> None:
    """Run every size and kind in a fresh process and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1])))
        return
    print(
        "| reply (MiB) | reply | contents pulled | Flower peak above contents "
        "| Message held | Bastion peak above Message | held after aggregate_train |"
    )
    print("|---|---|---|---|---|---|---|")
    root = Path(__file__).resolve().parents[1]
    for size in args.sizes:
        for kind in ("rejected", "accepted"):
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(size), kind],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"| {size} | {r['kind']} ({r['status']}) | {r['contents']:.0f} "
                f"| {r['flower_peak']:.0f} | {r['message']:.0f} "
                f"| {r['bastion_peak']:.0f} | {r['after']:.0f} |"
            )


if __name__ == "__main__":
    main()
