"""Named defences: one flag for a pre-aggregation chain, a rule and client momentum.

A defence preset is a set of run-config keys (the pre-aggregation chain, the rule,
client momentum, quarantine) chosen from the heterogeneity experiment
(``docs/ROBUSTNESS.md``, "Heterogeneous data"), so that a deployer does not have to
assemble the chain key by key::

    bastion run --defence robust-noniid --num-byzantine 2 --malicious 2 --attack alie

The preset's keys go first; ``--run-config`` and the flags then win over them, so
any part of a preset can be changed. ``bastion defences`` lists the presets with the
``--run-config`` text that gives the same run under plain ``flwr run``. A preset
needs ``num-byzantine`` > 0: the number of attackers it must tolerate is a property
of the deployment, not of the preset.

:data:`FRAGILE` records, per rule, what the same experiment measured when that rule
ran alone on label-sorted data without any attacker; ``bastion run`` and ``bastion
simulate`` print it as a note, with the recommended preset, when a user picks such
a rule on non-IID partitions.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from common.config import ConfigError, RunConfig, format_overrides

Scalar = bool | int | float | str


@dataclass(frozen=True)
class Defence:
    """A named set of run-config keys, with the evidence it was chosen on."""

    name: str
    keys: Mapping[str, Scalar]
    summary: str
    evidence: str

    def run_config_text(self) -> str:
        """The keys in ``flwr run --run-config`` syntax."""
        return format_overrides(dict(self.keys))


#: The presets, by name; :data:`RECOMMENDED` is the one the docs and hints name.
DEFENCES: dict[str, Defence] = {
    d.name: d
    for d in (
        # The heterogeneity experiment (docs/ROBUSTNESS.md, "Heterogeneous data";
        # Fashion-MNIST, n = 25, f = 5 omniscient attackers, one seed). Stage 1
        # (label-sorted, 138 cells) ranked momentum + ARC + mean first; stage 2 (every
        # partition and 11 attacks) found IPM with epsilon = 10 stalling it on
        # label-sorted data (0.100: ARC leaves each attacker an honest-sized vote)
        # while the reputation score marked those attackers (highest suspicion 0.999
        # on average, honest nodes' 0.03-0.2). Quarantine at 0.5 lifts the
        # label-sorted worst case from 0.100 to 0.389 (IPM 10) and keeps the clean
        # accuracy (0.710 against FedAvg's 0.689; Dirichlet 0.3: 0.811, IPM 10
        # 0.747 -> 0.777); it costs 0.09 under mimic, where five honest nodes with
        # rare classes were quarantined. Stage 3 (3 seeds) found that "far" evidence
        # quarantines 1-6 honest nodes per run on Dirichlet shards; the suspicion now
        # weighs far 0.4 and "opposed" (cosine below 0) 0.6: in 51 runs (label-sorted,
        # 11 attacks; Dirichlet 0.3, 6 attacks; 3 seeds) no honest node was quarantined
        # and every IPM and sign-flip attacker was; worst cases 0.443 (label-sorted,
        # was 0.421) and 0.750 (Dirichlet 0.3, was 0.751), clean on Dirichlet 0.803
        # (was 0.792). Probation (a returning node's first round is judged, not
        # aggregated) lifts label-sorted IPM 10 from 0.443 to 0.611. Client momentum
        # 0.5 instead of 0.9 (3 seeds): IID worst case 0.820 -> 0.843 and clean 0.838
        # -> 0.862 (FedAvg 0.865); Dirichlet 0.3 0.750 -> 0.782; label-sorted worst
        # case 0.503 -> 0.511, better under 7 of 10 attacks.
        Defence(
            name="robust-noniid",
            keys={
                "client-momentum": 0.5,
                "arc": True,
                "aggregator": "mean",
                "quarantine-threshold": 0.5,
                "reputation-weight-far": 0.4,
                "reputation-weight-opposed": 0.6,
                "quarantine-probation": True,
            },
            summary=(
                "client momentum 0.5, then adaptive robust clipping (ARC), then the mean; "
                "nodes whose suspicion (far from, or pointing against, the aggregate) "
                "reaches 0.5 sit out (quarantine), and their first round back is a trial "
                "that is not aggregated (probation)"
            ),
            evidence=(
                "docs/ROBUSTNESS.md, 'Heterogeneous data' (stages 1 to 3, 'The ceiling', "
                "'Client momentum 0.5')"
            ),
        ),
    )
}

#: The defence ``bastion run`` suggests and the README's example uses.
RECOMMENDED = "robust-noniid"

#: What a rule alone did on label-sorted Fashion-MNIST (n = 25) without any attacker,
#: from docs/ROBUSTNESS.md; ``bastion run`` prints it when a user picks the rule on
#: non-IID partitions without a defence preset.
FRAGILE: dict[str, str] = {
    # docs/ROBUSTNESS.md, the attack x defence grid of 2026-11-21 (20 rounds, f = 5):
    # the mean reached 0.685 on the same data
    "krum": "ended at 0.17 accuracy against the mean's 0.69",
    "bulyan": "ended at 0.29 accuracy against the mean's 0.69",
    "median": "ended at 0.42 accuracy against the mean's 0.69",
    "trimmed-mean": "ended at 0.53 accuracy against the mean's 0.69",
}


def get_defence(name: str) -> Defence:
    """The preset ``name``, or :class:`ConfigError` naming the value and the presets."""
    if name not in DEFENCES:
        allowed = ", ".join(repr(n) for n in DEFENCES)
        raise ConfigError(
            f"option '--defence': value {name!r} is not allowed; allowed: one of {allowed}"
        )
    return DEFENCES[name]


def with_defence(name: str, overrides: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """``overrides`` laid over the preset's keys (what the user wrote wins), checked to
    give the preset a Byzantine count to work with."""
    chosen = get_defence(name)
    merged = dict(chosen.keys) | dict(overrides)
    if int(merged.get("num-byzantine", 0)) <= 0:
        raise ConfigError(
            f"option '--defence': value {name!r} needs run config key 'num-byzantine' > 0 "
            "(--num-byzantine F: how many attackers the defence must tolerate)"
        )
    return merged


def fragile_rule_note(cfg: RunConfig, used_defence: bool) -> str | None:
    """A one-paragraph note for a run whose rule the experiment saw fail on non-IID data
    without any attacker, or ``None``."""
    if used_defence or cfg.partitioner == "iid" or cfg.aggregator not in FRAGILE:
        return None
    preset = DEFENCES[RECOMMENDED]
    return (
        f"note: {cfg.aggregator} alone {FRAGILE[cfg.aggregator]} on label-sorted "
        f"Fashion-MNIST with no attacker at all ({preset.evidence}); on non-IID data "
        f"consider --defence {preset.name} ({preset.summary})"
    )


def defences_report() -> str:
    """The text of ``bastion defences``: every preset, its keys and its evidence."""
    lines = []
    for d in DEFENCES.values():
        star = " (recommended)" if d.name == RECOMMENDED else ""
        lines += [
            f"{d.name}{star}: {d.summary}",
            f"  bastion run --defence {d.name} --num-byzantine F ...",
            f"  flwr run . --run-config {shlex.quote(d.run_config_text() + ' num-byzantine=F')}",
            f"  evidence: {d.evidence}",
        ]
    return "\n".join(lines)
