"""Bastion's run configuration: one pydantic model over Flower's flat run-config keys.

Flower hands a ServerApp and every ClientApp the run config as a flat mapping of
kebab-case keys (``num-server-rounds``, ``lr``, ...), with the defaults from
``[tool.flwr.app.config]`` in ``pyproject.toml`` and the user's ``--run-config``
overrides on top. :class:`RunConfig` validates that mapping once; every error
names the key, the value given and what is allowed (:class:`ConfigError`).

The keys of the run itself are :class:`RunConfig`'s fields. The names of the rule
(``aggregator``) and of the attack (``attack``), and the keys that only one rule,
pre-aggregation step or attack reads (``cc-tau``, ``attack-epsilon``, ...), belong to
those components: each declares them on its class (:class:`common.options.Option`),
and they are checked where the components are known (:mod:`server.run_config` for
the whole run, :mod:`attacks` on a node). RunConfig keeps such keys as they come
(:meth:`RunConfig.value`).

A node's own config (:class:`NodeConfig`) may set the run-config keys of its attack
and of its differential privacy for itself (:func:`node_may_set`); :func:`overlay`
is the one place where node config wins over run config.

The same model is used by ``bastion run`` (to fail before any process starts),
by the ServerApp and by the ClientApp (for the data settings), so the three can
never disagree about what a key means.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

AttackKnowledge = Literal["own", "collude", "omniscient"]
AttackData = Literal["own", "full"]
DPBudgetAction = Literal["stop", "warn"]
# How DP-SGD clips per-sample gradients: Opacus' ways (Yousefpour et al., 2021: module
# hooks, PyTorch's expanded weights, functorch's vmap, ghost clipping), ghost clipping
# with Bastion's Conv2d ghost norms (task.ghost_norms), and one-pass book-keeping (Bu et
# al., 2023; task.bookkeeping)
GradSampleMode = Literal["hooks", "ew", "functorch", "ghost", "ghost-conv", "bookkeeping"]


class ConfigError(ValueError):
    """A run-config or node-config value is invalid; the message names key, value, rule.

    ``keys`` are the keys whose values were refused (empty for a rule about several
    keys), so that a caller can go on checking the others.
    """

    def __init__(self, message: str, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keys = keys


def not_allowed(source: str, key: str, value: Any, allowed: str, why: str = "") -> str:
    """The one wording of a refused run-config or node-config value: the source, the
    key, the value, optionally why, and what is allowed."""
    return f"{source} key {key!r}: value {value!r} is not allowed{why}; allowed: {allowed}"


def unknown_key(source: str, key: str, value: Any, known: Iterable[str]) -> str:
    """The one wording of a key that no field and no component declares."""
    return f"{source}: unknown key {key!r} (value {value!r}); known keys: {', '.join(known)}"


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _snake(name: str) -> str:
    return name.replace("-", "_")


class _FlatModel(BaseModel):
    """A pydantic model read from and written to Flower's flat kebab-case keys."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=_kebab, populate_by_name=True, frozen=True
    )
    _source: str = PrivateAttr("run config")

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], *, source: str = "run config") -> _FlatModel:
        """Validate a flat mapping, raising :class:`ConfigError` with one line per problem."""
        try:
            obj = cls.model_validate(dict(values))
        except ValidationError as exc:
            refused = tuple(str(e["loc"][0]) for e in exc.errors() if e.get("loc"))
            raise ConfigError(_format_errors(exc, values, source, cls), refused) from None
        obj._source = source
        return obj

    @property
    def source(self) -> str:
        """Where the values came from, as error messages name it (``run config``)."""
        return self._source

    def to_flat(self) -> dict[str, Any]:
        """Return the kebab-case mapping Flower uses (``--run-config`` syntax)."""
        return self.model_dump(by_alias=True)

    @classmethod
    def keys(cls) -> list[str]:
        """All kebab-case keys this model accepts."""
        return [_kebab(name) for name in cls.model_fields]


def _allowed(model: type[BaseModel], key: str) -> str:
    """Describe what a field accepts, for error messages."""
    field = model.model_fields.get(key.replace("-", "_"))
    if field is None:  # a key of a component (common.options), kept as it came
        return "a bool, an int, a float or a string"
    choices = get_args(field.annotation)
    if choices and all(isinstance(c, str) for c in choices):
        return "one of " + ", ".join(repr(c) for c in choices)
    bounds = []
    for meta in field.metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            bound = getattr(meta, attr, None)
            if bound is not None:
                bounds.append(f"{sym} {bound}")
    kind = getattr(field.annotation, "__name__", str(field.annotation))
    return f"{kind} {' and '.join(bounds)}".strip()


def _format_errors(
    exc: ValidationError, values: Mapping[str, Any], source: str, cls: type[_FlatModel]
) -> str:
    lines = []
    seen: set[str] = set()
    for err in exc.errors():
        loc = err.get("loc") or ()
        key = str(loc[0]) if loc else ""
        if key and key in seen:  # a key outside the fields fails each scalar type once
            continue
        seen.add(key)
        if not key:  # a model-level rule: the message names its keys
            lines.append(f"{source}: {err['msg'].removeprefix('Value error, ')}")
            continue
        if err["type"] == "extra_forbidden":
            lines.append(unknown_key(source, key, err["input"], cls.keys()))
            continue
        value = values.get(key, values.get(key.replace("-", "_"), "<missing>"))
        what = _allowed(cls, key)
        # pydantic's own message for a Literal repeats the choices that `what` lists
        why = "" if err["type"] == "literal_error" else f" ({err['msg']})"
        lines.append(not_allowed(source, key, value, what, why))
    return "\n".join(lines)


class RunConfig(_FlatModel):
    """The run-config keys of a Bastion run (defaults mirror ``pyproject.toml``), and
    the keys its components declare (:mod:`common.options`), kept as they came.

    Training hyper-parameters travel to the clients in each round's
    ``ConfigRecord`` (so the server stays in control of them); the data settings
    (dataset, partitioner, seed) are read by each ClientApp from the run config.
    """

    model_config = ConfigDict(
        extra="allow", alias_generator=_kebab, populate_by_name=True, frozen=True
    )
    # the keys of rules, pre-aggregation steps and attacks: scalars, as in any run config
    __pydantic_extra__: dict[str, bool | int | float | str] = Field(init=False)

    num_server_rounds: int = Field(3, ge=1, le=100_000)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    # task.datasets.DATASETS and task.partition.PARTITIONERS say which names exist
    dataset: str = "digits"
    data_dir: str = ""
    partitioner: str = "iid"
    alpha: float = Field(0.5, gt=0, le=1e6)
    classes_per_partition: int = Field(2, ge=1, le=1000)
    local_test_fraction: float = Field(0.2, ge=0, lt=1)
    lr: float = Field(0.1, gt=0, le=100)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    local_epochs: int = Field(5, ge=0, le=10_000)
    local_steps: int = Field(0, ge=0, le=10_000_000)
    batch_size: int = Field(32, ge=1, le=1_000_000)
    # the aggregation rule (strategies.rules: AGGREGATORS); its own keys and the
    # pre-aggregation steps' are declared on their classes
    aggregator: str = "mean"
    num_byzantine: int = Field(0, ge=0, le=100_000)
    server_lr: float = Field(1.0, gt=0, le=100)
    server_momentum: float = Field(0.0, ge=0, lt=1)
    # > 0: every node replies with its bias-corrected momentum over the rounds it
    # trained instead of its raw update (task.momentum, client.momentum; Karimireddy,
    # He & Jaggi 2021, Algorithm 2; Allouah et al. 2023); 0: the raw update
    client_momentum: float = Field(0.0, ge=0, lt=1)
    fraction_train: float = Field(1.0, gt=0, le=1)
    min_train_nodes: int = Field(2, ge=1)
    min_available_nodes: int = Field(2, ge=1)
    federated_eval_every: int = Field(0, ge=0)
    round_timeout: float = Field(300.0, gt=0)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    output_dir: str = ""
    # checkpoint the model (and strategy state) every k rounds; 0: only after the last
    checkpoint_every: int = Field(1, ge=0, le=100_000)
    # > 0: evaluate rounds before the last on a fixed random subset of this many test
    # samples (the last round always uses the whole test set); 0: always all of it
    central_eval_samples: int = Field(0, ge=0)
    # several runs in one Flower run (common.batch; used by the experiment grid)
    batch_file: str = ""
    # Malicious clients (docs/ROBUSTNESS.md). num-malicious picks partitions by a
    # seeded rule (attacks.selection.malicious_partitions); node configs with
    # role="malicious" are the other way to make a node an attacker.
    num_malicious: int = Field(0, ge=0, le=100_000)
    # "none", or an attack of attacks.ATTACKS; its own keys (attack-epsilon, ...) are
    # declared on its class
    attack: str = "none"
    attack_knowledge: AttackKnowledge = "collude"
    attack_data: AttackData = "own"
    # attackers behave exactly like honest nodes before this round (the internship
    # report starts its attacks at round 10; Xie et al. 2020 after training has begun)
    attack_start_round: int = Field(1, ge=1, le=100_000)
    collusion_dir: str = ""
    collusion_timeout: float = Field(60.0, gt=0, le=86_400)
    # Client-side differential privacy: DP-SGD (Abadi et al., 2016) with Opacus
    # (Yousefpour et al., 2021), accounted over the whole run per node with RDP
    # (Mironov, 2017); see client.privacy. Node configs may override the dp-* keys.
    dp: bool = False
    # 0 is clipping without noise: DP-SGD's optimisation, no privacy (epsilon = inf)
    dp_noise_multiplier: float = Field(1.0, ge=0, le=1e6)
    # > 0: choose the noise multiplier so that the planned run ends at this epsilon
    dp_target_epsilon: float = Field(0.0, ge=0, le=1e6)
    dp_delta: float = Field(1e-5, gt=0, lt=1)
    dp_max_grad_norm: float = Field(1.0, gt=0, le=1e6)
    # > 0: a node's whole-run budget; what happens when a round would exceed it
    dp_max_epsilon: float = Field(0.0, ge=0, le=1e6)
    dp_budget_action: DPBudgetAction = "stop"
    # one-pass book-keeping with ghost norms (Bu et al., 2023; task.bookkeeping): the
    # fastest mode in every setting benchmarks/privacy.py measures (MnistCNN and
    # Cifar10CNN, batch 64 and 256, 1 and 2 threads; 1.27-1.71x plain SGD against
    # 2.2-3.2x for Opacus' ghost clipping; docs/PERFORMANCE.md), same update as
    # Opacus' hooks mode (tests/unit/test_bookkeeping.py)
    dp_grad_sample_mode: GradSampleMode = "bookkeeping"
    # Server side (strategies.rules.dpcheck, docs/PRIVACY.md): reject updates that
    # cannot carry the declared DP-SGD noise (too short for it, or nearly a copy of
    # another); dp-check-alpha bounds the chance that a round of honest updates loses
    # any. Needs dp = true with a fixed dp-noise-multiplier > 0 (server/run_config.py)
    dp_check: bool = False
    dp_check_alpha: float = Field(1e-6, gt=0, lt=1)
    # Reputation (strategies.rules.reputation): each node's suspicion score, an exponential
    # moving average of per-round evidence (rejected, left out by a selection rule,
    # far from the aggregate, pointing against it); with quarantine-threshold > 0,
    # nodes at or above it sit out quarantine-rounds rounds (longer each time), at most
    # quarantine-max at once
    # (-1: num-byzantine, or no cap when that is 0)
    reputation_decay: float = Field(0.7, ge=0, lt=1)
    reputation_weight_unselected: float = Field(0.5, ge=0, le=1)
    reputation_weight_far: float = Field(0.5, ge=0, le=1)
    reputation_weight_missing: float = Field(0.0, ge=0, le=1)
    reputation_weight_opposed: float = Field(0.0, ge=0, le=1)
    quarantine_threshold: float = Field(0.0, ge=0, le=1)
    quarantine_rounds: int = Field(3, ge=1, le=100_000)
    # the k-th quarantine of the same node lasts quarantine-rounds * escalation^(k-1)
    quarantine_escalation: float = Field(2.0, ge=1, le=100)
    quarantine_max: int = Field(-1, ge=-1, le=100_000)
    # true: a node's first round back from quarantine is a trial, its update judged
    # against the aggregate of the others and left out of it
    quarantine_probation: bool = False
    # Reply limits (strategies.validation, docs/RELIABILITY.md). A reply whose array
    # payloads and record values hold more than max-reply-bytes bytes is rejected before
    # anything is decoded (0: no limit); an update (delta from the global model) whose
    # L2 norm exceeds max-update-norm is rejected (0: no limit); a round with fewer than
    # min-accepted-replies accepted replies leaves the global model unchanged.
    max_reply_bytes: int = Field(256 * 2**20, ge=0)
    max_update_norm: float = Field(1e6, ge=0)
    min_accepted_replies: int = Field(1, ge=1, le=100_000)
    # Crash safety (common.rundir, docs/RELIABILITY.md): true continues the run in
    # output-dir from its newest checkpoint (round k + 1 next); without a checkpoint
    # the run starts from round 1
    resume: bool = False

    @model_validator(mode="before")
    @classmethod
    def _snake_extra_keys(cls, values: Any) -> Any:
        """Keep a component key under its Python name (``cc-tau`` as ``cc_tau``), so it
        reads like a field (``cfg.cc_tau``); :meth:`to_flat` writes it kebab-case."""
        if not isinstance(values, Mapping):
            return values
        fields = set(cls.model_fields) | set(cls.keys())
        return {(k if k in fields else _snake(str(k))): v for k, v in values.items()}

    def to_flat(self) -> dict[str, Any]:
        """Return the kebab-case mapping Flower uses, component keys included."""
        return {_kebab(k): v for k, v in self.model_dump(by_alias=True).items()}

    def value(self, key: str, default: Any = None) -> Any:
        """The value of run-config ``key``: a field's, or a component key's as it came
        (``default`` when the run config does not set it)."""
        name = _snake(key)
        if name in type(self).model_fields:
            return getattr(self, name)
        return (self.model_extra or {}).get(name, default)

    def extra_keys(self) -> list[str]:
        """The component keys this run config sets (not RunConfig's own fields)."""
        return [_kebab(k) for k in self.model_extra or {}]

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        if self.resume and self.batch_file:
            raise ValueError(
                "key 'resume' is true and key 'batch-file' is set; allowed: resume with a "
                "single run (a batch resumes cell by cell: `bastion grid` skips finished cells)"
            )
        if self.local_epochs == 0 and self.local_steps == 0:
            raise ValueError(
                "keys 'local-epochs' and 'local-steps' are both 0; set local-epochs >= 1 "
                "or local-steps >= 1 (local-steps > 0 takes precedence)"
            )
        if self.min_train_nodes > self.min_available_nodes:
            raise ValueError(
                f"key 'min-train-nodes' ({self.min_train_nodes}) is larger than "
                f"'min-available-nodes' ({self.min_available_nodes}); allowed: "
                "min-train-nodes <= min-available-nodes"
            )
        if 0 < self.dp_max_epsilon < self.dp_target_epsilon:
            raise ValueError(
                f"key 'dp-target-epsilon' ({self.dp_target_epsilon}) is larger than "
                f"'dp-max-epsilon' ({self.dp_max_epsilon}); allowed: dp-target-epsilon <= "
                "dp-max-epsilon (the planned run would run out of budget), or "
                "dp-max-epsilon = 0 (no budget)"
            )
        return self

    def train_instructions(self, server_round: int) -> dict[str, int | float]:
        """The ConfigRecord content sent to clients with round ``server_round``."""
        return {
            "server-round": server_round,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight-decay": self.weight_decay,
            "local-epochs": self.local_epochs,
            "local-steps": self.local_steps,
            "batch-size": self.batch_size,
            # A distinct, reproducible seed per round for the clients' data order.
            "round-seed": (self.seed * 1_000_003 + server_round) % (2**31 - 1),
        }


class TrainInstructions(_FlatModel):
    """What a client needs to run one round of local training (from the ConfigRecord)."""

    server_round: int = Field(ge=1)
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    local_epochs: int = Field(ge=0)
    local_steps: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    round_seed: int = Field(ge=0)
    batch_cell: int = Field(-1, ge=-1)  # the cell of a batch run (common.batch), or -1
    # the Flower run id whose node state (DP privacy ledger, client momentum) this run
    # continues (a resumed run is a new Flower run; its nodes keep accounting in the
    # first attempt's ledger and continue its momentum); 0: own
    ledger_run: int = Field(0, ge=0)

    def sgd_params(self) -> dict[str, int | float]:
        """The keyword arguments of ``task.training.train_local`` (and its DP twin)
        that come from these instructions."""
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "epochs": self.local_epochs,
            "steps": self.local_steps,
            "batch_size": self.batch_size,
        }


#: run-config keys a node's own config may set for itself: its attack and its DP
#: settings (:func:`node_may_set`, :func:`overlay`)
NODE_SETTABLE = ("attack", "collusion-dir", "dp")
#: ``dp-*`` keys that are the server's alone: the check of the replies' DP noise
SERVER_ONLY = ("dp-check", "dp-check-alpha")


def node_may_set(key: str) -> bool:
    """True for a run-config key a node's config may set for that node alone:
    ``attack``, ``attack-*``, ``collusion-dir``, ``dp`` and ``dp-*`` (except the
    server's :data:`SERVER_ONLY` keys)."""
    if key in SERVER_ONLY:
        return False
    return key in NODE_SETTABLE or key.startswith(("attack-", "dp-"))


class NodeConfig(_FlatModel):
    """A SuperNode's own settings (``flower-supernode --node-config``).

    ``data-dir`` lets each host point at its own copy of the data; an empty value
    falls back to the run config's ``data-dir``. Run-config keys the node may set for
    itself (:func:`node_may_set`: its attack, its DP settings) are kept in
    :attr:`overrides`, checked against RunConfig's bounds here and laid over the run
    config by :func:`overlay`; other keys are ignored.
    """

    model_config = ConfigDict(
        extra="ignore", alias_generator=_kebab, populate_by_name=True, frozen=True
    )

    partition_id: int = Field(ge=0)
    num_partitions: int = Field(ge=1)
    data_dir: str = ""
    # A node can be made malicious by its own config (docker-compose, real
    # deployments); its attack keys fall back to the run config's.
    role: Literal["", "honest", "malicious", "malformed", "fuzz"] = ""
    num_colluders: int | None = Field(None, ge=1, le=100_000)
    # state-dir keeps the node's DP privacy ledger and client momentum across SuperNode
    # restarts (unset: $BASTION_STATE_DIR, else <cache dir>/state; client.state)
    state_dir: str | None = None
    # role="fuzz" (client.malformed): trains honestly, sends its reply with one .npy
    # header byte-mutated each round.
    # role="malformed" (client.malformed): the kinds of malformed reply this node sends,
    # comma-separated, one per round by a documented rule; unset: the whole corpus
    malformed_kinds: str | None = None
    #: the run-config keys this node sets for itself (kebab-case), see :func:`overlay`
    overrides: dict[str, bool | int | float | str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _collect_overrides(cls, values: Any) -> Any:
        """Move the run-config keys a node may set into ``overrides``, checked with
        RunConfig's own types and bounds (component keys such as ``attack-epsilon``
        are checked by the component that reads them)."""
        if not isinstance(values, Mapping):
            return values
        own = {k: v for k, v in values.items() if not node_may_set(_kebab(str(k)))}
        mine = {_kebab(str(k)): v for k, v in values.items() if node_may_set(_kebab(str(k)))}
        fields = set(RunConfig.keys())
        try:
            RunConfig.model_validate({k: v for k, v in mine.items() if k in fields})
        except ValidationError as exc:
            raise ValueError(_format_errors(exc, mine, "node config", RunConfig)) from None
        return own | {"overrides": dict(values.get("overrides", {})) | mine}

    @model_validator(mode="after")
    def _check_partition(self) -> NodeConfig:
        if self.partition_id >= self.num_partitions:
            raise ValueError(
                f"node config key 'partition-id': value {self.partition_id} is not allowed; "
                f"allowed: 0 <= partition-id < num-partitions ({self.num_partitions})"
            )
        return self

    @classmethod
    def keys(cls) -> list[str]:
        """The node's own keys (the run-config keys it may set are :func:`node_may_set`'s)."""
        return [_kebab(name) for name in cls.model_fields if name != "overrides"]

    def sets(self, key: str) -> bool:
        """True when this node's config sets run-config ``key`` for itself."""
        return key in self.overrides


def overlay(run: RunConfig, node: NodeConfig) -> RunConfig:
    """The run config as ``node`` sees it: every run-config key the node's config sets
    for itself (:func:`node_may_set`) replaces the run config's value.

    Combinations are checked again over the result (e.g. ``dp-target-epsilon`` <=
    ``dp-max-epsilon``); errors name the node config as their source.
    """
    if not node.overrides:
        return run
    return RunConfig.from_flat(
        run.to_flat() | node.overrides, source="node config (over run config)"
    )


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``"k1=v1 k2='v 2'"`` the way ``flwr run --run-config`` does (TOML values).

    Values that are not valid TOML (e.g. ``dataset=mnist``) are taken as strings,
    matching what users expect from a command line.
    """
    import shlex
    import tomllib

    out: dict[str, Any] = {}
    for item in shlex.split(text):
        if "=" not in item:
            raise ConfigError(f"--run-config item {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def format_overrides(values: Mapping[str, Any]) -> str:
    """Write a mapping in ``flwr run --run-config`` syntax (TOML values)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)
