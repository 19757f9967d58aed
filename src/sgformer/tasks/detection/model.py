"""SG-Former + FPN + torchvision Mask R-CNN (Faster R-CNN without masks).

The backbone is wrapped as torchvision's ``backbone_utils`` does: a body returning an ordered
dict of maps (SG-Former ``features_only``, strides 4-32), a ``FeaturePyramidNetwork`` with a
max-pool level, and an ``out_channels`` attribute. ``MaskRCNN`` does the rest, including
resizing (short side, long-side cap, multi-scale choices) and normalisation.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...checkpoint import load_backbone_weights
from ...model import create_model
from ...runtime import unwrap_model

FPN_LEVELS = ("0", "1", "2", "3")  # strides 4-32; LastLevelMaxPool adds "pool" (stride 64)
# torchvision's defaults: one anchor size per FPN level, three aspect ratios.
COCO_ANCHOR_SIZES = (32, 64, 128, 256, 512)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
BOX_ROI_SIZE, MASK_ROI_SIZE = 7, 14  # MultiScaleRoIAlign output sides (torchvision)


class SGFormerFPN(nn.Module):
    """SG-Former feature maps -> FPN: ``OrderedDict`` of (B, out_channels, H_i, W_i) maps with
    keys ``0``-``3`` (strides 4-32) and ``pool`` (stride 64)."""

    def __init__(
        self,
        model_name: str,
        out_channels: int = 256,
        frozen_stages: int = -1,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = create_model(model_name, features_only=True, drop_path_rate=drop_path)
        channels = self.body.feature_info.channels()
        if len(channels) != len(FPN_LEVELS):
            raise ValueError(f"{model_name} gives {len(channels)} feature maps, FPN needs 4")
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.frozen_stages = frozen_stages
        self.mean, self.std = self.body.pretrained_cfg["mean"], self.body.pretrained_cfg["std"]
        num_stages = len(self.trunk.stages)
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(
                f"--frozen-stages must be in -1..{num_stages} (-1 none, 0 the stem, n the stem "
                f"and the first n stages), got {frozen_stages}"
            )
        for module in self._frozen_modules():
            module.requires_grad_(False)
        if frozen_stages >= 0:  # the position table belongs to the stem
            self.trunk.pos_embed.requires_grad_(False)

    @property
    def trunk(self) -> nn.Module:
        """The SG-Former inside timm's feature wrapper."""
        return self.body.model

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.trunk.stem, *self.trunk.stages[: self.frozen_stages]]

    def train(self, mode: bool = True) -> SGFormerFPN:
        super().train(mode)
        for module in self._frozen_modules():  # frozen stages keep eval behaviour (drop path)
            module.eval()
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """(B, 3, H, W) padded batch -> FPN maps (B, out_channels, ceil(H/s), ceil(W/s))."""
        features = self.body(x)
        return self.fpn(OrderedDict(zip(FPN_LEVELS, features, strict=True)))


def build_detector(
    model_name: str,
    num_classes: int,
    *,
    mask: bool = True,
    frozen_stages: int = -1,
    drop_path: float = 0.0,
    short_side: tuple[int, ...] = (800,),
    max_size: int = 1333,
    out_channels: int = 256,
    anchor_sizes: tuple[int, ...] = COCO_ANCHOR_SIZES,
    box_head_dim: int = 1024,
    mask_head_dim: int = 256,
    rpn_pre_nms_train: int = 2000,
    rpn_post_nms_train: int = 2000,
    rpn_pre_nms_test: int = 1000,
    rpn_post_nms_test: int = 1000,
    rpn_batch_size: int = 256,
    box_batch_size: int = 512,
    detections_per_img: int = 100,
    backbone_checkpoint: str | Path | None = None,
) -> nn.Module:
    """torchvision ``MaskRCNN`` (``FasterRCNN`` if not ``mask``) on SG-Former + FPN.

    ``num_classes`` counts object classes; the background label 0 is added here. The model
    takes a list of (3, H, W) images in [0, 1] of any sizes, resizes each to ``short_side``
    (a random choice per image when training with several) with the long side at most
    ``max_size``, and returns boxes in the input images' pixels.
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    if num_classes < 1:
        raise ValueError(f"need at least one object class, got {num_classes}")
    if len(anchor_sizes) != len(FPN_LEVELS) + 1:
        raise ValueError(
            f"--anchor-sizes needs one size per FPN level ({len(FPN_LEVELS) + 1}), got "
            f"{list(anchor_sizes)}"
        )
    backbone = SGFormerFPN(model_name, out_channels, frozen_stages, drop_path)
    if backbone_checkpoint is not None:
        load_backbone_weights(backbone.trunk, backbone_checkpoint)
    anchors = AnchorGenerator(
        tuple((int(s),) for s in anchor_sizes), (ANCHOR_RATIOS,) * len(anchor_sizes)
    )
    kwargs: dict[str, Any] = {
        "min_size": tuple(int(s) for s in short_side),
        "max_size": int(max_size),
        "image_mean": list(backbone.mean),
        "image_std": list(backbone.std),
        "rpn_anchor_generator": anchors,
        "rpn_pre_nms_top_n_train": rpn_pre_nms_train,
        "rpn_post_nms_top_n_train": rpn_post_nms_train,
        "rpn_pre_nms_top_n_test": rpn_pre_nms_test,
        "rpn_post_nms_top_n_test": rpn_post_nms_test,
        "rpn_batch_size_per_image": rpn_batch_size,
        "box_batch_size_per_image": box_batch_size,
        "box_detections_per_img": detections_per_img,
        "box_head": TwoMLPHead(out_channels * BOX_ROI_SIZE**2, box_head_dim),
        "box_predictor": FastRCNNPredictor(box_head_dim, num_classes + 1),
    }
    if not mask:
        return FasterRCNN(backbone, **kwargs)
    return MaskRCNN(
        backbone,
        mask_head=MaskRCNNHeads(out_channels, (mask_head_dim,) * 4, 1),
        mask_predictor=MaskRCNNPredictor(mask_head_dim, mask_head_dim, num_classes + 1),
        **kwargs,
    )


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float
) -> list[dict[str, Any]]:
    """AdamW groups: the backbone at ``lr * backbone_lr_mult``; no decay for norms, biases and
    the backbone's ``no_weight_decay`` names (``pos_embed``), as the paper's Swin-style setups."""
    model = unwrap_model(model)
    skip = {f"backbone.body.model.{n}" for n in model.backbone.trunk.no_weight_decay()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_backbone = name.startswith("backbone.body.")
        decay = not (param.ndim <= 1 or name.endswith(".bias") or name in skip)
        groups.setdefault((in_backbone, decay), []).append(param)
    return [
        {
            "params": params,
            "lr": lr * (backbone_lr_mult if in_backbone else 1.0),
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"{'backbone' if in_backbone else 'heads'}{'' if decay else '_no_decay'}",
        }
        for (in_backbone, decay), params in sorted(groups.items())
    ]
