"""Convolutions over the token grid, and the locally-enhanced term every attention adds."""

import torch
import torch.nn.functional as F
from torch import nn

from .fused import conv2d_gelu


def grid_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) tokens of an (H, W) grid as a (B, C, H, W) map: a channels-last view
    wherever the N axis splits into (H, W) without a copy (contiguous tokens, a channel slice).

    The batch axis keeps its stride N * C also for a batch of one, where
    ``transpose(1, 2).reshape`` would give it a stride of C: convolutions then do not recognise
    the layout as channels-last and copy the map to NCHW first (2.7 ms for a first-stage MLP map
    of one 224 px image, and a slower kernel after it).
    """
    B, _, C = tokens.shape
    return tokens.reshape(B, *grid, C).permute(0, 3, 1, 2)  # B, C, H, W


def conv_on_grid(
    tokens: torch.Tensor,
    grid: tuple[int, int],
    conv: nn.Conv2d,
    weight: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """Run ``conv`` (and with ``gelu`` a GELU after it) on tokens laid out as their (H, W)
    grid.

    Contiguous (B, N, C) tokens are already a channels-last (B, C, H, W) map, so no copy is
    made on the way in or out; a strided input (a slice of a wider product) is compacted first,
    as the convolution kernels are much slower on gapped memory.

    Args:
        tokens: (B, N, C), N = H * W.
        weight: used in place of ``conv.weight`` (same shape) when given.

    Returns:
        (B, N, C_out), contiguous.
    """
    spatial = grid_map(tokens.contiguous(), grid)  # B, C, H, W
    if gelu:
        out = conv2d_gelu(spatial, conv.weight if weight is None else weight, conv)
    elif weight is None:
        out = conv(spatial)  # B, C_out, H, W
    else:
        out = F.conv2d(
            spatial, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups
        )
    return out.flatten(2).transpose(1, 2)  # B, N, C_out
