"""One-pass clipping (task.bookkeeping) and Conv2d ghost norms (task.ghost_norms).

The reference everywhere is independent of the code under test: either a loop of
single-sample backward passes through plain autograd, clipped by hand, or Opacus'
``hooks`` mode (per-sample gradients, ``DPOptimizer``'s own clipping and noise).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from client.privacy import epsilon_of
from task.bookkeeping import DPLossBookKeeping, GradSampleModuleBookKeeping
from task.datasets import ArrayDataset
from task.ghost_norms import (
    choose_form,
    conv2d_ghost_sq_norms,
    conv2d_norm_sample,
    conv_form,
    conv_grad_samples,
    ghost_conv_module,
)
from task.models import Cifar10CNN, DigitsMLP, MnistCNN
from task.training import train_local_dp

SHAPES: dict[type[nn.Module], tuple[int, ...]] = {
    DigitsMLP: (64,),
    MnistCNN: (1, 28, 28),
    Cifar10CNN: (3, 32, 32),
}


def per_sample_grads(model: nn.Module, x: Tensor, y: Tensor) -> list[list[Tensor]]:
    """Each sample's gradient of its own cross-entropy, by plain autograd."""
    out = []
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        out.append([g.detach() for g in torch.autograd.grad(loss, params)])
    return out


def clipped_sum_by_hand(model: nn.Module, x: Tensor, y: Tensor, c: float) -> list[Tensor]:
    """``sum_i min(1, C / (||g_i|| + 1e-6)) g_i`` from :func:`per_sample_grads`."""
    grads = per_sample_grads(model, x, y)
    total = [torch.zeros_like(g) for g in grads[0]]
    for sample in grads:
        norm = torch.sqrt(sum(g.square().sum() for g in sample))
        coef = min(1.0, c / (float(norm) + 1e-6))
        for t, g in zip(total, sample, strict=True):
            t += coef * g
    return total


def bookkeeping_sum(model: nn.Module, x: Tensor, y: Tensor, c: float) -> list[Tensor]:
    """What one book-keeping backward pass leaves in ``p.grad``."""
    gsm = GradSampleModuleBookKeeping(model, max_grad_norm=c)
    try:
        loss = DPLossBookKeeping(gsm, nn.CrossEntropyLoss())(gsm(x), y)
        loss.backward()
        return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    finally:
        gsm._close()


def rel_err(a: list[Tensor], b: list[Tensor]) -> float:
    fa = torch.cat([t.flatten() for t in a])
    fb = torch.cat([t.flatten() for t in b])
    return float((fa - fb).norm() / fb.norm().clamp(min=1e-30))


def sample_norms(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    grads = per_sample_grads(model, x, y)
    return torch.stack([torch.sqrt(sum(g.square().sum() for g in s)) for s in grads])


# --- the clipped sum, against single-sample autograd ------------------------------------


@pytest.mark.parametrize("cls", list(SHAPES), ids=lambda c: c.__name__)
def test_one_pass_gives_the_clipped_sum_of_per_sample_gradients(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(12, *SHAPES[cls])
    y = torch.randint(0, 10, (12,))
    norms = sample_norms(model, x, y)
    c = float(norms.median())  # about half the samples are clipped, half are not
    assert (norms > c * 1.01).any() and (norms < c * 0.99).any()
    expected = clipped_sum_by_hand(model, x, y, c)
    assert rel_err(bookkeeping_sum(model, x, y, c), expected) < 1e-5


class TwoCalls(nn.Module):
    """One Linear layer applied twice (its per-sample gradient sums both calls), a
    frozen weight with a trainable bias, and a sequence Linear in the ghost form."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.weight.requires_grad_(False)
        self.seq = nn.Linear(8, 64)  # 4 positions: 2 * 4^2 < 8 * 64, the ghost form
        self.norm = nn.GroupNorm(4, 4)
        self.head = nn.Linear(4 * 64, 10)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, 4, 8)
        h = torch.tanh(self.shared(torch.tanh(self.shared(x))))
        h = self.seq(torch.tanh(self.frozen(h)))  # (B, 4, 64)
        return self.head(self.norm(h).flatten(1))


def test_reused_layers_frozen_weights_sequences_and_group_norm() -> None:
    torch.manual_seed(1)
    model = TwoCalls()
    assert choose_form(4, 8, 64) == "ghost"
    x, y = torch.randn(6, 4, 8), torch.randint(0, 10, (6,))
    c = float(sample_norms(model, x, y).median())
    assert rel_err(bookkeeping_sum(model, x, y, c), clipped_sum_by_hand(model, x, y, c)) < 1e-5
    assert model.frozen.weight.grad is None


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2, bias=False),
        nn.Conv2d(3, 4, 4, padding="same"),  # even kernel: asymmetric padding
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(3, 5, 2, padding="valid", stride=(2, 1)),
        nn.Conv1d(3, 4, 3, padding=2),
        nn.Conv3d(2, 3, 2),
    ],
    ids=["plain", "grouped-strided-dilated", "same-even", "reflect", "valid-strided", "1d", "3d"],
)
def test_per_sample_convolution_gradients(conv: nn.Module) -> None:
    torch.manual_seed(2)
    dims = {nn.Conv1d: (9,), nn.Conv2d: (9, 9), nn.Conv3d: (5, 5, 5)}[type(conv)]
    x = torch.randn(5, conv.in_channels, *dims)
    g = torch.randn_like(conv(x))
    expected = []
    for i in range(len(x)):  # each sample's weight gradient, by autograd
        (grad,) = torch.autograd.grad((conv(x[i : i + 1]) * g[i : i + 1]).sum(), conv.weight)
        expected.append(grad)
    got = conv_grad_samples(conv, x, g)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_conv2d_ghost_norms_match_the_direct_norms_where_the_rule_picks_them() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(32, 64, 5)  # MnistCNN's second convolution: 8 x 8 positions
    x = torch.randn(9, 32, 12, 12)
    g = torch.randn_like(conv(x))
    assert conv_form(conv, g.shape) == "ghost"
    direct = conv_grad_samples(conv, x, g).flatten(1).square().sum(1)
    torch.testing.assert_close(conv2d_ghost_sq_norms(conv, x, g), direct, rtol=1e-4, atol=0)
    norms = conv2d_norm_sample(conv, [x], g)
    torch.testing.assert_close(norms[conv.weight], direct.sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(norms[conv.bias], g.sum((2, 3)).norm(dim=1), rtol=1e-5, atol=0)
    assert conv_form(nn.Conv2d(1, 32, 5), (9, 32, 24, 24)) == "direct"  # 576 positions


def test_choose_form_follows_bu_et_al_layerwise_rule() -> None:
    # ghost when two P x P Grams are smaller than the D x C per-sample gradient
    assert choose_form(1, 1024, 128) == "ghost"
    assert choose_form(64, 800, 64) == "ghost"  # 8,192 < 51,200
    assert choose_form(1024, 288, 32) == "direct"  # 2M > 9,216
    assert choose_form(160, 100, 512) == "direct"  # 51,200 == 51,200: ties go direct


# --- against Opacus: noised, averaged gradient, same noise seed -------------------------


def opacus_step(
    model: nn.Module, mode: str, x: Tensor, y: Tensor, c: float, sigma: float
) -> Tensor:
    """The gradient ``DPOptimizer`` hands to SGD after clipping, noise and averaging."""
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    model = copy.deepcopy(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    fast = mode != "hooks"
    kwargs = {
        "noise_multiplier": sigma,
        "max_grad_norm": c,
        "expected_batch_size": 8,
        "loss_reduction": "mean",
        "generator": torch.Generator().manual_seed(11),
    }
    opt = (DPOptimizerFastGradientClipping if fast else DPOptimizer)(sgd, **kwargs)
    if mode == "hooks":
        gsm = prepare_module(model, "hooks", batch_first=True, loss_reduction="mean")
        criterion: Callable = nn.CrossEntropyLoss()
    elif mode == "ghost-conv":
        gsm = ghost_conv_module(model, max_grad_norm=c)
        criterion = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(), "mean")
    else:
        gsm = GradSampleModuleBookKeeping(model, max_grad_norm=c)
        criterion = DPLossBookKeeping(gsm, nn.CrossEntropyLoss())
    opt.zero_grad(set_to_none=True)
    if len(x) == 0:  # an empty Poisson batch: what train_local_dp does
        for p in model.parameters():
            if fast:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape))
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            criterion(gsm(x), y).backward()
    opt.pre_step()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    gsm._close()
    return grad


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost-conv"])
@pytest.mark.parametrize("batch", [0, 1, 8])
@pytest.mark.parametrize("sigma", [0.0, 1.0])
@pytest.mark.parametrize("cls", list(SHAPES), ids=lambda c: c.__name__)
def test_noised_gradient_equals_opacus_hooks_mode(
    cls: type[nn.Module], sigma: float, batch: int, mode: str
) -> None:
    torch.manual_seed(4)
    model = cls()
    x = torch.randn(batch, *SHAPES[cls])
    y = torch.randint(0, 10, (batch,))
    c = float(sample_norms(model, x, y).median()) if batch else 1.0
    if batch == 1:
        c /= 2  # the single sample is clipped
    expected = opacus_step(model, "hooks", x, y, c, sigma)
    got = opacus_step(model, mode, x, y, c, sigma)
    if batch == 0 and sigma == 0:  # nothing to clip, no noise: a zero step
        assert not expected.any() and not got.any()
    else:
        assert float((got - expected).norm() / expected.norm()) < 1e-5


# --- errors, and the training loop ----------------------------------------------------


def test_refuses_what_it_cannot_clip_correctly() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

    with pytest.raises(NotImplementedError, match="shared by Linear and Linear"):
        GradSampleModuleBookKeeping(Tied(), max_grad_norm=1.0)

    inplace = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    gsm = GradSampleModuleBookKeeping(inplace, max_grad_norm=1.0)
    loss = DPLossBookKeeping(gsm, nn.CrossEntropyLoss())(
        gsm(torch.randn(3, 4)), torch.zeros(3, dtype=torch.long)
    )
    with pytest.raises(NotImplementedError, match="modified in place"):
        loss.backward()

    gsm = GradSampleModuleBookKeeping(DigitsMLP(), max_grad_norm=1.0)
    gsm(torch.randn(2, 64))
    with pytest.raises(RuntimeError, match="second forward pass"):
        gsm(torch.randn(2, 64))
    with pytest.raises(ValueError, match="max_grad_norm"):
        GradSampleModuleBookKeeping(DigitsMLP(), max_grad_norm=0.0)


def test_training_reports_the_same_privacy_and_leaves_the_model_clean() -> None:
    rng = torch.Generator().manual_seed(5)
    data = ArrayDataset(
        torch.randn(40, 1, 28, 28, generator=rng).numpy(),
        torch.randint(0, 10, (40,), generator=rng).numpy(),
    )
    results, params = {}, {}
    for mode in ("hooks", "bookkeeping"):
        torch.manual_seed(6)
        model = MnistCNN()
        results[mode] = train_local_dp(
            model,
            data,
            lr=0.1,
            momentum=0.9,
            steps=6,
            batch_size=4,  # q = 0.1: some Poisson batches are empty
            noise_multiplier=1.0,
            max_grad_norm=0.5,
            grad_sample_mode=mode,
            seed=9,
        )
        params[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert all(not m._forward_hooks for m in model.modules())
        assert all(p.grad is None for p in model.parameters())
    hooks, bk = results["hooks"], results["bookkeeping"]
    history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in (hooks, bk)]
    assert history[0] == history[1] and hooks.empty_batches == bk.empty_batches
    assert epsilon_of([history[1]], 1e-5) == epsilon_of([history[0]], 1e-5) > 0
    # same batches, same noise: the same model after 6 steps with momentum
    assert float((params["bookkeeping"] - params["hooks"]).norm() / params["hooks"].norm()) < 1e-5
