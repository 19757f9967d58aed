"""Feed-forward layer with a depthwise 3x3 convolution between its two linears."""

import torch
import torch.nn.functional as F
from torch import nn

from .fused import GELU, add_into, autocast_on_cpu, autograd_on_cpu, dropout_or_identity
from .lepe import conv_on_grid


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
        self.act = GELU()
        self.drop1 = dropout_or_identity(drop)
        self.fc2 = nn.Linear(hidden_features, in_features, **dd)
        self.drop2 = dropout_or_identity(drop)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, C) tokens of an (H, W) grid -> (B, N, C)."""
        h = self.fc1(x)  # B, N, Ch
        if autograd_on_cpu(h) or autocast_on_cpu(h):
            # h + dwconv(h) is one depthwise convolution whose centre tap is one larger: no
            # sum forward and no gradient sum backward over the widest tensor of the block
            # (stage-1 MLP of sgformer_s at batch 8, forward and backward: 51 -> 44 ms;
            # bfloat16 inference of sgformer_s at batch 16: 9 % faster). It rounds
            # differently, so float32 inference keeps the published two-step form.
            h = conv_on_grid(h, grid, self.dwconv, weight=self.dwconv.weight + self._identity)
        else:
            # The sum lands in the convolution's output: no further (B, N, Ch) buffer.
            h = add_into(conv_on_grid(h, grid, self.dwconv), h)  # B, N, Ch
        h = self.drop1(self.act(h))
        return self.drop2(self.fc2(h))

    @property
    def _identity(self) -> torch.Tensor:
        """(Ch, 1, 3, 3) depthwise kernel that copies its input: 1 at the centre tap."""
        channels = self.dwconv.out_channels
        return F.pad(self.dwconv.weight.new_ones(channels, 1, 1, 1), (1, 1, 1, 1))
