"""The message protocol between Bastion's ServerApp and its ClientApps.

One place for every name that crosses the wire: the records a message carries, the
keys of the ``MetricRecord`` a node replies with and their types, and the extra keys
of the ``ConfigRecord`` the server sends (the training hyper-parameters themselves
are :class:`common.config.TrainInstructions`). The ClientApp writes these names
(:mod:`client.app`, :mod:`client.privacy`), the strategy checks and reads them
(:mod:`strategies.validation`, :mod:`strategies.strategy`), the omniscient research
hook reads them (:mod:`server.omniscient`), and the malformed-reply corpus breaks
them on purpose (:mod:`client.malformed`).

A ``train`` instruction: ``ArrayRecord`` :data:`ARRAYS` (the global model) and
``ConfigRecord`` :data:`CONFIG`. A ``train`` reply: ``ArrayRecord`` :data:`ARRAYS`
(the full trained model) and ``MetricRecord`` :data:`METRICS`. An ``evaluate``
reply: ``MetricRecord`` :data:`METRICS` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

#: record names
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"

# ConfigRecord keys the server adds to the training instructions
#: the cell of a batch run (common.batch), or -1
BATCH_CELL = "batch-cell"
#: the Flower run id whose node state this run continues (client.privacy, client.momentum)
LEDGER_RUN = "ledger-run"

# MetricRecord keys of a reply
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
STEPS = "steps"
PARTITION_ID = "partition-id"
# DP-SGD (client.privacy): epsilon spent over the whole run so far, and its terms
DP_EPSILON = "dp-epsilon"
DP_DELTA = "dp-delta"
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
DP_SAMPLE_RATE = "dp-sample-rate"
DP_ROUNDS = "dp-rounds"
# ground truth a Bastion attacker declares for experiments (client.malicious); the
# strategy records it in the diagnostics and never uses it
MALICIOUS = "malicious"
KNOWN_ROWS = "known-rows"
COLLUDERS_SEEN = "colluders-seen"
# an evaluate reply
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"

#: Every metric key a Bastion ClientApp sends, and its type: an ``int`` key holds an
#: integer, a ``float`` key any finite number (strategies.validation checks them)
METRIC_TYPES: Mapping[str, type] = MappingProxyType(
    {
        NUM_EXAMPLES: int,
        TRAIN_LOSS: float,
        TRAIN_SECONDS: float,
        STEPS: int,
        PARTITION_ID: int,
        DP_EPSILON: float,
        DP_DELTA: float,
        DP_NOISE_MULTIPLIER: float,
        DP_SAMPLE_RATE: float,
        DP_ROUNDS: int,
        MALICIOUS: int,
        KNOWN_ROWS: int,
        COLLUDERS_SEEN: int,
        EVAL_LOSS: float,
        EVAL_ACCURACY: float,
    }
)
#: float metrics that may be +inf (never NaN): epsilon of DP-SGD without noise
MAY_BE_INFINITE = frozenset({DP_EPSILON})
#: the largest ``num-examples`` a reply may claim
MAX_NUM_EXAMPLES = 10**9

# The strategy's own MetricRecords (what RobustStrategy.aggregate_* return)
NUM_ACCEPTED = "num-accepted"
NUM_REJECTED = "num-rejected"
AGGREGATE_NORM = "aggregate-norm"
NUM_NODES = "num-nodes"
