"""Segmentation models: an smp UperNet or Semantic FPN on the ``tu-sgformer_*`` timm encoder,
padded to stride 32 for inputs of any size, with mmseg's optional auxiliary FCN head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PAD_DIVISOR = 32  # smp checks that H and W divide by the encoder's output stride
DECODERS = ("upernet", "fpn")
FPN_GROUPS = 32  # smp's FPN segmentation blocks use GroupNorm(32)
AUX_WEIGHT = 0.4  # mmseg UperNet configs: auxiliary FCN head on stage 3, loss weight 0.4
AUX_STAGE = 3  # stage 3 (stride 16) as mmseg's ``in_index=2``
AUX_CHANNELS = 256  # mmseg FCNHead channels for Swin/PVT-sized backbones
AUX_DROPOUT = 0.1


def pad_to_multiple(
    images: torch.Tensor, divisor: int, value: float = 0.0
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad ``images`` (B, C, H, W) at the bottom and right so H and W divide by ``divisor``.

    Returns the padded tensor (B, C, H', W') and the (pad_h, pad_w) to crop away afterwards.
    """
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % divisor, (-width) % divisor
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h), value=value)  # B, C, H + pad_h, W + pad_w
    return images, (pad_h, pad_w)


class FCNHead(nn.Module):
    """Auxiliary head (mmseg FCNHead, one conv): 3x3 conv, BN, ReLU, dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = AUX_CHANNELS):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(AUX_DROPOUT)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) stage features -> (B, K, h, w) logits."""
        return self.classifier(self.dropout(self.conv(features)))


class SegmentationModel(nn.Module):
    """An smp UperNet or FPN on SG-Former features, for inputs of any size.

    ``forward`` returns (logits, aux_logits): (B, K, H, W) at the input size, and the auxiliary
    head's (B, K, H, W) in training mode (None in eval mode or without an aux head).
    """

    def __init__(self, net: nn.Module, aux_head: FCNHead | None):
        super().__init__()
        self.net = net
        self.aux_head = aux_head

    @property
    def backbone(self) -> nn.Module:
        """The SG-Former inside smp's ``TimmUniversalEncoder`` and timm's feature getter."""
        return self.net.encoder.model.model

    def no_weight_decay(self) -> set[str]:
        """Full names of the backbone's no-decay tensors (pos_embed), for timm's optimiser."""
        prefix = "net.encoder.model.model."
        return {prefix + name for name in self.backbone.no_weight_decay()}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        height, width = images.shape[-2:]
        padded, _ = pad_to_multiple(images, PAD_DIVISOR)  # B, 3, H', W'
        # smp's list: input, an empty stride-2 map, then stages 1-4 (strides 4-32).
        features = self.net.encoder(padded)
        logits = self.net.segmentation_head(self.net.decoder(features))  # B, K, H', W'
        logits = logits[..., :height, :width]  # B, K, H, W
        aux = None
        if self.aux_head is not None and self.training:
            aux = self.aux_head(features[1 + AUX_STAGE])  # B, K, H'/16, W'/16
            aux = F.interpolate(aux, size=padded.shape[-2:], mode="bilinear", align_corners=False)
            aux = aux[..., :height, :width]  # B, K, H, W
        return logits, aux


def build_segmentation_model(
    model_name: str,
    decoder: str,
    num_classes: int,
    *,
    decoder_channels: int = 256,
    aux_head: bool = False,
    drop_path_rate: float = 0.1,
    img_size: int | None = None,
) -> SegmentationModel:
    """smp ``UPerNet``/``FPN`` with the ``tu-{model_name}`` encoder (random weights).

    smp's FPN is the Semantic FPN of Kirillov et al. (the paper's "Semantic FPN"): lateral 1x1
    convs and a top-down path with ``decoder_channels`` maps, per-level 3x3 conv + GroupNorm +
    ReLU + 2x upsampling to stride 4, summed, dropout, 1x1 classifier, 4x upsampling.
    """
    import segmentation_models_pytorch as smp

    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    encoder_kwargs: dict[str, Any] = {"drop_path_rate": drop_path_rate}
    if img_size is not None:
        encoder_kwargs["img_size"] = img_size  # sizes the position table; any input still runs
    common = {"encoder_weights": None, "classes": num_classes, **encoder_kwargs}
    if decoder == "upernet":
        net = smp.UPerNet(f"tu-{model_name}", decoder_channels=decoder_channels, **common)
    else:
        if (decoder_channels // 2) % FPN_GROUPS:
            raise ValueError(
                f"the fpn decoder needs --decoder-channels a multiple of {2 * FPN_GROUPS} (its "
                f"branches use half of it in GroupNorm({FPN_GROUPS})), got {decoder_channels}"
            )
        # mmseg's Semantic FPN head: 128-channel per-level branches, dropout 0.1.
        net = smp.FPN(
            f"tu-{model_name}",
            decoder_pyramid_channels=decoder_channels,
            decoder_segmentation_channels=decoder_channels // 2,
            decoder_dropout=0.1,
            **common,
        )
    head = None
    if aux_head:
        head = FCNHead(net.encoder.out_channels[1 + AUX_STAGE], num_classes)
    return SegmentationModel(net, head)
