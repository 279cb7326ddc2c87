"""Per-node suspicion across rounds, and optional quarantine of repeat offenders.

Robust rules judge every round on its own: a node whose update Krum discards in
round 5 starts round 6 with a clean slate. This module keeps a memory. After
each round, every node the server heard about gets *evidence* ``e`` in ``[0, 1]``
from the round's diagnostics:

* ``1`` when its reply was **rejected** (malformed, non-finite, over a limit, an
  error reply);
* ``weight_missing`` when it sent **no reply** within the round timeout (default
  ``0``: a crash or a cut cable is not evidence of malice);
* for an accepted reply, the mean of the signals the round has for it, weighted
  by ``weight_unselected``, ``weight_far`` and ``weight_opposed``:

  - *left out*: ``m / n`` when a selection rule (Krum, Multi-Krum, Bulyan, ...)
    chose ``m`` of ``n`` replies and **not this one**, 0 when it chose this one
    (not being picked by Krum, which picks one, says little; being left out by
    Multi-Krum, which keeps ``n - f``, says a lot); rules that select nothing
    (mean, median, ...) give no such signal;
  - *far*: ``clamp(d / median(d) - 1, 0, 1)`` for its distance ``d`` to the
    aggregate, relative to the median distance of the round's accepted replies
    (0 up to the median, 1 at twice the median and beyond);
  - *opposed*: ``clamp(-cos, 0, 1)`` for the cosine between its update and the
    aggregate: 0 for any update with a non-negative component along the round's
    consensus, 1 for one pointing straight against it (IPM, sign flip).

  *Far* and *opposed* answer different heterogeneity. On label-sorted data honest
  updates are nearly orthogonal to the aggregate (cosines down to -0.3 in single
  rounds, ``docs/ROBUSTNESS.md``, stage 3), so *opposed* would accuse them there;
  on Dirichlet data honest nodes with rare classes sit at two and three times the
  median distance while every honest cosine stays above 0.1, so *far* accuses them
  and *opposed* does not. The defence preset (``bastion.defences``) picks its
  weights from that measurement.

The suspicion score is an exponential moving average,
``s <- decay * s + (1 - decay) * e``, so it stays in ``[0, 1]`` and reads as
"the recent share of bad evidence"; a node the server did not ask in a round
(not sampled) gets ``e = 0`` for it, which forgives slowly. With a threshold
``t > 0``, a node whose score reaches ``t`` is **quarantined**: left out of
sampling (training and evaluation) for ``quarantine_rounds`` rounds, and each
further quarantine of the same node lasts ``escalation`` times longer than the
one before (repeat offenders are kept out longer and longer). A quarantined
node's score does not decay while it is out: it comes back on probation, and
one more bad round sends it back. With ``probation`` on, a node's first round back
is a *trial*: its update is compared with the aggregate of the others (it collects
evidence as usual) but is not part of that aggregate, so an attacker that returns
and attacks again is sent back before its update ever moves the model (in the
stage 3 runs of ``docs/ROBUSTNESS.md`` returning IPM attackers were only caught
again after two or three rounds in the aggregate, which they pulled towards them).
At most ``max_quarantined`` nodes are quarantined at once (the highest scores
win), and never so many that fewer than ``2 f + 1`` of the online nodes remain
(an honest majority must stay possible; the strategy passes its ``f``).
Quarantine does not lower the ``f`` the robust rule assumes: a quarantined node
may be honest.

This is a heuristic in the spirit of reputation systems for federated learning
(e.g. Kang et al. 2019, "Incentive mechanism for reliable federated learning";
the exponentially forgetting scores of Muñoz-González et al. 2019, "Byzantine-
robust federated machine learning through adaptive model averaging"), not a
guarantee. Its limits: scores are keyed by node id, so an attacker who can
register new identities starts each one clean (with SuperNode authentication a
node id is bound to a registered key, which moves the problem to who may
register keys); attacks built to look central (ALIE, IPM with small epsilon)
are, by construction, rarely far from the aggregate nor left out, and collect
little evidence; honest nodes with unusual data (non-IID) collect "far"
evidence too, which is why quarantine is off by default.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class RoundObservation(Protocol):
    """What reputation reads from one node's diagnostics in one round."""

    node_id: int
    status: str
    selected: bool | None
    distance_to_aggregate: float | None
    cosine_to_aggregate: float | None
    no_reply: bool  # rejected because nothing came back (timeout, node offline)


@dataclass(frozen=True)
class ReputationConfig:
    """Weights, memory and quarantine policy (see the module docstring)."""

    decay: float = 0.7
    weight_unselected: float = 0.5
    weight_far: float = 0.5
    weight_missing: float = 0.0
    weight_opposed: float = 0.0
    quarantine_threshold: float = 0.0  # 0: never quarantine
    quarantine_rounds: int = 3
    escalation: float = 2.0  # each further quarantine of a node lasts this much longer
    max_quarantined: int | None = None  # None: no cap besides min_remaining
    probation: bool = False  # a node's first round back from quarantine is a trial

    def __post_init__(self) -> None:
        checks = [
            ("reputation-decay", self.decay, 0.0 <= self.decay < 1.0, "0 <= value < 1"),
            (
                "reputation-weight-unselected",
                self.weight_unselected,
                0.0 <= self.weight_unselected <= 1.0,
                "0..1",
            ),
            ("reputation-weight-far", self.weight_far, 0.0 <= self.weight_far <= 1.0, "0..1"),
            (
                "reputation-weight-opposed",
                self.weight_opposed,
                0.0 <= self.weight_opposed <= 1.0,
                "0..1",
            ),
            (
                "reputation-weight-missing",
                self.weight_missing,
                0.0 <= self.weight_missing <= 1.0,
                "0..1",
            ),
            (
                "quarantine-threshold",
                self.quarantine_threshold,
                0.0 <= self.quarantine_threshold <= 1.0,
                "0 (off) or a score in (0, 1]",
            ),
            ("quarantine-rounds", self.quarantine_rounds, self.quarantine_rounds >= 1, ">= 1"),
            ("quarantine-escalation", self.escalation, 1.0 <= self.escalation <= 100, "1..100"),
        ]
        for key, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"key {key!r} is {value!r}; allowed: {allowed}")


@dataclass
class NodeStanding:
    """One node's reputation: its score, evidence of the last round, quarantine."""

    score: float = 0.0
    last_evidence: float = 0.0
    rounds_observed: int = 0
    times_quarantined: int = 0
    quarantined_from: int = 0  # first round of the latest quarantine
    quarantined_until: int = 0  # last round of the latest quarantine; 0: never


@dataclass
class Reputation:
    """Suspicion scores of every node seen so far, updated once per round."""

    config: ReputationConfig = field(default_factory=ReputationConfig)
    nodes: dict[int, NodeStanding] = field(default_factory=dict)

    # ------------------------------------------------------------------ evidence
    def evidence(self, observations: Sequence[RoundObservation]) -> dict[int, float]:
        """Evidence in ``[0, 1]`` for each observed node of one round (module docstring)."""
        cfg = self.config
        accepted = [o for o in observations if o.status == "accepted"]
        distances = [
            o.distance_to_aggregate
            for o in accepted
            if o.distance_to_aggregate is not None and math.isfinite(o.distance_to_aggregate)
        ]
        median = statistics.median(distances) if distances else 0.0
        flags = [o.selected for o in accepted if o.selected is not None]
        picked_share = sum(flags) / len(flags) if flags else 0.0
        out: dict[int, float] = {}
        for obs in observations:
            if obs.status == "rejected":
                out[obs.node_id] = cfg.weight_missing if obs.no_reply else 1.0
                continue
            if obs.status != "accepted":
                continue
            # a weighted mean of the signals this round has for the node
            total = weight = 0.0
            if obs.selected is not None:
                total += cfg.weight_unselected * (picked_share if obs.selected is False else 0.0)
                weight += cfg.weight_unselected
            d = obs.distance_to_aggregate
            if d is not None and math.isfinite(d) and median > 0:
                total += cfg.weight_far * min(1.0, max(0.0, d / median - 1.0))
                weight += cfg.weight_far
            c = obs.cosine_to_aggregate
            if cfg.weight_opposed > 0 and c is not None and math.isfinite(c):
                total += cfg.weight_opposed * min(1.0, max(0.0, -c))
                weight += cfg.weight_opposed
            out[obs.node_id] = total / weight if weight > 0 else 0.0
        return out

    # -------------------------------------------------------------------- update
    def observe(
        self,
        server_round: int,
        observations: Sequence[RoundObservation],
        *,
        online: Iterable[int] = (),
        min_remaining: int = 1,
    ) -> list[int]:
        """Fold one round's evidence into the scores; return the newly quarantined nodes.

        Every known node's score decays; observed nodes add their evidence. With a
        threshold, nodes at or above it whose quarantine is over start a new one for
        rounds ``server_round + 1 .. server_round + quarantine_rounds``, within the
        caps (``max_quarantined``; at least ``min_remaining`` of ``online`` left).
        """
        cfg = self.config
        evidence = self.evidence(observations)
        for node_id in evidence:
            self.nodes.setdefault(node_id, NodeStanding())
        benched = set(self.quarantined(server_round))
        for node_id, standing in self.nodes.items():
            if node_id in benched and node_id not in evidence:
                continue  # no forgiveness while left out: it comes back on probation
            e = evidence.get(node_id, 0.0)
            standing.score = cfg.decay * standing.score + (1.0 - cfg.decay) * e
            standing.last_evidence = e
            standing.rounds_observed += node_id in evidence
        if cfg.quarantine_threshold <= 0:
            return []
        candidates = sorted(
            (
                (s.score, node_id)
                for node_id, s in self.nodes.items()
                # only on fresh evidence: a node still out (its score held) is not re-judged
                if node_id in evidence
                and s.score >= cfg.quarantine_threshold
                and s.quarantined_until <= server_round
            ),
            reverse=True,
        )
        active = len(self.quarantined(server_round + 1))
        cap = math.inf if cfg.max_quarantined is None else cfg.max_quarantined
        online_set = set(online) or set(self.nodes)
        newly: list[int] = []
        for _, node_id in candidates:
            if active + 1 > cap:
                break
            remaining = len(online_set - set(self.quarantined(server_round + 1)) - {node_id})
            if remaining < min_remaining:
                break
            standing = self.nodes[node_id]
            # the k-th quarantine of a node lasts quarantine_rounds * escalation^(k-1)
            length = min(
                10**6, round(cfg.quarantine_rounds * cfg.escalation**standing.times_quarantined)
            )
            standing.quarantined_from = server_round + 1
            standing.quarantined_until = server_round + length
            standing.times_quarantined += 1
            newly.append(node_id)
            active += 1
        return newly

    def quarantined(self, server_round: int) -> list[int]:
        """Nodes left out of round ``server_round``."""
        return sorted(
            node_id
            for node_id, s in self.nodes.items()
            if s.quarantined_from <= server_round <= s.quarantined_until
        )

    def on_trial(self, server_round: int) -> list[int]:
        """Nodes whose update in ``server_round`` is judged without being aggregated:
        with ``probation`` on, those whose latest quarantine ended the round before."""
        if not self.config.probation:
            return []
        return sorted(
            node_id
            for node_id, s in self.nodes.items()
            if s.times_quarantined > 0 and s.quarantined_until == server_round - 1
        )

    def score(self, node_id: int) -> float:
        """The node's current suspicion score (0 for a node never seen)."""
        standing = self.nodes.get(node_id)
        return 0.0 if standing is None else standing.score

    # --------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        return {
            str(node_id): {
                "score": s.score,
                "last_evidence": s.last_evidence,
                "rounds_observed": s.rounds_observed,
                "times_quarantined": s.times_quarantined,
                "quarantined_from": s.quarantined_from,
                "quarantined_until": s.quarantined_until,
            }
            for node_id, s in self.nodes.items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.nodes = {int(k): NodeStanding(**v) for k, v in state.items()}
