"""Convolutional stem (stride 4) and stage downsampling (stride 2)."""

import torch
from torch import nn

from .fused import GELU, sizes_are_symbolic

# GroupNorm with one group normalises over (C, H, W) per sample, as the published layers do.
GROUP_NORM_GROUPS = 1
GROUP_NORM_EPS = 1e-5  # docs/design.md "Layout": GroupNorm eps
STEM_LAYER_NORM_EPS = 1e-5  # docs/design.md "Layout": the stem's token LayerNorm
# CPU images from this many pixels run the stem channels-last (see Stem.forward). At 64 px it
# is slower (sgformer_nano training step, batch 32: 205 against 217 img/s), at 224 px faster;
# sizes in between were not measured.
STEM_CHANNELS_LAST_MIN_PIXELS = 160 * 160


class Stem(nn.Module):
    """Three 3x3 convolutions (strides 2, 1, 2) with GroupNorm, then a token LayerNorm."""

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_chans, embed_dim, 3, stride=2, padding=1, bias=False, **dd)
        self.norm1 = nn.GroupNorm(GROUP_NORM_GROUPS, embed_dim, eps=GROUP_NORM_EPS, **dd)
        self.conv2 = nn.Conv2d(embed_dim, embed_dim, 3, stride=1, padding=1, bias=False, **dd)
        self.norm2 = nn.GroupNorm(GROUP_NORM_GROUPS, embed_dim, eps=GROUP_NORM_EPS, **dd)
        self.conv3 = nn.Conv2d(embed_dim, embed_dim, 3, stride=2, padding=1, bias=False, **dd)
        self.norm3 = nn.GroupNorm(GROUP_NORM_GROUPS, embed_dim, eps=GROUP_NORM_EPS, **dd)
        self.act = GELU()
        self.norm = nn.LayerNorm(embed_dim, eps=STEM_LAYER_NORM_EPS, **dd)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C_in, H, W) image -> ((B, N, C) tokens, (ceil(H/4), ceil(W/4)) grid)."""
        cpu_eager = x.device.type == "cpu" and not sizes_are_symbolic()
        if cpu_eager and x.shape[-2] * x.shape[-1] >= STEM_CHANNELS_LAST_MIN_PIXELS:
            # Channels-last convolutions and their gradients are much faster on the CPU for
            # large maps: a training step of sgformer_s's stem at 224 px, batch 8, 210 -> 155
            # ms; its inference at batch 16, 385 -> 256 ms (2 threads).
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        x = self.norm3(self.conv3(x))  # B, C, H/4, W/4
        grid = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), grid  # B, N, C


class Downsample(nn.Module):
    """1x1 conv, depthwise 3x3 stride-2 conv, 1x1 conv, each GroupNorm'd; GELU between."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_chs, out_chs, 1, bias=False, **dd)
        self.norm1 = nn.GroupNorm(GROUP_NORM_GROUPS, out_chs, eps=GROUP_NORM_EPS, **dd)
        self.conv2 = nn.Conv2d(
            out_chs, out_chs, 3, stride=2, padding=1, groups=out_chs, bias=False, **dd
        )
        self.norm2 = nn.GroupNorm(GROUP_NORM_GROUPS, out_chs, eps=GROUP_NORM_EPS, **dd)
        self.conv3 = nn.Conv2d(out_chs, out_chs, 1, bias=False, **dd)
        self.norm3 = nn.GroupNorm(GROUP_NORM_GROUPS, out_chs, eps=GROUP_NORM_EPS, **dd)
        self.act = GELU()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C_in, H, W) map -> ((B, N, C_out) tokens, (ceil(H/2), ceil(W/2)) grid)."""
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        x = self.norm3(self.conv3(x))  # B, C, H/2, W/2
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])  # B, N, C
