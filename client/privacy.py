"""Client-side differential privacy: DP-SGD per node, accounted over the whole run.

A node with ``dp = true`` (run config, or its own node config) trains with DP-SGD
(Abadi et al., 2016, "Deep learning with differential privacy", Algorithm 1) as
implemented by Opacus (Yousefpour et al., 2021): Poisson-sampled batches with rate
q = batch-size / |local train set|, per-sample gradients clipped to L2 norm C
(``dp-max-grad-norm``) and Gaussian noise of standard deviation sigma*C
(sigma = ``dp-noise-multiplier``); see :func:`task.training.train_local_dp`. The
server only ever sees the resulting model, so the guarantee is record-level DP of
the node's training set against the server and everyone downstream.

Privacy spent is counted per node over *all* rounds it took part in: each round
appends one entry ``(noise_multiplier, sample_rate, steps)`` to the node's
:class:`PrivacyLedger`, a JSON file that survives a SuperNode restart, and epsilon
is the Rényi-DP composition of the whole history (Mironov, 2017, "Rényi
differential privacy"; Opacus' ``RDPAccountant``) converted to (epsilon, delta)-DP.
Before training, the node checks whether the round would take it past
``dp-max-epsilon``; with ``dp-budget-action = "stop"`` it does not train and
replies with an error message naming the budget and the epsilon spent (the
strategy rejects such replies with that reason and the round goes on), with
``"warn"`` it trains and logs a warning.

With ``dp-target-epsilon > 0`` the noise multiplier is not taken from the config
but computed (Opacus' ``get_noise_multiplier``, RDP accountant) so that
``num-server-rounds`` rounds of this node's local steps end at or below the target.

What the guarantee covers: the model update, computed with secret randomness (batch
sampling and noise are seeded from the OS, never from the round seed the server
sends, which would let the server regenerate and subtract the noise). DP replies
leave out ``train-loss``, an un-noised statistic of the training data; they still
carry ``num-examples`` (the reply contract needs it; robust rules ignore it) and
``train-seconds``. A round is recorded in the ledger after training and before the
reply leaves, so a crash can only over-count, never under-count.

Nothing here imports Opacus at module level: it costs about 1.4 s on top of torch,
and Flower starts a fresh ClientApp process for every message.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from logging import WARNING
from pathlib import Path

import torch
from flwr.app import Error, Message
from flwr.common import log

from client.state import STATE_DIR_ENV, state_dir, state_file
from common import protocol
from common.config import ConfigError, NodeConfig, RunConfig, TrainInstructions, overlay
from task.datasets import ArrayDataset
from task.training import DPTrainResult, dp_num_steps, dp_sample_rate, train_local_dp

__all__ = [
    "DP_BUDGET_EXHAUSTED",
    "STATE_DIR_ENV",
    "DPSettings",
    "LedgerEntry",
    "PrivacyLedger",
    "PrivateRound",
    "budget_error_reply",
    "epsilon_of",
    "ledger_path",
    "plan_noise_multiplier",
    "resolve_dp",
    "state_dir",
]

#: ``Error.code`` of a reply refused because the privacy budget is spent (Flower's
#: own codes, ``flwr.common.constant.ErrorCode``, are small integers from 0).
DP_BUDGET_EXHAUSTED = 1001

_LEDGER_VERSION = 1


@dataclass(frozen=True)
class DPSettings:
    """A node's resolved DP-SGD settings (its node config over the run config)."""

    noise_multiplier: float
    target_epsilon: float
    delta: float
    max_grad_norm: float
    max_epsilon: float
    budget_action: str
    grad_sample_mode: str


def resolve_dp(run: RunConfig, node: NodeConfig) -> DPSettings | None:
    """This node's DP settings, or ``None`` when it trains without DP.

    Every ``dp-*`` key of the node config that is set wins over the run config's
    (:func:`common.config.overlay`).
    """
    mine = overlay(run, node)
    if not mine.dp:
        return None
    settings = DPSettings(
        noise_multiplier=mine.dp_noise_multiplier,
        target_epsilon=mine.dp_target_epsilon,
        delta=mine.dp_delta,
        max_grad_norm=mine.dp_max_grad_norm,
        max_epsilon=mine.dp_max_epsilon,
        budget_action=mine.dp_budget_action,
        grad_sample_mode=mine.dp_grad_sample_mode,
    )
    if 0 < settings.max_epsilon < settings.target_epsilon:
        raise ConfigError(
            f"key 'dp-target-epsilon' ({settings.target_epsilon}) is larger than "
            f"'dp-max-epsilon' ({settings.max_epsilon}) for partition {node.partition_id} "
            "(node config over run config); allowed: dp-target-epsilon <= dp-max-epsilon, "
            "or dp-max-epsilon = 0 (no budget)"
        )
    return settings


def ledger_path(
    directory: Path, run_id: int | str, partition_id: int, batch_cell: int = -1
) -> Path:
    """The ledger file of one partition in one run (one cell of a batch run)."""
    return state_file(directory, "privacy", run_id, partition_id, batch_cell, suffix=".json")


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of an RDP accountant history at ``delta`` (0 for an empty history).

    Each entry is ``(noise_multiplier, sample_rate, steps)``; the Rényi divergences
    of the sampled Gaussian mechanism add up over the entries (Mironov, 2017,
    Prop. 1) and are converted to (epsilon, delta)-DP by Opacus' ``RDPAccountant``.
    Entries with the same noise multiplier and sample rate are merged first (their
    RDP is linear in the steps), so the cost stays that of one entry per distinct
    pair however many rounds a node took part in. A round without noise (noise
    multiplier 0: clipping only) releases its update without any guarantee, so the
    whole history is worth ``inf``.
    """
    history = [entry for entry in history if int(entry[2]) > 0]  # 0 steps release nothing
    if not history:
        return 0.0
    if any(float(sigma) == 0.0 for sigma, _, _ in history):
        return math.inf
    from opacus.accountants import RDPAccountant

    merged: dict[tuple[float, float], int] = {}
    for sigma, rate, steps in history:
        key = (float(sigma), float(rate))
        merged[key] = merged.get(key, 0) + int(steps)
    accountant = RDPAccountant()
    accountant.history = [(sigma, rate, steps) for (sigma, rate), steps in merged.items()]
    return float(accountant.get_epsilon(delta=delta))


def plan_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, total_steps: int
) -> float:
    """The noise multiplier that makes ``total_steps`` steps at ``sample_rate`` end at
    or below ``target_epsilon`` (Opacus' ``get_noise_multiplier``, RDP accountant)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # the search probes large noise multipliers, whose best RDP order is the
        # largest one tried; Opacus warns about each of those probes
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        try:
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=total_steps,
                accountant="rdp",
            )
        except ValueError as exc:  # "The privacy budget is too low."
            raise ValueError(
                f"key 'dp-target-epsilon': value {target_epsilon} is not reachable with "
                f"delta={delta} over {total_steps} steps at sample rate {sample_rate:.4g} "
                f"({exc}); allowed: a larger target, fewer rounds or local steps, or a "
                "smaller batch size"
            ) from None
    return float(sigma)


@dataclass(frozen=True)
class LedgerEntry:
    """One round of DP-SGD a node released: an RDP accountant history entry."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int

    @property
    def history(self) -> tuple[float, float, int]:
        """``(noise_multiplier, sample_rate, steps)``, Opacus' history format."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyLedger:
    """A node's privacy spending over a run, in a JSON file that outlives the process.

    Each :meth:`record` re-reads the file under an exclusive lock, appends and
    replaces the file atomically, so a crash never leaves half a ledger and a
    restarted node (or any fresh object on the same path) sees every round
    recorded before. A file that exists but cannot be read raises: starting from
    an empty ledger would under-count the privacy spent.

    The file also remembers the noise multipliers planned for ``dp-target-epsilon``
    (:meth:`planned_noise_multiplier`): the search costs about a second, and Flower
    starts a fresh process for every round.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: list[LedgerEntry]
        self.plans: dict[str, float]
        self.entries, self.plans = self._read()

    def _read(self) -> tuple[list[LedgerEntry], dict[str, float]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return [], {}
        try:
            data = json.loads(text)
            if data.get("version") != _LEDGER_VERSION:
                raise ValueError(f"unknown version {data.get('version')!r}")
            entries = [LedgerEntry(**entry) for entry in data["entries"]]
            plans = {str(k): float(v) for k, v in data.get("plans", {}).items()}
            return entries, plans
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RuntimeError(
                f"privacy ledger {self.path} is unreadable ({exc}); refusing to train with "
                "an unknown privacy spend. Restore the file, or delete it only if this "
                "node has released nothing in this run"
            ) from None

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The whole-run accountant history, ``[(noise_multiplier, sample_rate, steps)]``."""
        return [entry.history for entry in self.entries]

    def epsilon(self, delta: float, extra: Sequence[tuple[float, float, int]] = ()) -> float:
        """Epsilon spent over all recorded rounds (plus ``extra`` planned ones) at ``delta``."""
        return epsilon_of([*self.history, *extra], delta)

    def planned_noise_multiplier(
        self, target_epsilon: float, delta: float, sample_rate: float, total_steps: int
    ) -> float:
        """:func:`plan_noise_multiplier`, computed once per run and kept in the file."""
        key = f"{target_epsilon!r}|{delta!r}|{sample_rate!r}|{total_steps}"
        if key not in self.plans:
            sigma = plan_noise_multiplier(target_epsilon, delta, sample_rate, total_steps)
            with self._locked():
                self.entries, self.plans = self._read()
                self.plans[key] = sigma
                self._write()
        return self.plans[key]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self) -> None:
        payload = {
            "version": _LEDGER_VERSION,
            "entries": [asdict(e) for e in self.entries],
            "plans": self.plans,
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)

    def record(self, entry: LedgerEntry) -> None:
        """Append ``entry`` to the file (atomically, under a lock) and to :attr:`entries`."""
        with self._locked():
            entries, self.plans = self._read()
            self.entries = [*entries, entry]
            self._write()


def budget_error_reply(msg: Message, reason: str) -> Message:
    """The error reply of a node that refuses to train (code :data:`DP_BUDGET_EXHAUSTED`)."""
    return Message(Error(code=DP_BUDGET_EXHAUSTED, reason=reason), reply_to=msg)


class PrivateRound:
    """One round of DP-SGD on a node: plan, budget check, training, accounting.

    :meth:`plan` fixes the round's (noise multiplier, sample rate, steps) and says
    whether it fits the budget (:attr:`refusal` is the reason when it does not and
    the action is ``"stop"``); :meth:`train` runs DP-SGD and records the round in
    the ledger before anything is released; :meth:`metrics` are the reply metrics.
    """

    def __init__(
        self,
        dp: DPSettings,
        ledger: PrivacyLedger,
        *,
        server_round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        spent: float,
        after: float,
    ) -> None:
        self.dp, self.ledger, self.server_round = dp, ledger, server_round
        self.noise_multiplier, self.sample_rate, self.steps = noise_multiplier, sample_rate, steps
        self.spent, self.after = spent, after
        self.epsilon: float | None = None
        self.refusal: str | None = None
        if dp.max_epsilon > 0 and after > dp.max_epsilon:
            why = (
                f"differential-privacy budget exhausted: dp-max-epsilon={dp.max_epsilon:g} "
                f"(delta={dp.delta:g}); this node has spent epsilon={spent:.4f} over "
                f"{len(ledger.entries)} round(s) and round {server_round} ({steps} steps, "
                f"q={sample_rate:.4g}, noise multiplier {noise_multiplier:.4g}) would bring "
                f"it to {after:.4f}"
            )
            if dp.budget_action == "stop":
                self.refusal = why + "; not training (dp-budget-action='stop')"
            else:
                log(WARNING, "[bastion] %s; training anyway (dp-budget-action='warn')", why)

    @classmethod
    def plan(
        cls,
        dp: DPSettings,
        ledger: PrivacyLedger,
        *,
        server_round: int,
        num_examples: int,
        batch_size: int,
        epochs: int,
        steps: int,
        num_rounds: int,
    ) -> PrivateRound:
        """Plan round ``server_round`` for a node holding ``num_examples`` training examples.

        The sample rate is q = batch_size / num_examples and the round takes
        :func:`~task.training.dp_num_steps` steps. With ``target_epsilon > 0`` the
        noise multiplier is planned for ``num_rounds`` such rounds.
        """
        rate = dp_sample_rate(num_examples, batch_size)
        n_steps = dp_num_steps(num_examples, batch_size, epochs=epochs, steps=steps)
        sigma = dp.noise_multiplier
        if dp.target_epsilon > 0:
            sigma = ledger.planned_noise_multiplier(
                dp.target_epsilon, dp.delta, rate, num_rounds * n_steps
            )
        spent = ledger.epsilon(dp.delta)
        after = ledger.epsilon(dp.delta, [(sigma, rate, n_steps)])
        return cls(
            dp,
            ledger,
            server_round=server_round,
            noise_multiplier=sigma,
            sample_rate=rate,
            steps=n_steps,
            spent=spent,
            after=after,
        )

    @classmethod
    def for_node(
        cls,
        dp: DPSettings,
        node: NodeConfig,
        instr: TrainInstructions,
        *,
        run_id: int | str,
        num_examples: int,
        run: RunConfig,
    ) -> PrivateRound:
        """:meth:`plan` this round for ``node`` with its ledger under :func:`state_dir`."""
        ledger = PrivacyLedger(
            ledger_path(state_dir(node), run_id, node.partition_id, instr.batch_cell)
        )
        return cls.plan(
            dp,
            ledger,
            server_round=instr.server_round,
            num_examples=num_examples,
            batch_size=instr.batch_size,
            epochs=instr.local_epochs,
            steps=instr.local_steps,
            num_rounds=run.num_server_rounds,
        )

    def train(
        self,
        model: torch.nn.Module,
        data: ArrayDataset,
        instr: TrainInstructions,
        *,
        device: torch.device | None = None,
        seed: int | None = None,
    ) -> DPTrainResult:
        """Run the planned DP-SGD round on ``model`` and record it in the ledger.

        ``seed`` fixes batch sampling and noise (tests only); by default both come
        from a secret seed (see :func:`~task.training.train_local_dp`).
        """
        if self.refusal is not None:
            raise RuntimeError(f"PrivateRound.train called for a refused round: {self.refusal}")
        result = train_local_dp(
            model,
            data,
            **(instr.sgd_params() | {"steps": self.steps}),  # type: ignore[arg-type]
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.dp.max_grad_norm,
            grad_sample_mode=self.dp.grad_sample_mode,
            seed=seed,
            device=device,
        )
        self.ledger.record(
            LedgerEntry(
                round=self.server_round,
                noise_multiplier=result.noise_multiplier,
                sample_rate=result.sample_rate,
                steps=result.steps,
            )
        )
        self.epsilon = self.ledger.epsilon(self.dp.delta)
        return result

    def metrics(self) -> dict[str, int | float]:
        """Reply metrics: epsilon spent so far (whole run), delta, noise multiplier."""
        if self.epsilon is None:
            raise RuntimeError("PrivateRound.metrics called before train")
        return {
            protocol.DP_EPSILON: self.epsilon,
            protocol.DP_DELTA: self.dp.delta,
            protocol.DP_NOISE_MULTIPLIER: self.noise_multiplier,
            protocol.DP_SAMPLE_RATE: self.sample_rate,
            protocol.DP_ROUNDS: len(self.ledger.entries),
        }
