"""Semantic segmentation: ``model`` (smp UperNet / Semantic FPN on SG-Former), ``data``
(ADE20K layout, mmseg pipeline), ``inference`` (sliding window, multi-scale, mIoU) and
``task`` (settings, training task, val and predict)."""

from .data import (
    IGNORE_INDEX,
    SegmentationDataset,
    TrainTransform,
    collate_samples,
    eval_transform,
    find_pairs,
    read_label,
    rescaled_size,
)
from .inference import MS_RATIOS, SegmentationMetrics, evaluate, format_iou_table, infer
from .model import SegmentationModel, build_segmentation_model, pad_to_multiple
from .task import (
    SCHEDULES,
    WARMUP_RATIO,
    SegmentationConfig,
    SegmentationTask,
    lr_factor,
    predict,
    segmenter_from_checkpoint,
    train,
    validate_checkpoint,
)

__all__ = [
    "IGNORE_INDEX",
    "MS_RATIOS",
    "SCHEDULES",
    "WARMUP_RATIO",
    "SegmentationConfig",
    "SegmentationDataset",
    "SegmentationMetrics",
    "SegmentationModel",
    "SegmentationTask",
    "TrainTransform",
    "build_segmentation_model",
    "collate_samples",
    "eval_transform",
    "evaluate",
    "find_pairs",
    "format_iou_table",
    "infer",
    "lr_factor",
    "pad_to_multiple",
    "predict",
    "read_label",
    "rescaled_size",
    "segmenter_from_checkpoint",
    "train",
    "validate_checkpoint",
]
