"""The probe ClientApp: reports the process that ran its task."""

from __future__ import annotations

import os
import signal
import sys
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

#: whether torch was in this process before the app's own import (a warm parent)
TORCH_PRELOADED = "torch" in sys.modules
#: the app version the task ran (the tests change it between runs)
TAG = "v1"

app = ClientApp()


@app.query()
def probe(msg: Message, context: Context) -> Message:
    """Reply with this task's process facts, or crash / hang when told to."""
    partition = int(context.node_config["partition-id"])
    cfg = msg.content["cfg"]
    if cfg["round"] == cfg["fail-round"]:
        if partition == cfg["crash-partition"]:
            os.kill(os.getpid(), signal.SIGKILL)
        if partition == cfg["hang-partition"]:
            time.sleep(3600)
    facts = ConfigRecord(
        {
            "tag": TAG,
            "partition": partition,
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "torch_preloaded": TORCH_PRELOADED,
        }
    )
    return Message(RecordDict({"probe": facts}), reply_to=msg)
