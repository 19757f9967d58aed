"""Feed-forward layer with a depthwise 3x3 convolution between its two linears."""

import torch
from torch import nn


class DepthwiseConvMlp(nn.Module):
    """``fc2(GELU(h + dwconv3x3(h)))`` with ``h = fc1(x)`` (SPEC "Layout", MLP)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        drop: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(in_features, hidden_features, **dd)
        self.dwconv = nn.Conv2d(
            hidden_features, hidden_features, 3, padding=1, groups=hidden_features, **dd
        )
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, C) tokens of an (H, W) grid -> (B, N, C)."""
        B, N, _ = x.shape
        H, W = grid
        h = self.fc1(x)  # B, N, Ch
        spatial = h.transpose(1, 2).reshape(B, -1, H, W)  # B, Ch, H, W
        h = h + self.dwconv(spatial).flatten(2).transpose(1, 2)  # B, N, Ch
        h = self.drop1(self.act(h))
        return self.drop2(self.fc2(h))
