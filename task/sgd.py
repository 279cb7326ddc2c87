"""Mini-batch SGD with momentum and weight decay, without ``torch.optim``.

Why by hand: constructing any ``torch.optim`` optimizer imports ``torch._dynamo``
(measured 1.7 s here), and Flower starts a fresh ClientApp process for every
message, so every client paid that on every round for a few microseconds of
arithmetic. This is the exact update rule of ``torch.optim.SGD`` with
``dampening=0`` and ``nesterov=False`` (Sutskever et al., 2013, momentum form
used by PyTorch), and ``tests/unit/test_sgd.py`` checks it bit-for-bit against
``torch.optim.SGD``. DP-SGD keeps using Opacus' optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class PlainSGD:
    """SGD step: ``v <- momentum * v + (g + weight_decay * p)``; ``p <- p - lr * v``.

    On the first step ``v`` starts as the decayed gradient itself, as in PyTorch.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"PlainSGD: lr must be > 0 and momentum, weight_decay >= 0; "
                f"got lr={lr}, momentum={momentum}, weight_decay={weight_decay}"
            )
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self._buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        """Drop the gradients (like ``set_to_none=True``)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """Apply one update to every parameter that has a gradient."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = p.grad
            if self.weight_decay:
                grad = grad.add(p, alpha=self.weight_decay)
            if self.momentum:
                buf = self._buffers[i]
                if buf is None:
                    buf = self._buffers[i] = torch.clone(grad).detach()
                else:
                    buf.mul_(self.momentum).add_(grad)
                grad = buf
            p.add_(grad, alpha=-self.lr)
