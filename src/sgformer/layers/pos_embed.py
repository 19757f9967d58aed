"""2-D sine-cosine position table (MAE layout; timm's helper orders channels differently), and
its resampling to other grids."""

import torch
import torch.nn.functional as F

SINCOS_TEMPERATURE = 10000.0


def sincos_2d_table(
    height: int,
    width: int,
    dim: int,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(height * width, dim) MAE-style table: first half of channels encode the column,
    second half the row; each half is [sin, cos] over dim / 4 frequencies (docs/design.md,
    "Layout")."""
    if dim % 4 != 0:
        raise ValueError(f"sine-cosine position table needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float64, device=device) / quarter
    omega = 1.0 / SINCOS_TEMPERATURE**omega  # quarter
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=device),
        torch.arange(width, dtype=torch.float64, device=device),
        indexing="ij",
    )  # H, W each

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # N, quarter
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # N, dim / 2

    return torch.cat([encode(cols), encode(rows)], dim=1).to(dtype or torch.float32)  # N, dim


def resample_position_table(
    table: torch.Tensor, grid: tuple[int, int], table_grid: tuple[int, int]
) -> torch.Tensor:
    """Bicubic resampling (antialiased when shrinking) of a position table to another grid.

    timm's ``resample_abs_pos_embed`` computes the same values, but first tests whether the
    grids are equal, which would tie a traced graph to one input size; resampling onto the
    table's own grid returns it unchanged.

    Args:
        table: (1, Ht * Wt, C) on ``table_grid``.

    Returns:
        (1, H * W, C) on ``grid``, in ``table``'s dtype.
    """
    C = table.shape[-1]
    spatial = table.reshape(1, *table_grid, C).permute(0, 3, 1, 2).float()  # 1, C, Ht, Wt
    spatial = F.interpolate(spatial, size=grid, mode="bicubic", antialias=True)  # 1, C, H, W
    return spatial.permute(0, 2, 3, 1).reshape(1, -1, C).to(table.dtype)  # 1, H*W, C
