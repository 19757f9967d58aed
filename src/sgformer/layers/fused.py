"""Fast forms of common operations: dropout only where it drops, in-place sums and GELU, and
when the traced forms (``sizes_are_symbolic``) apply."""

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
