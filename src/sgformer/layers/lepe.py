"""Locally-enhanced positional term that every SG-Former attention adds before its projection."""

import torch
from torch import nn


def locally_enhanced(
    x: torch.Tensor, grid: tuple[int, int], linear: nn.Linear, conv: nn.Conv2d
) -> torch.Tensor:
    """``conv(linear(x))`` on the token grid (SPEC "Attention": lepe).

    Args:
        x: (B, N, C) tokens of an (H, W) grid, N = H * W.
        linear: C -> C.
        conv: depthwise 3x3, padding 1.

    Returns:
        (B, N, C).
    """
    B, N, C = x.shape
    spatial = linear(x).transpose(1, 2).reshape(B, C, *grid)  # B, C, H, W
    return conv(spatial).flatten(2).transpose(1, 2)  # B, N, C
