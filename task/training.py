"""Local training and evaluation of a model on an in-memory dataset.

Plain mini-batch SGD (momentum, weight decay) for a number of local epochs or a
fixed number of local steps, as in FedAvg's ClientUpdate (McMahan et al., 2017,
Algorithm 1). Runs on CPU or CUDA; deterministic for a given seed on CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

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


def make_loader(data: ArrayDataset, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over an :class:`ArrayDataset` (seeded shuffling, no worker processes)."""
    tensors = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
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
