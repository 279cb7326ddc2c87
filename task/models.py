"""Models of the ML task, one per dataset.

All models are plain ``torch.nn`` modules built only from layers that Opacus can
compute per-sample gradients for (``Linear``, ``Conv2d``, ``GroupNorm``; no
``BatchNorm``, whose statistics mix the samples of a batch), so the same model
trains with plain SGD or with DP-SGD (Abadi et al., 2016, "Deep learning with
differential privacy", Algorithm 1). Every model returns unnormalised logits
for 10 classes; the parameter count in each docstring is checked by the tests.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MODELS", "Cifar10CNN", "DigitsMLP", "MnistCNN", "build_model"]


class DigitsMLP(nn.Module):
    """MLP for scikit-learn's 8x8 digits: input ``(N, 64)``, output ``(N, 10)`` logits.

    ``Linear(64, 128) -> ReLU -> Linear(128, 10)``; 9,610 parameters.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch of flattened 8x8 images, shape ``(N, 64)`` (or ``(N, 8, 8)``)."""
        return self.net(x.flatten(1))


class MnistCNN(nn.Module):
    """Small CNN for 28x28 grayscale images (MNIST, Fashion-MNIST).

    Input ``(N, 1, 28, 28)``, output ``(N, 10)`` logits::

        Conv2d(1, 32, 5) -> ReLU -> MaxPool(2)     # 32 x 12 x 12
        Conv2d(32, 64, 5) -> ReLU -> MaxPool(2)    # 64 x 4 x 4
        Linear(1024, 128) -> ReLU -> Linear(128, 10)

    A narrower version of the CNN of McMahan et al. (2017, "Communication-efficient
    learning of deep networks from decentralized data", Sec. 3), with a 128-unit
    instead of a 512-unit hidden layer; 184,586 parameters.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch of images of shape ``(N, 1, 28, 28)``."""
        return self.classifier(self.features(x))


class Cifar10CNN(nn.Module):
    """CNN for CIFAR-10: 4 conv layers + 1 fully connected layer, GroupNorm, ReLU.

    Input ``(N, 3, 32, 32)``, output ``(N, 10)`` logits::

        Conv2d(3, 32, 3, padding=1) -> GroupNorm(8, 32) -> ReLU
        Conv2d(32, 32, 3, padding=1) -> GroupNorm(8, 32) -> ReLU -> MaxPool(2)  # 32 x 16 x 16
        Conv2d(32, 64, 3, padding=1) -> GroupNorm(8, 64) -> ReLU
        Conv2d(64, 64, 3, padding=1) -> GroupNorm(8, 64) -> ReLU -> MaxPool(2)  # 64 x 8 x 8
        Linear(4096, 10)

    GroupNorm (Wu & He, 2018, "Group normalization") replaces BatchNorm so that
    Opacus can compute per-sample gradients; 106,922 parameters.
    """

    def __init__(self, num_classes: int = 10, num_groups: int = 8) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
                nn.GroupNorm(num_groups, c_out),
                nn.ReLU(),
            ]

        self.features = nn.Sequential(
            *block(3, 32),
            *block(32, 32),
            nn.MaxPool2d(2),
            *block(32, 64),
            *block(64, 64),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 8 * 8, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch of images of shape ``(N, 3, 32, 32)``."""
        return self.classifier(self.features(x))


MODELS: dict[str, type[nn.Module]] = {
    "digits": DigitsMLP,
    "fashion-mnist": MnistCNN,
    "mnist": MnistCNN,
    "cifar10": Cifar10CNN,
}


def build_model(dataset: str) -> nn.Module:
    """Return a freshly initialised model for ``dataset`` (a key of :data:`MODELS`).

    The initialisation draws from torch's global RNG, so it is reproducible under
    ``torch.manual_seed``.

    Raises:
        ValueError: ``dataset`` is not a key of :data:`MODELS`.
    """
    try:
        cls = MODELS[dataset]
    except (KeyError, TypeError):
        raise ValueError(
            f"dataset={dataset!r} has no model; allowed: " + ", ".join(repr(k) for k in MODELS)
        ) from None
    return cls()
