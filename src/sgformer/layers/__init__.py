"""Small layers and tensor helpers of SG-Former, one concept per file."""

from .downsample import Downsample, Stem
from .fused import (
    GELU,
    Linear,
    StackedLinear,
    add_into,
    autocast_dtype,
    dropout_or_identity,
    linear,
    scaled_bmm,
    sizes_are_symbolic,
)
from .lepe import conv_on_grid, grid_map
from .mlp import DepthwiseConvMlp
from .padding import (
    PAD_FILL_VALUE,
    crop_grid,
    grid_padding,
    pad_grid,
    padding_needed,
    valid_mask,
)
from .pos_embed import resample_position_table, sincos_2d_table
from .window import window_partition, window_reverse

__all__ = [
    "GELU",
    "Linear",
    "PAD_FILL_VALUE",
    "DepthwiseConvMlp",
    "Downsample",
    "StackedLinear",
    "Stem",
    "add_into",
    "autocast_dtype",
    "conv_on_grid",
    "crop_grid",
    "dropout_or_identity",
    "grid_map",
    "grid_padding",
    "linear",
    "pad_grid",
    "padding_needed",
    "resample_position_table",
    "scaled_bmm",
    "sincos_2d_table",
    "sizes_are_symbolic",
    "valid_mask",
    "window_partition",
    "window_reverse",
]
