"""Padding a token grid to a multiple of a size, and the mask that undoes it."""

import torch
import torch.nn.functional as F

from .fused import sizes_are_symbolic

# Value written into padded grid positions before windowed attention. Every consumer masks
# those positions out, so this value must never reach a real position's output; the tests
# change it to prove that.
PAD_FILL_VALUE = 0.0


def grid_padding(height: int, width: int, multiple: int) -> tuple[int, int]:
    """Rows and columns to add at the bottom and right so both sides divide ``multiple``.

    Written as whole multiples minus the side, not ``-side % multiple``: with symbolic sizes the
    padded side is then visibly a multiple when it is split into windows. With the ``%`` form
    the dynamic-size tests of export and compile ran past 15 minutes (measured).
    """
    return (
        (height + multiple - 1) // multiple * multiple - height,
        (width + multiple - 1) // multiple * multiple - width,
    )


def padding_needed(padding: tuple[int, int]) -> bool:
    """Whether to pad a grid, and so to mask: when it needs padding, and always while sizes are
    symbols (``sizes_are_symbolic``); the padded and masked path is exact without padding too."""
    return sizes_are_symbolic() or padding != (0, 0)


def pad_grid(x: torch.Tensor, padding: tuple[int, int], value: float | None = None) -> torch.Tensor:
    """Pad a channels-last grid at the bottom and right.

    Args:
        x: (B, H, W, C) grid.
        padding: (pad_h, pad_w) from :func:`grid_padding`.
        value: fill for the new positions; ``PAD_FILL_VALUE`` when None.

    Returns:
        (B, H + pad_h, W + pad_w, C) grid. Undo with :func:`crop_grid`.
    """
    if not padding_needed(padding):
        return x
    pad_h, pad_w = padding
    fill = PAD_FILL_VALUE if value is None else value
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h), value=fill)  # B, H + pad_h, W + pad_w, C


def valid_mask(
    height: int, width: int, padding: tuple[int, int], device: torch.device | None = None
) -> torch.Tensor:
    """(H + pad_h, W + pad_w) bool grid, True at real positions, False at padding."""
    pad_h, pad_w = padding
    rows = torch.arange(height + pad_h, device=device) < height  # H + pad_h
    cols = torch.arange(width + pad_w, device=device) < width  # W + pad_w
    return rows[:, None] & cols[None, :]


def crop_grid(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, Hp, Wp, ...) padded grid -> (B, H, W, ...) at its real positions.

    A view, except while sizes are symbols: slicing then tests the new sizes against the old
    (a branch that would tie the graph to the example's padding), so the rows and columns are
    gathered by index instead, into a contiguous copy.
    """
    if sizes_are_symbolic():
        rows = torch.arange(height, device=x.device)
        cols = torch.arange(width, device=x.device)
        return x.index_select(1, rows).index_select(2, cols)
    return x[:, :height, :width]
