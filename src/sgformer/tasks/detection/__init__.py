"""Detection and instance segmentation: ``model`` (SG-Former + FPN + Mask R-CNN), ``coco``
(COCO instances and AP) and ``task`` (settings, training task, val and predict)."""

from .model import SGFormerFPN, build_detector, param_groups
from .task import (
    SCHEDULES,
    DetectionConfig,
    DetectionTask,
    detector_from_checkpoint,
    predict,
    train,
    validate_checkpoint,
)

__all__ = [
    "SCHEDULES",
    "DetectionConfig",
    "DetectionTask",
    "SGFormerFPN",
    "build_detector",
    "detector_from_checkpoint",
    "param_groups",
    "predict",
    "train",
    "validate_checkpoint",
]
