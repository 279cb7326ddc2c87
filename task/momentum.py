"""Worker (client) momentum across rounds: what a node sends instead of its raw update.

Karimireddy, He & Jaggi (ICML 2021, "Learning from History for Byzantine Robust
Optimization", Algorithm 2) and Allouah et al. (AISTATS 2023, "Fixing by Mixing: A
Recipe for Optimal Byzantine ML under Heterogeneity") show that robust aggregation
rules hold up under heterogeneous data when every worker sends its *momentum*, an
average of its recent updates, instead of its latest update: averaging over time
shrinks the honest workers' variance, so a robust rule can tell them apart from the
attackers, who can no longer hide in that variance.

Bastion's worker is a federated node and its "gradient" is one round's update
``delta_t = (locally trained model) - (received global model)``. With
``client-momentum`` beta in ``(0, 1)`` the node keeps, over the rounds of a run, the
exponential moving average of the papers::

    m_t = beta * m_{t-1} + (1 - beta) * delta_t,        m_0 = 0

and replies with ``global + m_hat_t``, where (our choice, see below)::

    m_hat_t = m_t / (1 - beta ** t)

``t`` counts the rounds this node trained, not the server's rounds: a node that was
not sampled, or was down, continues from its stored ``m`` (the papers' workers take
part in every step; in FL the missed rounds simply contribute nothing). Only the
floating-point arrays are averaged; integer buffers (a BatchNorm's
``num_batches_tracked``) are sent as trained.

**Initialisation: Adam's bias correction** (Kingma & Ba, ICLR 2015, Sec. 3). The
papers start at ``m_0 = 0`` and run thousands of SGD steps, where the first
``1 / (1 - beta)`` steps being shrunk does not matter. A federated run has about 30
rounds: with beta = 0.9 the uncorrected ``m_t`` is only ``1 - 0.9^t`` of a
steady-state average, 0.10 of an update in round 1 and still 0.65 in round 10,
which slows the whole run down. Dividing by ``1 - beta^t`` makes ``m_hat_t`` a
weighted *average* of the node's updates so far (weights summing to 1), so
``m_hat_1 = delta_1`` and the step size is the same as without momentum from the
first round on. Measured (docs/AGGREGATION.md, "Client momentum";
``benchmarks/client_momentum.py``): 10 digits clients, 10 rounds, beta = 0.9.

No Flower here: the node's state file is :mod:`client.momentum`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["WorkerMomentum", "debiased", "momentum_reply", "momentum_step"]


def momentum_step(previous: torch.Tensor | None, delta: torch.Tensor, beta: float) -> torch.Tensor:
    """``m_t = beta * m_{t-1} + (1 - beta) * delta_t``; ``previous=None`` is ``m_0 = 0``."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"momentum beta must be in [0, 1), got {beta}")
    fresh = (1.0 - beta) * delta
    return fresh if previous is None else beta * previous + fresh


def debiased(m: torch.Tensor, beta: float, t: int) -> torch.Tensor:
    """Adam's bias correction ``m_t / (1 - beta^t)`` of the ``t``-th momentum (t >= 1)."""
    if t < 1:
        raise ValueError(f"the momentum's round count t must be >= 1, got {t}")
    return m / (1.0 - beta**t)


@dataclass(frozen=True)
class WorkerMomentum:
    """A node's momentum after ``t`` trained rounds, the last of them ``server_round``.

    ``m`` holds one tensor per floating-point array of the model (state-dict order),
    each in that array's shape and dtype, on the CPU.
    """

    m: dict[str, torch.Tensor]
    t: int
    server_round: int
    beta: float

    def matches(self, like: Mapping[str, torch.Tensor], beta: float) -> str | None:
        """Why this momentum cannot continue for a model ``like`` at ``beta`` (``None``: it can)."""
        if self.beta != beta:
            return f"it was kept with client-momentum {self.beta}, this run uses {beta}"
        if self.t < 1:
            return f"its round count t is {self.t}"
        floats = {k: v for k, v in like.items() if torch.is_floating_point(v)}
        if list(self.m) != list(floats):
            return f"its arrays {list(self.m)} are not the model's {list(floats)}"
        for key, ref in floats.items():
            mine = self.m[key]
            if mine.shape != ref.shape or mine.dtype != ref.dtype:
                return (
                    f"array {key!r} is {tuple(mine.shape)} {mine.dtype}, the model's is "
                    f"{tuple(ref.shape)} {ref.dtype}"
                )
        return None


def momentum_reply(
    global_state: Mapping[str, torch.Tensor],
    trained_state: Mapping[str, torch.Tensor],
    *,
    beta: float,
    previous: WorkerMomentum | None,
    server_round: int,
    bias_correction: bool = True,
) -> tuple[dict[str, torch.Tensor], WorkerMomentum]:
    """The state dict a node sends in round ``server_round``, and its new momentum.

    For each floating-point array: ``delta = trained - global`` (in the array's
    dtype), ``m = beta * previous + (1 - beta) * delta`` and the reply
    ``global + m / (1 - beta^t)`` (``global + m`` with ``bias_correction=False``);
    other arrays are sent as trained. ``previous=None`` starts the momentum (t = 1).
    """
    if previous is not None:
        problem = previous.matches(global_state, beta)
        if problem is not None:
            raise ValueError(f"the stored momentum cannot continue: {problem}")
    t = 1 if previous is None else previous.t + 1
    reply: dict[str, torch.Tensor] = {}
    m: dict[str, torch.Tensor] = {}
    for key, base in global_state.items():
        trained = trained_state[key].detach().cpu()
        if not torch.is_floating_point(base):
            reply[key] = trained
            continue
        base = base.detach().cpu()
        before = None if previous is None else previous.m[key]
        m[key] = momentum_step(before, trained.to(base.dtype) - base, beta)
        step = debiased(m[key], beta, t) if bias_correction else m[key]
        reply[key] = base + step
    return reply, WorkerMomentum(m=m, t=t, server_round=server_round, beta=beta)
