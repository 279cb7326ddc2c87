"""Byzantine update attacks and a label-flipping data poisoning, as pure tensor functions.

An update attack is a small callable object built by name::

    attack = build_attack("ipm", epsilon=0.1)
    bad = attack(known)          # (d,) malicious update delta

``known`` is a float ``(k, d)`` tensor of *honest* update deltas (update minus
the current global model) that the attacker knows. Row 0 is always the
attacker's own honest update, computed as an honest client would; ``k == 1``
when the attacker knows only that. Colluding attackers that pool their honest
estimates pass ``k > 1`` rows, and an omniscient research mode may pass every
honest update of the round. The result has ``known``'s dtype and device.
Means and standard deviations are accumulated in float64 and rounded once to
the input dtype.

========== ======================================= ================================
name       malicious update                        parameters (defaults)
========== ======================================= ================================
ipm        ``-epsilon * mean(known)``              ``epsilon=0.1``
alie       ``mean(known) - z * std(known)``        ``z=None``, ``num_clients=None``,
                                                   ``num_byzantine=None``
sign-flip  ``-scale * mean(known)``                ``scale=1.0``
gaussian   a sample of ``N(0, sigma^2 I_d)``       ``sigma=200.0``, ``seed=None``
mimic      ``known[target]``                       ``target=0``
scaling    ``scale * known[0]``                    ``scale=10.0``
adaptive   IPM or ALIE at the factor that moves    ``base="alie"``, ``evals=20``,
           ``aggregate(known + f copies)``         ``max_factor=100.0``,
           farthest from ``mean(known)``           ``step=1.0``, ``base_factor=None``,
           (a line search)                         ``num_byzantine=1``,
                                                   ``aggregate=None`` (needed)
========== ======================================= ================================

:func:`label_flip` is the data-poisoning counterpart (``y -> C - 1 - y``),
applied to the attacker's training labels rather than to its update.

Every bad name, parameter or value raises ``ValueError`` saying what is
allowed. Only torch, the standard library and the ground (:mod:`common`: the run
config and its option declarations) are imported (no Flower, no numpy: numpy label
arrays are handled by duck typing).
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from torch import Tensor

from attacks.line_search import Probe, line_maximize
from common.config import ConfigError, RunConfig, not_allowed
from common.options import Option, check_choice, read_params

__all__ = [
    "ADAPTIVE_BASES",
    "ATTACKS",
    "ATTACK_PARAMS",
    "DATA_ATTACKS",
    "Adaptive",
    "AdaptiveChoice",
    "Aggregate",
    "Alie",
    "Attack",
    "Gaussian",
    "Ipm",
    "Mimic",
    "Scaling",
    "SignFlip",
    "alie_z_max",
    "attack_names",
    "attack_params",
    "build_attack",
    "check_attack_config",
    "declared_options",
    "label_flip",
    "round_seed_param",
]

_LabelsT = TypeVar("_LabelsT")


# --------------------------------------------------------------------------- #
# Validation helpers                                                           #
# --------------------------------------------------------------------------- #
def _real(attack: str, param: str, value: Any, allowed: str) -> float:
    """``value`` as a finite float (ints and floats, not bools), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"attack {attack!r}: {param}={value!r} is not allowed; {allowed}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"attack {attack!r}: {param}={value!r} is not allowed; {allowed}")
    return out


def _integer(attack: str, param: str, value: Any, allowed: str) -> int:
    """``value`` as an int (integral types, not bools), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"attack {attack!r}: {param}={value!r} is not allowed; {allowed}")
    return int(value)


def _validate_known(known: Any, attack: str) -> Tensor:
    """Check that ``known`` is a finite floating ``(k, d)`` tensor with ``k >= 1``."""
    if not isinstance(known, Tensor):
        raise ValueError(
            f"attack {attack!r}: known must be a torch.Tensor of shape (k, d), "
            f"got {type(known).__name__}"
        )
    if known.dim() != 2:
        raise ValueError(
            f"attack {attack!r}: known must be 2-D (k, d) with row 0 the attacker's own "
            f"update, got shape {tuple(known.shape)}"
        )
    if known.shape[0] == 0:
        raise ValueError(
            f"attack {attack!r}: known has k = 0 rows; it needs at least the attacker's "
            f"own honest update in row 0"
        )
    if not known.dtype.is_floating_point:
        raise ValueError(f"attack {attack!r}: known must have a floating dtype, got {known.dtype}")
    if not bool(torch.isfinite(known).all()):
        raise ValueError(f"attack {attack!r}: known contains non-finite values (nan or inf)")
    return known


def _mean64(known: Tensor) -> Tensor:
    """Coordinate-wise mean of the rows, accumulated in float64 (shape ``(d,)``)."""
    return known.to(torch.float64).mean(dim=0)


def _mean_std64(known: Tensor) -> tuple[Tensor, Tensor]:
    """Coordinate-wise mean and population std (divisor ``k``) of the rows, in float64."""
    x = known.to(torch.float64)
    mean = x.mean(dim=0)
    return mean, (x - mean).square_().mean(dim=0).sqrt_()


# --------------------------------------------------------------------------- #
# Attack base class                                                            #
# --------------------------------------------------------------------------- #
class Attack:
    """Base class of the update attacks: ``attack(known) -> (d,)`` malicious delta.

    ``name`` is the registry name, ``params`` the parameters the attack runs
    with (defaults filled in), so ``build_attack(a.name, **a.params)`` rebuilds
    an equivalent attack. ``repr`` reads like ``ipm(epsilon=0.1)``.
    """

    name: ClassVar[str] = "attack"
    #: Accepted keyword parameters, in order.
    param_names: ClassVar[tuple[str, ...]] = ()
    #: the run-config keys the attack reads and the parameters they feed
    #: (:mod:`common.options`); the attack's name, its keys and its parameters are
    #: declared here once, and the run config's allowed attack names, the registry
    #: and :func:`attack_params` derive from them
    options: ClassVar[tuple[Option, ...]] = ()
    #: every concrete attack by name, in the order the classes are defined
    registry: ClassVar[dict[str, type[Attack]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in Attack.registry:
                raise TypeError(f"attack name {cls.name!r} is already taken")
            Attack.registry[cls.name] = cls

    @classmethod
    def from_options(
        cls, values: Mapping[str, Any], *, num_clients: int, num_byzantine: int
    ) -> dict[str, Any]:
        """Keyword parameters from the run config's values of :attr:`options`
        (``{param: value}``, keys that are off left out) and the attack's setting: all
        ``num_clients`` clients of a round, ``num_byzantine`` of them attackers. The
        default uses the configured values alone."""
        return dict(values)

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Raise :class:`ConfigError` when ``cfg``'s values of :attr:`options` are bad
        (naming the key, the value and what is allowed); an attack with more to check
        (:class:`Adaptive`: the attackers' knowledge) extends it."""
        read_params(cls.options, cfg)

    @property
    def params(self) -> dict[str, Any]:
        """The attack's parameters (a fresh dict)."""
        return {}

    def __call__(self, known: Tensor) -> Tensor:
        """Malicious update delta of shape ``(d,)`` from the honest rows ``known``.

        Raises ``ValueError`` if ``known`` is not a finite floating ``(k, d)``
        tensor with ``k >= 1``, or if the result overflows ``known``'s dtype.
        """
        known = _validate_known(known, self.name)
        with torch.no_grad():
            out64 = self._apply(known)
            out = out64.to(dtype=known.dtype, device=known.device)
        if not bool(torch.isfinite(out).all()):
            raise ValueError(
                f"attack {self!r} produced a non-finite update (overflow in {known.dtype}); "
                f"use smaller parameters"
            )
        return out

    def _apply(self, known: Tensor) -> Tensor:
        """The malicious vector, in float64 or in ``known``'s dtype (cast afterwards)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({args})"


class Ipm(Attack):
    """Inner product manipulation (IPM): ``-epsilon * mean(known, dim=0)``.

    Xie, Koyejo & Gupta (2020), "Fall of empires: breaking Byzantine-tolerant
    SGD by inner product manipulation", UAI 2019 / PMLR 115, Sec. 4: every
    Byzantine worker sends ``-epsilon`` times the mean of the honest gradients,
    so that the inner product between the true gradient and the robust
    aggregate turns negative. A small ``epsilon`` (the paper's 0.1) hides the
    attackers inside the honest cloud against Krum/median-type rules; a large
    one (e.g. 10) pulls the plain mean the wrong way. Any finite ``epsilon`` is
    accepted, negative ones included (they push *along* the honest mean).

    The mean is accumulated in float64; ``-epsilon * mean`` is rounded once
    to ``known``'s dtype. With ``k = 1`` the mean is the attacker's own update.
    """

    name: ClassVar[str] = "ipm"
    param_names: ClassVar[tuple[str, ...]] = ("epsilon",)
    options = (Option("attack-epsilon", param="epsilon", default=0.1, ge=-1e6, le=1e6),)

    def __init__(self, *, epsilon: float = 0.1) -> None:
        self.epsilon = _real(self.name, "epsilon", epsilon, "epsilon must be a finite float")

    @property
    def params(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon}

    def _apply(self, known: Tensor) -> Tensor:
        return _mean64(known) * (-self.epsilon)


def alie_z_max(num_clients: int, num_byzantine: int) -> float:
    """The z of "A little is enough" (ALIE) for ``n`` clients of which ``f`` are Byzantine.

    Baruch, Baruch & Goldberg (2019), "A little is enough: circumventing
    defenses for distributed learning", NeurIPS 2019, Sec. 3 / Algorithm 3::

        s     = floor(n / 2 + 1) - f           # honest "supporters" needed
        z_max = Phi^{-1}((n - s) / n)          # Phi = standard normal CDF

    ``n`` counts all clients of the round (honest and Byzantine). ``Phi^{-1}``
    is :meth:`statistics.NormalDist.inv_cdf` (float64).

    The formula gives a *small* z for small federations: ``n = 10, f = 2`` ->
    ``Phi^{-1}(0.6) ~= 0.2533``; ``n = 25, f = 5`` -> ``Phi^{-1}(0.68) ~= 0.4677``;
    ``n = 4, f = 1`` -> ``0``. With such z the ALIE update stays very close
    to the honest mean and the attack is nearly harmless; pass ``z``
    explicitly to :class:`Alie` (e.g. ``z = 1``) for a stronger attack.

    Raises ``ValueError`` (naming the values) if ``n < 2``, ``f < 1``,
    ``f >= n`` or ``(n - s) / n`` falls outside ``(0, 1)`` (which happens when
    ``f >= floor(n / 2 + 1)``, i.e. the Byzantine clients need no honest
    supporters at all).
    """
    n = _integer("alie", "num_clients", num_clients, "num_clients must be an int >= 2")
    f = _integer("alie", "num_byzantine", num_byzantine, "num_byzantine must be an int >= 1")
    if n < 2:
        raise ValueError(f"attack 'alie': num_clients={n} is not allowed; it must be >= 2")
    if f < 1:
        raise ValueError(f"attack 'alie': num_byzantine={f} is not allowed; it must be >= 1")
    if f >= n:
        raise ValueError(
            f"attack 'alie': num_byzantine={f} is not allowed with num_clients={n}; "
            f"it must be < num_clients"
        )
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0.0 < p < 1.0:
        raise ValueError(
            f"attack 'alie': num_clients={n}, num_byzantine={f} give s = floor(n/2 + 1) - f "
            f"= {s} and (n - s)/n = {p}, outside (0, 1); the z formula needs "
            f"num_byzantine < floor(num_clients/2 + 1) = {math.floor(n / 2 + 1)}"
        )
    return statistics.NormalDist().inv_cdf(p)


class Alie(Attack):
    """ALIE ("A little is enough"): per coordinate ``mean(known) - z * std(known)``.

    Baruch, Baruch & Goldberg (2019), "A little is enough: circumventing
    defenses for distributed learning", NeurIPS 2019, Sec. 3 / Algorithm 3:
    each coordinate is moved ``z`` standard deviations away from the honest
    mean, small enough to stay inside the honest spread (and so to survive
    median / Krum / Bulyan) yet consistently biased across all coordinates and
    rounds. The paper estimates mean and std from the honest updates the
    Byzantine workers hold; here they come from the ``k`` rows of ``known``.

    ``std`` is the *population* standard deviation (``unbiased=False``,
    divisor ``k``), the maximum-likelihood estimate the colluding workers
    compute from the values they hold; it also makes ``k = 1`` well defined.
    With ``k = 1`` the std is 0, so the output is the attacker's own honest
    update: a lone, non-colluding ALIE attacker degenerates to an honest client.

    ``z``: if given (any finite float), it is used as is and ``num_clients`` /
    ``num_byzantine`` are only type-checked. If ``None`` it is computed by
    :func:`alie_z_max` from ``num_clients`` (``n``, all clients of a round)
    and ``num_byzantine`` (``f``); that formula gives small z for small ``n``
    (``n = 10, f = 2`` -> ~0.25, ``n = 25, f = 5`` -> ~0.47), where ALIE is
    nearly harmless, so pass ``z`` explicitly (e.g. ``z = 1``) for a stronger
    attack. ``params["z"]`` and ``.z`` hold the z actually used.

    Mean and std are accumulated in float64 and the result rounded once.
    """

    name: ClassVar[str] = "alie"
    param_names: ClassVar[tuple[str, ...]] = ("z", "num_clients", "num_byzantine")
    options = (
        Option(
            "attack-z",
            param="z",
            default=0.0,
            ge=-1e3,
            le=1e3,
            off=0.0,
            help="ALIE's z (0: Baruch et al.'s z_max for the run's n and f)",
        ),
    )

    @classmethod
    def from_options(
        cls, values: Mapping[str, Any], *, num_clients: int, num_byzantine: int
    ) -> dict[str, Any]:
        """``z`` as configured, else :func:`alie_z_max` of the setting."""
        if "z" in values:
            return dict(values)
        return {"z": alie_z_max(num_clients, num_byzantine)}

    def __init__(
        self,
        *,
        z: float | None = None,
        num_clients: int | None = None,
        num_byzantine: int | None = None,
    ) -> None:
        if num_clients is not None:
            num_clients = _integer(
                self.name, "num_clients", num_clients, "num_clients must be an int or None"
            )
        if num_byzantine is not None:
            num_byzantine = _integer(
                self.name, "num_byzantine", num_byzantine, "num_byzantine must be an int or None"
            )
        if z is None:
            if num_clients is None or num_byzantine is None:
                raise ValueError(
                    "attack 'alie': z=None needs num_clients and num_byzantine to compute "
                    "z from Baruch et al.'s formula (alie_z_max); pass both, or pass z "
                    "explicitly (e.g. z=1.0)"
                )
            self.z = alie_z_max(num_clients, num_byzantine)
        else:
            self.z = _real(self.name, "z", z, "z must be a finite float or None")
        self.num_clients = num_clients
        self.num_byzantine = num_byzantine

    @property
    def params(self) -> dict[str, Any]:
        return {"z": self.z, "num_clients": self.num_clients, "num_byzantine": self.num_byzantine}

    def _apply(self, known: Tensor) -> Tensor:
        mean, std = _mean_std64(known)
        return mean - self.z * std


class SignFlip(Attack):
    """Sign flip ("bit flip"): ``-scale * mean(known)``; with ``k = 1``, ``-scale * own``.

    Karimireddy, He & Jaggi (2022), "Byzantine-robust learning on
    heterogeneous datasets via resampling", ICLR 2022, Sec. 6 and the appendix
    on attacks ("bit flipping": a Byzantine worker sends the negative of its
    honest update); also Allen-Zhu, Ebrahimian, Li & Alistarh (2021),
    "Byzantine-resilient non-convex stochastic gradient descent", ICLR 2021
    ("sign flipping"). ``scale`` (> 0, default 1) multiplies the flipped
    vector. The mean is accumulated in float64 and the result rounded once.
    """

    name: ClassVar[str] = "sign-flip"
    param_names: ClassVar[tuple[str, ...]] = ("scale",)

    def __init__(self, *, scale: float = 1.0) -> None:
        allowed = "scale must be a finite float > 0"
        self.scale = _real(self.name, "scale", scale, allowed)
        if self.scale <= 0:
            raise ValueError(f"attack {self.name!r}: scale={scale!r} is not allowed; {allowed}")

    @property
    def params(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def _apply(self, known: Tensor) -> Tensor:
        return _mean64(known) * (-self.scale)


class Gaussian(Attack):
    """Gaussian noise: a sample of ``N(0, sigma^2 I_d)``, ignoring the honest values.

    Blanchard, El Mhamdi, Guerraoui & Stainer (2017), "Machine learning with
    adversaries: Byzantine tolerant gradient descent", NeurIPS 2017, Sec. 5
    (Gaussian Byzantine workers, sigma = 200); Xie, Koyejo & Gupta (2018),
    "Generalized Byzantine-tolerant SGD", arXiv:1802.10116, Sec. 5
    ("Gaussian attack"). Only ``d = known.shape[1]`` is used from ``known``.

    ``sigma`` must be finite and > 0. The draw comes from a CPU
    ``torch.Generator`` in float64 (scaled by sigma, rounded once, then moved
    to ``known``'s device), so results do not depend on device or dtype
    beyond that one rounding. With an int ``seed`` (``0 <= seed < 2**64``)
    *every call* rebuilds the generator from the seed and returns the same
    vector for the same ``d``: colluding attackers given the same seed send
    identical vectors. (For fresh noise each round, build the attack with a
    round-dependent seed.) With ``seed=None`` each call draws from a generator
    seeded from OS entropy (not reproducible); the global torch RNG is never
    consumed.
    """

    name: ClassVar[str] = "gaussian"
    param_names: ClassVar[tuple[str, ...]] = ("sigma", "seed")
    options = (Option("attack-sigma", param="sigma", default=200.0, gt=0, le=1e12),)

    def __init__(self, *, sigma: float = 200.0, seed: int | None = None) -> None:
        allowed = "sigma must be a finite float > 0"
        self.sigma = _real(self.name, "sigma", sigma, allowed)
        if self.sigma <= 0:
            raise ValueError(f"attack {self.name!r}: sigma={sigma!r} is not allowed; {allowed}")
        if seed is not None:
            allowed = "seed must be None or an int with 0 <= seed < 2**64"
            seed = _integer(self.name, "seed", seed, allowed)
            if not 0 <= seed < 2**64:
                raise ValueError(f"attack {self.name!r}: seed={seed!r} is not allowed; {allowed}")
        self.seed = seed

    @property
    def params(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "seed": self.seed}

    def _apply(self, known: Tensor) -> Tensor:
        generator = torch.Generator(device="cpu")
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        noise = torch.randn(known.shape[1], generator=generator, dtype=torch.float64)
        return noise.mul_(self.sigma).to(dtype=known.dtype).to(device=known.device)


class Mimic(Attack):
    """Mimic: a copy of one honest update, ``known[target]``.

    Karimireddy, He & Jaggi (2022), "Byzantine-robust learning on
    heterogeneous datasets via resampling", ICLR 2022, Sec. 6 / appendix
    ("mimic" attack): all Byzantine workers copy the update of one chosen
    honest worker, over-representing its (non-iid) data and starving the
    others -- harmless under iid data, damaging under heterogeneity. The
    paper picks the target honest worker by a heuristic over a warm-up
    phase; here the caller chooses it as ``target``, an index into the rows
    of ``known`` (``0 <= target < k``; the default 0 is the attacker's own
    update, meaningful when colluders agree to all send it). The row is
    copied exactly (a new tensor, never a view of ``known``).
    """

    name: ClassVar[str] = "mimic"
    param_names: ClassVar[tuple[str, ...]] = ("target",)
    options = (Option("attack-target", param="target", default=0, ge=0, help="row mimic copies"),)

    def __init__(self, *, target: int = 0) -> None:
        allowed = "target must be an int with 0 <= target < k (the rows of known)"
        self.target = _integer(self.name, "target", target, allowed)
        if self.target < 0:
            raise ValueError(f"attack {self.name!r}: target={target!r} is not allowed; {allowed}")

    @property
    def params(self) -> dict[str, Any]:
        return {"target": self.target}

    def _apply(self, known: Tensor) -> Tensor:
        k = known.shape[0]
        if self.target >= k:
            raise ValueError(
                f"attack {self.name!r}: target={self.target} is not allowed with k = {k} "
                f"known rows; it must satisfy 0 <= target < {k}"
            )
        return known[self.target].clone()


class Scaling(Attack):
    """Scaling / model-replacement boosting: ``scale * known[0]`` (the own update).

    Bagdasaryan, Veit, Hua, Estrin & Shmatikov (2020), "How to backdoor
    federated learning", AISTATS 2020, Sec. 3.2, Eq. 3: the attacker scales
    its update by ``gamma = n / eta`` so that it survives averaging and
    replaces the global model; Bhagoji, Chakraborty, Mittal & Calo (2019),
    "Analyzing federated learning through an adversarial lens", ICML 2019,
    Sec. 3 ("explicit boosting"). ``scale`` is any finite float (default 10).
    The product is computed in float64 and rounded once.
    """

    name: ClassVar[str] = "scaling"
    param_names: ClassVar[tuple[str, ...]] = ("scale",)
    options = (Option("attack-scale", param="scale", default=10.0, ge=-1e6, le=1e6),)

    def __init__(self, *, scale: float = 10.0) -> None:
        self.scale = _real(self.name, "scale", scale, "scale must be a finite float")

    @property
    def params(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def _apply(self, known: Tensor) -> Tensor:
        return known[0].to(torch.float64) * self.scale


#: the attacks whose factor :class:`Adaptive` searches
ADAPTIVE_BASES: tuple[str, ...] = ("ipm", "alie")

#: the server's aggregation as the adaptive attack sees it: ``(n, d)`` rows in, ``(d,)`` out
Aggregate = Callable[[Tensor], Tensor]


class AdaptiveChoice(NamedTuple):
    """What :meth:`Adaptive.search` chose: the malicious vector (``known``'s dtype),
    the base attack and its factor, the damage there and every probe, in order."""

    vector: Tensor
    base: str
    factor: float
    damage: float
    probes: tuple[Probe, ...]


def _needs_aggregate(source: str, knowledge: str | None = None) -> str:
    why = (
        f" with attack-knowledge {knowledge!r}"
        if knowledge is not None
        else " without the server's aggregation"
    )
    return not_allowed(
        source,
        "attack",
        "adaptive",
        "attack-knowledge = 'omniscient' (simulation only: its line search runs the "
        "server's aggregation, which no deployed attacker has), or another attack",
        why,
    )


class Adaptive(Attack):
    """Adaptive (worst-case) attack: the factor of IPM or ALIE that hurts this round's
    aggregation most, found by a line search through the server's own pipeline.

    Allouah, Farhadkhani, Guerraoui, Gupta, Pinot & Stephan (2023), "Fixing by mixing:
    a recipe for optimal Byzantine ML under heterogeneity", AISTATS 2023 (the
    "optimal" IPM and ALIE of their experiments), as implemented by ByzFL's
    ``Optimal_InnerProductManipulation`` / ``Optimal_ALittleIsEnough``. The base attack
    (``base``: ``"alie"``, Baruch et al. 2019, ``mean - z * std``; or ``"ipm"``, Xie et
    al. 2020, ``-epsilon * mean``) is evaluated at factors chosen by
    :func:`attacks.line_search.line_maximize` over ``[0, max_factor]`` (first step
    ``step``, at most ``evals`` evaluations). The damage of a factor is

        || aggregate(known rows + num_byzantine copies of the candidate) - mean(known) ||_2

    and the factor with the largest damage wins (ties: the one evaluated first). When
    ``base_factor`` is given (the base attack as configured: ``attack-epsilon``, or
    ``attack-z`` / Baruch et al.'s z_max) it is evaluated first, so the choice never
    does less damage than the base attack itself. The search thus stays where the rule
    still accepts the attackers when that hurts more than being rejected, and goes as
    far as the range allows against a rule that never rejects (the mean).

    ``aggregate`` is the server's aggregation (``(n, d) -> (d,)``); only the
    omniscient research mode can provide it (:mod:`server.omniscient`), so a run
    config with another ``attack-knowledge`` is refused (:meth:`check_config`), and a
    call without it raises :class:`~common.config.ConfigError`. Cost: ``evals``
    aggregations of ``(k + f, d)`` rows per call. Deterministic for a deterministic
    ``aggregate``.
    """

    name: ClassVar[str] = "adaptive"
    param_names: ClassVar[tuple[str, ...]] = (
        "base",
        "evals",
        "max_factor",
        "step",
        "base_factor",
        "num_byzantine",
        "aggregate",
    )
    options = (
        Option(
            "attack-adaptive-base",
            param="base",
            default="alie",
            help="attack whose factor the adaptive attack searches: 'alie' (z) or 'ipm' (epsilon)",
        ),
        Option(
            "attack-adaptive-evals",
            param="evals",
            default=20,
            ge=1,
            le=1000,
            help="aggregations the adaptive attack may run per round",
        ),
        Option(
            "attack-adaptive-max",
            param="max_factor",
            default=100.0,
            gt=0,
            le=1e6,
            help="largest factor the adaptive attack tries (search range [0, max])",
        ),
        Option(
            "attack-adaptive-step",
            param="step",
            default=1.0,
            gt=0,
            le=1e6,
            help="the adaptive attack's first step (doubled while the damage grows)",
        ),
        # the base attack as configured: its factor is evaluated first
        *Ipm.options,
        *Alie.options,
    )

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Also refuse an unknown base and a run whose attackers cannot see the
        server's aggregation (``attack-knowledge`` other than ``omniscient``)."""
        super().check_config(cfg)
        base = cls.options[0].read(cfg)
        if base not in ADAPTIVE_BASES:
            allowed = "one of " + ", ".join(repr(b) for b in ADAPTIVE_BASES)
            raise ConfigError(not_allowed(cfg.source, cls.options[0].key, base, allowed))
        if cfg.attack_knowledge != "omniscient":
            raise ConfigError(_needs_aggregate(cfg.source, cfg.attack_knowledge))

    @classmethod
    def from_options(
        cls, values: Mapping[str, Any], *, num_clients: int, num_byzantine: int
    ) -> dict[str, Any]:
        """The search's keys, ``num_byzantine`` copies, and the base attack's configured
        factor (ALIE without ``attack-z``: :func:`alie_z_max`, when it is defined)."""
        out = {k: values[k] for k in ("base", "evals", "max_factor", "step")}
        factor: float | None
        if out["base"] == "ipm":
            factor = float(values["epsilon"])
        elif "z" in values:
            factor = float(values["z"])
        else:
            try:
                factor = alie_z_max(num_clients, num_byzantine)
            except ValueError:  # f too large for Baruch et al.'s formula: no seed
                factor = None
        return out | {"base_factor": factor, "num_byzantine": num_byzantine}

    def __init__(
        self,
        *,
        base: str = "alie",
        evals: int = 20,
        max_factor: float = 100.0,
        step: float = 1.0,
        base_factor: float | None = None,
        num_byzantine: int = 1,
        aggregate: Aggregate | None = None,
    ) -> None:
        if base not in ADAPTIVE_BASES:
            raise ValueError(
                f"attack {self.name!r}: base={base!r} is not allowed; base must be one of "
                f"{', '.join(repr(b) for b in ADAPTIVE_BASES)}"
            )
        self.base = base
        allowed = "evals must be an int >= 1"
        self.evals = _integer(self.name, "evals", evals, allowed)
        if self.evals < 1:
            raise ValueError(f"attack {self.name!r}: evals={evals!r} is not allowed; {allowed}")
        for param, value in (("max_factor", max_factor), ("step", step)):
            allowed = f"{param} must be a finite float > 0"
            if _real(self.name, param, value, allowed) <= 0:
                raise ValueError(
                    f"attack {self.name!r}: {param}={value!r} is not allowed; {allowed}"
                )
        self.max_factor, self.step = float(max_factor), float(step)
        self.base_factor = (
            None
            if base_factor is None
            else _real(
                self.name, "base_factor", base_factor, "base_factor must be a finite float or None"
            )
        )
        allowed = "num_byzantine must be an int >= 1"
        self.num_byzantine = _integer(self.name, "num_byzantine", num_byzantine, allowed)
        if self.num_byzantine < 1:
            raise ValueError(
                f"attack {self.name!r}: num_byzantine={num_byzantine!r} is not allowed; {allowed}"
            )
        if aggregate is not None and not callable(aggregate):
            raise ValueError(
                f"attack {self.name!r}: aggregate={aggregate!r} is not allowed; aggregate must "
                "be None or a callable (n, d) -> (d,)"
            )
        self.aggregate = aggregate

    @property
    def params(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "evals": self.evals,
            "max_factor": self.max_factor,
            "step": self.step,
            "base_factor": self.base_factor,
            "num_byzantine": self.num_byzantine,
            "aggregate": self.aggregate,
        }

    def search(self, known: Tensor) -> AdaptiveChoice:
        """The line search on ``known`` (``(k, d)`` honest rows): the chosen vector,
        its factor and damage, and every probe. Raises :class:`ConfigError` without
        an ``aggregate``; whatever ``aggregate`` raises propagates."""
        known = _validate_known(known, self.name)
        aggregate = self.aggregate
        if aggregate is None:
            raise ConfigError(_needs_aggregate("run config"))
        f = self.num_byzantine
        with torch.no_grad():
            mean, std = _mean_std64(known)
            # the base attack as origin + factor * direction, exactly as Ipm / Alie compute it
            if self.base == "alie":
                origin, direction = mean, -std
            else:
                origin, direction = torch.zeros_like(mean), -mean

            def candidate(factor: float) -> Tensor:
                return (origin + factor * direction).to(dtype=known.dtype, device=known.device)

            damages: dict[float, float] = {}

            def damage(factor: float) -> float:
                if factor not in damages:
                    bad = candidate(factor)
                    if not bool(torch.isfinite(bad).all()):
                        damages[factor] = -math.inf  # overflow in known's dtype
                    else:
                        rows = torch.cat([known, bad.unsqueeze(0).expand(f, -1)])
                        out = aggregate(rows).to(device=mean.device, dtype=torch.float64)
                        damages[factor] = float(torch.linalg.vector_norm(out - mean))
                return damages[factor]

            probes: list[Probe] = []
            if self.base_factor is not None:
                probes.append(Probe(self.base_factor, damage(self.base_factor)))
            if self.evals > len(probes):
                probes += line_maximize(
                    damage,
                    lower=0.0,
                    upper=self.max_factor,
                    step=self.step,
                    evals=self.evals - len(probes),
                )
            best = probes[0]
            for p in probes[1:]:
                if p.value > best.value:
                    best = p
            return AdaptiveChoice(
                candidate(best.factor), self.base, best.factor, best.value, tuple(probes)
            )

    def _apply(self, known: Tensor) -> Tensor:
        return self.search(known).vector


# --------------------------------------------------------------------------- #
# Registry                                                                     #
# --------------------------------------------------------------------------- #
# every Attack subclass with a name registered itself when it was defined
_ATTACK_CLASSES: Mapping[str, type[Attack]] = MappingProxyType(Attack.registry)

#: Names accepted by :func:`build_attack`.
ATTACKS: tuple[str, ...] = tuple(_ATTACK_CLASSES)
#: ``{attack name: accepted parameter names}`` (config keys ``attack-<param>``
#: map to these with ``-`` -> ``_``).
ATTACK_PARAMS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {name: cls.param_names for name, cls in _ATTACK_CLASSES.items()}
)


def build_attack(name: str, **params: Any) -> Attack:
    """Construct update attack ``name`` (one of :data:`ATTACKS`) with keyword ``params``.

    Parameters and defaults: ``ipm``: ``epsilon=0.1``; ``alie``: ``z=None``,
    ``num_clients=None``, ``num_byzantine=None`` (z, or both counts, needed);
    ``sign-flip``: ``scale=1.0``; ``gaussian``: ``sigma=200.0``, ``seed=None``;
    ``mimic``: ``target=0``; ``scaling``: ``scale=10.0``; ``adaptive``:
    ``base="alie"``, ``evals=20``, ``max_factor=100.0``, ``step=1.0``,
    ``base_factor=None``, ``num_byzantine=1``, ``aggregate=None`` (a call needs it).

    Raises ``ValueError`` for an unknown name (listing :data:`ATTACKS`), an
    unknown parameter (listing the attack's parameters) or a bad value
    (naming the attack, the parameter, the value and what is allowed).
    """
    if not isinstance(name, str) or name not in _ATTACK_CLASSES:
        raise ValueError(f"unknown attack {name!r}; available: {', '.join(ATTACKS)}")
    cls = _ATTACK_CLASSES[name]
    for key, value in params.items():
        if key not in cls.param_names:
            raise ValueError(
                f"attack {name!r} has no parameter {key!r} (got {key}={value!r}); "
                f"{name} accepts: {', '.join(cls.param_names)}"
            )
    return cls(**params)


# --------------------------------------------------------------------------- #
# From the run config                                                          #
# --------------------------------------------------------------------------- #
#: attacks on the training data instead of the update (:func:`label_flip`)
DATA_ATTACKS: tuple[str, ...] = ("label-flip",)


def attack_names() -> tuple[str, ...]:
    """What run-config key ``attack`` allows: ``none``, every registered update attack
    and the data attacks."""
    return ("none", *Attack.registry, *DATA_ATTACKS)


def check_attack_config(cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` when ``cfg``'s ``attack`` is not an attack, when
    ``num-malicious`` > 0 comes without one, or when a key the attack declares has a
    bad value; the message names the key, the value and what is allowed."""
    names = attack_names()
    check_choice(cfg, "attack", names)
    if cfg.num_malicious > 0 and cfg.attack == "none":
        raise ConfigError(
            f"key 'num-malicious' is {cfg.num_malicious} but key 'attack' is 'none'; "
            f"allowed: an attack out of {list(names[1:])} when num-malicious > 0"
        )
    cls = Attack.registry.get(cfg.attack)
    if cls is not None:
        cls.check_config(cfg)


def attack_params(cfg: RunConfig, *, num_clients: int, num_byzantine: int) -> dict[str, Any]:
    """:func:`build_attack`'s parameters for ``cfg``'s attack: the keys it declares,
    read from ``cfg`` (node config over run config for a deployed node), completed by
    the attack for ``num_clients`` clients of which ``num_byzantine`` attack (ALIE's
    default z). Empty for a data attack. A per-round seed is :func:`round_seed_param`'s.
    """
    check_attack_config(cfg)
    cls = Attack.registry.get(cfg.attack)
    if cls is None:
        return {}
    return cls.from_options(
        read_params(cls.options, cfg), num_clients=num_clients, num_byzantine=num_byzantine
    )


def declared_options() -> tuple[Option, ...]:
    """Every run-config key the registered attacks declare."""
    return tuple(opt for cls in Attack.registry.values() for opt in cls.options)


def round_seed_param(name: str, round_seed: int) -> dict[str, int]:
    """``{"seed": round_seed}`` for an attack that draws randomness (it has a ``seed``
    parameter: the same noise for every colluder of a round, fresh noise each round),
    else ``{}``."""
    cls = Attack.registry.get(name)
    return {"seed": round_seed} if cls is not None and "seed" in cls.param_names else {}


# --------------------------------------------------------------------------- #
# Data poisoning                                                               #
# --------------------------------------------------------------------------- #
def label_flip(labels: _LabelsT, num_classes: int) -> _LabelsT:
    """Label flipping: every label ``y`` becomes ``C - 1 - y`` (``C = num_classes``).

    The data-poisoning attack of Biggio, Nelson & Laskov (2012), "Poisoning
    attacks against support vector machines", ICML 2012 (label-flip
    poisoning), in the federated form of Tolpegin, Truex, Gursoy & Liu (2020),
    "Data poisoning attacks against federated learning systems", ESORICS 2020,
    Sec. 3; Karimireddy, He & Jaggi (2022, resampling paper, Sec. 6) use the
    same ``y -> C - 1 - y`` map as their "label flipping" attack.

    ``labels`` is an integer torch tensor or numpy array of any shape; the
    result has the same type, dtype, shape (and device) and is a new object.
    Raises ``ValueError`` if ``num_classes`` is not an int >= 1, the labels are
    not integers, or any label falls outside ``[0, num_classes)``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise ValueError(f"label_flip: num_classes={num_classes!r} must be an int >= 1")
    c = int(num_classes)
    if c < 1:
        raise ValueError(f"label_flip: num_classes={c} must be an int >= 1")
    if isinstance(labels, Tensor):
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"label_flip: labels must have an integer dtype, got {labels.dtype}")
        wide = labels.to(torch.int64)
        if wide.numel() == 0:
            return labels.clone()  # type: ignore[return-value]
        lo, hi = int(wide.min()), int(wide.max())
        _check_label_range(lo, hi, c)
        out = (c - 1 - wide).to(labels.dtype)
        _check_label_fits(int(out.max()), lo, c, labels.dtype)
        return out  # type: ignore[return-value]
    # numpy arrays (duck-typed so that this module does not import numpy)
    dtype = getattr(labels, "dtype", None)
    if dtype is None or not hasattr(labels, "astype") or not hasattr(labels, "__array__"):
        raise ValueError(
            f"label_flip: labels must be a torch.Tensor or a numpy array, "
            f"got {type(labels).__name__}"
        )
    if getattr(dtype, "kind", None) not in ("i", "u"):
        raise ValueError(f"label_flip: labels must have an integer dtype, got {dtype}")
    arr: Any = labels
    if arr.size == 0:
        return arr.copy()
    lo, hi = int(arr.min()), int(arr.max())
    _check_label_range(lo, hi, c)
    flipped = (c - 1 - arr.astype("int64")).astype(dtype)
    _check_label_fits(int(flipped.max()), lo, c, dtype)
    return flipped


def _check_label_range(lo: int, hi: int, c: int) -> None:
    if lo < 0 or hi >= c:
        raise ValueError(
            f"label_flip: labels must lie in [0, {c}) for num_classes={c}, "
            f"got min {lo} and max {hi}"
        )


def _check_label_fits(out_max: int, lo: int, c: int, dtype: Any) -> None:
    # Flipped labels lie in [0, c - 1]; the largest, c - 1 - lo, wraps around
    # only if it exceeds the dtype's maximum (e.g. uint8 labels with C > 256).
    if out_max != c - 1 - lo:
        raise ValueError(
            f"label_flip: flipped label {c - 1 - lo} (= num_classes - 1 - {lo}) does not fit "
            f"the labels' dtype {dtype}; widen the labels first"
        )
