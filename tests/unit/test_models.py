"""Tests for task.models: shapes, sizes, determinism and Opacus DP-SGD compatibility."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from task.models import MODELS, Cifar10CNN, DigitsMLP, MnistCNN, build_model

INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "digits": (64,),
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
# Plausible sizes: small enough for CPU federations and DP-SGD, big enough to learn.
PARAM_RANGES: dict[str, tuple[int, int]] = {
    "digits": (2_000, 50_000),
    "mnist": (100_000, 400_000),
    "fashion-mnist": (100_000, 400_000),
    "cifar10": (50_000, 1_000_000),
}
DATASETS = sorted(MODELS)

# Opacus' hooks-mode grad sampler uses full backward hooks; PyTorch warns when the
# model inputs do not require grad, which is the normal case for training data.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def batch(dataset: str, n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *INPUT_SHAPES[dataset]), generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return x, y


def test_registry_maps_datasets_to_models() -> None:
    assert set(MODELS) == set(INPUT_SHAPES)
    assert MODELS["digits"] is DigitsMLP
    assert MODELS["mnist"] is MnistCNN
    assert MODELS["fashion-mnist"] is MnistCNN
    assert MODELS["cifar10"] is Cifar10CNN
    for name, cls in MODELS.items():
        assert type(build_model(name)) is cls


@pytest.mark.parametrize("dataset", DATASETS)
def test_output_shape_is_batch_by_ten_logits(dataset: str) -> None:
    model = build_model(dataset).eval()
    for n in (1, 5):
        x, _ = batch(dataset, n)
        out = model(x)
        assert out.shape == (n, 10)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("dataset", DATASETS)
def test_outputs_are_per_sample(dataset: str) -> None:
    # No cross-sample coupling (e.g. BatchNorm): a sample's logits do not depend
    # on the rest of the batch -- the premise of per-sample DP-SGD clipping.
    # Training mode, where BatchNorm would mix the samples of a batch.
    model = build_model(dataset).train()
    x, _ = batch(dataset, 6)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dataset", DATASETS)
def test_parameter_count_matches_docstring_and_is_plausible(dataset: str) -> None:
    cls = MODELS[dataset]
    count = num_params(cls())
    low, high = PARAM_RANGES[dataset]
    assert low <= count <= high
    stated = re.findall(r"([\d,]+) parameters", cls.__doc__ or "")
    assert stated, f"{cls.__name__} docstring must state its parameter count"
    assert int(stated[-1].replace(",", "")) == count


@pytest.mark.parametrize("dataset", DATASETS)
def test_opacus_validator_accepts_model(dataset: str) -> None:
    assert ModuleValidator.validate(build_model(dataset), strict=False) == []


@pytest.mark.parametrize("dataset", DATASETS)
def test_init_is_deterministic_under_manual_seed(dataset: str) -> None:
    torch.manual_seed(123)
    a = build_model(dataset).state_dict()
    torch.manual_seed(123)
    b = build_model(dataset).state_dict()
    torch.manual_seed(124)
    c = build_model(dataset).state_dict()
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_unknown_dataset_raises_listing_allowed_names() -> None:
    with pytest.raises(ValueError, match=r"dataset='svhn'.*'digits'.*'fashion-mnist'.*'cifar10'"):
        build_model("svhn")


def _make_private(
    model: nn.Module, dataset: str, n: int, *, noise: float, clip: float, lr: float
) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    x, y = batch(dataset, n, seed=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=n)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure-RNG and similar advisory warnings
        private, dp_optimizer, dp_loader = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise,
            max_grad_norm=clip,
            poisson_sampling=False,  # a fixed batch, so the step can be checked exactly
        )
    xb, yb = next(iter(dp_loader))
    return private, dp_optimizer, xb, yb


@pytest.mark.parametrize("dataset", DATASETS)
def test_one_dp_sgd_step_has_exact_per_sample_grads(dataset: str) -> None:
    n, lr = 4, 0.1
    torch.manual_seed(0)
    model = build_model(dataset)
    reference = copy.deepcopy(model)
    # No noise and a clipping bound far above every gradient norm: DP-SGD must then
    # take exactly the non-private SGD step on the batch mean (Abadi et al., 2016).
    private, optimizer, xb, yb = _make_private(model, dataset, n, noise=0.0, clip=1e6, lr=lr)
    before = [p.detach().clone() for p in private.parameters()]

    optimizer.zero_grad()
    nn.functional.cross_entropy(private(xb), yb).backward()

    ref_params = list(reference.parameters())
    per_sample = []
    for i in range(n):
        reference.zero_grad()
        nn.functional.cross_entropy(reference(xb[i : i + 1]), yb[i : i + 1]).backward()
        per_sample.append([p.grad.detach().clone() for p in ref_params])

    params = list(private.parameters())
    assert len(params) == len(ref_params)
    for j, p in enumerate(params):
        assert p.grad_sample is not None
        assert p.grad_sample.shape == (n, *p.shape)
        expected = torch.stack([g[j] for g in per_sample])
        torch.testing.assert_close(p.grad_sample, expected, rtol=1e-4, atol=1e-5)

    optimizer.step()
    for j, (p, p0) in enumerate(zip(params, before, strict=True)):
        mean_grad = torch.stack([g[j] for g in per_sample]).mean(0)
        torch.testing.assert_close(p.detach(), p0 - lr * mean_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dataset", DATASETS)
def test_one_dp_sgd_step_clips_and_adds_noise(dataset: str) -> None:
    n, lr, clip = 4, 1.0, 1e-3
    torch.manual_seed(0)
    model = build_model(dataset)
    private, optimizer, xb, yb = _make_private(model, dataset, n, noise=0.0, clip=clip, lr=lr)
    before = torch.cat([p.detach().flatten().clone() for p in private.parameters()])
    optimizer.zero_grad()
    nn.functional.cross_entropy(private(xb), yb).backward()
    optimizer.step()
    after = torch.cat([p.detach().flatten() for p in private.parameters()])
    step = torch.linalg.vector_norm(after - before)
    # Every per-sample gradient is clipped to norm <= clip, so is their mean.
    assert 0 < step <= lr * clip * (1 + 1e-4)

    torch.manual_seed(0)
    model = build_model(dataset)
    private, optimizer, xb, yb = _make_private(model, dataset, n, noise=1.0, clip=clip, lr=lr)
    optimizer.zero_grad()
    nn.functional.cross_entropy(private(xb), yb).backward()
    optimizer.step()
    noisy = torch.cat([p.detach().flatten() for p in private.parameters()])
    # Gaussian noise of std clip/n per coordinate dwarfs the clipped signal.
    assert torch.linalg.vector_norm(noisy - before) > 10 * lr * clip
