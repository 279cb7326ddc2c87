"""Byzantine attacks as pure tensor math, used by both sides of a federation.

A malicious ClientApp (:mod:`client.malicious`) crafts its update with them; the
ServerApp's simulation-only research hook (:mod:`server.omniscient`) does the same
with every honest update of the round. Only torch, the standard library and the
ground (:mod:`common`) are imported here (no Flower).

>>> from attacks import build_attack
>>> bad = build_attack("ipm", epsilon=0.1)(known)      # doctest: +SKIP
"""

from __future__ import annotations

from attacks.byzantine import (
    ADAPTIVE_BASES,
    ATTACKS,
    DATA_ATTACKS,
    Adaptive,
    AdaptiveChoice,
    Attack,
    alie_z_max,
    attack_names,
    attack_params,
    build_attack,
    check_attack_config,
    declared_options,
    label_flip,
    round_seed_param,
)
from attacks.line_search import Probe, line_maximize
from attacks.selection import malicious_partitions

__all__ = [
    "ADAPTIVE_BASES",
    "ATTACKS",
    "DATA_ATTACKS",
    "Adaptive",
    "AdaptiveChoice",
    "Attack",
    "Probe",
    "alie_z_max",
    "attack_names",
    "attack_params",
    "build_attack",
    "check_attack_config",
    "declared_options",
    "label_flip",
    "line_maximize",
    "malicious_partitions",
    "round_seed_param",
]
