"""SG-Former: Self-guided Transformer with Evolving Token Reallocation (Ren et al., ICCV 2023).

Layout follows timm's model files: attention layers and blocks, the model class,
``checkpoint_filter_fn``, ``_create_sgformer``, ``default_cfgs`` and the registered variants.
What each layer computes is stated in ``docs/design.md``; where the published
implementation and the paper differ we follow the published code (the weights were trained
with it) and say so. ``docs/any_size.md`` states how inputs of any size are handled.
"""

import logging
import math
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import (
    GELU,
    DepthwiseConvMlp,
    Downsample,
    Linear,
    StackedLinear,
    Stem,
    add_into,
    conv_on_grid,
    crop_grid,
    dropout_or_identity,
    grid_map,
    grid_padding,
    pad_grid,
    padding_needed,
    resample_position_table,
    scaled_bmm,
    sincos_2d_table,
    sizes_are_symbolic,
    valid_mask,
    window_partition,
)
from .reallocation import (
    SIGNIFICANCE_SOURCES,
    buckets_for,
    combine_significance,
    key_importance,
    merged_token_counts,
    reallocate_tokens,
    significance_dtype,
    token_allocation,
)

__all__ = ["SGFormer", "checkpoint_filter_fn", "create_model"]

_logger = logging.getLogger(__name__)

WINDOW_SIZE = 7  # docs/design.md "Hybrid-scale attention": local half attends within 7x7 windows
BLOCK_NORM_EPS = 1e-6  # docs/design.md "Variants": block and stage LayerNorms
REDUCE_NORM_EPS = 1e-5  # docs/design.md "Hybrid-scale attention": LayerNorm after the k=sr conv
MIN_INPUT_SIZE = 32  # one token at stride 32
# Stages of at least this many blocks add the MLP centre taps to all their blocks' convolution
# weights in one sum (a stack and an add, and a stack of gradients under autograd) rather than
# one add per block.
STACKED_TAPS_MIN_DEPTH = 4
ATTENTION_MODES = ("hybrid", "local", "global")  # paper Table 7: scales in the first block
# Largest (heads, queries, keys) score block per image that the global half of a hybrid-scale
# block holds at once (64 MiB in float32); bigger grids run their queries in chunks. Traced
# graphs (compiled, exported) take the unchunked path: the size test would fix their size.
GLOBAL_ATTENTION_CHUNK = 2**24

SignificanceParts = tuple[torch.Tensor | None, torch.Tensor | None]


class HybridScaleAttention(nn.Module):
    """First block of a pair: half the heads attend globally to a ``sr``-reduced grid, half
    locally within 7x7 windows; both report how much attention each token receives.

    ``mode='local'`` or ``'global'`` gives all heads to one scale (paper Table 7 ablation);
    ``significance`` picks the map the block hands on (``SGFormer``'s argument).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        mode: str = "hybrid",
        window_size: int = WINDOW_SIZE,
        significance: str = "hybrid",
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.sr_ratio = sr_ratio
        self.window_size = window_size
        self.significance = significance
        self.global_heads = {"hybrid": num_heads // 2, "global": num_heads, "local": 0}[mode]
        self.local_heads = num_heads - self.global_heads
        self.global_dim = self.global_heads * self.head_dim
        self.local_dim = self.local_heads * self.head_dim
        # Everything the block input gives, in one product: the global heads' queries, the
        # local heads' queries, keys and values (the published q1, q2 and kv2:
        # docs/published_code.md), then the LePE linear. Every scale has the same number of
        # heads, so each part of `dim` outputs holds whole head groups of that many heads.
        self.group_heads = self.local_heads or self.global_heads
        width = self.global_dim + 3 * self.local_dim + dim
        self.qkv_lepe = StackedLinear(dim, width, width // dim, None if qkv_bias else 1, **dd)
        if self.global_heads:
            self.reduce = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio, **dd)
            self.reduce_norm = nn.LayerNorm(dim, eps=REDUCE_NORM_EPS, **dd)
            self.reduce_act = GELU()
            self.kv_global = Linear(dim, 2 * self.global_dim, bias=qkv_bias, **dd)
        self.lepe_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.attn_drop = dropout_or_identity(attn_drop)
        self.proj = Linear(dim, dim, **dd)
        self.proj_drop = dropout_or_identity(proj_drop)

    def _global(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        grid: tuple[int, int],
        real: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Global heads over the ``sr``-reduced grid.

        Args:
            x: (B, N, C) block input.
            q: (B*hg, N', d) queries of the window-padded grid, in window order.
            real: (N',) bool, True at real queries, or None when nothing is padded.

        Returns:
            (B*hg, N', d) output and the (B, Hr, Wr) attention received per reduced cell.
        """
        B, N, C = x.shape
        H, W = grid
        sr, heads, d = self.sr_ratio, self.global_heads, self.head_dim
        padding = grid_padding(H, W, sr)
        spatial = grid_map(x, grid)  # B, C, H, W
        if padding_needed(padding):
            # Zeros beyond the border, as a convolution's own padding: a border cell of the
            # reduced grid then sums only real positions. Every reduced cell holds a real one.
            spatial = F.pad(spatial, (0, padding[1], 0, padding[0]))  # B, C, Hp, Wp
        reduced = self.reduce(spatial)  # B, C, Hr, Wr
        Hr, Wr = reduced.shape[-2:]
        reduced = self.reduce_act(self.reduce_norm(reduced.flatten(2).transpose(1, 2)))  # B, M, C
        kv = self.kv_global(reduced).unflatten(-1, (2, heads, d))  # B, M, 2, hg, d
        M = kv.shape[1]
        # One copy puts the heads on the batch axis: plain batched products below.
        k, v = kv.permute(2, 0, 3, 1, 4).reshape(2, B * heads, M, d).unbind(0)  # B*hg, M, d
        keys = k.transpose(1, 2)  # B*hg, d, M
        Nq = q.shape[1]
        # The (B, hg, N', M) probabilities are needed for the significance map, so no fused
        # kernel; past a size, queries go in chunks and only per-key sums are kept.
        if sizes_are_symbolic() or heads * Nq * M <= GLOBAL_ATTENTION_CHUNK:
            attn = scaled_bmm(q, keys, self.scale).softmax(dim=-1)  # B*hg, N', M
            received = key_importance(attn.view(B, heads, Nq, M), real)  # B, M
            out = torch.bmm(self.attn_drop(attn), v)  # B*hg, N', d
        else:
            received = q.new_zeros(B, M, dtype=significance_dtype(q.device))
            outs = []
            chunk = max(1, GLOBAL_ATTENTION_CHUNK // (heads * M))  # queries per chunk
            for start in range(0, Nq, chunk):
                scores = scaled_bmm(q[:, start : start + chunk], keys, self.scale)  # B*hg, n, M
                attn = scores.softmax(dim=-1)
                probs = attn.detach().view(B, heads, -1, M)  # B, hg, n, M
                if real is not None:  # padded queries received nothing
                    probs = probs * real[start : start + chunk, None]
                received += probs.sum(dim=(1, 2), dtype=received.dtype)  # B, M
                outs.append(torch.bmm(self.attn_drop(attn), v))  # B*hg, n, d
            out = torch.cat(outs, dim=1)  # B*hg, N', d
            received = received / (heads * N)
        return out, received.view(B, Hr, Wr)

    def _local(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        windows: tuple[int, int],
        real: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Local heads within windows.

        Args:
            q, k, v: (B*hl, N', d) queries, keys and values of the window-padded grid, in
                window order; ``windows`` = (nh, nw) windows down and across.
            real: (nh*nw, w*w) bool, True at real positions, or None when nothing is padded.

        Returns:
            (B*hl, N', d) output in window order and the (B, Hp, Wp) attention received per
            token of the padded grid, in raster order.
        """
        w, heads, d = self.window_size, self.local_heads, self.head_dim
        nh, nw = windows
        B = q.shape[0] // heads
        q, k, v = (t.view(-1, w * w, d) for t in (q, k, v))  # B*hl*nW, w*w, d each
        attn = scaled_bmm(q, k.transpose(1, 2), self.scale)  # B*hl*nW, w*w, w*w
        attn = attn.view(B, heads, nh * nw, w * w, w * w)
        query_mask = None
        if real is not None:
            # Padded keys get no attention; padded queries are computed, then cropped away.
            attn = attn.masked_fill(~real[:, None, :], float("-inf"))
            query_mask = real.view(nh, 1, nw, 1, w * w)  # as the by-key view's queries
        attn = attn.softmax(dim=-1)  # B, hl, nW, w*w, w*w
        # Keys by grid position, heads and queries last: the mean over those lays the result
        # out in raster order with no copy of its own.
        by_key = attn.view(B, heads, nh, nw, w * w, w, w).permute(0, 2, 5, 3, 6, 1, 4)
        received = key_importance(by_key.unsqueeze(-1), query_mask)  # B, nh, w, nw, w, 1
        out = torch.bmm(self.attn_drop(attn).view(-1, w * w, w * w), v)  # B*hl*nW, w*w, d
        return out.view(B * heads, -1, d), received.reshape(B, nh * w, nw * w)

    def _significance(
        self,
        global_part: torch.Tensor | None,
        local_part: torch.Tensor | None,
        grid: tuple[int, int],
        return_parts: bool,
    ) -> tuple[torch.Tensor, SignificanceParts | None]:
        """The (B, N) map this block hands on, from the (B, Hr, Wr) global and the (B, Hp, Wp)
        local part; and both parts as (B, N) maps when asked for."""
        H, W = grid
        sr = self.sr_ratio
        B = (global_part if global_part is not None else local_part).shape[0]
        if (
            self.significance == "hybrid"
            and not return_parts
            and global_part is not None
            and local_part is not None
        ):
            Hr, Wr = global_part.shape[1:]
            Hl, Wl = local_part.shape[1:]
            if not padding_needed((Hr * sr - H, Wr * sr - W)) and not padding_needed(
                (Hl - H, Wl - W)
            ):
                # Nearest-neighbour upsampling as a broadcast within the sum: no copy.
                local_cells = local_part.view(B, Hr, sr, Wr, sr)  # B, Hr, sr, Wr, sr
                combined = global_part.view(B, Hr, 1, Wr, 1) + local_cells
                return combined.view(B, H * W), None
        if global_part is not None:
            Hr, Wr = global_part.shape[1:]
            upsampled = global_part.view(B, Hr, 1, Wr, 1).expand(B, Hr, sr, Wr, sr)
            global_part = upsampled.reshape(B, Hr * sr, Wr * sr)  # B, Hp, Wp
            global_part = crop_grid(global_part, H, W).reshape(B, H * W)  # B, N
        if local_part is not None:
            local_part = crop_grid(local_part, H, W).reshape(B, H * W)  # B, N
        combined = combine_significance(global_part, local_part, self.significance)
        return combined, (global_part, local_part) if return_parts else None

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int], return_parts: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, SignificanceParts | None]:
        """(B, N, C) -> ((B, N, C), (B, N) significance map, and with ``return_parts`` its
        (global part (B, N) or None, local part (B, N) or None))."""
        B, N, C = x.shape
        H, W = grid
        w, heads, d = self.window_size, self.group_heads, self.head_dim
        qkv, lepe = self.qkv_lepe(x)  # P-1, B, N, C (maybe strided); B, N, C
        mixed = conv_on_grid(lepe, grid, self.lepe_conv)  # B, N, C
        padding = grid_padding(H, W, w)
        Hp, Wp = H + padding[0], W + padding[1]
        nh, nw = Hp // w, Wp // w
        padded = padding_needed(padding)
        per_part = C // (heads * d)  # head groups per part: 2 in the hybrid form, else 1
        groups = qkv.shape[0] * per_part
        grid_qkv = pad_grid(qkv.view(-1, B, H, W, C), padding)  # P-1, B, Hp, Wp, C
        # One copy lays every head group out window by window with its heads on the batch axis.
        # The global heads take their queries in this order too: their outputs then join the
        # local heads' in one layout, and the significance mean ignores the order of queries.
        grouped = grid_qkv.view(-1, B, nh, w, nw, w, per_part, heads, d)
        grouped = grouped.permute(0, 6, 1, 7, 2, 4, 3, 5, 8)  # P-1, per_part, B, h, nh, nw, w, w, d
        grouped = grouped.reshape(groups, B * heads, Hp * Wp, d)  # groups, B*h, N', d
        grouped = grouped.unbind(0)  # B*h, N', d each: queries (global first), keys, values
        real = None
        if padded:
            real = window_partition(valid_mask(H, W, padding, x.device)[None, :, :, None], w)
            real = real.view(nh * nw, w * w)  # nW, w*w
        outs, global_part, local_part = [], None, None
        if self.global_heads:
            out, global_part = self._global(
                x, grouped[0], grid, None if real is None else real.view(-1)
            )
            outs.append(out)
        if self.local_heads:
            out, local_part = self._local(*grouped[-3:], (nh, nw), real)
            outs.append(out)
        # Outputs in window order onto the token grid, global heads' channels first:
        # proj's input `concat(global, local) + lepe`.
        outs = [o.view(B, heads, nh, nw, w, w, d).permute(0, 2, 4, 3, 5, 1, 6) for o in outs]
        if torch.is_grad_enabled():  # outs: B, nh, w, nw, w, h, d each
            # Under autograd every in-place write into a slice would copy the whole gradient.
            out = torch.stack(outs, dim=5)  # B, nh, w, nw, w, parts, h, d
            if padded:
                out = crop_grid(out.reshape(B, Hp, Wp, C), H, W)  # B, H, W, C
                mixed = mixed.view(B, H, W, C) + out  # B, H, W, C
            else:
                mixed = mixed.view(out.shape) + out  # B, nh, w, nw, w, parts, h, d
            mixed = mixed.reshape(B, N, C)  # a view: the sum takes the LePE map's layout
        else:
            # The LePE map is the output buffer: each scale adds its heads' output into its
            # channel slice.
            if padded:
                target = mixed.view(B, H, W, len(outs), heads * d)  # B, H, W, parts, h*d
                for i, o in enumerate(outs):
                    target[..., i, :].add_(crop_grid(o.reshape(B, Hp, Wp, -1), H, W))
            else:
                target = mixed.view(B, nh, w, nw, w, len(outs), heads, d)
                for i, o in enumerate(outs):
                    target[..., i, :, :].add_(o)
        significance, parts = self._significance(global_part, local_part, grid, return_parts)
        return self.proj_drop(self.proj(mixed)), significance, parts


class SelfGuidedAttention(nn.Module):
    """Second block of a pair: every query attends to the token sequence reallocated by the
    significance map of the block before (significant tokens merged finely, minor coarsely)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.buckets = buckets_for(sr_ratio)
        # The queries and the LePE linear's output (docs/design.md "Attention"), both of x.
        self.q_lepe = StackedLinear(dim, 2 * dim, 2, 2 if qkv_bias else 1, **dd)
        # Keys, then values, of all heads from the merged tokens in one product (the published
        # layer's kv1 and kv2, one per half of the heads, interleaved: docs/published_code.md).
        self.kv = Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.merge = nn.ModuleList(nn.Linear(b.group_size, 1, **dd) for b in self.buckets)
        self.lepe_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim, **dd)
        self.proj_drop = dropout_or_identity(proj_drop)

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int], significance: torch.Tensor
    ) -> torch.Tensor:
        """(B, N, C) tokens and (B, N) significance -> (B, N, C)."""
        B, N, C = x.shape
        heads, d = self.num_heads, self.head_dim
        q, lepe = self.q_lepe(x)  # 1, B, N, C; B, N, C
        q = q.squeeze(0).unflatten(-1, (heads, d)).transpose(1, 2)  # B, heads, N, d
        merges = [(m.weight, m.bias) for m in self.merge]
        merged = reallocate_tokens(x, significance, self.buckets, merges)  # B, M', C
        kv = self.kv(merged).unflatten(-1, (2, heads, d))  # B, M', 2, heads, d
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # B, heads, M', d each
        dropout = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # B, heads, N, d
        mixed = conv_on_grid(lepe, grid, self.lepe_conv)  # B, N, C
        mixed = add_into(mixed.view(B, N, heads, d), out.transpose(1, 2))  # B, N, heads, d
        return self.proj_drop(self.proj(mixed.reshape(B, N, C)))  # proj(attention + lepe)


class GlobalAttention(nn.Module):
    """Plain multi-head attention over all tokens (stage 4, where sr = 1)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        # The published q, then kv, then the LePE linear (docs/design.md "Attention").
        self.qkv_lepe = StackedLinear(dim, 4 * dim, 4, 4 if qkv_bias else 1, **dd)
        self.lepe_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim, **dd)
        self.proj_drop = dropout_or_identity(proj_drop)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        heads = self.num_heads
        qkv, lepe = self.qkv_lepe(x)  # 3, B, N, C (maybe strided); B, N, C
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv)  # B, heads, N, d
        dropout = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # B, heads, N, d
        mixed = conv_on_grid(lepe, grid, self.lepe_conv)  # B, N, C
        mixed = add_into(mixed.view(B, N, heads, -1), out.transpose(1, 2))  # B, N, heads, d
        return self.proj_drop(self.proj(mixed.reshape(B, N, C)))  # proj(attention + lepe)


class SGFormerBlock(nn.Module):
    """Pre-norm transformer block; ``kind`` is ``hybrid``, ``guided`` or ``global``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kind: str,
        sr_ratio: int = 1,
        attention_mode: str = "hybrid",
        window_size: int = WINDOW_SIZE,
        significance: str = "hybrid",
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.kind = kind
        self.norm1 = norm_layer(dim, **dd)
        drops = {"qkv_bias": qkv_bias, "attn_drop": attn_drop, "proj_drop": proj_drop}
        if kind == "hybrid":
            self.attn = HybridScaleAttention(
                dim, num_heads, sr_ratio, attention_mode, window_size, significance, **drops, **dd
            )
        elif kind == "guided":
            self.attn = SelfGuidedAttention(dim, num_heads, sr_ratio, **drops, **dd)
        else:
            self.attn = GlobalAttention(dim, num_heads, **drops, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = DepthwiseConvMlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        grid: tuple[int, int],
        significance: torch.Tensor | None = None,
        return_parts: bool = False,
        mlp_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, SignificanceParts | None] | None]:
        """(B, N, C) -> (B, N, C), plus the (B, N) significance map a hybrid block measured
        and, with ``return_parts``, its global and local parts. ``mlp_weight``: the MLP's
        ``tapped_weight()`` when the stage has computed it."""
        measured = None
        if self.kind == "hybrid":
            out, significance, parts = self.attn(self.norm1(x), grid, return_parts)
            measured = (significance, parts)
        elif self.kind == "guided":
            out = self.attn(self.norm1(x), grid, significance)
        else:
            out = self.attn(self.norm1(x), grid)
        # In inference residual sums land in the branch outputs, which nothing else holds.
        x = add_into(self.drop_path1(out), x)
        x = add_into(self.drop_path2(self.mlp(self.norm2(x), grid, mlp_weight)), x)
        return x, measured


class SGFormerStage(nn.Module):
    """Downsampling (none for the first stage, whose input is the stem's), blocks, LayerNorm.

    With ``sr_ratio > 1`` blocks alternate hybrid-scale and self-guided; with 1 all are global.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        sr_ratio: int,
        downsample: bool,
        drop_path: list[float],
        significance: str = "hybrid",
        attention_mode: str = "hybrid",
        window_size: int = WINDOW_SIZE,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        self.buckets = buckets_for(sr_ratio) if sr_ratio > 1 else None
        self.downsample = Downsample(in_dim, dim, **dd) if downsample else None
        kinds = ["hybrid", "guided"] * (depth // 2) if sr_ratio > 1 else ["global"] * depth
        self.blocks = nn.ModuleList(
            SGFormerBlock(
                dim,
                num_heads,
                kind,
                sr_ratio=sr_ratio,
                attention_mode=attention_mode,
                window_size=window_size,
                significance=significance,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i],
                norm_layer=norm_layer,
                **dd,
            )
            for i, kind in enumerate(kinds)
        )
        self.norm = norm_layer(dim, **dd)

    def _run(
        self, x: torch.Tensor, collect: bool
    ) -> tuple[torch.Tensor, list[tuple[SignificanceParts, torch.Tensor]]]:
        if self.downsample is not None:
            x, grid = self.downsample(x)  # B, N, C
        else:
            grid = (x.shape[2], x.shape[3])
            x = x.flatten(2).transpose(1, 2)  # B, N, C
        significance, measured = None, []
        mlp_weights = [None] * len(self.blocks)
        if len(self.blocks) >= STACKED_TAPS_MIN_DEPTH:
            weights = torch.stack([block.mlp.dwconv.weight for block in self.blocks])
            mlp_weights = (weights + self.blocks[0].mlp.centre_tap).unbind(0)  # Ch, 1, 3, 3 each
        for block, mlp_weight in zip(self.blocks, mlp_weights, strict=True):
            args = (x, grid, significance, collect, mlp_weight)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, found = checkpoint(block, *args, use_reentrant=False)
            else:
                x, found = block(*args)
            if found is not None:
                significance, parts = found
                if collect:
                    measured.append((parts, significance))
        return grid_map(self.norm(x), grid), measured  # B, C, H, W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C, H', W'), H' = ceil(H / 2) after downsampling."""
        return self._run(x, collect=False)[0]

    def forward_with_significance(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[SignificanceParts, torch.Tensor]]]:
        """As forward, plus ((global, local) parts, combined map) of each hybrid block."""
        return self._run(x, collect=True)


class SGFormer(nn.Module):
    """SG-Former backbone and classifier.

    Takes any (B, C, H, W) float image with H, W >= 32; stage outputs have strides 4, 8, 16, 32
    (sizes rounded up). ``significance`` picks the map that guides reallocation (``hybrid``,
    ``local``, ``global``, ``uniform``; paper Table 6) and ``attention`` the scales of the
    hybrid-scale blocks (``hybrid``, ``local``, ``global``; paper Table 7).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        img_size: int | tuple[int, int] = 224,
        embed_dims: tuple[int, ...] = (64, 128, 256, 512),
        num_heads: tuple[int, ...] = (2, 4, 8, 16),
        depths: tuple[int, ...] = (2, 4, 16, 1),
        sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[..., nn.Module] | None = None,
        significance: str = "hybrid",
        attention: str = "hybrid",
        window_size: int = WINDOW_SIZE,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        _check_config(
            embed_dims, num_heads, depths, sr_ratios, significance, attention, global_pool
        )
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=BLOCK_NORM_EPS)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = embed_dims[-1]
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else img_size
        # The position table lives on the stem grid of img_size (56 x 56 at 224) and is
        # resampled to other grids at run time.
        self.pos_embed_grid = (math.ceil(img_h / 4), math.ceil(img_w / 4))

        self.stem = Stem(in_chans, embed_dims[0], **dd)
        num_positions = self.pos_embed_grid[0] * self.pos_embed_grid[1]
        self.pos_embed = nn.Parameter(torch.empty(1, num_positions, embed_dims[0], **dd))
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear decay
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.stages.append(
                SGFormerStage(
                    embed_dims[i - 1] if i else embed_dims[0],
                    embed_dims[i],
                    depth,
                    num_heads[i],
                    sr_ratios[i],
                    downsample=i > 0,
                    drop_path=rates[first : first + depth],
                    significance=significance,
                    attention_mode=attention,
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    norm_layer=norm_layer,
                    **dd,
                )
            )
            self.feature_info.append(
                {"num_chs": embed_dims[i], "reduction": 4 * 2**i, "module": f"stages.{i}"}
            )
        self.head_drop = dropout_or_identity(drop_rate)
        self.head = self._classifier(num_classes, **dd)
        self.init_weights()
        # Every convolution of the stages reads a channels-last map (a token grid viewed as
        # one, layers.grid_map). Its weight in the same layout is read as it is, and its
        # gradient comes out in the parameter's layout: in the default layout each training
        # step copies 28 weight gradients of sgformer_s (docs/BENCHMARKS.md "Operator calls").
        # The stem keeps the default layout, which decides its kernels' layout for small
        # images. After init_weights, so the initial values do not depend on the layout.
        for conv in (m for m in self.stages.modules() if isinstance(m, nn.Conv2d)):
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)

    def init_weights(self) -> None:
        """docs/design.md "Initialisation", and the 2-D sine-cosine position table."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                fan_out = kh * kw * module.out_channels // module.groups
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, DepthwiseConvMlp):
                module.init_non_persistent_buffers()
        if self.pos_embed.is_meta:  # no storage to fill; a later to_empty() + init fills it
            return
        table = sincos_2d_table(*self.pos_embed_grid, self.pos_embed.shape[-1], device="cpu")
        with torch.no_grad():
            self.pos_embed.copy_(table.unsqueeze(0))

    # ----- timm optimiser and head hooks -----
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {
            "stem": r"^stem|^pos_embed",
            "blocks": r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.norm", (99999,)),
            ],
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = global_pool
        self.head = self._classifier(num_classes, self.pos_embed.device, self.pos_embed.dtype)
        self.head.train(self.training)

    def _classifier(
        self, num_classes: int, device: torch.device | None, dtype: torch.dtype | None
    ) -> nn.Module:
        """The linear classifier on the pooled features; ``nn.Identity`` for 0 classes."""
        if not num_classes:
            return nn.Identity()
        return Linear(self.num_features, num_classes, device=device, dtype=dtype)

    # ----- forward -----
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor image batch, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(
                f"expected a 4-D (B, C, H, W) image batch, got rank {x.ndim} with shape "
                f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"expected a floating-point image batch, got {x.dtype}; convert with x.float() "
                "and normalise with the model's mean and std (timm.data.resolve_data_config)"
            )
        B, C, H, W = x.shape
        if B == 0:
            raise ValueError(f"empty batch: got shape {tuple(x.shape)}, need at least one image")
        if self.in_chans != C:
            raise ValueError(
                f"expected {self.in_chans} input channels, got {C} (shape {tuple(x.shape)}); "
                f"build the model with in_chans={C} or convert the images"
            )
        if H < MIN_INPUT_SIZE or W < MIN_INPUT_SIZE:
            raise ValueError(
                f"image sides must be at least {MIN_INPUT_SIZE} px, got {H} x {W}; "
                "resize or pad the input"
            )

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) image -> (B, C, ceil(H/4), ceil(W/4)) stem map with positions."""
        tokens, grid = self.stem(x)  # B, N, C
        pos = self.pos_embed  # 1, N, C
        if sizes_are_symbolic() or grid != self.pos_embed_grid:
            pos = resample_position_table(pos, grid, self.pos_embed_grid)
        return grid_map(tokens + pos, grid)  # B, C, H/4, W/4

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C4, ceil(H/32), ceil(W/32)) normed stage-4 map."""
        self._check_input(x)
        x = self._embed(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C4, H', W') -> (B, num_classes) logits, or pooled (B, C4) with pre_logits."""
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))  # B, C4
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (each already normed by its stage LayerNorm), NCHW.

        Args:
            indices: take the last n stages if an int, the listed stages if a list.
            norm: unused; every stage ends in its own norm.
            stop_early: stop after the last stage taken.
            output_fmt: only ``NCHW``.
            intermediates_only: return only the list.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        self._check_input(x)
        x = self._embed(x)
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last one taken (and the head); returns the indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    @torch.no_grad()
    def forward_significance(
        self, x: torch.Tensor, return_parts: bool = False
    ) -> list[torch.Tensor] | list[dict[str, Any]]:
        """Significance map of every hybrid-scale block, in order.

        Args:
            x: (B, C_in, H, W) image batch.
            return_parts: also give the global and local parts and the token allocation.

        Returns:
            Without parts, one (B, H_i, W_i) map per hybrid block on its stage's grid.
            With parts, one dict per hybrid block: ``stage``, ``block`` (indices),
            ``significance``, ``global``, ``local`` ((B, H_i, W_i), a part is None when the
            attention ablation has no such scale), ``allocation`` ((B, H_i, W_i) int64: merge
            group size each token fell into), ``group_sizes`` and ``merged_tokens`` (per
            bucket, least significant first).
        """
        self._check_input(x)
        dtype = x.dtype  # maps are summed in significance_dtype, returned in the image's
        x = self._embed(x)
        last = max((i for i, s in enumerate(self.stages) if s.buckets), default=-1)
        maps = []
        for stage_index, stage in enumerate(self.stages[: last + 1]):
            x, measured = stage.forward_with_significance(x)
            B, _, H, W = x.shape

            def as_map(part: torch.Tensor | None) -> torch.Tensor | None:
                return None if part is None else part.to(dtype).reshape(B, H, W)  # noqa: B023

            hybrid_blocks = [i for i, b in enumerate(stage.blocks) if b.kind == "hybrid"]
            for block_index, ((global_part, local_part), combined) in zip(
                hybrid_blocks, measured, strict=True
            ):
                if not return_parts:
                    maps.append(as_map(combined))
                    continue
                maps.append(
                    {
                        "stage": stage_index,
                        "block": block_index,
                        "significance": as_map(combined),
                        "global": as_map(global_part),
                        "local": as_map(local_part),
                        "allocation": token_allocation(combined, stage.buckets).reshape(B, H, W),
                        "group_sizes": [b.group_size for b in stage.buckets],
                        "merged_tokens": merged_token_counts(H * W, stage.buckets),
                    }
                )
        return maps


def _check_pool(global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")


def _check_config(
    embed_dims: tuple[int, ...],
    num_heads: tuple[int, ...],
    depths: tuple[int, ...],
    sr_ratios: tuple[int, ...],
    significance: str,
    attention: str,
    global_pool: str,
) -> None:
    """Reject configurations the architecture cannot build, saying what to change."""
    _check_pool(global_pool)
    lengths = {len(embed_dims), len(num_heads), len(depths), len(sr_ratios)}
    if len(lengths) != 1:
        raise ValueError(
            "embed_dims, num_heads, depths and sr_ratios need one entry per stage, got "
            f"{len(embed_dims)}, {len(num_heads)}, {len(depths)}, {len(sr_ratios)}"
        )
    if significance not in SIGNIFICANCE_SOURCES:
        raise ValueError(
            f"significance must be one of {SIGNIFICANCE_SOURCES}, got {significance!r}"
        )
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if attention != "hybrid" and significance not in (attention, "uniform"):
        raise ValueError(
            f"attention={attention!r} measures only {attention} significance; "
            f"use significance={attention!r} or 'uniform', got {significance!r}"
        )
    if embed_dims[0] % 4:
        raise ValueError(
            f"embed_dims[0] must be divisible by 4 (sine-cosine table), got {embed_dims[0]}"
        )
    for i, (dim, heads, depth, sr) in enumerate(
        zip(embed_dims, num_heads, depths, sr_ratios, strict=True)
    ):
        if dim % heads:
            raise ValueError(f"stage {i}: embed_dims {dim} is not divisible by num_heads {heads}")
        if sr > 1:
            buckets_for(sr)
            if depth % 2:
                raise ValueError(
                    f"stage {i}: depth must be even (hybrid/self-guided pairs) with sr_ratio {sr}, "
                    f"got {depth}"
                )
            if heads % 2:
                raise ValueError(
                    f"stage {i}: num_heads must be even with sr_ratio {sr}, got {heads}"
                )


# Published parameter names -> ours (docs/design.md "Published checkpoint layout"), in order.
# In stages 1-3 of the published layout, even blocks are hybrid-scale, odd are self-guided.
_HYBRID = r"^(block[123]\.\d*[02468]\.attn\.)"
_GUIDED = r"^(block[123]\.\d*[13579]\.attn\.)"
_PUBLISHED_RENAMES: tuple[tuple[str, str | Callable[[re.Match], str]], ...] = (
    (_HYBRID + r"sr\.", r"\1reduce."),
    (_HYBRID + r"norm\.", r"\1reduce_norm."),
    (_HYBRID + r"q1\.", r"\1q_global."),
    (_HYBRID + r"kv1\.", r"\1kv_global."),
    (_HYBRID + r"q2\.", r"\1q_local."),
    (_HYBRID + r"kv2\.", r"\1kv_local."),
    (_GUIDED + r"kv1\.", r"\1kv_first."),
    (_GUIDED + r"kv2\.", r"\1kv_last."),
    (_GUIDED + r"f([123])\.", lambda m: f"{m[1]}merge.{int(m[2]) - 1}."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
    (r"^patch_embed1\.conv\.0\.c\.", "stem.conv1."),
    (r"^patch_embed1\.conv\.0\.bn\.", "stem.norm1."),
    (r"^patch_embed1\.conv\.2\.c\.", "stem.conv2."),
    (r"^patch_embed1\.conv\.2\.bn\.", "stem.norm2."),
    (r"^patch_embed1\.conv\.4\.c\.", "stem.conv3."),
    (r"^patch_embed1\.conv\.4\.bn\.", "stem.norm3."),
    (r"^patch_embed1\.norm\.", "stem.norm."),
    (
        r"^patch_embed(\d)\.conv(\d)\.c\.",
        lambda m: f"stages.{int(m[1]) - 1}.downsample.conv{m[2]}.",
    ),
    (
        r"^patch_embed(\d)\.conv(\d)\.bn\.",
        lambda m: f"stages.{int(m[1]) - 1}.downsample.norm{m[2]}.",
    ),
    (r"^block(\d)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}."),
    (r"^norm(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.norm."),
)
# Projections we hold as one linear where the published layout (and this project's earlier
# layouts) has several: {fused name: ((part names, in order), chunks), ...}; the layout whose
# parts the checkpoint holds most of is used. With chunks > 1 each part is cut into that many
# row blocks and the blocks are interleaved: the guided block's kv holds the keys of all heads,
# then their values, while kv_first/kv_last each hold keys, then values, of half the heads. A
# hybrid block of a one-scale ablation lacks some parts; a layer without qkv bias has only the
# LePE linear's bias.
_FUSED_PROJECTIONS: dict[str, tuple[tuple[tuple[str, ...], int], ...]] = {
    "kv": ((("kv_first", "kv_last"), 2),),
    "q_lepe": ((("q", "lepe_linear"), 1),),
    "qkv_lepe": (
        (("q_global", "q_local", "kv_local", "lepe_linear"), 1),
        (("q", "kv", "lepe_linear"), 1),
        (("qkv", "lepe_linear"), 1),
    ),
}
_CHECKPOINT_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")
_MAX_LISTED = 8


def _unwrap(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of a training checkpoint (EMA preferred), without ``module.`` prefixes.

    A run checkpoint of this project (``sgformer.checkpoint``: a ``format_version`` key) keeps
    them in its ``state``; the published files and timm's keep them at the top level.
    """
    if "format_version" in checkpoint and isinstance(checkpoint.get("state"), dict):
        checkpoint = checkpoint["state"]
    for key in _CHECKPOINT_WRAPPERS:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _fuse_projections(
    state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Join the separate projections of the published layout into the model's fused ones
    (``_FUSED_PROJECTIONS``), wherever the model expects a fused tensor the checkpoint lacks."""
    state_dict = dict(state_dict)
    for key in expected:
        prefix, _, tail = key.rpartition(".")  # stages.0.blocks.1.attn.kv, weight
        owner, _, fused = prefix.rpartition(".")
        if key in state_dict or fused not in _FUSED_PROJECTIONS or tail not in ("weight", "bias"):
            continue
        layouts = [
            ([f"{owner}.{part}.{tail}" for part in parts], chunks)
            for parts, chunks in _FUSED_PROJECTIONS[fused]
        ]
        names, chunks = max(layouts, key=lambda layout: sum(n in state_dict for n in layout[0]))
        names = [name for name in names if name in state_dict]
        if not names:
            continue
        pieces = [state_dict.pop(name).chunk(chunks) for name in names]
        state_dict[key] = torch.cat([p[i] for i in range(chunks) for p in pieces])
    return state_dict


def _listing(items: list[str]) -> str:
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def checkpoint_filter_fn(state_dict: dict[str, Any], model: SGFormer) -> dict[str, torch.Tensor]:
    """Map a published (or our own) checkpoint onto ``model``'s names and check it.

    Unwraps ``state_dict_ema``/``state_dict``/``model`` and ``module.`` prefixes, renames the
    published names, resamples ``pos_embed`` to the model's grid, and raises ``ValueError``
    naming the keys for missing, unexpected or differently shaped tensors and non-finite
    values. A classifier of another size is dropped (timm re-creates it for a new
    ``num_classes``); a stem of other input channels is left for timm to adapt.
    """
    state_dict = _unwrap(state_dict)
    if "stem.conv1.weight" not in state_dict:
        renamed = {}
        for key, value in state_dict.items():
            for pattern, repl in _PUBLISHED_RENAMES:
                key = re.sub(pattern, repl, key)
            renamed[key] = value
        state_dict = renamed

    expected = model.state_dict()
    state_dict = _fuse_projections(state_dict, expected)
    if "pos_embed" in state_dict and "pos_embed" in expected:
        pos = state_dict["pos_embed"]
        if pos.shape != expected["pos_embed"].shape and pos.ndim == 3:
            side = math.isqrt(pos.shape[1])
            if side * side != pos.shape[1]:
                raise ValueError(
                    f"pos_embed has {pos.shape[1]} positions, not a square grid; build the model "
                    "with the img_size it was trained at"
                )
            state_dict["pos_embed"] = resample_position_table(
                pos, model.pos_embed_grid, (side, side)
            )

    for name in ("head.weight", "head.bias"):
        if name in state_dict and (
            name not in expected or state_dict[name].shape != expected[name].shape
        ):
            _logger.info("dropping checkpoint %s: the model's classifier differs", name)
            del state_dict[name]

    head = {"head.weight", "head.bias"}
    missing = [k for k in expected if k not in state_dict and k not in head]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected
        and v.shape != expected[k].shape
        and not (k == "stem.conv1.weight" and v.shape[0] == expected[k].shape[0])
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch in {len(mismatched)} tensors: {_listing(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if problems:
        raise ValueError(
            "checkpoint does not fit this model (another variant or config?): "
            + "; ".join(problems)
        )
    non_finite = [
        k
        for k, v in state_dict.items()
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()
    ]
    if non_finite:
        raise ValueError(f"checkpoint has NaN or Inf values in {_listing(non_finite)}")
    return state_dict


def check_checkpoint_file(path: str | Path) -> None:
    """Fail early and clearly when ``path`` is not a torch or safetensors checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with path.open("rb") as f:
        head = f.read(16)
    is_zip = head.startswith(b"PK\x03\x04")  # torch.save since 1.6
    is_pickle = head[:1] == b"\x80"  # legacy torch.save
    is_safetensors = len(head) > 8 and head[8:9] == b"{"  # 8-byte header size, then JSON
    if not (is_zip or is_pickle or is_safetensors):
        raise ValueError(
            f"{path} is not a checkpoint: expected a file written by torch.save (.pth/.pt) or "
            "a .safetensors file"
        )


def _create_sgformer(variant: str, pretrained: bool = False, **kwargs: Any) -> SGFormer:
    if pretrained:
        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        if not overlay.get("file"):
            raise ValueError(
                f"{variant}: weights are never downloaded at run time; download them from "
                "https://github.com/OliverRensu/SG-Former and pass "
                "pretrained_cfg_overlay=dict(file=PATH)"
            )
        check_checkpoint_file(overlay["file"])
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        SGFormer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"out_indices": out_indices, "feature_cls": "getter"},
        **kwargs,
    )


def _cfg(top1: float | None = None, **kwargs: Any) -> dict[str, Any]:
    notes = (f"ImageNet-1k top-1 {top1} % (paper, 224 x 224)",) if top1 else ()
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "head",
        "paper_ids": "arXiv:2308.12216",
        "paper_name": "SG-Former: Self-guided Transformer with Evolving Token Reallocation",
        "origin_url": "https://github.com/OliverRensu/SG-Former",
        "notes": notes,
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "sgformer_s.in1k": _cfg(top1=83.2),
        "sgformer_m.in1k": _cfg(top1=84.1),
        "sgformer_b.in1k": _cfg(top1=84.7),
        "sgformer_nano": _cfg(),
    }
)

# Paper Table 1 (= published implementation).
VARIANTS: dict[str, dict[str, tuple[int, ...]]] = {
    "sgformer_nano": {
        "embed_dims": (32, 64, 128, 256),
        "num_heads": (2, 2, 4, 8),
        "depths": (2, 2, 2, 1),
    },
    "sgformer_s": {
        "embed_dims": (64, 128, 256, 512),
        "num_heads": (2, 4, 8, 16),
        "depths": (2, 4, 16, 1),
    },
    "sgformer_m": {
        "embed_dims": (64, 128, 256, 512),
        "num_heads": (2, 4, 8, 16),
        "depths": (2, 6, 28, 2),
    },
    "sgformer_b": {
        "embed_dims": (96, 192, 384, 768),
        "num_heads": (4, 6, 12, 24),
        "depths": (4, 6, 24, 2),
    },
}


@register_model
def sgformer_nano(pretrained: bool = False, **kwargs: Any) -> SGFormer:
    """The reduced config of the golden reference data; for tests and CPU demos."""
    return _create_sgformer(
        "sgformer_nano", pretrained, **dict(VARIANTS["sgformer_nano"], **kwargs)
    )


@register_model
def sgformer_s(pretrained: bool = False, **kwargs: Any) -> SGFormer:
    """SG-Former-S: 22.5 M parameters, 4.8 GMACs, 83.2 % top-1."""
    return _create_sgformer("sgformer_s", pretrained, **dict(VARIANTS["sgformer_s"], **kwargs))


@register_model
def sgformer_m(pretrained: bool = False, **kwargs: Any) -> SGFormer:
    """SG-Former-M: 38.7 M parameters, 7.5 GMACs, 84.1 % top-1."""
    return _create_sgformer("sgformer_m", pretrained, **dict(VARIANTS["sgformer_m"], **kwargs))


@register_model
def sgformer_b(pretrained: bool = False, **kwargs: Any) -> SGFormer:
    """SG-Former-B: 78.0 M parameters, 15.6 GMACs, 84.7 % top-1."""
    return _create_sgformer("sgformer_b", pretrained, **dict(VARIANTS["sgformer_b"], **kwargs))


def create_model(model_name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with a clear error that lists the SG-Former models for a bad name."""
    if model_name.split(".")[0] not in timm.list_models():
        raise ValueError(
            f"unknown model {model_name!r}; SG-Former models: "
            f"{', '.join(timm.list_models('sgformer*'))} (any other timm model name also works)"
        )
    return timm.create_model(model_name, **kwargs)
