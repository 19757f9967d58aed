"""Non-overlapping square windows over a channels-last grid."""

import torch


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """Split a grid into windows.

    Args:
        x: (B, H, W, C) with H and W multiples of ``window``.

    Returns:
        (B * nW, window * window, C), windows in row-major order, tokens row-major inside.
    """
    B, H, W, C = x.shape
    assert H % window == 0 and W % window == 0, f"grid {H}x{W} not a multiple of {window}"
    x = x.view(B, H // window, window, W // window, window, C)  # B, nH, w, nW, w, C
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)  # B*nW, w*w, C


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, window * window, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, C)  # B,nH,nW,w,w,C
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, C)  # B, H, W, C
