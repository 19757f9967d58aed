"""Feed-forward layer with a depthwise 3x3 convolution between its two linears."""

import torch
from torch import nn

from .fused import Linear, dropout_or_identity
from .lepe import conv_on_grid


class DepthwiseConvMlp(nn.Module):
    """``fc2(GELU(h + dwconv3x3(h)))`` with ``h = fc1(x)`` (docs/design.md "Layout", MLP)."""

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
        self.fc1 = Linear(in_features, hidden_features, **dd)
        self.dwconv = nn.Conv2d(
            hidden_features, hidden_features, 3, padding=1, groups=hidden_features, **dd
        )
        self.register_buffer("centre_tap", torch.empty(1, 1, 3, 3, **dd), persistent=False)
        self.init_non_persistent_buffers()
        self.drop1 = dropout_or_identity(drop)
        self.fc2 = Linear(hidden_features, in_features, **dd)
        self.drop2 = dropout_or_identity(drop)

    def init_non_persistent_buffers(self) -> None:
        """Fill ``centre_tap``: the 3x3 kernel that copies its input (1 at the centre)."""
        if self.centre_tap.is_meta:  # no storage; a later to_empty() + this call fills it
            return
        with torch.no_grad():
            self.centre_tap.zero_()[..., 1, 1] = 1

    def tapped_weight(self) -> torch.Tensor:
        """The convolution weight with ``centre_tap`` added, (Ch, 1, 3, 3)."""
        return self.dwconv.weight + self.centre_tap

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int], tapped_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, N, C) tokens of an (H, W) grid -> (B, N, C).

        ``tapped_weight``: :meth:`tapped_weight`, when the caller has computed it (a stage
        does for all its blocks in one sum).
        """
        h = self.fc1(x)  # B, N, Ch
        # h + dwconv(h) is one depthwise convolution whose centre tap is one larger: no sum
        # forward and no gradient sum backward over the widest tensor of the block (stage-1 MLP
        # of sgformer_s at batch 8 on the CPU, forward and backward: 51 -> 44 ms; bfloat16
        # inference of sgformer_s at batch 16: 9 % faster). In CPU inference (float32, or bfloat16
        # autocast) GELU is the convolution's post-op (layers.fused.conv2d_gelu).
        weight = self.tapped_weight() if tapped_weight is None else tapped_weight  # Ch, 1, 3, 3
        h = self.drop1(conv_on_grid(h, grid, self.dwconv, weight=weight, gelu=True))  # B, N, Ch
        return self.drop2(self.fc2(h))
