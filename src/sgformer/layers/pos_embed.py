"""2-D sine-cosine position table (MAE layout; timm's helper orders channels differently)."""

import torch

SINCOS_TEMPERATURE = 10000.0


def sincos_2d_table(
    height: int,
    width: int,
    dim: int,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(height * width, dim) MAE-style table: first half of channels encode the column,
    second half the row; each half is [sin, cos] over dim / 4 frequencies (SPEC "Layout")."""
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
