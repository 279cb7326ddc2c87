"""Per-sample gradient norms of linear and convolutional layers without storing
per-sample gradients.

A ``Linear`` or ``Conv2d`` layer's weight gradient for sample i is a product of two
factors the backward pass already has: the layer input, unfolded into positions
(``A_i``, shape ``(D, P)``: D input features per position, P positions: the output
pixels of a convolution, the tokens of a sequence, or 1 for a ``Linear`` layer on
vectors), and the gradient of sample i's loss with respect to the layer output
(``G_i``, shape ``(C, P)``, C output features)::

    grad_i = G_i A_i^T                                      (C x D)
    ||grad_i||_F^2 = <A_i^T A_i, G_i^T G_i>_F               ("ghost norm", two P x P Grams)

(Li, Tramèr, Liang & Hashimoto, 2022, "Large language models can be strong
differentially private learners", Sec. 4; Bu, Wang, Zha & Karypis, 2023,
"Differentially private optimization on large model at small cost", Sec. 3.2.)
:func:`choose_form` picks, per layer, the ghost form or the per-sample gradient
itself ("direct") by Bu et al.'s layer-wise rule. For Bastion's models that is the
ghost form for ``MnistCNN``'s second convolution (8 x 8 positions, 800 x 64 weights)
and every ``Linear`` layer on vectors, and the direct form for the convolutions on
large feature maps (``MnistCNN``'s first, all four of ``Cifar10CNN``'s).

Both forms work on the batch in chunks of about :data:`CHUNK_BYTES` of unfolded
input, so that the im2col copy stays in cache instead of streaming B x D x P floats
through memory (at batch 256 that is 52 MB for ``MnistCNN``'s second convolution,
where Opacus' ``compute_conv_grad_sample`` spends as long copying as multiplying).

Opacus 1.6 registers ghost norms for ``Linear`` and ``Embedding`` only; for
``Conv2d`` its fast-gradient-clipping module materialises every per-sample
gradient in a zero-filled buffer and then takes its norm. :func:`conv2d_norm_sample`
is the missing ``Conv2d`` norm sampler, in Opacus' signature;
:mod:`task.bookkeeping` uses the same functions for one-pass clipping.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

Form = Literal["ghost", "direct"]
Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d

#: about this many bytes of unfolded input per chunk of the batch on a CPU (a few MB,
#: so that it stays in cache; 1-16 MB measured within 10 % of each other, the whole
#: batch at once up to 2x slower at batch 256)
CHUNK_BYTES = 4 << 20
#: on an accelerator, chunks only bound the memory (small chunks would cost launches)
DEVICE_CHUNK_BYTES = 256 << 20


def choose_form(positions: int, in_features: int, out_features: int) -> Form:
    """How to get one layer's per-sample gradient norms: Bu et al.'s (2023, Sec. 3.2)
    layer-wise rule, ghost norm when ``2 P^2 < D C``.

    The ghost form holds two P x P Gram matrices per sample, the direct form the
    D x C per-sample gradient; the rule takes the smaller. With one position (a
    ``Linear`` layer on vectors) the ghost form is ``||a_i||^2 ||g_i||^2``.
    """
    return "ghost" if 2 * positions * positions < in_features * out_features else "direct"


def _chunks(batch: int, bytes_per_sample: int, device: torch.device) -> list[slice]:
    """Consecutive slices of the batch, each holding about :data:`CHUNK_BYTES` (on
    the CPU) or :data:`DEVICE_CHUNK_BYTES` (elsewhere)."""
    limit = CHUNK_BYTES if device.type == "cpu" else DEVICE_CHUNK_BYTES
    step = max(1, limit // max(bytes_per_sample, 1))
    return [slice(i, i + step) for i in range(0, batch, step)]


@dataclass
class LayerFactors:
    """The two factors of a ``Linear`` layer's per-sample weight gradients.

    ``a``: inputs, ``(B, D, P)``; ``g``: output gradients of each sample's own loss,
    ``(B, C, P)``. Sample i's weight gradient is ``g[i] @ a[i].T`` (``(C, D)``) and
    its bias gradient ``g[i].sum(-1)``.
    """

    a: Tensor
    g: Tensor

    @property
    def form(self) -> Form:
        """:func:`choose_form` for this layer's shape."""
        _, d, p = self.a.shape
        return choose_form(p, d, self.g.shape[1])

    def weight_grad_samples(self) -> Tensor:
        """Per-sample weight gradients ``(B, C, D)`` (the direct form)."""
        return torch.bmm(self.g, self.a.transpose(1, 2))

    def weight_sq_norms(self) -> Tensor:
        """``||g[i] @ a[i].T||_F^2`` for every sample, ``(B,)``, in :attr:`form`."""
        if self.a.shape[2] == 1:  # one position: an outer product
            return self.a.square().sum((1, 2)) * self.g.square().sum((1, 2))
        if self.form == "ghost":
            return _gram_inner(self.a, self.g)
        return torch.linalg.vector_norm(self.weight_grad_samples(), dim=(1, 2)).square()

    def weight_clipped_sum(self, coef: Tensor) -> Tensor:
        """``sum_i coef[i] g[i] @ a[i].T`` ``(C, D)``: one matrix product over all
        samples and positions (book-keeping, Bu et al. 2023, Algorithm 1)."""
        b, c, p = self.g.shape
        d = self.a.shape[1]
        weighted = self.g * coef.view(b, 1, 1)
        # (C, B*P) @ (B*P, D)
        return weighted.transpose(0, 1).reshape(c, b * p) @ self.a.transpose(1, 2).reshape(b * p, d)


def _gram_inner(a: Tensor, g: Tensor) -> Tensor:
    """``<a_i^T a_i, g_i^T g_i>_F`` per sample for ``a`` ``(B, D, P)``, ``g`` ``(B, C, P)``."""
    gram_a = torch.bmm(a.transpose(1, 2), a)
    gram_g = torch.bmm(g.transpose(1, 2), g)
    # a Frobenius inner product of two PSD matrices is >= 0; rounding can make it a
    # hair negative
    return (gram_a * gram_g).sum((1, 2)).clamp_(min=0)


def linear_factors(layer: nn.Linear, activation: Tensor, backprop: Tensor) -> LayerFactors:
    """:class:`LayerFactors` of a ``Linear`` layer from its input ``(B, ..., D)`` and
    the per-sample output gradients ``(B, ..., C)`` (every middle dimension is a
    position)."""
    b = activation.shape[0]
    a = activation.reshape(b, -1, activation.shape[-1]).transpose(1, 2)
    g = backprop.reshape(b, -1, backprop.shape[-1]).transpose(1, 2)
    return LayerFactors(a.to(g.dtype), g)


def conv2d_unfoldable(layer: nn.Module) -> bool:
    """Whether ``layer`` is a ``Conv2d`` that Opacus' ``unfold2d`` unfolds exactly:
    one group and zero padding (other convolutions take :func:`conv_grad_samples`'
    grouped-convolution path and the direct form)."""
    return type(layer) is nn.Conv2d and layer.groups == 1 and layer.padding_mode == "zeros"


def conv_form(layer: Conv, output_shape: torch.Size) -> Form:
    """:func:`choose_form` for a convolution with output ``(B, C_out, *spatial)``;
    always ``"direct"`` unless :func:`conv2d_unfoldable`."""
    if not conv2d_unfoldable(layer):
        return "direct"
    positions = math.prod(output_shape[2:])
    in_features = layer.in_channels * math.prod(layer.kernel_size)
    return choose_form(positions, in_features, layer.out_channels)


def _unfold(layer: nn.Conv2d, x: Tensor) -> Tensor:
    """im2col of ``x`` ``(b, C_in, H, W)`` -> ``(b, C_in kh kw, P)``: Opacus' ``unfold2d``
    (which also knows ``padding="same"``), except that an unpadded layer skips its
    ``F.pad`` (a zero-filled copy of the input even when nothing is padded)."""
    from opacus.utils.tensor_utils import unfold2d

    kh, kw = layer.kernel_size
    if layer.padding != (0, 0) and layer.padding != "valid":
        return unfold2d(
            x,
            kernel_size=(kh, kw),
            padding=layer.padding,
            stride=layer.stride,
            dilation=layer.dilation,
        )
    x = x.contiguous()
    b, c, h, w = x.shape
    (sh, sw), (dh, dw) = layer.stride, layer.dilation
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    sb, sc, srow, scol = x.stride()
    windows = x.as_strided(
        (b, c, kh, kw, ho, wo), (sb, sc, srow * dh, scol * dw, srow * sh, scol * sw)
    )
    return windows.reshape(b, c * kh * kw, ho * wo)


def conv2d_ghost_sq_norms(layer: nn.Conv2d, activation: Tensor, backprop: Tensor) -> Tensor:
    """Squared per-sample weight-gradient norms ``(B,)`` of a ``Conv2d`` in the ghost
    form, ``<A_i^T A_i, G_i^T G_i>``, chunk by chunk of the batch."""
    b, c = backprop.shape[:2]
    g = backprop.reshape(b, c, -1)
    x = activation.to(backprop.dtype)
    d = layer.in_channels * math.prod(layer.kernel_size)
    out = backprop.new_empty(b)
    for part in _chunks(b, d * g.shape[2] * g.element_size(), g.device):
        out[part] = _gram_inner(_unfold(layer, x[part]), g[part])
    return out


def conv_grad_samples(layer: Conv, activation: Tensor, backprop: Tensor) -> Tensor:
    """Per-sample weight gradients ``(B, *weight.shape)`` of a convolution.

    An unfoldable ``Conv2d`` (:func:`conv2d_unfoldable`): im2col and a batched matrix
    product, chunk by chunk (Opacus' ``compute_conv_grad_sample``, without its
    full-batch unfold and zero-filled buffer). Any other convolution (``Conv1d``,
    ``Conv3d``, groups, reflect/replicate/circular padding): one grouped convolution
    backward over the whole batch, the B samples stacked along the channels
    (input ``(1, B C_in, ...)``, output gradient ``(1, B C_out, ...)``, ``B * groups``
    groups), which is the weight gradient of every sample at once.
    """
    b, c = backprop.shape[:2]
    weight = layer.weight
    x = activation.to(backprop.dtype)
    if conv2d_unfoldable(layer):
        g = backprop.reshape(b, c, -1)
        d = weight[0].numel()
        out = backprop.new_empty(b, c, d)
        for part in _chunks(b, d * g.shape[2] * g.element_size(), g.device):
            torch.bmm(g[part], _unfold(layer, x[part]).transpose(1, 2), out=out[part])
        return out.view(b, *weight.shape)
    # the weight is only read for its shape (no input gradient is asked for)
    shape_only = weight.new_empty(1).expand(b * weight.shape[0], *weight.shape[1:])
    stacked = _weight_grad(
        layer,
        x.reshape(1, b * x.shape[1], *x.shape[2:]),
        backprop.reshape(1, b * c, *backprop.shape[2:]),
        shape_only,
        b * layer.groups,
    )
    return stacked.view(b, *weight.shape)


def _weight_grad(layer: Conv, x: Tensor, grad_out: Tensor, weight: Tensor, groups: int) -> Tensor:
    """The convolution's own weight-gradient kernel (``aten.convolution_backward``,
    weight only) for input ``x`` and output gradient ``grad_out``, with ``layer``'s
    stride, dilation and padding. Padding modes other than zeros and string paddings
    are applied to ``x`` first, as ``nn.Conv*d`` does before ``F.conv*d`` (asymmetric
    for an even kernel with ``padding="same"``)."""
    dims = x.dim() - 2
    padding: tuple[int, ...] | str = layer.padding
    if layer.padding_mode != "zeros" or isinstance(padding, str):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * dims
    grads = torch.ops.aten.convolution_backward(
        grad_out,
        x,
        weight,
        None,
        layer.stride,
        padding,
        layer.dilation,
        False,
        (0,) * dims,
        groups,
        (False, True, False),
    )
    return grads[1]


def conv_bias_grad_samples(backprop: Tensor) -> Tensor:
    """Per-sample bias gradients ``(B, C_out)`` of a convolution: its output gradient
    ``(B, C_out, *spatial)`` summed over the positions."""
    return backprop.reshape(backprop.shape[0], backprop.shape[1], -1).sum(2)


def conv_clipped_weight_sum(
    layer: Conv, activation: Tensor, backprop: Tensor, coef: Tensor
) -> Tensor:
    """``sum_i coef[i] grad_i`` of a convolution's weight: the convolution's own
    weight-gradient kernel on the output gradients scaled by ``coef`` (book-keeping,
    Bu et al. 2023, Algorithm 1: the cost of the weight gradient of plain SGD)."""
    b = backprop.shape[0]
    scaled = backprop * coef.to(backprop.dtype).view(b, *([1] * (backprop.dim() - 1)))
    x = activation.to(backprop.dtype)
    return _weight_grad(layer, x, scaled, layer.weight.detach(), layer.groups)


def conv2d_norm_sample(
    layer: nn.Conv2d, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Opacus norm sampler for ``Conv2d`` (the signature of
    ``opacus.grad_sample.register_norm_sampler``): per-sample gradient norms ``(B,)``
    of the weight and bias, in the form :func:`conv_form` picks."""
    activation = activations[0]
    b = activation.shape[0]
    out: dict[nn.Parameter, Tensor] = {}
    if layer.weight.requires_grad:
        if conv_form(layer, backprops.shape) == "ghost":
            out[layer.weight] = conv2d_ghost_sq_norms(layer, activation, backprops).sqrt()
        else:
            grads = conv_grad_samples(layer, activation, backprops)
            out[layer.weight] = torch.linalg.vector_norm(grads.view(b, -1), dim=1)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = torch.linalg.vector_norm(conv_bias_grad_samples(backprops), dim=1)
    return out


def ghost_conv_module(model: nn.Module, *, max_grad_norm: float) -> nn.Module:
    """``model`` wrapped in Opacus' ghost-clipping module (two backward passes) with
    :func:`conv2d_norm_sample` registered for ``Conv2d`` on a subclass, so that
    Opacus' own ``ghost`` mode, elsewhere in the process, stays as Opacus ships it."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    class GradSampleModuleGhostConv(GradSampleModuleFastGradientClipping):
        NORM_SAMPLERS: ClassVar[dict[type, Callable[..., dict[nn.Parameter, Tensor]]]] = {
            **GradSampleModuleFastGradientClipping.NORM_SAMPLERS,
            nn.Conv2d: conv2d_norm_sample,
        }

    return GradSampleModuleGhostConv(
        model, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm
    )
