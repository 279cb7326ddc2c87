"""Is an update consistent with the DP-SGD noise its node declared? Pure math, no Flower.

Why: under client DP-SGD the honest updates are dominated by their Gaussian noise, so
they are nearly orthogonal and about one noise norm long, while colluders who send one
shared vector (IPM's ``-epsilon * mean``, Xie, Koyejo & Gupta 2020) sit at distance 0
from each other and close to everyone: Krum picked them in every round of
``docs/PRIVACY.md``'s sweep. Such updates cannot have been computed with the noise
the run declares, and this module says so from the declared settings alone.

**The noise in an honest update.** DP-SGD (Abadi et al. 2016, Algorithm 1) as
Opacus runs it (``task.training.train_local_dp``): at step ``t = 1..T`` the gradient
is ``g_t = (sum of clipped per-example gradients + sigma C xi_t) / B`` with
``xi_t ~ N(0, I_d)`` independent, ``B`` the expected batch size (``max(1,
round(q N))``, ``q = min(1, batch-size / N)``); then SGD with weight decay ``w`` and
momentum ``mu`` (``torch.optim.SGD``): ``v_t = mu v_{t-1} + g_t + w p_{t-1}``,
``p_t = p_{t-1} - lr v_t``. The noise enters this linear recursion additively, so
its part of the final delta ``p_T - p_0`` is ``sum_t c_t (sigma C / B) xi_t`` where
``c_t = e_1^T A^(T-t) b`` is the impulse response of the state ``(p, v)``:
``A = [[1 - lr w, -lr mu], [w, mu]]``, ``b = (-lr, 1)``. Without weight decay
``c_t = -lr (1 - mu^(T-t+1)) / (1 - mu)`` (momentum accumulates each step's noise
into every later step). The noise of the delta is therefore ``N(0, s^2 I_d)`` with

    s^2 = (sigma C / B)^2 * sum_t c_t^2,

and its squared norm is ``s^2`` times a chi-square with ``d`` degrees of freedom
(:func:`noise_std`). The loss gradient's response to earlier noise (through the
Hessian, ``lr H e``) is neglected: it is second order over a few local steps;
measured on MnistCNN (5 steps, lr 0.05, momentum 0.9, sigma 1, C 5) the squared
norm of real Opacus updates was 0.994 to 1.004 times ``s^2 d``, the chi-square's own
spread (``sqrt(2 / d) = 0.0033``).

**The floor.** For any signal ``S`` independent of the noise ``N``,
``|S + N|^2 >= |N|^2 - z^2 s^2`` whenever ``<S, N> >= -z s |S|`` (minimise
``|S|^2 - 2 z s |S|`` over ``|S|``). Laurent & Massart (2000, Lemma 1) bound the
chi-square's lower tail, ``P(chi2_d <= d - 2 sqrt(d x)) <= exp(-x)``, and the
Gaussian tail gives ``P(<S, N> < -z s |S|) <= exp(-z^2 / 2)``; with ``x = z^2 / 2 =
ln(2 / a)`` both fail with probability at most ``a``:

    P(|S + N|^2 < s^2 F(d, a)) <= a,   F(d, a) = d - 2 sqrt(d ln(2/a)) - 2 ln(2/a)

(:func:`noise_floor`; the bound is conservative: the exact chi-square quantile lies
above it). Two honest updates carry independent noises (each node seeds its own from
the OS), so ``x_i - x_j`` is a signal plus ``N(0, (s_i^2 + s_j^2) I_d)`` and
``|x_i - x_j|^2 >= (s_i^2 + s_j^2) F`` with the same probability.

**The check** (:func:`dp_consistency`) makes ``n`` norm tests and ``n (n - 1) / 2``
pair tests per round, each at ``a = alpha / (n + n (n - 1) / 2)`` (Bonferroni), so
``alpha`` (``dp-check-alpha``) bounds the probability that a round of honest
updates sees any rejection at all:

1. an update with ``|x_i|^2 < s_i^2 F`` is too short to carry its noise;
2. among the updates that pass 1, a pair with ``|x_i - x_j|^2 < (s_i^2 + s_j^2) F``
   is too close for two independent noises: *both* are rejected, since nothing
   tells the original from the copy (a short update must not take part: it would
   be "close" to every honest one, whose distance to it is about one noise norm
   against the pair floor of about sqrt(2)).

Dropping both costs an attacker its own update for every honest one it knocks out
by copying it, so the honest majority margin (honest minus Byzantine) is unchanged.

What it does not catch: an attacker that adds fresh Gaussian noise of the declared
scale to its vector passes both tests; it then holds one vote with the signal of
its choice, and the rule (not this check) must bound what that signal can do. One
that sends vectors of exactly the floor's norm is even favoured by Krum, whose
distances it shortens by about 1% (``docs/PRIVACY.md``,
``benchmarks/dpcheck_adaptive.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from torch import Tensor

from common import protocol
from strategies.rules import _kernels as K

__all__ = [
    "DPCheck",
    "DPSGDDeclaration",
    "dp_consistency",
    "noise_coefficients",
    "noise_floor",
    "noise_sum_of_squares",
]


def _impulse_response(steps: int, lr: float, mu: float, wd: float) -> Iterator[float]:
    """``h_k = e_1^T A^k b`` for ``k = 0..steps-1``: the coefficient, in the final
    delta, of the noise drawn ``k`` steps before the last."""
    p, v = -lr, 1.0  # the state (p, v) right after the step that drew the noise
    for _ in range(steps):
        yield p
        v = mu * v + wd * p
        p = p - lr * v


def noise_coefficients(
    steps: int, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> list[float]:
    """``[c_1, ..., c_T]``: the coefficient of step ``t``'s averaged gradient noise in
    the round's final delta ``p_T - p_0`` under SGD with momentum and weight decay
    (``torch.optim.SGD``, ``dampening = 0``, no Nesterov), from the linear recursion
    in this module's docstring. All are negative (descent); the first steps' noise
    has the largest coefficients, since momentum carries it into every later step."""
    response = _impulse_response(int(steps), float(lr), float(momentum), float(weight_decay))
    return list(reversed(list(response)))


@lru_cache(maxsize=256)
def noise_sum_of_squares(steps: int, lr: float, momentum: float, weight_decay: float) -> float:
    """``sum_t c_t^2`` of :func:`noise_coefficients`, in O(T) time and O(1) memory
    (cached: it depends on the node only through ``T``)."""
    response = _impulse_response(int(steps), float(lr), float(momentum), float(weight_decay))
    return math.fsum(h * h for h in response)


def noise_floor(d: int, a: float) -> float:
    """``F(d, a) = d - 2 sqrt(d ln(2/a)) - 2 ln(2/a)``, at least 0: with probability at
    least ``1 - a``, ``|S + N|^2 >= s^2 F`` for ``N ~ N(0, s^2 I_d)`` and any ``S``
    independent of it (Laurent & Massart 2000, Lemma 1, and the Gaussian tail; see
    the module docstring)."""
    if d < 1 or not 0 < a < 1:
        raise ValueError(f"noise_floor needs d >= 1 and 0 < a < 1, got d={d}, a={a}")
    x = math.log(2.0 / a)
    return max(0.0, d - 2.0 * math.sqrt(d * x) - 2.0 * x)


@dataclass(frozen=True)
class DPSGDDeclaration:
    """The DP-SGD every honest node runs in a round, as the run config declares it.

    The per-node quantities that depend on the node's training-set size ``N`` follow
    ``task.training`` (``dp_sample_rate``, ``dp_num_steps`` and Opacus' expected
    batch size; ``tests/unit/test_dpcheck.py`` checks they agree).
    """

    noise_multiplier: float
    max_grad_norm: float
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    local_epochs: int
    local_steps: int

    def sample_rate(self, num_examples: int) -> float:
        """Poisson rate ``q = min(1, batch-size / N)``."""
        return min(1.0, self.batch_size / num_examples)

    def steps(self, num_examples: int) -> int:
        """``local-steps`` when > 0, else ``local-epochs * ceil(N / batch-size)``."""
        if self.local_steps > 0:
            return self.local_steps
        return self.local_epochs * math.ceil(num_examples / self.batch_size)

    def expected_batch_size(self, num_examples: int) -> int:
        """What Opacus divides the noisy sum by: ``max(1, round(q N))``."""
        return max(1, round(self.sample_rate(num_examples) * num_examples))

    def noise_std(self, num_examples: int) -> float:
        """Per-coordinate standard deviation ``s`` of the noise in a node's delta:
        ``s^2 = (sigma C / B)^2 sum_t c_t^2`` (module docstring)."""
        ssq = noise_sum_of_squares(
            self.steps(num_examples), self.lr, self.momentum, self.weight_decay
        )
        scale = self.noise_multiplier * self.max_grad_norm / self.expected_batch_size(num_examples)
        return scale * math.sqrt(ssq)

    def mismatch(self, metrics: Mapping[str, object]) -> str | None:
        """Why a reply's own DP metrics (``num-examples``, ``steps``,
        ``dp-noise-multiplier``, ``dp-sample-rate``; :mod:`common.protocol`) disagree
        with this declaration, or ``None``. A reply that declares less noise (a smaller
        sigma, fewer steps) would make the check weaker for itself, so any
        disagreement rejects it."""
        need = (
            protocol.NUM_EXAMPLES,
            protocol.STEPS,
            protocol.DP_NOISE_MULTIPLIER,
            protocol.DP_SAMPLE_RATE,
        )
        missing = [k for k in need if k not in metrics]
        if missing:
            return (
                f"dp-check: the reply declares no DP-SGD (metrics {missing} missing); "
                "dp-check needs every node to train with the run's DP-SGD"
            )
        n = int(metrics[protocol.NUM_EXAMPLES])  # type: ignore[call-overload]
        expected = {
            protocol.DP_NOISE_MULTIPLIER: float(self.noise_multiplier),
            protocol.DP_SAMPLE_RATE: self.sample_rate(n),
            protocol.STEPS: float(self.steps(n)),
        }
        for key, want in expected.items():
            got = float(metrics[key])  # type: ignore[arg-type]
            if not math.isclose(got, want, rel_tol=1e-9, abs_tol=0.0):
                return (
                    f"dp-check: the reply declares {key} = {got:.6g}, the run's DP-SGD gives "
                    f"{want:.6g} for num-examples {n}"
                )
        return None


@dataclass(frozen=True)
class DPCheck:
    """The run's declared DP-SGD and the check's family-wise tail probability
    (run-config ``dp-check-alpha``)."""

    declaration: DPSGDDeclaration
    alpha: float = 1e-6

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"dp-check: alpha must be in (0, 1), got {self.alpha}")
        if self.declaration.noise_multiplier <= 0:
            raise ValueError("dp-check: needs a noise multiplier > 0 (there is no noise to check)")

    def reasons(
        self,
        x: Tensor,
        metrics: Sequence[Mapping[str, object]],
        labels: Sequence[str] | None = None,
    ) -> list[str | None]:
        """Why each row of ``x`` (an update whose reply carried ``metrics[i]``) is
        inconsistent with the declared DP-SGD, or ``None``: first the reply's own DP
        metrics against :attr:`declaration` (:meth:`DPSGDDeclaration.mismatch`), then
        :func:`dp_consistency` over the rows that passed, each with the noise scale of
        its ``num-examples``."""
        if len(metrics) != x.shape[0]:
            raise ValueError(f"dp-check: {len(metrics)} metric records for {x.shape[0]} rows")
        names = list(labels) if labels is not None else [f"row {i}" for i in range(len(metrics))]
        reasons = [self.declaration.mismatch(m) for m in metrics]
        kept = [i for i, r in enumerate(reasons) if r is None]
        if not kept:
            return reasons
        scales = [
            self.declaration.noise_std(int(metrics[i][protocol.NUM_EXAMPLES]))  # type: ignore[call-overload]
            for i in kept
        ]
        rows = x if len(kept) == x.shape[0] else x[kept]
        found = dp_consistency(rows, scales, alpha=self.alpha, labels=[names[i] for i in kept])
        for i, reason in zip(kept, found, strict=True):
            reasons[i] = reason
        return reasons


def dp_consistency(
    x: Tensor,
    noise_std: Sequence[float],
    *,
    alpha: float,
    labels: Sequence[str] | None = None,
) -> list[str | None]:
    """The reason each row of ``x`` is inconsistent with its declared DP noise, or
    ``None`` where it is consistent (module docstring: tests 1 and 2, Bonferroni over
    the round's ``n + n (n - 1) / 2`` tests at family-wise level ``alpha``).

    ``noise_std[i]`` is row ``i``'s per-coordinate noise standard deviation ``s_i``
    (:meth:`DPSGDDeclaration.noise_std`); ``labels[i]`` names row ``i`` in the
    reasons (default ``row i``). Squared norms and distances are float64 (the
    rules' Gram kernels).
    """
    if x.dim() != 2:
        raise ValueError(f"dp_consistency: x must be (n, d), got shape {tuple(x.shape)}")
    n, d = x.shape
    if len(noise_std) != n:
        raise ValueError(f"dp_consistency: {len(noise_std)} noise scales for {n} rows")
    if n == 0:
        return []
    names = list(labels) if labels is not None else [f"row {i}" for i in range(n)]
    tests = n + n * (n - 1) // 2
    a = alpha / tests
    floor = noise_floor(d, a)
    s2 = [float(s) ** 2 for s in noise_std]
    where = f"F = {floor / d:.4f} d at alpha = {alpha:g} per round ({tests} tests), d = {d}"
    sq = K.row_sq_norms(x).to("cpu").tolist()
    reasons: list[str | None] = [None] * n
    for i in range(n):
        least = s2[i] * floor
        if sq[i] < least:
            reasons[i] = (
                f"dp-check: update norm {math.sqrt(sq[i]):.4g} is below {math.sqrt(least):.4g}, "
                f"the least a DP-SGD update with the declared noise can have (noise norm "
                f"{math.sqrt(s2[i] * d):.4g} = s sqrt(d), s = {math.sqrt(s2[i]):.4g}; {where})"
            )
    kept = [i for i in range(n) if reasons[i] is None]
    if len(kept) < 2:
        return reasons
    rows = x[kept] if len(kept) < n else x
    dist = K.sq_dists_from_gram(K.centered_gram(rows, "dp-check")).to("cpu")
    close: dict[int, list[tuple[int, float, float]]] = {}
    for a_pos, i in enumerate(kept):
        for b_pos in range(a_pos + 1, len(kept)):
            j = kept[b_pos]
            least = (s2[i] + s2[j]) * floor
            got = float(dist[a_pos, b_pos])
            if got < least:
                close.setdefault(i, []).append((j, got, least))
                close.setdefault(j, []).append((i, got, least))
    for i, partners in close.items():
        j, got, least = min(partners, key=lambda p: p[1])
        others = f" and {len(partners) - 1} more" if len(partners) > 1 else ""
        reasons[i] = (
            f"dp-check: near-duplicate of {names[j]}{others}: distance {math.sqrt(got):.4g} is "
            f"below {math.sqrt(least):.4g}, the least two independent DP noises leave "
            f"(sqrt((s_i^2 + s_j^2) F), {where}); both of such a pair are dropped: nothing "
            "tells the original from the copy"
        )
    return reasons
