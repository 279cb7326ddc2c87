"""The probe ServerApp: query every node each round, write each reply as a JSON line."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``rounds`` rounds of one query message per node."""
    cfg = context.run_config
    out = Path(str(cfg["out"]))
    deadline = time.monotonic() + 60
    while len(grid.get_node_ids()) < int(cfg["nodes"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    nodes = sorted(grid.get_node_ids())
    for rnd in range(1, int(cfg["rounds"]) + 1):
        content = ConfigRecord(
            {
                "round": rnd,
                "fail-round": int(cfg["fail-round"]),
                "crash-partition": int(cfg["crash-partition"]),
                "hang-partition": int(cfg["hang-partition"]),
            }
        )
        messages = [
            Message(RecordDict({"cfg": content}), dst_node_id=node, message_type="query")
            for node in nodes
        ]
        replies = grid.send_and_receive(messages, timeout=120)
        with out.open("a") as f:
            for reply in replies:
                row: dict[str, object] = {"round": rnd, "node": reply.metadata.src_node_id}
                if reply.has_error():
                    row["error"] = reply.error.reason
                else:
                    row.update(dict(reply.content["probe"]))
                f.write(json.dumps(row) + "\n")
