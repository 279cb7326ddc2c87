"""One-pass DP-SGD clipping ("book-keeping") as an Opacus grad-sample module.

DP-SGD needs ``sum_i c_i grad_i`` with ``c_i = min(1, C / ||grad_i||)`` (Abadi et al.,
2016, Algorithm 1). Opacus' fastest mode, ghost clipping, gets the norms in a first
backward pass and the clipped sum in a second one, the backward of
``sum_i c_i loss_i`` (Lee & Kifer, 2021; Li et al., 2022). Book-keeping (Bu, Wang, Zha
& Karypis, 2023, "Differentially private optimization on large model at small cost",
Algorithm 1) needs one: the backward pass computes only the gradients with respect to
each layer's output (``torch.autograd.grad`` with respect to the layer outputs, so
autograd skips every weight gradient), the per-sample norms come from each layer's
input and output gradient (:mod:`task.ghost_norms`: the ghost form or the per-sample
gradient, whichever is cheaper for the layer's shape), and the clipped sum is then one
matrix product per layer, ``sum_i c_i G_i A_i^T``, or, where the per-sample gradients
were formed for the norm anyway, their weighted sum.

Everything else stays Opacus': :class:`GradSampleModuleBookKeeping` plays the role of
``GradSampleModuleFastGradientClipping`` (it leaves ``p.grad = sum_i c_i grad_i``, as
ghost clipping's second backward does), so ``DPOptimizerFastGradientClipping`` adds
the noise ``N(0, (sigma C)^2)`` and divides by the expected batch size, the
``DPDataLoader`` draws the Poisson batches, and the RDP accountant sees the same
(sigma, q, steps). Layers other than ``Linear`` and ``Conv2d`` (``GroupNorm``,
``LayerNorm``, ``Embedding``, grouped or non-zero-padded convolutions, ...) get their
per-sample gradients from Opacus' registered grad samplers, or from its functorch
fallback for layer types it does not know; those are small (one value per channel)
for the normalisation layers of Bastion's models.

Why this is written here and not taken from a library: Opacus 1.6 has no one-pass mode
and no ``Conv2d`` ghost norm; the reference implementation of book-keeping
(``fastDP``, Bu et al.) is not on PyPI and patches layers' backward functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from task.ghost_norms import (
    conv2d_ghost_sq_norms,
    conv_bias_grad_samples,
    conv_clipped_weight_sum,
    conv_form,
    conv_grad_samples,
    linear_factors,
)

#: Opacus' stability term in ``C / (norm + 1e-6)`` (``DPOptimizer`` and ghost clipping)
CLIP_EPS = 1e-6


def clip_coefficients(sq_norms: Tensor, max_grad_norm: float) -> Tensor:
    """``min(1, C / (||grad_i|| + 1e-6))`` per sample, as Opacus computes it."""
    return (max_grad_norm / (sq_norms.sqrt() + CLIP_EPS)).clamp(max=1.0)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# a parameter whose clipped sum is computed once the coefficients are known
Deferred = tuple[nn.Parameter, Callable[[Tensor], Tensor]]


def _contribution(
    module: nn.Module,
    activation: Tensor,
    backprop: Tensor,
    grad_samplers: dict[type, Callable[..., dict[nn.Parameter, Tensor]]],
    *,
    alone: bool,
) -> tuple[Tensor | None, Deferred | None, dict[nn.Parameter, Tensor]]:
    """One layer call's share of a step, in the cheaper form for its shape
    (:func:`task.ghost_norms.choose_form`).

    Returns, for a weight in the ghost form (or a ``Linear`` on vectors), its squared
    per-sample norms ``(B,)`` and the function that gives its clipped sum from the
    clipping coefficients; and the per-sample gradients ``{p: (B, *p.shape)}`` of the
    layer's other trainable parameters. ``alone``: the layer runs once in the step
    (a layer called twice needs the per-sample gradients of both calls summed before
    the norm, so it always takes the direct form).
    """
    b = activation.shape[0]
    kind = type(module)
    if kind is not nn.Linear and kind not in _CONVS:
        sampler = grad_samplers.get(kind)
        if sampler is None:
            from opacus.grad_sample.functorch import ft_compute_per_sample_gradient

            sampler = ft_compute_per_sample_gradient
        grads = sampler(module, [activation], backprop)
        return None, None, {p: gs for p, gs in grads.items() if p.requires_grad}
    weight, bias = module.weight, module.bias  # type: ignore[union-attr]
    samples: dict[nn.Parameter, Tensor] = {}
    if bias is not None and bias.requires_grad:
        convolution = kind in _CONVS
        samples[bias] = conv_bias_grad_samples(backprop) if convolution else _linear_bias(backprop)
    if not weight.requires_grad:
        return None, None, samples
    if kind is nn.Linear:
        factors = linear_factors(module, activation, backprop)  # type: ignore[arg-type]
        if alone and (factors.a.shape[2] == 1 or factors.form == "ghost"):
            return factors.weight_sq_norms(), (weight, factors.weight_clipped_sum), samples
        samples[weight] = factors.weight_grad_samples().view(b, *weight.shape)
        return None, None, samples
    if alone and conv_form(module, backprop.shape) == "ghost":  # type: ignore[arg-type]
        sq_norms = conv2d_ghost_sq_norms(module, activation, backprop)  # type: ignore[arg-type]

        def clipped_sum(coef: Tensor) -> Tensor:
            return conv_clipped_weight_sum(module, activation, backprop, coef)  # type: ignore[arg-type]

        return sq_norms, (weight, clipped_sum), samples
    samples[weight] = conv_grad_samples(module, activation, backprop)  # type: ignore[arg-type]
    return None, None, samples


def _linear_bias(backprop: Tensor) -> Tensor:
    """Per-sample bias gradients ``(B, C)`` of a ``Linear`` layer (summed over positions)."""
    return backprop.reshape(backprop.shape[0], -1, backprop.shape[-1]).sum(1)


@dataclass
class _LayerStep:
    """One layer's share of a step: per-sample gradients and deferred clipped sums."""

    samples: dict[nn.Parameter, Tensor] = field(default_factory=dict)
    deferred: list[Deferred] = field(default_factory=list)


class GradSampleModuleBookKeeping(nn.Module):
    """Wraps a model so that one backward pass leaves the clipped per-sample gradient
    sum ``sum_i min(1, C / ||grad_i||) grad_i`` in every trainable ``p.grad``.

    Use it as Opacus uses ``GradSampleModuleFastGradientClipping``, with
    :class:`DPLossBookKeeping` as the criterion and ``DPOptimizerFastGradientClipping``
    as the optimizer (``task.training.train_local_dp`` with
    ``grad_sample_mode="bookkeeping"``). One forward pass per backward pass, batch
    first; a parameter shared by two modules is refused (its per-sample gradient would
    be the sum over both, which the per-module factors do not give).
    """

    def __init__(
        self, module: nn.Module, *, max_grad_norm: float, batch_first: bool = True
    ) -> None:
        import opacus.grad_sample  # noqa: F401  (registers Opacus' grad samplers)
        from opacus.grad_sample.functorch import prepare_layer
        from opacus.grad_sample.grad_sample_module import GradSampleModule
        from opacus.utils.module_utils import trainable_modules

        super().__init__()
        if not batch_first:
            raise ValueError("GradSampleModuleBookKeeping: batch_first=False is not supported")
        if max_grad_norm <= 0:
            raise ValueError(
                f"GradSampleModuleBookKeeping: max_grad_norm must be > 0; got {max_grad_norm}"
            )
        self._module = module
        self.max_grad_norm = float(max_grad_norm)
        self._grad_samplers: dict[type, Callable[..., dict[nn.Parameter, Tensor]]] = dict(
            GradSampleModule.GRAD_SAMPLERS
        )
        self._layers = [m for _, m in trainable_modules(module)]
        owner: dict[int, nn.Module] = {}
        for layer in self._layers:
            for p in layer.parameters(recurse=False):
                if id(p) in owner:
                    raise NotImplementedError(
                        f"bookkeeping: a parameter of shape {tuple(p.shape)} is shared by "
                        f"{type(owner[id(p)]).__name__} and {type(layer).__name__}; use "
                        "dp-grad-sample-mode 'hooks' for models with tied parameters"
                    )
                owner[id(p)] = layer
            if type(layer) not in self._grad_samplers and not _factors_type(layer):
                prepare_layer(layer, batch_first=True)  # functorch fallback
        self._params = [
            p for layer in self._layers for p in layer.parameters(recurse=False) if p.requires_grad
        ]
        self._calls: list[tuple[nn.Module, Tensor, Tensor, int]] = []
        self._handles = [layer.register_forward_hook(self._capture) for layer in self._layers]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward pass; records each layer's input and output."""
        if self._calls:
            self._calls.clear()
            raise RuntimeError(
                "bookkeeping: a second forward pass before the backward pass of the first; "
                "run one forward and one backward per step"
            )
        return self._module(*args, **kwargs)

    def _capture(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if not isinstance(output, Tensor) or not inputs or not isinstance(inputs[0], Tensor):
            raise NotImplementedError(
                f"bookkeeping: {type(module).__name__} takes or returns something other than "
                "one tensor; use dp-grad-sample-mode 'hooks'"
            )
        self._calls.append((module, inputs[0].detach(), output, output._version))

    def clipped_backward(self, loss_per_sample: Tensor) -> None:
        """Set ``p.grad`` (added to an existing one) to ``sum_i c_i grad_i`` for the
        per-sample losses ``loss_per_sample`` ``(B,)`` of the last forward pass."""
        calls, self._calls = self._calls, []
        batch = loss_per_sample.shape[0]
        if batch == 0 or not calls:
            for p in self._params:
                _add_grad(p, torch.zeros_like(p))
            return
        for module, _, out, version in calls:
            if out._version != version:
                # autograd would give the gradient of the tensor as modified in place
                # (e.g. by ReLU(inplace=True)), not of the layer's output
                raise NotImplementedError(
                    f"bookkeeping: the output of {type(module).__name__} was modified in "
                    "place after the layer; use out-of-place ops (nn.ReLU() without "
                    "inplace=True) or dp-grad-sample-mode 'hooks'"
                )
        outputs = [out for _, _, out, _ in calls]
        backprops = torch.autograd.grad(loss_per_sample.sum(), outputs, allow_unused=True)
        steps: dict[nn.Module, _LayerStep] = {}
        counts: dict[nn.Module, int] = {}
        for module, *_ in calls:
            counts[module] = counts.get(module, 0) + 1
        sq_norms = loss_per_sample.new_zeros(batch, dtype=torch.float32)
        for (module, activation, out, _), backprop in zip(calls, backprops, strict=True):
            if backprop is None:
                backprop = torch.zeros_like(out)
            step = steps.setdefault(module, _LayerStep())
            norms, deferred, samples = _contribution(
                module, activation, backprop, self._grad_samplers, alone=counts[module] == 1
            )
            if norms is not None and deferred is not None:
                sq_norms += norms
                step.deferred.append(deferred)
            for p, gs in samples.items():
                step.samples[p] = step.samples[p] + gs if p in step.samples else gs
        for step in steps.values():
            for gs in step.samples.values():
                sq_norms += torch.linalg.vector_norm(gs.reshape(batch, -1), dim=1).square()
        coef = clip_coefficients(sq_norms, self.max_grad_norm).to(loss_per_sample.dtype)
        touched: set[int] = set()
        for step in steps.values():
            for p, clipped_sum in step.deferred:
                _add_grad(p, clipped_sum(coef).view_as(p))
                touched.add(id(p))
            for p, gs in step.samples.items():
                _add_grad(p, (coef.to(gs.dtype) @ gs.reshape(batch, -1)).view_as(p))
                touched.add(id(p))
        for p in self._params:  # a layer that the loss did not reach
            if id(p) not in touched:
                _add_grad(p, torch.zeros_like(p))

    def _close(self) -> None:
        """Remove the hooks (Opacus' name for a grad-sample module's teardown)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._calls = []
        for layer in self._layers:
            if hasattr(layer, "ft_compute_sample_grad"):
                del layer.ft_compute_sample_grad


def _factors_type(module: nn.Module) -> bool:
    """Whether :mod:`task.ghost_norms` handles ``module`` (a ``Linear`` or a convolution)."""
    return type(module) is nn.Linear or type(module) in _CONVS


def _add_grad(p: nn.Parameter, grad: Tensor) -> None:
    p.grad = grad if p.grad is None else p.grad + grad


class BookKeepingLoss:
    """The loss of one step: per-sample losses whose ``backward()`` clips in one pass.

    ``detach()`` / ``item()`` give the reduced loss (mean or sum), as Opacus'
    ``DPTensorFastGradientClipping`` does.
    """

    def __init__(
        self, module: GradSampleModuleBookKeeping, loss_per_sample: Tensor, reduction: str
    ) -> None:
        self.module = module
        self.loss_per_sample = loss_per_sample
        self.reduction = reduction

    def detach(self) -> Tensor:
        """The reduced loss, detached."""
        reduced = (
            self.loss_per_sample.mean() if self.reduction == "mean" else self.loss_per_sample.sum()
        )
        return reduced.detach()

    def item(self) -> float:
        """The reduced loss as a float."""
        return float(self.detach())

    def backward(self) -> None:
        """One backward pass; leaves ``sum_i c_i grad_i`` in ``p.grad``."""
        self.module.clipped_backward(self.loss_per_sample)


class DPLossBookKeeping:
    """Wraps a criterion (e.g. ``nn.CrossEntropyLoss()``) for book-keeping, as Opacus'
    ``DPLossFastGradientClipping`` does for ghost clipping: called like the criterion,
    it returns a :class:`BookKeepingLoss`."""

    def __init__(
        self,
        module: GradSampleModuleBookKeeping,
        criterion: nn.Module,
        loss_reduction: str = "mean",
    ) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(
                f"DPLossBookKeeping: loss_reduction={loss_reduction!r}; allowed: 'mean', 'sum'"
            )
        self.module = module
        self.criterion = criterion
        self.loss_reduction = loss_reduction

    def __call__(self, *args: Any, **kwargs: Any) -> BookKeepingLoss:
        """Per-sample losses of ``criterion(*args)`` (its ``reduction`` set to none)."""
        old = getattr(self.criterion, "reduction", "mean")
        self.criterion.reduction = "none"
        try:
            per_sample = self.criterion(*args, **kwargs)
        finally:
            self.criterion.reduction = old
        return BookKeepingLoss(self.module, per_sample, self.loss_reduction)
