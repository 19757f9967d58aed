"""Small layers and tensor helpers of SG-Former, one concept per file."""

from .downsample import Downsample, Stem
from .lepe import locally_enhanced
from .mlp import DepthwiseConvMlp
from .padding import PAD_FILL_VALUE, grid_padding, pad_grid, padding_needed, valid_mask
from .pos_embed import sincos_2d_table
from .window import window_partition, window_reverse

__all__ = [
    "PAD_FILL_VALUE",
    "DepthwiseConvMlp",
    "Downsample",
    "Stem",
    "grid_padding",
    "locally_enhanced",
    "pad_grid",
    "padding_needed",
    "sincos_2d_table",
    "valid_mask",
    "window_partition",
    "window_reverse",
]
