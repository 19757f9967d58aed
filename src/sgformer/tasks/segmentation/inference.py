"""Segmentation inference (whole image or sliding window, one or several scales, flip) and
metrics (torchmetrics IoU per class and pixel accuracy, ignore index honoured, synced on ranks).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ...runtime import Distributed, progress_bar, reduce_sum
from .data import rescaled_size

MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmseg ADE20K aug_test
SLIDE_STRIDE_FRACTION = 2 / 3  # mmseg slide: stride 341 for 512 crops

_logger = logging.getLogger(__name__)


def slide_logits(
    model: nn.Module, image: torch.Tensor, crop_size: int, stride: int, num_classes: int
) -> torch.Tensor:
    """Logits (1, K, H, W) of a (1, 3, H, W) image from overlapping ``crop_size`` windows,
    ``stride`` apart (the last window of a row or column flush with the edge), averaged."""
    _, _, height, width = image.shape
    logits = image.new_zeros(1, num_classes, height, width)
    counts = image.new_zeros(1, 1, height, width)
    rows = max(math.ceil((height - crop_size) / stride), 0) + 1
    cols = max(math.ceil((width - crop_size) / stride), 0) + 1
    for row in range(rows):
        for col in range(cols):
            bottom = min(row * stride + crop_size, height)
            right = min(col * stride + crop_size, width)
            top, left = max(bottom - crop_size, 0), max(right - crop_size, 0)
            window = image[..., top:bottom, left:right]  # 1, 3, h, w
            logits[..., top:bottom, left:right] += model(window)[0].float()
            counts[..., top:bottom, left:right] += 1
    return logits / counts


@torch.no_grad()
def infer(
    model: nn.Module,
    image: torch.Tensor,
    *,
    num_classes: int,
    base_size: int,
    mode: str = "whole",
    crop_size: int = 512,
    stride: int | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Class probabilities (1, K, H, W) of a normalised (1, 3, H, W) image at its own size.

    The image is rescaled as in training (``rescaled_size`` of ``base_size`` x scale), run whole
    or by sliding windows, and the softmax of every scale (and flip) is averaged at (H, W).
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be whole or slide, got {mode!r}")
    stride = stride or max(1, round(crop_size * SLIDE_STRIDE_FRACTION))
    height, width = image.shape[-2:]
    probs = image.new_zeros(1, num_classes, height, width)
    for scale in scales:
        size = rescaled_size(height, width, base_size * scale)
        scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            view = scaled.flip(-1) if flipped else scaled
            if mode == "whole":
                logits = model(view)[0].float()  # 1, K, h, w
            else:
                logits = slide_logits(model, view, crop_size, stride, num_classes)
            if flipped:
                logits = logits.flip(-1)
            logits = F.interpolate(logits, size=(height, width), mode="bilinear")
            probs += logits.softmax(dim=1)
    return probs / (len(scales) * (2 if flip else 1))


# ---------------------------------------------------------------------------------------------
# Metrics: torchmetrics IoU per class and pixel accuracy, ignore index honoured, synced on ranks.


class SegmentationMetrics:
    """Per-class IoU (``MulticlassJaccardIndex``, NaN for classes absent from both prediction
    and truth, left out of the mean as mmseg does) and pixel accuracy ``aAcc``."""

    def __init__(self, num_classes: int, ignore_index: int, device: torch.device | str = "cpu"):
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        self.jaccard = MulticlassJaccardIndex(
            num_classes, average=None, ignore_index=ignore_index, zero_division=float("nan")
        ).to(device)
        self.accuracy = MulticlassAccuracy(
            num_classes, average="micro", ignore_index=ignore_index
        ).to(device)
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Class indices (B, H, W) against labels (B, H, W)."""
        self.jaccard.update(preds, target)
        self.accuracy.update(preds, target)

    def compute(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """``mIoU`` and ``aAcc`` as fractions, ``per_class_iou`` {name: IoU or None}."""
        iou = self.jaccard.compute().cpu()
        names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        per_class = {
            name: (None if math.isnan(v) else float(v))
            for name, v in zip(names, iou.tolist(), strict=True)
        }
        present = iou[~iou.isnan()]
        return {
            "mIoU": float(present.mean()) if len(present) else float("nan"),
            "aAcc": float(self.accuracy.compute()),
            "per_class_iou": per_class,
        }


def format_iou_table(result: dict[str, Any]) -> str:
    """The per-class IoU table (percent) with mIoU and aAcc, as mmseg prints it."""
    per_class = result["per_class_iou"]
    width = max([len("class"), *(len(n) for n in per_class)])
    lines = [f"{'class':<{width}}  IoU (%)", f"{'-' * width}  -------"]
    for name, iou in per_class.items():
        lines.append(f"{name:<{width}}  {'n/a' if iou is None else f'{100 * iou:7.2f}'}")
    lines.append(f"{'-' * width}  -------")
    lines.append(f"{'mIoU':<{width}}  {100 * result['mIoU']:7.2f}")
    lines.append(f"{'aAcc':<{width}}  {100 * result['aAcc']:7.2f}")
    return "\n".join(lines)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    num_classes: int,
    ignore_index: int,
    dist_info: Distributed,
    class_names: Sequence[str] | None = None,
    infer_kwargs: dict[str, Any],
    precision: Callable[[], Any] = contextlib.nullcontext,
    desc: str = "val",
) -> dict[str, Any]:
    """mIoU, aAcc, per-class IoU over every rank's shard (batch 1: images keep their size),
    and the unreadable images skipped; ``precision()`` is the autocast context."""
    model.eval()
    device = dist_info.device
    metrics = SegmentationMetrics(num_classes, ignore_index, device)
    seen, skipped = 0, 0
    start = time.perf_counter()
    bar = progress_bar(len(loader), desc, dist_info.is_main)
    for batch in loader:
        batch.check()
        skipped += len(batch.skipped)
        for name in batch.skipped:
            _logger.warning("skipped unreadable image %s", name)
        for image, label in zip(batch.inputs, batch.targets, strict=True):
            with precision():
                probs = infer(
                    model, image[None].to(device), num_classes=num_classes, **infer_kwargs
                )
            metrics.update(probs.argmax(dim=1), label[None].to(device))
            seen += 1
        bar.update()
    bar.close()
    seen_total, skipped_total = reduce_sum([seen, skipped], dist_info)
    if seen_total == 0:
        raise ValueError("no readable images in the validation split")
    result = metrics.compute(class_names)
    elapsed = time.perf_counter() - start
    return {
        **result,
        "images": int(seen_total),
        "skipped": int(skipped_total),
        "images_per_s": seen_total / elapsed,
    }
