"""Which partitions the run config's ``num-malicious`` rule makes malicious.

One seeded rule, read by the ClientApp (is this node an attacker?), by the
launchers (which compose service attacks, which run-table row is malicious) and
by tests; pure Python, so every side computes the same set.
"""

from __future__ import annotations

import random

from common.config import ConfigError


def malicious_partitions(num_partitions: int, num_malicious: int, seed: int) -> tuple[int, ...]:
    """The partition ids the ``num-malicious`` rule makes malicious, sorted.

    A seeded uniform sample (Python's ``random.Random(seed).sample``), the same on
    every node and in the server, so it is deterministic per run seed and, under
    label-sorted partitioning, does not hand the attackers one block of classes.
    """
    if not 0 <= num_malicious <= num_partitions:
        raise ConfigError(
            f"run config key 'num-malicious': value {num_malicious} is not allowed; "
            f"allowed: 0..{num_partitions} (the number of partitions)"
        )
    rng = random.Random(f"bastion-malicious-{seed}")
    return tuple(sorted(rng.sample(range(num_partitions), num_malicious)))
