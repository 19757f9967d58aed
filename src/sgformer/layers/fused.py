"""Fast forms of common operations: stacked linears, products of a block's input, in-place sums
and GELU, and when the training forms (``autograd_on_cpu``), the reduced-precision forms
(``autocast_on_cpu``) and the traced forms (``sizes_are_symbolic``) apply."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def stacked_linear(x: torch.Tensor, layers: list[nn.Linear]) -> torch.Tensor:
    """``torch.cat([layer(x) for layer in layers], -1)`` with one matrix product.

    The weights are stacked at call time (a copy of a few weight matrices, small next to the
    product), so state_dict names stay per layer and gradients reach each layer's own weight.
    Every output column is the same dot product its own layer computes; a missing bias is a
    zero one.

    Args:
        x: (..., C_in).

    Returns:
        (..., sum C_out_i); slice it with ``split`` (strided views, no copies).
    """
    if len(layers) == 1:
        return F.linear(x, layers[0].weight, layers[0].bias)
    weight = torch.cat([layer.weight for layer in layers])  # sum C_out_i, C_in
    biases = [
        layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
        for layer in layers
    ]
    return F.linear(x, weight, torch.cat(biases))  # ..., sum C_out_i


def input_products(
    x: torch.Tensor, groups: Sequence[Sequence[nn.Linear]]
) -> list[torch.Tensor | None]:
    """``[stacked_linear(x, group) for group in groups]``, None for an empty group.

    In inference all groups share one matrix product whose output is split into strided views.
    Under autograd each group has its own product: the gradient of a split product is first
    assembled by a copy (a ``cat`` of its parts' gradients), which made sgformer_s's training
    step 1.6-2.6 % slower (batch 8, 224 px, both forms alternating in one process).

    Args:
        x: (..., C_in).

    Returns:
        Per group (..., sum of its C_out).
    """
    if torch.is_grad_enabled():
        return [stacked_linear(x, list(group)) if group else None for group in groups]
    widths = [sum(layer.out_features for layer in group) for group in groups]
    parts = stacked_linear(x, [layer for group in groups for layer in group]).split(widths, -1)
    return [part if group else None for part, group in zip(parts, groups, strict=True)]


def sizes_are_symbolic() -> bool:
    """Whether torch.compile or torch.export is tracing the model.

    Sizes may then be symbols: a Python branch on one (is there padding, does the last run of
    merged tokens fall short) would tie the graph to the sizes that take the same branches, so
    layers take branch-free forms. Those compute the same values (padding by zero rows, a mask
    that keeps everything, a short run as a full one with zero weights) and may round
    differently in the last bits, as any compiled kernel may.
    """
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def autograd_on_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` is a CPU tensor in an eager computation autograd records (training).

    Some layers then take forms that are faster forward and backward on the CPU but round
    differently. Inference keeps the published forms: its outputs are compared with the
    published ones, and the significance sort turns a last-bit change into another order of
    nearly tied tokens. Traced graphs keep them too: the compiler picks its own kernels, and
    one of those forms depends on the image size.
    """
    return torch.is_grad_enabled() and x.device.type == "cpu" and not sizes_are_symbolic()


def autocast_on_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` is a CPU tensor in an eager computation under CPU autocast (bfloat16 or
    float16).

    The outputs then round at that precision (bfloat16 keeps 8 bits: about 0.5 % of the
    logits of the reference run), far above the last-bit differences of the faster forms that
    training uses, so inference may take them too where they were measured faster.
    """
    return torch.is_autocast_enabled("cpu") and x.device.type == "cpu" and not sizes_are_symbolic()


def add_into(buffer: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``buffer + value``, written into ``buffer`` when autograd is not recording.

    In inference the sum then needs no new buffer. Under autograd it is computed out of place:
    an in-place update of a view (a linear's 3-D output and a channels-last convolution's token
    view are views) makes the backward pass copy the whole gradient of the view's base.
    """
    if torch.is_grad_enabled():
        return buffer + value
    return buffer.add_(value)


class GELU(nn.GELU):
    """``nn.GELU`` (erf form) that overwrites its input when autograd is not recording.

    Its inputs here are fresh buffers nothing else reads (a norm's or a convolution's output),
    so in inference the activation needs no buffer of its own. The in-place kernel is the
    same vectorised erf GELU, so the values are bit-identical.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        return torch.ops.aten.gelu_(x)
