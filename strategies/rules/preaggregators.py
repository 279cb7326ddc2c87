"""Pre-aggregation steps: ``(n, d)`` client deltas -> ``(m, d)`` mixed updates.

A pre-aggregator is a callable ``pre(x, *, num_byzantine=f)`` returning a
:class:`PreAggregationOutput`: the new updates, the Byzantine count to hand to
the next step, and the ``(m, n)`` mixing matrix whose row ``i`` gives the
coefficients of output ``i`` over the inputs (so diagnostics can trace outputs
back to clients). Steps compose: the output of one feeds the next, and the
mixing matrices multiply (see :class:`strategies.rules.registry.Pipeline`).

Byzantine-count rules (derivations in ``docs/AGGREGATION.md``):

========= ===================== =============================================
step      outputs               Byzantine count handed on
========= ===================== =============================================
clip      n                     f      (clipping is per input)
resample  n                     min(s * f, n)  (each input feeds s outputs)
bucket    ceil(n / s)           min(f, ceil(n / s))  (an input is in 1 bucket)
nnm       n                     f      (Allouah et al. 2023, Lemma/Thm on NNM)
========= ===================== =============================================

Randomised steps hold a CPU ``torch.Generator`` seeded with ``seed`` and
expose ``state_dict()`` / ``load_state_dict()`` so a resumed server draws the
same sequence. No Flower imports here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from common.options import Option
from strategies.rules import _kernels as K
from strategies.rules.aggregators import NamedStep, _positive, check_num_byzantine, validate_updates

__all__ = [
    "Bucket",
    "Clip",
    "NearestNeighborMixing",
    "PreAggregationOutput",
    "PreAggregator",
    "Resample",
]


class PreAggregationOutput(NamedTuple):
    """Result of one pre-aggregation step.

    updates:       ``(m, d)`` tensor, same dtype/device as the input.
    num_byzantine: how many of the ``m`` outputs may be Byzantine-influenced;
                   the ``f`` to hand to the next step or the aggregator.
    mixing:        ``(m, n)`` float64 CPU tensor, ``updates ~= mixing @ x``.
    """

    updates: Tensor
    num_byzantine: int
    mixing: Tensor | None = None


class PreAggregator(NamedStep):
    """Base class: input and ``f`` validation, ``no_grad``, (empty) state.

    A step's first option is its switch: the run config puts the step in the pipeline
    when that key is not off (``clip-norm`` > 0, ``nnm`` true, ``bucketing-s`` > 0,
    ...). Enabled steps run in :attr:`registry` order, which is the order their classes
    are defined in this module: clip, nnm, then resample or bucket.
    """

    name: ClassVar[str] = "pre-aggregator"
    registry: ClassVar[dict[str, type[NamedStep]]] = {}
    #: whether the step regroups the updates into means (at most one such step runs)
    regroups: ClassVar[bool] = False

    def __call__(self, x: Tensor, *, num_byzantine: int) -> PreAggregationOutput:
        """Apply the step to the rows of ``x`` given ``f = num_byzantine``."""
        x = validate_updates(x, self.name)
        f = check_num_byzantine(self.name, num_byzantine, allow_none=False)
        assert f is not None
        with torch.no_grad():
            return self._apply(x, f)

    def _apply(self, x: Tensor, f: int) -> PreAggregationOutput:
        raise NotImplementedError


class _Randomized(PreAggregator):
    """A step that draws from its own seeded CPU generator."""

    def __init__(self, *, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{self.name}: seed must be an int, got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        """``{"generator": ByteTensor}`` -- the generator's state."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"generator"}:
            raise ValueError(
                f"{self.name}: state must have exactly the key 'generator', got {sorted(state)}"
            )
        self.generator.set_state(state["generator"])


def _groups_of_s(key: str, help: str) -> tuple[Option, ...]:
    """The options of a step that averages groups of ``s``: its switch and size
    (run-config ``key``, 0: off) and the run's seed."""
    switch = Option(key, param="s", default=0, ge=0, le=100_000, off=0, help=f"{help} (0: off)")
    return (switch, Option("seed", param="seed"))


class _GroupsOfS(_Randomized):
    """A randomized step that averages inputs in groups of ``s`` (resample, bucket)."""

    regroups = True

    def __init__(self, *, s: int = 2, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.s = _positive(self.name, "s", s, integer=True)

    def params(self) -> dict[str, Any]:
        return {"s": self.s, "seed": self.seed}


class Clip(PreAggregator):
    """Server-side L2 norm clipping: ``x_i * min(1, max_norm / ||x_i||)``.

    Bounds each client's influence on any later (even non-robust) step; a
    common companion of robust rules (e.g. Allouah et al. 2023; Karimireddy et
    al. 2021 clip around a centre instead, see ``centered-clipping``). Norms
    are computed in float64; the scaled rows are rounded to the input dtype,
    so an output norm can exceed ``max_norm`` by float rounding (~1e-7
    relative in float32). The Byzantine count is unchanged: output ``i``
    depends on input ``i`` only. ``mixing`` is ``diag(scale)``.
    """

    name = "clip"
    options = (
        Option(
            "clip-norm",
            param="max_norm",
            default=0.0,
            ge=0,
            off=0.0,
            help="clip each update to this L2 norm before the rule (0: off)",
        ),
    )

    def __init__(self, *, max_norm: float) -> None:
        self.max_norm = float(_positive(self.name, "max_norm", max_norm))

    def params(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def _apply(self, x, f):
        norms = K.row_sq_norms(x).to("cpu").sqrt_()
        if not bool(torch.isfinite(norms).all()):
            K.assert_finite(x, self.name)
            raise ValueError("clip: norms overflow float64")
        scale = torch.where(norms > self.max_norm, self.max_norm / norms.clamp(min=1e-300), 1.0)
        out = x * scale.to(device=x.device, dtype=x.dtype)[:, None]
        return PreAggregationOutput(out, f, torch.diag(scale))


class AdaptiveRobustClipping(PreAggregator):
    """Adaptive Robust Clipping, ARC (Allouah, Guerraoui, Gupta, Pinot & Stephan,
    "Adaptive Gradient Clipping for Robust Federated Learning", ICLR 2025,
    arXiv:2405.14432, Algorithm 1).

    With ``k = floor(2 (f / n) (n - f))``, the ``k`` inputs of largest L2 norm are
    clipped to the norm of the ``(k + 1)``-th largest: ``x_i * min(1, c / ||x_i||)``
    with ``c`` that norm. The radius follows the round's own updates (no fixed
    ``clip-norm`` to tune), and at most ``k`` inputs, never more than the Byzantine
    ones could push out, are changed; ``k = 0`` (e.g. ``f = 0``) leaves every input
    as it is. Ties in norm go to the lower index (stable sort). Norms are float64;
    the scaled rows are rounded to the input dtype.

    The Byzantine count is unchanged: output ``i`` depends on input ``i`` only.
    ``mixing`` is ``diag(scale)``. The paper pairs ARC with NNM and a robust rule.
    """

    name = "arc"
    options = (Option("arc", default=False, off=False, help="adaptive robust clipping (ARC)"),)

    @staticmethod
    def clipped_count(n: int, f: int) -> int:
        """``k = floor(2 (f / n) (n - f))``, the number of inputs ARC clips (exact in
        integers), at most ``n - 1``."""
        return min((2 * f * (n - f)) // n, n - 1) if n > 0 else 0

    def _apply(self, x, f):
        n = x.shape[0]
        norms = K.row_sq_norms(x).to("cpu").sqrt_()
        if not bool(torch.isfinite(norms).all()):
            K.assert_finite(x, self.name)
            raise ValueError("arc: norms overflow float64")
        k = self.clipped_count(n, f)
        scale = torch.ones(n, dtype=torch.float64)
        if k > 0:
            order = torch.sort(norms, descending=True, stable=True).indices
            radius = float(norms[order[k]])
            top = order[:k]
            scale[top] = torch.where(
                norms[top] > radius, radius / norms[top].clamp(min=1e-300), 1.0
            )
        out = x * scale.to(device=x.device, dtype=x.dtype)[:, None]
        return PreAggregationOutput(out, f, torch.diag(scale))


class NearestNeighborMixing(PreAggregator):
    """Nearest-Neighbour Mixing, NNM (Allouah, Farhadkhani, Guerraoui, Gupta,
    Pinot & Stephan, "Fixing by Mixing: A Recipe for Optimal Byzantine ML
    under Heterogeneity", AISTATS 2023, Algorithm 1).

    Output ``i`` is the mean of the ``n - f`` inputs nearest to ``x_i`` in
    Euclidean distance, ``x_i`` itself included (it is always first; other
    ties go to the lower index). Distances come from the mean-centred float64
    Gram matrix.

    The count handed on stays ``f``: an output built around a Byzantine
    input can be anything, but an output around an honest input averages
    ``n - f`` inputs of which at most ``f`` are Byzantine and all lie no
    farther from ``x_i`` than its ``(n - f)``-th honest neighbour, and the
    paper's guarantee (``F o NNM`` is ``(f, O(kappa))``-robust when ``F`` is
    ``(f, kappa)``-robust) is stated for the next rule run with the same
    ``f``. Requires ``n > 2f``.
    """

    name = "nnm"
    options = (Option("nnm", default=False, off=False, help="nearest-neighbour mixing"),)

    def _apply(self, x, f):
        n = x.shape[0]
        if not n > 2 * f:
            raise ValueError(f"nnm needs n > 2f, got n={n}, f={f}")
        dist = K.sq_dists_from_gram(K.centered_gram(x, self.name)).to("cpu")
        dist.fill_diagonal_(-1.0)  # self first
        nearest = torch.sort(dist, dim=1, stable=True).indices[:, : n - f]
        mixing = torch.zeros(n, n, dtype=torch.float64)
        mixing.scatter_(1, nearest, 1.0 / (n - f))
        out = K.mix_rows(x, mixing, self.name)
        return PreAggregationOutput(out, f, mixing)


class Resample(_GroupsOfS):
    """s-resampling (Karimireddy, He & Jaggi, "Byzantine-Robust Learning on
    Heterogeneous Datasets via Resampling", arXiv:2006.09365 / ICLR 2022
    submission, Algorithm 2 "s-Resampling").

    Produces ``T = n`` outputs; output ``t`` is the mean of ``s`` distinct
    inputs drawn uniformly without replacement from the inputs used fewer
    than ``s`` times so far. With ``T = n`` every input ends up used exactly
    ``s`` times. Taken literally the draw can get stuck in the last rounds
    (fewer than ``s`` inputs still have uses left, e.g. n=3, s=2, first two
    outputs {0,1}, {0,1}); so an input whose remaining uses equal the number
    of outputs still to form -- it must appear in all of them -- is included
    deterministically and the rest of the ``s`` are drawn uniformly from the
    other inputs with uses left. When no input is forced this *is* the
    paper's draw, and it can never get stuck (the invariant "remaining uses
    <= outputs left" is kept).

    A Byzantine input feeds exactly ``s`` outputs, so up to ``s * f`` outputs
    may be tainted: the count handed on is ``min(s * f, n)``. Requires
    ``1 <= s <= n``.
    """

    name = "resample"
    options = _groups_of_s("resampling-s", "s-resampling: each output a mean of s updates")

    def draw(self, n: int) -> Tensor:
        """The ``(n, n)`` mixing matrix of one resampling (consumes randomness)."""
        s = self.s
        if not 1 <= s <= n:
            raise ValueError(f"resample needs 1 <= s <= n, got s={s}, n={n}")
        remaining = [s] * n
        mixing = torch.zeros(n, n, dtype=torch.float64)
        for t in range(n):
            left = n - t
            forced = [i for i in range(n) if remaining[i] == left]
            free = [i for i in range(n) if 0 < remaining[i] < left]
            need = s - len(forced)
            picks = torch.randperm(len(free), generator=self.generator)[:need].tolist()
            chosen = forced + [free[j] for j in picks]
            for i in chosen:
                remaining[i] -= 1
            mixing[t, chosen] = 1.0 / s
        return mixing

    def _apply(self, x, f):
        n = x.shape[0]
        mixing = self.draw(n)
        out = K.mix_rows(x, mixing, self.name)
        return PreAggregationOutput(out, min(self.s * f, n), mixing)


class Bucket(_GroupsOfS):
    """Bucketing (Karimireddy, He & Jaggi, "Byzantine-Robust Learning on
    Heterogeneous Datasets via Bucketing", ICLR 2022, Algorithm 1; analysed
    with NNM by Allouah et al. 2023).

    Shuffle the inputs with a uniformly random permutation, cut the shuffled
    order into ``ceil(n / s)`` consecutive buckets of ``s`` inputs (the last
    holds the ``n mod s`` left over when ``s`` does not divide ``n``), and
    output each bucket's mean (the paper divides the last, shorter bucket by
    ``s`` too; the mean keeps every output on the inputs' scale).

    A Byzantine input lands in exactly one bucket, so at most ``f`` buckets
    are tainted, and never more than there are buckets: the count handed on
    is ``min(f, ceil(n / s))``. Requires ``s >= 1`` (``s >= n`` gives one
    bucket, the plain mean).
    """

    name = "bucket"
    options = _groups_of_s("bucketing-s", "bucketing: means of s shuffled updates")

    def draw(self, n: int) -> Tensor:
        """The ``(ceil(n/s), n)`` mixing matrix of one bucketing."""
        perm = torch.randperm(n, generator=self.generator)
        buckets = math.ceil(n / self.s)
        mixing = torch.zeros(buckets, n, dtype=torch.float64)
        for b in range(buckets):
            members = perm[b * self.s : (b + 1) * self.s]
            mixing[b, members] = 1.0 / members.numel()
        return mixing

    def _apply(self, x, f):
        n = x.shape[0]
        mixing = self.draw(n)
        out = K.mix_rows(x, mixing, self.name)
        return PreAggregationOutput(out, min(f, mixing.shape[0]), mixing)
