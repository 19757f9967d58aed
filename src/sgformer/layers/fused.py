"""Fast forms of common operations: dropout only where it drops, in-place sums and GELU, and
when the training forms (``autograd_on_cpu``), the reduced-precision forms (``autocast_on_cpu``)
and the traced forms (``sizes_are_symbolic``) apply."""

import torch
from torch import nn


def dropout_or_identity(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity`` for p = 0: a dropout of rate 0 still costs a call
    per use (92 of them in an sgformer_s forward), and the published rates are all 0."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


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
