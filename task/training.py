"""Local training and evaluation of a model on an in-memory dataset.

Plain mini-batch SGD (momentum, weight decay) for a number of local epochs or a
fixed number of local steps, as in FedAvg's ClientUpdate (McMahan et al., 2017,
Algorithm 1). Runs on CPU or CUDA; deterministic for a given seed on CPU.

:func:`train_local_dp` is the differentially private variant: DP-SGD (Abadi et
al., 2016, "Deep learning with differential privacy", Algorithm 1) with Opacus
(Yousefpour et al., 2021, "Opacus: user-friendly differential privacy library in
PyTorch"): Poisson-sampled batches, per-sample gradients clipped to L2 norm C,
Gaussian noise of standard deviation sigma*C added to their sum. Opacus is imported
only there (it costs seconds); :func:`train_local` never touches it.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from task.datasets import ArrayDataset
from task.sgd import PlainSGD


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`train_local` did."""

    num_examples: int
    steps: int
    mean_loss: float
    seconds: float


@dataclass(frozen=True)
class DPTrainResult(TrainResult):
    """What one call of :func:`train_local_dp` did, with its privacy parameters.

    ``(noise_multiplier, sample_rate, steps)`` is exactly one entry of an RDP
    accountant's history (Mironov, 2017; Opacus' ``RDPAccountant.history``).
    """

    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    empty_batches: int


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy of a model on a dataset."""

    num_examples: int
    loss: float
    accuracy: float


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``auto``/``cpu``/``cuda``/``cuda:N`` to a device; ``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this host")
    return torch.device(name)


def tensor_dataset(data: ArrayDataset) -> TensorDataset:
    """``data`` as tensors sharing its memory; a read-only array (a memory-mapped cache
    file, :mod:`task.cache`) is copied first, since torch tensors are writable."""

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array if array.flags.writeable else np.array(array))

    return TensorDataset(tensor(data.x), tensor(data.y))


def make_loader(data: ArrayDataset, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over an :class:`ArrayDataset` (seeded shuffling, no worker processes)."""
    tensors = tensor_dataset(data)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        tensors, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=False
    )


def train_local(
    model: nn.Module,
    data: ArrayDataset,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    epochs: int = 1,
    steps: int = 0,
    batch_size: int = 32,
    seed: int = 0,
    device: torch.device | None = None,
) -> TrainResult:
    """Train ``model`` in place with mini-batch SGD on ``data``.

    ``steps > 0`` runs exactly that many mini-batch steps (cycling over
    reshuffled epochs); otherwise ``epochs`` full passes. Returns the number of
    examples, the steps taken, the mean training loss over all steps and the
    wall time of the loop.
    """
    if len(data) == 0:
        raise ValueError("train_local: the training set is empty")
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    model.to(device).train()
    optimizer = PlainSGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    loader = make_loader(data, batch_size, shuffle=True, seed=seed)
    total_steps = steps if steps > 0 else epochs * len(loader)
    start = time.perf_counter()
    done, loss_sum = 0, torch.zeros((), device=device)
    while done < total_steps:
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            done += 1
            if done >= total_steps:
                break
    seconds = time.perf_counter() - start
    return TrainResult(
        num_examples=len(data),
        steps=done,
        mean_loss=float(loss_sum) / max(done, 1),
        seconds=seconds,
    )


#: Per-sample clipping implementations (``grad_sample_mode``): Opacus' own four, Opacus'
#: ghost clipping with Bastion's ``Conv2d`` ghost norms (``ghost-conv``,
#: :mod:`task.ghost_norms`), and one-pass book-keeping (:mod:`task.bookkeeping`).
GRAD_SAMPLE_MODES = ("hooks", "ew", "functorch", "ghost", "ghost-conv", "bookkeeping")
#: the modes that clip without per-sample gradients (``p.grad`` is the clipped sum)
FAST_CLIPPING_MODES = ("ghost", "ghost-conv", "bookkeeping")


def dp_sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate q = batch_size / num_examples (at most 1)."""
    if num_examples <= 0 or batch_size <= 0:
        raise ValueError(
            f"dp_sample_rate: num_examples and batch_size must be >= 1; "
            f"got {num_examples} and {batch_size}"
        )
    return min(1.0, batch_size / num_examples)


def dp_num_steps(num_examples: int, batch_size: int, *, epochs: int, steps: int) -> int:
    """DP-SGD steps of one local round: ``steps`` when > 0, else ``epochs`` epochs.

    An epoch is ``ceil(num_examples / batch_size)`` Poisson batches, the same number
    of steps as :func:`train_local` takes per epoch (each batch holds
    ``batch_size`` examples in expectation).
    """
    if steps > 0:
        return steps
    return epochs * math.ceil(num_examples / batch_size)


def train_local_dp(
    model: nn.Module,
    data: ArrayDataset,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    epochs: int = 1,
    steps: int = 0,
    batch_size: int = 32,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str = "hooks",
    seed: int | None = None,
    device: torch.device | None = None,
    step_hook: Callable[[Any], None] | None = None,
) -> DPTrainResult:
    """Train ``model`` in place with DP-SGD on ``data``.

    Each step draws a Poisson batch (every example independently with probability
    q = ``batch_size / len(data)``, Opacus' ``DPDataLoader``), clips every
    per-sample gradient to L2 norm ``max_grad_norm`` (C), adds Gaussian noise
    N(0, (sigma*C)^2) to their sum and divides by the expected batch size (Abadi
    et al., 2016, Algorithm 1), then applies SGD with ``momentum`` and
    ``weight_decay`` (``torch.optim.SGD``, the rule :class:`~task.sgd.PlainSGD`
    reproduces). The step count is :func:`dp_num_steps`; an empty Poisson batch
    still takes a step (pure noise), as the privacy analysis assumes.

    ``grad_sample_mode`` picks how per-sample gradients are clipped
    (:data:`GRAD_SAMPLE_MODES`): Opacus' per-sample gradients (``hooks``, ``ew``,
    ``functorch``); Opacus' ghost clipping (``ghost``: per-sample norms in a first
    backward pass, the clipped sum in a second), also with ghost norms for
    ``Conv2d`` (``ghost-conv``); or book-keeping (``bookkeeping``: one backward
    pass, :mod:`task.bookkeeping`). All give the same clipped sum, so the same
    update for the same batch and noise; the privacy accounting is the same. ``seed`` seeds
    the batch sampling and the noise; ``None`` (what the ClientApp uses) draws a
    secret seed from the OS, because noise that the server could regenerate (e.g.
    from the round seed it sends) would protect nothing. ``noise_multiplier = 0``
    is clipping without noise: DP-SGD's optimisation, no privacy (epsilon = inf).
    ``step_hook(optimizer)`` runs after clipping and noising, before the parameter
    update (Opacus' step hook; ``p.grad_sample`` still holds the raw per-sample
    gradients there, except in the :data:`FAST_CLIPPING_MODES`).
    """
    if len(data) == 0:
        raise ValueError("train_local_dp: the training set is empty")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"train_local_dp: grad_sample_mode={grad_sample_mode!r}; allowed: "
            + ", ".join(repr(m) for m in GRAD_SAMPLE_MODES)
        )
    if noise_multiplier < 0 or max_grad_norm <= 0:
        raise ValueError(
            f"train_local_dp: noise_multiplier must be >= 0 and max_grad_norm > 0; "
            f"got {noise_multiplier} and {max_grad_norm}"
        )
    from opacus.data_loader import DPDataLoader
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    device = device or torch.device("cpu")
    num = len(data)
    rate = dp_sample_rate(num, batch_size)
    total_steps = dp_num_steps(num, batch_size, epochs=epochs, steps=steps)
    seed = secrets.randbits(62) if seed is None else seed
    ghost = grad_sample_mode in FAST_CLIPPING_MODES

    model.to(device).train()
    gsm: Any
    if grad_sample_mode == "bookkeeping":
        from task.bookkeeping import GradSampleModuleBookKeeping

        gsm = GradSampleModuleBookKeeping(model, max_grad_norm=max_grad_norm)
    elif grad_sample_mode == "ghost-conv":
        from task.ghost_norms import ghost_conv_module

        gsm = ghost_conv_module(model, max_grad_norm=max_grad_norm)
    else:
        extra = {"max_grad_norm": max_grad_norm} if ghost else {}
        gsm = prepare_module(
            model, grad_sample_mode, batch_first=True, loss_reduction="mean", **extra
        )
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    dp_class = DPOptimizerFastGradientClipping if ghost else DPOptimizer
    optimizer = dp_class(
        sgd,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        # the mean over a Poisson batch divides by its expected size, not its size
        expected_batch_size=max(1, round(rate * num)),
        loss_reduction="mean",
        generator=torch.Generator(device=device).manual_seed(seed + 1),
    )
    if step_hook is not None:
        optimizer.attach_step_hook(step_hook)
    loss_fn = nn.CrossEntropyLoss()
    criterion: Callable[..., Any] = loss_fn
    if grad_sample_mode == "bookkeeping":
        from task.bookkeeping import DPLossBookKeeping

        criterion = DPLossBookKeeping(gsm, loss_fn, "mean")
    elif ghost:
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        criterion = DPLossFastGradientClipping(gsm, optimizer, loss_fn, "mean")
    tensors = tensor_dataset(data)
    loader = DPDataLoader(tensors, sample_rate=rate, generator=torch.Generator().manual_seed(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    done, empty, loss_sum = 0, 0, torch.zeros((), device=device)
    try:
        with warnings.catch_warnings():
            # Opacus' hooks on the first layer fire with respect to outputs only (the
            # inputs need no gradient); PyTorch warns about that on every run
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            while done < total_steps:
                for xb, yb in loader:
                    optimizer.zero_grad(set_to_none=True)
                    if len(xb) == 0:  # Poisson sampling drew nobody: a noise-only step
                        empty += 1
                        for p in params:
                            if ghost:
                                p.grad = torch.zeros_like(p)
                            else:
                                p.grad_sample = torch.zeros((0, *p.shape), device=device)
                    else:
                        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                        loss = criterion(gsm(xb), yb)
                        loss.backward()
                        loss_sum += loss.detach()
                    optimizer.step()
                    done += 1
                    if done >= total_steps:
                        break
    finally:
        optimizer.zero_grad(set_to_none=True)
        gsm._close()  # remove Opacus' hooks and per-sample attributes from ``model``
        for p in params:
            if hasattr(p, "summed_grad"):
                del p.summed_grad
    seconds = time.perf_counter() - start
    return DPTrainResult(
        num_examples=num,
        steps=done,
        mean_loss=float(loss_sum) / max(done - empty, 1),
        seconds=seconds,
        noise_multiplier=noise_multiplier,
        sample_rate=rate,
        max_grad_norm=max_grad_norm,
        empty_batches=empty,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ArrayDataset,
    *,
    batch_size: int = 1024,
    device: torch.device | None = None,
) -> EvalResult:
    """Mean cross-entropy loss and accuracy (fraction in 0..1) of ``model`` on ``data``."""
    device = device or torch.device("cpu")
    model.to(device).eval()
    if len(data) == 0:
        return EvalResult(num_examples=0, loss=float("nan"), accuracy=float("nan"))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct = 0.0, 0
    for xb, yb in make_loader(data, batch_size, shuffle=False):
        xb, yb = xb.to(device), yb.to(device)
        logits = model(xb)
        loss_sum += float(loss_fn(logits, yb))
        correct += int((logits.argmax(dim=1) == yb).sum())
    n = len(data)
    return EvalResult(num_examples=n, loss=loss_sum / n, accuracy=correct / n)
