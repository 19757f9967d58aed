"""Padding a token grid to a multiple of a size, and the mask that undoes it."""

import torch
import torch.nn.functional as F

# Value written into padded grid positions before windowed attention. Every consumer masks
# those positions out, so this value must never reach a real position's output; the tests
# change it to prove that.
PAD_FILL_VALUE = 0.0


def grid_padding(height: int, width: int, multiple: int) -> tuple[int, int]:
    """Rows and columns to add at the bottom and right so both sides divide ``multiple``."""
    return (-height) % multiple, (-width) % multiple


def padding_needed(padding: tuple[int, int]) -> bool:
    """Whether a grid needs padding, and so a mask; the masked path is exact without it too."""
    return padding != (0, 0)


def pad_grid(x: torch.Tensor, padding: tuple[int, int], value: float | None = None) -> torch.Tensor:
    """Pad a channels-last grid at the bottom and right.

    Args:
        x: (B, H, W, C) grid.
        padding: (pad_h, pad_w) from :func:`grid_padding`.
        value: fill for the new positions; ``PAD_FILL_VALUE`` when None.

    Returns:
        (B, H + pad_h, W + pad_w, C) grid. Crop with ``[:, :H, :W]`` to undo.
    """
    pad_h, pad_w = padding
    if pad_h == 0 and pad_w == 0:
        return x
    fill = PAD_FILL_VALUE if value is None else value
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h), value=fill)  # B, H + pad_h, W + pad_w, C


def valid_mask(
    height: int, width: int, padding: tuple[int, int], device: torch.device | None = None
) -> torch.Tensor:
    """(H + pad_h, W + pad_w) bool grid, True at real positions, False at padding."""
    pad_h, pad_w = padding
    mask = torch.zeros(height + pad_h, width + pad_w, dtype=torch.bool, device=device)
    mask[:height, :width] = True
    return mask
