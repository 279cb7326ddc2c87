"""Run-config keys that a rule, a pre-aggregation step or an attack declares on its class.

A component (an aggregation rule in :mod:`strategies.rules`, a pre-aggregation step,
an attack in :mod:`attacks`) says once, on its own class, which run-config keys it
reads and which of its keyword parameters each key feeds::

    class CenteredClipping(Aggregator):
        name = "centered-clipping"
        options = (
            Option("cc-tau", param="tau", default=10.0, gt=0),
            Option("cc-iterations", param="iterations", default=1, ge=1, le=1000),
        )

Everything else derives from that declaration: the names the run config allows, the
registry that builds components by name, the mapping from run config to parameters
(:meth:`Option.read`), the keys ``pyproject.toml`` lists for ``flwr run`` (checked by
``tests/unit/test_config.py``) and the CLI help. The ground (this package) knows the
vocabulary, not the components: it imports nothing of Bastion's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from common.config import ConfigError, RunConfig, not_allowed, unknown_key

Scalar = bool | int | float | str


@dataclass(frozen=True)
class Option:
    """One run-config key a component reads.

    key:     the kebab-case run-config key (``cc-tau``).
    param:   the component's keyword parameter the value is passed as (``tau``), or
             ``None`` for a key that only switches the component on (``nnm``).
    default: the run-config default; its type is the key's type (``bool``, ``int``,
             ``float`` (which also takes an int) or ``str``).
    ge, gt, le, lt: bounds of a number.
    off:     the value that means "not set": the parameter is then not passed (the
             component's own default applies), and a pre-aggregation step whose first
             option is off is not in the pipeline.
    help:    one line for ``--help`` and the docs.

    A key that is a field of :class:`~common.config.RunConfig` itself (``seed``) is
    read from there; declaring it gives the component its value and adds no new key.
    """

    key: str
    param: str | None = None
    default: Scalar = 0
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    off: Scalar | None = None
    help: str = ""

    @property
    def shared(self) -> bool:
        """True when the key is one of RunConfig's own fields (``seed``)."""
        return self.key.replace("-", "_") in RunConfig.model_fields

    def allowed(self) -> str:
        """What the key accepts, as error messages and help texts say it."""
        kind = type(self.default).__name__
        bounds = [
            f"{sym} {bound:g}"
            for bound, sym in ((self.gt, ">"), (self.ge, ">="), (self.lt, "<"), (self.le, "<="))
            if bound is not None
        ]
        return f"{kind} {' and '.join(bounds)}".strip()

    def check(self, value: Any, source: str = "run config") -> Scalar:
        """``value`` if the key allows it (an int for a float key becomes a float), else
        :class:`ConfigError` naming the key, the value and what is allowed."""
        kind = type(self.default)
        ok = type(value) is kind or (
            kind is float and isinstance(value, int) and not isinstance(value, bool)
        )
        if ok and isinstance(value, int | float) and not isinstance(value, bool):
            value = kind(value)
            ok = (
                math.isfinite(value)
                and (self.gt is None or value > self.gt)
                and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt)
                and (self.le is None or value <= self.le)
            )
        if not ok:
            raise ConfigError(not_allowed(source, self.key, value, self.allowed()))
        return value

    def read(self, cfg: RunConfig) -> Scalar:
        """This key's value in ``cfg`` (its default when ``cfg`` does not set it), checked."""
        return self.check(cfg.value(self.key, self.default), cfg.source)

    def is_off(self, value: Scalar) -> bool:
        """True when ``value`` means "not set" (see ``off``)."""
        return self.off is not None and value == self.off


def check_choice(cfg: RunConfig, key: str, allowed: Iterable[str]) -> None:
    """Raise :class:`ConfigError` unless run-config ``key``'s value is one of ``allowed``
    (a name the run config cannot list itself: a rule, an attack, a dataset)."""
    names = list(allowed)
    value = cfg.value(key)
    if value not in names:
        raise ConfigError(
            not_allowed(cfg.source, key, value, "one of " + ", ".join(repr(n) for n in names))
        )


def read_params(options: Iterable[Option], cfg: RunConfig) -> dict[str, Scalar]:
    """``{param: value}`` of the options that feed a parameter and are not off in ``cfg``."""
    out: dict[str, Scalar] = {}
    for opt in options:
        value = opt.read(cfg)
        if opt.param is not None and not opt.is_off(value):
            out[opt.param] = value
    return out


def declared_keys(options: Iterable[Option]) -> dict[str, Option]:
    """The run-config keys ``options`` add to RunConfig's own, by key (first declaration
    wins; two components may read the same key only with the same default)."""
    out: dict[str, Option] = {}
    for opt in options:
        if opt.shared:
            continue
        seen = out.setdefault(opt.key, opt)
        if seen.default != opt.default:
            raise ValueError(
                f"run-config key {opt.key!r} is declared twice with different defaults "
                f"({seen.default!r}, {opt.default!r})"
            )
    return out


def check_options(cfg: RunConfig, options: Iterable[Option]) -> None:
    """Raise :class:`ConfigError` for a key ``cfg`` sets that is neither one of its own
    fields nor declared by ``options``, and for a declared key with a bad value; every
    problem is listed."""
    declared = declared_keys(options)
    problems = []
    for key in cfg.extra_keys():
        if key not in declared:
            known = sorted({*RunConfig.keys(), *declared})
            problems.append(unknown_key(cfg.source, key, cfg.value(key), known))
            continue
        try:
            declared[key].read(cfg)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))


def defaults(options: Iterable[Option]) -> Mapping[str, Scalar]:
    """``{key: default}`` of the keys ``options`` declare (not RunConfig's own)."""
    return {key: opt.default for key, opt in declared_keys(options).items()}
