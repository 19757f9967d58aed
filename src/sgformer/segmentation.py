"""Semantic segmentation on SG-Former: smp UperNet / Semantic FPN heads, ADE20K-layout data, mIoU.

The paper's ADE20K numbers (Semantic FPN 80k, UperNet 160k; docs/design.md, "Training
recipes") came from OpenMMLab configs that were never released. This module rebuilds that
pipeline from maintained parts: segmentation-models-pytorch decoders on the ``tu-sgformer_*``
timm encoder, torchvision functional ops for the augmentation, torchmetrics for IoU and pixel
accuracy, and the run helpers of ``runtime.py`` (distributed setup, seeding, AMP),
``checkpoint.py`` (the run format) and ``engine.py`` (optimiser step, non-finite guard). One
iteration-based loop (``train_segmentation``) reads top to bottom.

Data follow the ADE20K layout: ``ROOT/images/{split}/NAME.jpg|png`` with
``ROOT/annotations/{split}/NAME.png``, single-channel PNGs of class indices. With
``reduce_zero_label`` (ADE20K) label 0 ("other") becomes ``ignore_index`` and every other label
drops by one, as mmseg's ``LoadAnnotations(reduce_zero_label=True)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from .checkpoint import (
    LAST_CHECKPOINT,
    Run,
    load_run,
    plain_args,
    save_run,
)
from .engine import (
    IMAGE_EXTENSIONS,
    check_finite_loss,
    check_not_finished,
    collect_images,
    create_optimizer,
    load_backbone_weights,
    optimizer_step,
    restore_training_state,
    resume_args,
    sharded_loader,
    training_state,
    write_args,
    write_summary_csv,
)
from .runtime import (
    Distributed,
    ScalarLog,
    amp_settings,
    autocast,
    epoch_seed,
    make_scaler,
    progress_bar,
    reduce_sum,
    seed_everything,
    setup_distributed,
    wrap_distributed,
)

_logger = logging.getLogger(__name__)

TASK = "segmentation"
IGNORE_INDEX = 255  # mmseg's ignore label; reduce_zero_label maps ADE20K's "other" (0) here
PAD_DIVISOR = 32  # smp checks that H and W divide by the encoder's output stride
DECODERS = ("upernet", "fpn")
FPN_GROUPS = 32  # smp's FPN segmentation blocks use GroupNorm(32)
AUX_WEIGHT = 0.4  # mmseg UperNet configs: auxiliary FCN head on stage 3, loss weight 0.4
AUX_STAGE = 3  # stage 3 (stride 16) as mmseg's ``in_index=2``
AUX_CHANNELS = 256  # mmseg FCNHead channels for Swin/PVT-sized backbones
AUX_DROPOUT = 0.1
MIN_BATCHNORM_BATCH = 2  # BatchNorm in training needs two samples (PPM cells are 1 x 1)
SCALE_RANGE = (0.5, 2.0)  # mmseg ``ratio_range`` of the ADE20K pipeline
LONG_TO_SHORT = 4  # mmseg ``img_scale=(2048, 512)``: long side budget = 4 x short side
CAT_MAX_RATIO = 0.75  # a random crop may be at most 75 % one class (mmseg RandomCrop)
CROP_TRIES = 10
HFLIP_PROB = 0.5
# mmseg PhotoMetricDistortion (brightness +-32 of 255, contrast and saturation 0.5-1.5, hue +-18
# degrees) as torchvision ColorJitter factors.
PHOTOMETRIC = {"brightness": 32 / 255, "contrast": 0.5, "saturation": 0.5, "hue": 18 / 360}
MEAN = (0.485, 0.456, 0.406)  # ImageNet, as the classification weights were trained
STD = (0.229, 0.224, 0.225)
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmseg ADE20K aug_test
SLIDE_STRIDE_FRACTION = 2 / 3  # mmseg slide: stride 341 for 512 crops
WARMUP_RATIO = 1e-6  # mmseg linear warm-up starts at lr x 1e-6
PALETTE_SEED = 20230802
OVERLAY_OPACITY = 0.5
SHAPES_SPLITS = ("training", "validation")

# ---------------------------------------------------------------------------------------------
# Schedules: the one place the paper's numbers live. Explicit flags win over a schedule, which
# wins over SEG_DEFAULTS. Batch sizes are per process (-b), as timm's train.py.
SCHEDULES: dict[str, dict[str, Any]] = {
    # UperNet, ADE20K: AdamW lr 6e-5 wd 0.01, 1500 linear warm-up iterations, linear decay,
    # 160k iterations, batch 16 (8 GPUs x 2), 512 x 512 crops; aux FCN head as mmseg's config.
    "upernet_160k": {
        "decoder": "upernet",
        "iters": 160_000,
        "batch_size": 2,
        "lr": 6e-5,
        "weight_decay": 0.01,
        "warmup_iters": 1500,
        "power": 1.0,
        "crop_size": 512,
        "base_size": 512,
        "decoder_channels": 512,
        "aux_head": True,
        "val_interval": 16_000,
        "num_classes": 150,
        "reduce_zero_label": True,
    },
    # Semantic FPN, ADE20K: AdamW lr 1e-4 wd 1e-4, 80k iterations, batch 16. The paper gives no
    # schedule shape; this is PVT's Semantic FPN config (poly 0.9, no warm-up), which it follows.
    "fpn_80k": {
        "decoder": "fpn",
        "iters": 80_000,
        "batch_size": 2,
        "lr": 1e-4,
        "weight_decay": 1e-4,
        "warmup_iters": 0,
        "power": 0.9,
        "crop_size": 512,
        "base_size": 512,
        "decoder_channels": 256,
        "aux_head": False,
        "val_interval": 8_000,
        "num_classes": 150,
        "reduce_zero_label": True,
    },
    # Built-in shapes scenes (128 px, 8 shapes + background) with sgformer_nano on a 2-core CPU
    # in under 10 minutes (about 5 iterations/s): full resolution, 96 px crops, a narrow rescale
    # range; from `make demo`'s classifier (--backbone-checkpoint runs/demo/best.pth) as the
    # paper starts from ImageNet weights (docs/segmentation.md).
    "shapes": {
        "model": "sgformer_nano",
        "decoder": "upernet",
        "iters": 2400,
        "batch_size": 8,
        "lr": 2e-3,
        "weight_decay": 0.01,
        "warmup_iters": 50,
        "power": 1.0,
        "crop_size": 96,
        "base_size": 128,
        "scale_range": (0.75, 1.5),
        "decoder_channels": 64,
        "aux_head": False,
        "val_interval": 600,
        "num_classes": 9,
        "reduce_zero_label": False,
        "drop_path": 0.0,
    },
}
PAPER_GLOBAL_BATCH = 16

SEG_DEFAULTS: dict[str, Any] = {
    "data_root": None,
    "schedule": None,  # shapes without --data-root; else upernet_160k or fpn_80k by --decoder
    "train_split": "training",
    "val_split": "validation",
    "model": "sgformer_s",
    "decoder": "upernet",
    "num_classes": None,
    "ignore_index": IGNORE_INDEX,
    "reduce_zero_label": True,
    "backbone_checkpoint": None,
    "resume": None,
    "iters": 160_000,
    "batch_size": 2,
    "lr": 6e-5,
    "weight_decay": 0.01,
    "warmup_iters": 1500,
    "power": 1.0,
    "min_lr": 0.0,
    "crop_size": 512,
    "base_size": 512,
    "scale_range": SCALE_RANGE,
    "decoder_channels": 256,
    "aux_head": False,
    "drop_path": 0.1,
    "clip_grad": None,
    "amp": False,
    "amp_dtype": None,
    "mode": "whole",
    "val_interval": 16_000,
    "time_limit": None,  # minutes; stop early (then evaluate and checkpoint) when reached
    "workers": min(4, os.cpu_count() or 1),
    "seed": 0,
    "output": "runs/segment",
    "log_interval": 50,
    "log": "csv",
    "device": None,
}
# On --resume these come from the command line; everything else from the checkpoint.
RESUME_OVERRIDABLE = {
    "iters",
    "output",
    "workers",
    "log_interval",
    "log",
    "device",
    "val_interval",
    "time_limit",
}


def resolve_segment_args(given: dict[str, Any]) -> argparse.Namespace:
    """Explicit flags (not None) win over the schedule, which wins over ``SEG_DEFAULTS``."""
    name = given.get("schedule")
    if name is None:
        decoder = given.get("decoder") or SEG_DEFAULTS["decoder"]
        if given.get("data_root") is None:
            name = "shapes"
        else:
            name = "upernet_160k" if decoder == "upernet" else "fpn_80k"
    if name not in SCHEDULES:
        raise ValueError(f"unknown --schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    merged = {**SEG_DEFAULTS, **SCHEDULES[name]}
    merged.update({k: v for k, v in given.items() if v is not None})
    merged["schedule"] = name
    merged["scale_range"] = tuple(float(v) for v in merged["scale_range"])
    args = argparse.Namespace(**merged)
    if args.decoder not in DECODERS:
        raise ValueError(f"--decoder must be one of {', '.join(DECODERS)}, got {args.decoder!r}")
    if args.mode not in ("whole", "slide"):
        raise ValueError(f"--mode must be whole or slide, got {args.mode!r}")
    for key in ("iters", "batch_size", "crop_size", "base_size", "val_interval"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup_iters < 0:
        raise ValueError(f"--warmup-iters must be >= 0, got {args.warmup_iters}")
    if args.crop_size < PAD_DIVISOR:
        raise ValueError(f"--crop-size {args.crop_size} is below the minimum {PAD_DIVISOR}")
    return args


# ---------------------------------------------------------------------------------------------
# Model: smp decoder on the ``tu-`` SG-Former encoder, padded to stride 32, optional aux head.


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


# ---------------------------------------------------------------------------------------------
# Data: ADE20K layout; pairs without a partner are skipped and counted, bad labels are errors.


def find_pairs(root: str | Path, split: str) -> tuple[list[tuple[Path, Path]], int]:
    """(image, annotation) pairs of ``ROOT/images/split`` and ``ROOT/annotations/split`` by
    file stem, and the number of files without a partner (skipped with a warning)."""
    root = Path(root)
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} not found: --data-root must hold images/{split}/ and "
                f"annotations/{split}/ (the ADE20K layout)"
            )
    images = {
        p.relative_to(image_dir).with_suffix(""): p
        for p in image_dir.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
    }
    labels = {
        p.relative_to(label_dir).with_suffix(""): p
        for p in label_dir.rglob("*")
        if p.suffix.lower() == ".png"
    }
    pairs = [(images[k], labels[k]) for k in sorted(images.keys() & labels.keys())]
    unpaired = len(images.keys() ^ labels.keys())
    if unpaired:
        _logger.warning(
            "%s: skipped %d files without a partner (%d images without an annotation, %d "
            "annotations without an image)",
            root / "*" / split,
            unpaired,
            len(images.keys() - labels.keys()),
            len(labels.keys() - images.keys()),
        )
    if not pairs:
        raise ValueError(
            f"no image/annotation pairs in {image_dir} and {label_dir}: an image NAME.jpg needs "
            "the label map NAME.png"
        )
    return pairs, unpaired


def read_label(
    path: str | Path, *, num_classes: int, ignore_index: int, reduce_zero_label: bool
) -> np.ndarray:
    """A label PNG as an (H, W) int64 array of class indices and ``ignore_index``.

    Raises ``ValueError`` naming the file and the value when a label is not a class index
    (>= ``num_classes``) nor ``ignore_index``.
    """
    with Image.open(path) as image:
        if image.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(
                f"{path} is a {image.mode} image; label maps must be single-channel PNGs of "
                "class indices"
            )
        label = np.asarray(image, dtype=np.int64)
    if reduce_zero_label:
        label = np.where(label == 0, ignore_index, label - 1)
        label[label == ignore_index - 1] = ignore_index  # 255 stays ignored after the shift
    bad = (label >= num_classes) & (label != ignore_index)
    if bad.any():
        value = int(label[bad].max()) + int(reduce_zero_label)
        raise ValueError(
            f"{path} holds label value {value}, which is neither a class (num_classes "
            f"{num_classes}{', after reduce_zero_label' if reduce_zero_label else ''}) nor "
            f"ignore_index {ignore_index}; fix the mask or pass --num-classes / --ignore-index"
            + ("" if reduce_zero_label else " (or --reduce-zero-label for ADE20K-style data)")
        )
    return label


def rescaled_size(height: int, width: int, short: float) -> tuple[int, int]:
    """mmseg ``Resize(keep_ratio=True)`` to ``(LONG_TO_SHORT * short, short)``: the largest
    size with the same aspect whose long side fits the long budget and short side the short."""
    scale = min(LONG_TO_SHORT * short / max(height, width), short / min(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


class TrainTransform:
    """The paper's ADE20K training pipeline (mmseg): random rescale in ``scale_range`` around
    ``base_size``, random crop (at most ``CAT_MAX_RATIO`` one class), flip, photometric
    distortion, normalise, pad to the crop with 0 (image) and ``ignore_index`` (label)."""

    def __init__(
        self,
        crop_size: int,
        base_size: int,
        scale_range: tuple[float, float] = SCALE_RANGE,
        ignore_index: int = IGNORE_INDEX,
    ):
        self.crop_size, self.base_size = crop_size, base_size
        self.scale_range, self.ignore_index = scale_range, ignore_index
        self.photometric = v2.ColorJitter(**PHOTOMETRIC)

    def _crop_box(self, label: torch.Tensor) -> tuple[int, int]:
        height, width = label.shape[-2:]
        top = left = 0
        for _ in range(CROP_TRIES):
            top = random.randint(0, max(height - self.crop_size, 0))
            left = random.randint(0, max(width - self.crop_size, 0))
            window = label[..., top : top + self.crop_size, left : left + self.crop_size]
            _, counts = window[window != self.ignore_index].unique(return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < CAT_MAX_RATIO:
                break
        return top, left

    def __call__(self, image: Image.Image, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL image and (H, W) labels -> (3, S, S) float image and (S, S) int64 labels."""
        pixels = TF.pil_to_tensor(image.convert("RGB"))  # 3, H, W uint8
        target = torch.from_numpy(label)[None]  # 1, H, W
        ratio = random.uniform(*self.scale_range)
        size = list(rescaled_size(*pixels.shape[-2:], self.base_size * ratio))
        pixels = TF.resize(pixels, size, InterpolationMode.BILINEAR, antialias=True)
        target = TF.resize(target, size, InterpolationMode.NEAREST)
        top, left = self._crop_box(target)
        pixels = pixels[:, top : top + self.crop_size, left : left + self.crop_size]
        target = target[:, top : top + self.crop_size, left : left + self.crop_size]
        if random.random() < HFLIP_PROB:
            pixels, target = pixels.flip(-1), target.flip(-1)
        pixels = self.photometric(pixels)
        tensor = TF.normalize(pixels.float() / 255, MEAN, STD)
        pad_h, pad_w = self.crop_size - tensor.shape[-2], self.crop_size - tensor.shape[-1]
        tensor = F.pad(tensor, (0, pad_w, 0, pad_h), value=0.0)  # 3, S, S
        target = F.pad(target, (0, pad_w, 0, pad_h), value=self.ignore_index)  # 1, S, S
        return tensor, target[0]


def normalize_image(image: Image.Image) -> torch.Tensor:
    """A PIL image as a normalised float tensor (3, H, W)."""
    pixels = TF.pil_to_tensor(image.convert("RGB")).float() / 255  # 3, H, W
    return TF.normalize(pixels, MEAN, STD)


def eval_transform(image: Image.Image, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Full image, normalised (3, H, W), and its labels (H, W); resizing happens in inference."""
    return normalize_image(image), torch.from_numpy(label)


@dataclass
class Sample:
    image: torch.Tensor | None  # 3, H, W (None: unreadable image or bad data)
    label: torch.Tensor | None  # H, W int64
    name: str
    error: str | None = None  # bad data: raised in the main process, not in a worker


@dataclass
class Batch:
    images: torch.Tensor  # B, 3, S, S
    labels: torch.Tensor  # B, S, S
    unreadable: int  # images skipped in this batch
    errors: list[str]

    def check(self) -> None:
        """Raise the first data error (a clean one-line ValueError, whatever the worker)."""
        if self.errors:
            raise ValueError(self.errors[0])


class SegmentationDataset(Dataset):
    """Image/label pairs of one split; unreadable images come back as ``Sample(None, ...)``."""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        transform: Callable[[Image.Image, np.ndarray], tuple[torch.Tensor, torch.Tensor]],
        *,
        num_classes: int,
        ignore_index: int,
        reduce_zero_label: bool,
    ):
        self.pairs, self.transform = list(pairs), transform
        self.label_kwargs = {
            "num_classes": num_classes,
            "ignore_index": ignore_index,
            "reduce_zero_label": reduce_zero_label,
        }

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:
        image_path, label_path = self.pairs[index]
        try:
            label = read_label(label_path, **self.label_kwargs)
            with Image.open(image_path) as image:
                image.load()
                if image.size != (label.shape[1], label.shape[0]):
                    raise ValueError(
                        f"{image_path} is {image.size[0]}x{image.size[1]} but its annotation "
                        f"{label_path} is {label.shape[1]}x{label.shape[0]}; they must match"
                    )
                pixels, target = self.transform(image, label)
        except ValueError as err:
            return Sample(None, None, str(image_path), error=str(err))
        except OSError as err:
            _logger.warning("skipped unreadable image %s: %s", image_path, err)
            return Sample(None, None, str(image_path))
        return Sample(pixels, target, str(image_path))


def collate_samples(samples: list[Sample]) -> Batch:
    """Stack the readable samples (B, 3, S, S), (B, S, S); count the unreadable ones."""
    good = [s for s in samples if s.image is not None]
    errors = [s.error for s in samples if s.error is not None]
    unreadable = len(samples) - len(good) - len(errors)
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), unreadable, errors)
    images = torch.stack([s.image for s in good])
    labels = torch.stack([s.label for s in good])
    return Batch(images, labels, unreadable, errors)


# ---------------------------------------------------------------------------------------------
# Inference: whole image or sliding window, at one or several scales, with optional flip.


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
    amp: bool = False,
    amp_dtype: torch.dtype = torch.bfloat16,
) -> dict[str, Any]:
    """mIoU, aAcc, per-class IoU over every rank's shard (batch 1: images keep their size)."""
    model.eval()
    device = dist_info.device
    metrics = SegmentationMetrics(num_classes, ignore_index, device)
    seen, skipped = 0, 0
    start = time.perf_counter()
    bar = progress_bar(len(loader), "val", dist_info.is_main)
    for batch in loader:
        batch.check()
        skipped += batch.unreadable
        for image, label in zip(batch.images, batch.labels, strict=True):
            with autocast(device, amp, amp_dtype):
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


# ---------------------------------------------------------------------------------------------
# Training: iteration-based, linear warm-up then poly (power 1: linear) decay.


def lr_factor(
    iteration: int, total: int, warmup_iters: int, power: float, min_ratio: float = 0.0
) -> float:
    """Multiplier of the base lr after ``iteration`` updates: mmseg's poly decay from 1 to
    ``min_ratio`` over ``total`` iterations, times a linear warm-up from ``WARMUP_RATIO``."""
    progress = min(iteration, total) / total
    factor = (1 - progress) ** power * (1 - min_ratio) + min_ratio
    if iteration < warmup_iters:
        factor *= 1 - (1 - iteration / warmup_iters) * (1 - WARMUP_RATIO)
    return factor


def _data_setup(args: argparse.Namespace) -> tuple[Path, list[str] | None]:
    """The data root (generating the shapes scenes without --data-root) and class names."""
    if args.data_root is not None:
        return Path(args.data_root), None
    from .data import DEFAULT_ROOT, write_shapes_dataset

    # The built-in data folder is the project's: a dataset of other defaults (an older version)
    # is rewritten; one with these defaults is kept as it is.
    summary = write_shapes_dataset(DEFAULT_ROOT, force=True)
    return Path(summary["dense"]), ["background", *summary["classes"]]


def _endless(loader: DataLoader, first_pass: int, seed: int, rank: int) -> Iterator[Batch]:
    """Batches forever. Every pass over the data starts from a seed known from its number alone
    (``epoch_seed``) and reshuffles (``set_epoch``), so a run resumed at a pass boundary repeats
    the uninterrupted one."""
    pass_index = first_pass
    while True:
        seed_everything(epoch_seed(seed, pass_index, rank))
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(pass_index)
        yield from loader
        pass_index += 1


def _resume_args(given: dict[str, Any]) -> tuple[argparse.Namespace, Run]:
    args, run = resume_args(given, RESUME_OVERRIDABLE, "schedule", TASK, SEG_DEFAULTS)
    args.scale_range = tuple(args.scale_range)
    return args, run


def _infer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"base_size": args.base_size, "mode": args.mode, "crop_size": args.crop_size}


def train_segmentation(given: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) as ``sgformer segment train`` describes; returns the last evaluation.

    ``given`` maps flag names to values, None where the flag was not given.
    """
    resumed: Run | None = None
    if given.get("resume"):
        args, resumed = _resume_args(given)
    else:
        args = resolve_segment_args(given)
    dist_info = setup_distributed(args.device)
    output = Path(args.output)
    last_path = output / LAST_CHECKPOINT

    # Data first: a wrong folder should fail before a model is built.
    data_root, class_names = _data_setup(args)
    if resumed is not None:
        class_names = resumed.data.get("class_names")
    args.data_root = str(data_root)
    label_kwargs = {
        "num_classes": args.num_classes,
        "ignore_index": args.ignore_index,
        "reduce_zero_label": args.reduce_zero_label,
    }
    train_pairs, train_unpaired = find_pairs(data_root, args.train_split)
    val_pairs, val_unpaired = find_pairs(data_root, args.val_split)
    train_set = SegmentationDataset(
        train_pairs,
        TrainTransform(args.crop_size, args.base_size, args.scale_range, args.ignore_index),
        **label_kwargs,
    )
    val_set = SegmentationDataset(val_pairs, eval_transform, **label_kwargs)
    global_batch = args.batch_size * dist_info.world_size
    if len(train_set) < global_batch:
        raise ValueError(
            f"{len(train_set)} training images make no full batch of {global_batch} "
            f"(-b {args.batch_size} x {dist_info.world_size} processes); lower -b"
        )

    seed_everything(args.seed)
    model_kwargs = {
        "decoder": args.decoder,
        "num_classes": args.num_classes,
        "decoder_channels": args.decoder_channels,
        "aux_head": args.aux_head,
        "drop_path_rate": args.drop_path,
        "img_size": args.crop_size,
    }
    model = build_segmentation_model(args.model, **model_kwargs)
    if args.backbone_checkpoint and resumed is None:
        load_backbone_weights(model.backbone, args.backbone_checkpoint)
    if dist_info.enabled and dist_info.device.type == "cuda":
        # Batch 2 per GPU: the heads' BatchNorm sees all ranks' samples (mmseg's SyncBN).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(dist_info.device)
    optimizer = create_optimizer(model, "adamw", args.lr, args.weight_decay)
    min_ratio = args.min_lr / args.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, args.iters, args.warmup_iters, args.power, min_ratio)
    )
    amp_dtype = amp_settings(args.amp, args.amp_dtype, dist_info.device)
    scaler = make_scaler(args.amp, amp_dtype, dist_info.device)
    loss_fn = nn.CrossEntropyLoss(ignore_index=args.ignore_index)

    iteration, history, best = 0, [], {"mIoU": -1.0, "iteration": -1}
    if resumed is not None:
        restore_training_state(resumed, model, optimizer, scheduler, scaler)
        iteration, history, best = resumed.state["iteration"], resumed.history, resumed.best
        _logger.info("resumed from %s at iteration %d", args.resume, iteration)
    check_not_finished(iteration, args.iters, "iterations", "--iters")

    train_loader = sharded_loader(
        train_set,
        batch_size=args.batch_size,
        workers=args.workers,
        dist_info=dist_info,
        is_training=True,
        seed=args.seed,
        collate_fn=collate_samples,
        persistent_workers=True,  # the iteration loop passes over the data many times
    )
    val_loader = sharded_loader(
        val_set,
        batch_size=1,
        workers=args.workers,
        dist_info=dist_info,
        is_training=False,
        seed=0,
        collate_fn=collate_samples,
    )
    train_model = wrap_distributed(model, dist_info)
    scalars = ScalarLog(output, args.log, enabled=dist_info.is_main)
    if dist_info.is_main:
        write_args(output, args)
        _logger.info(
            "training %s + %s (%d classes, schedule %s) on %d images (%d unpaired files "
            "skipped), %d processes, global batch %d, %d iterations",
            args.model,
            args.decoder,
            args.num_classes,
            args.schedule,
            len(train_set),
            train_unpaired + val_unpaired,
            dist_info.world_size,
            global_batch,
            args.iters,
        )
        if args.schedule != "shapes" and global_batch != PAPER_GLOBAL_BATCH:
            _logger.warning(
                "global batch %d differs from the paper's %d; the lr is not rescaled",
                global_batch,
                PAPER_GLOBAL_BATCH,
            )

    passes = iteration // len(train_loader)
    loss_sum, loss_count, skipped, window_start = 0.0, 0, 0, time.perf_counter()
    row: dict[str, Any] = {}
    deadline = None if args.time_limit is None else time.perf_counter() + 60 * args.time_limit
    bar = progress_bar(args.iters - iteration, "train", dist_info.is_main)
    train_model.train()
    for batch in _endless(train_loader, passes, args.seed, dist_info.rank):
        batch.check()
        skipped += batch.unreadable
        # A batch that unreadable files left with one image is passed over too: the heads'
        # BatchNorm cannot train on a single sample.
        if len(batch.images) < min(MIN_BATCHNORM_BATCH, args.batch_size):
            continue
        images, labels = batch.images.to(dist_info.device), batch.labels.to(dist_info.device)
        with autocast(dist_info.device, args.amp, amp_dtype):
            logits, aux = train_model(images)
            loss = loss_fn(logits.float(), labels)
            if aux is not None:
                loss = loss + AUX_WEIGHT * loss_fn(aux.float(), labels)
        check_finite_loss(loss, dist_info, f"iteration {iteration + 1}", last_path)
        optimizer.zero_grad(set_to_none=True)
        optimizer_step(loss, optimizer, scaler, args.clip_grad, model.parameters())
        scheduler.step()
        iteration += 1
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if bar.disable and args.log_interval and iteration % args.log_interval == 0:
            _logger.info(
                "iteration %d/%d  loss %.4f  lr %.3g",
                iteration,
                args.iters,
                loss.item(),
                optimizer.param_groups[0]["lr"],
            )
        out_of_time = deadline is not None and time.perf_counter() >= deadline
        if dist_info.enabled:  # every rank stops at the same iteration
            out_of_time = reduce_sum([float(out_of_time)], dist_info)[0] > 0
        finished = iteration >= args.iters or out_of_time
        if iteration % args.val_interval and not finished:
            continue
        if out_of_time and iteration < args.iters:
            _logger.warning(
                "--time-limit %g min reached at iteration %d of %d; stopping",
                args.time_limit,
                iteration,
                args.iters,
            )

        # Evaluate and checkpoint.
        train_time = time.perf_counter() - window_start
        loss_total, count_total, skipped_total = reduce_sum(
            [loss_sum, loss_count, skipped], dist_info
        )
        metrics = evaluate(
            model,
            val_loader,
            num_classes=args.num_classes,
            ignore_index=args.ignore_index,
            dist_info=dist_info,
            class_names=class_names,
            infer_kwargs=_infer_kwargs(args),
            amp=args.amp,
            amp_dtype=amp_dtype,
        )
        row = {
            "iteration": iteration,
            "train_loss": loss_total / max(count_total, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "mIoU": metrics["mIoU"],
            "aAcc": metrics["aAcc"],
            "iters_per_s": loss_count / train_time,
            "train_skipped": int(skipped_total),
            "val_skipped": metrics["skipped"],
        }
        history.append(row)
        is_best = row["mIoU"] > best["mIoU"]
        if is_best:
            best = {"mIoU": row["mIoU"], "iteration": iteration}
        if dist_info.is_main:
            row_metrics = {**row, "per_class_iou": metrics["per_class_iou"]}
            state = training_state(
                model, optimizer, scheduler, scaler, iteration=iteration, metrics=row_metrics
            )
            data = {"class_names": class_names, "num_classes": args.num_classes}
            run = Run(TASK, args.model, model_kwargs, plain_args(args), state, history, best, data)
            save_run(output, run, is_best)
            write_summary_csv(output, history, SUMMARY_FIELDS)
            scalars.write(row, iteration)
        _logger.info(
            "iteration %d/%d  train loss %.4f  mIoU %.2f  aAcc %.2f  lr %.3g  %.2f it/s",
            iteration,
            args.iters,
            row["train_loss"],
            100 * row["mIoU"],
            100 * row["aAcc"],
            row["lr"],
            row["iters_per_s"],
        )
        if finished:
            break
        loss_sum, loss_count, skipped, window_start = 0.0, 0, 0, time.perf_counter()
        train_model.train()
    bar.close()
    scalars.close()
    if dist_info.enabled:
        dist.barrier()
    return {
        **row,
        "per_class_iou": metrics["per_class_iou"],
        "best_mIoU": best["mIoU"],
        "best_iteration": best["iteration"],
        "output": str(output),
    }


SUMMARY_FIELDS = (
    "iteration",
    "train_loss",
    "lr",
    "mIoU",
    "aAcc",
    "iters_per_s",
    "train_skipped",
    "val_skipped",
)


# ---------------------------------------------------------------------------------------------
# Validation and prediction from a checkpoint.


def segmenter_from_checkpoint(path: str | Path) -> tuple[SegmentationModel, Run]:
    """The segmentation model of a ``segment train`` checkpoint, and its run."""
    run = load_run(path, TASK)
    model = build_segmentation_model(run.model_name, **run.model_kwargs)
    model.load_state_dict(run.weights())
    return model, run


def _test_options(
    args: dict[str, Any],
    mode: str | None,
    crop_size: int | None,
    stride: int | None,
    ms: bool,
    flip: bool | None,
) -> dict[str, Any]:
    return {
        "base_size": args["base_size"],
        "mode": mode or args["mode"],
        "crop_size": crop_size or args["crop_size"],
        "stride": stride,
        "scales": MS_RATIOS if ms else (1.0,),
        "flip": ms if flip is None else flip,
    }


def validate_segmentation(
    checkpoint: str | Path,
    *,
    data_root: str | Path | None = None,
    split: str | None = None,
    mode: str | None = None,
    crop_size: int | None = None,
    stride: int | None = None,
    ms: bool = False,
    flip: bool | None = None,
    workers: int = 2,
    device: str | None = None,
    results_file: str | Path | None = None,
) -> dict[str, Any]:
    """``sgformer segment val``: mIoU, aAcc, per-class IoU of a checkpoint on a split.

    ``ms`` tests at ``MS_RATIOS`` with flip (flip alone with ``flip=True``); data root, split,
    label settings, mode and crop default to the training run's.
    """
    dist_info = setup_distributed(device)
    model, run = segmenter_from_checkpoint(checkpoint)
    model.to(dist_info.device)
    args = run.args
    root = Path(data_root or args["data_root"])
    pairs, unpaired = find_pairs(root, split or args["val_split"])
    dataset = SegmentationDataset(
        pairs,
        eval_transform,
        num_classes=args["num_classes"],
        ignore_index=args["ignore_index"],
        reduce_zero_label=args["reduce_zero_label"],
    )
    loader = sharded_loader(
        dataset,
        batch_size=1,
        workers=workers,
        dist_info=dist_info,
        is_training=False,
        seed=0,
        collate_fn=collate_samples,
    )
    options = _test_options(args, mode, crop_size, stride, ms, flip)
    metrics = evaluate(
        model,
        loader,
        num_classes=args["num_classes"],
        ignore_index=args["ignore_index"],
        dist_info=dist_info,
        class_names=run.data.get("class_names"),
        infer_kwargs=options,
    )
    result = {
        "model": run.model_name,
        "decoder": run.model_kwargs["decoder"],
        "checkpoint": str(checkpoint),
        "data_root": str(root),
        "split": split or args["val_split"],
        "unpaired_skipped": unpaired,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        **metrics,
    }
    if results_file is not None and dist_info.is_main:
        Path(results_file).write_text(json.dumps(result, indent=2) + "\n")
    return result


def palette(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colours: fixed for a given K, class 0 black (background in shapes data)."""
    colours = np.random.default_rng(PALETTE_SEED).integers(0, 256, (num_classes, 3))
    colours[0] = 0
    return colours.astype(np.uint8)


def save_prediction(
    image: Image.Image, pred: np.ndarray, colours: np.ndarray, stem: Path, opacity: float
) -> tuple[Path, Path]:
    """Write ``STEM_mask.png`` (palette PNG: pixel values are class indices, shown in colour)
    and ``STEM_overlay.png`` (the colours blended over the image)."""
    mask_path, overlay_path = Path(f"{stem}_mask.png"), Path(f"{stem}_overlay.png")
    mask = Image.fromarray(pred.astype(np.uint8), mode="P")
    mask.putpalette(colours.reshape(-1).tolist())
    mask.save(mask_path)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = (1 - opacity) * rgb + opacity * colours[pred].astype(np.float32)
    Image.fromarray(blended.round().astype(np.uint8)).save(overlay_path)
    return mask_path, overlay_path


def predict_segmentation(
    inputs: Iterable[str | Path],
    checkpoint: str | Path,
    *,
    output: str | Path = "segment_predictions",
    mode: str | None = None,
    crop_size: int | None = None,
    stride: int | None = None,
    ms: bool = False,
    flip: bool | None = None,
    opacity: float = OVERLAY_OPACITY,
    device: str | None = None,
) -> dict[str, Any]:
    """Colour-coded masks and overlays for images (files or folders) in ``output``.

    Returns ``{"written": [(mask, overlay), ...], "skipped": [unreadable files]}``.
    """
    if not 0 <= opacity <= 1:
        raise ValueError(f"--opacity must be within [0, 1], got {opacity}")
    run_device = setup_distributed(device).device
    model, run = segmenter_from_checkpoint(checkpoint)
    model.to(run_device).eval()
    args = run.args
    num_classes = args["num_classes"]
    if num_classes > 256:
        raise ValueError(f"palette PNGs hold at most 256 classes, the model has {num_classes}")
    options = _test_options(args, mode, crop_size, stride, ms, flip)
    colours = palette(num_classes)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for path in collect_images(inputs):
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except OSError as err:
            _logger.warning("skipped unreadable image %s: %s", path, err)
            skipped.append(str(path))
            continue
        tensor = normalize_image(image)
        probs = infer(model, tensor[None].to(run_device), num_classes=num_classes, **options)
        pred = probs.argmax(dim=1)[0].cpu().numpy()
        written.append(save_prediction(image, pred, colours, out / path.stem, opacity))
    return {"written": [tuple(map(str, w)) for w in written], "skipped": skipped}
