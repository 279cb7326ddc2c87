"""dp-check against an attacker that knows it: Krum's choices, pure math.

docs/PRIVACY.md, "What it cannot catch". Each simulated round holds ``n - f`` honest
DP updates (a shared signal of norm 0.35, about what MnistCNN's updates had without
noise, plus N(0, s^2 I_d) at the sweep's s = 0.0249, d = 184,586) and ``f``
attackers that send ``-eps * mean(honest)`` plus noise orthogonal to everything
else, scaled so that each attacker's squared norm is exactly ``ratio * s^2 d``.
``ratio = 1`` is an honest-looking norm; just above the check's floor ``F / d`` is
the shortest vector the check accepts. For each case: how many attackers
:func:`strategies.rules.dpcheck.dp_consistency` rejected (alpha 1e-6) and in how
many rounds Krum (f = 2) picked an attacker.

    python benchmarks/dpcheck_adaptive.py             # 60 rounds per case, ~1 min
    python benchmarks/dpcheck_adaptive.py --rounds 20

Never run by the test suite.
"""

from __future__ import annotations

import argparse
import math

import torch

from strategies import build_aggregator
from strategies.rules.dpcheck import dp_consistency, noise_floor

D, N, F = 184_586, 10, 2
S = 0.024874767209597956  # SWEEP.noise_std(1920) in tests/unit/test_dpcheck.py
ALPHA = 1e-6


def one_case(eps: float, ratio: float, rounds: int, gen: torch.Generator) -> tuple[int, int]:
    """(attackers rejected, rounds in which Krum picked an attacker)."""
    krum = build_aggregator("krum", num_byzantine=F)
    rejected = picked = 0
    for _ in range(rounds):
        signal = torch.randn(D, generator=gen)
        signal *= 0.35 / signal.norm()
        honest = signal + S * torch.randn(N - F, D, generator=gen)
        ipm = -eps * honest.mean(dim=0)
        z = torch.randn(F, D, generator=gen, dtype=torch.float64)
        basis, _ = torch.linalg.qr(torch.cat([ipm.double()[None], z]).T)
        length = math.sqrt(ratio * S * S * D - float(ipm.norm()) ** 2)
        attackers = ipm + (basis[:, 1:].T * length).float()
        x = torch.cat([honest, attackers])
        reasons = dp_consistency(x, [S] * N, alpha=ALPHA)
        rejected += sum(r is not None for r in reasons[N - F :])
        weights = krum.aggregate(x).weights
        assert weights is not None
        picked += int(torch.argmax(weights)) >= N - F
    return rejected, picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)  # ~1 MB kernels: threads only add hand-offs
    gen = torch.Generator().manual_seed(1)
    floor = noise_floor(D, ALPHA / (N + N * (N - 1) // 2)) / D
    print(f"floor F/d = {floor:.4f} (n = {N}, alpha = {ALPHA:g}, d = {D})")
    for eps, ratio in ((0.1, 1.0), (0.1, floor * 1.002), (0.0, floor * 1.002)):
        rejected, picked = one_case(eps, ratio, args.rounds, gen)
        print(
            f"eps {eps}: attackers' |v|^2 = {ratio:.4f} s^2 d: rejected {rejected}/"
            f"{args.rounds * F}, Krum picked an attacker in {picked}/{args.rounds} rounds"
        )


if __name__ == "__main__":
    main()
