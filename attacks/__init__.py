"""Byzantine attacks as pure tensor math, used by both sides of a federation.

A malicious ClientApp (:mod:`client.malicious`) crafts its update with them; the
ServerApp's simulation-only research hook (:mod:`server.omniscient`) does the same
with every honest update of the round. Only torch and the standard library are
imported here (no Flower).

>>> from attacks import build_attack
>>> bad = build_attack("ipm", epsilon=0.1)(known)      # doctest: +SKIP
"""

from __future__ import annotations

from attacks.byzantine import ATTACKS, Attack, alie_z_max, build_attack, label_flip
from attacks.selection import malicious_partitions

__all__ = ["ATTACKS", "Attack", "alie_z_max", "build_attack", "label_flip", "malicious_partitions"]
