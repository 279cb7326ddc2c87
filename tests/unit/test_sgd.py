"""PlainSGD reproduces torch.optim.SGD exactly (it exists only to skip a 1.7 s import)."""

from __future__ import annotations

import pytest
import torch

from task.sgd import PlainSGD


@pytest.mark.parametrize(
    ("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.0, 1e-3), (0.9, 5e-4)]
)
def test_matches_torch_sgd_bit_for_bit(momentum: float, weight_decay: float) -> None:
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    ours = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    ours.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.SGD(
        ref.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay
    )
    opt_ours = PlainSGD(ours.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    for step in range(6):
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
            assert torch.equal(a, b), f"step {step}"


def test_parameters_without_grad_are_left_alone() -> None:
    frozen = torch.nn.Parameter(torch.ones(3))
    live = torch.nn.Parameter(torch.ones(3))
    opt = PlainSGD([frozen, live], lr=1.0)
    live.grad = torch.full((3,), 0.5)
    opt.step()
    assert torch.equal(frozen, torch.ones(3)) and torch.equal(live, torch.full((3,), 0.5))


def test_invalid_hyperparameters_are_named() -> None:
    with pytest.raises(ValueError, match="lr=0"):
        PlainSGD([torch.nn.Parameter(torch.ones(1))], lr=0)
