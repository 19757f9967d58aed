"""Segmentation data in the ADE20K layout: ``ROOT/images/{split}/NAME.jpg|png`` with
``ROOT/annotations/{split}/NAME.png``, single-channel PNGs of class indices, and mmseg's
training pipeline. With ``reduce_zero_label`` (ADE20K) label 0 ("other") becomes
``ignore_index`` and every other label drops by one, as mmseg's
``LoadAnnotations(reduce_zero_label=True)``. Pairs without a partner are skipped and counted,
unreadable images skipped and named, bad labels are errors that name file and value.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from ...trainer import Batch
from .. import IMAGE_EXTENSIONS

_logger = logging.getLogger(__name__)

IGNORE_INDEX = 255  # mmseg's ignore label; reduce_zero_label maps ADE20K's "other" (0) here
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
        except OSError:  # named by the batch, warned about by its reader
            return Sample(None, None, str(image_path))
        return Sample(pixels, target, str(image_path))


def collate_samples(samples: list[Sample]) -> Batch:
    """Stack the readable samples (B, 3, S, S), (B, S, S); name the unreadable ones and keep
    the data errors to raise in the main process."""
    good = [s for s in samples if s.image is not None]
    errors = [s.error for s in samples if s.error is not None]
    skipped = [s.name for s in samples if s.image is None and s.error is None]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped, errors)
    images = torch.stack([s.image for s in good])
    labels = torch.stack([s.label for s in good])
    return Batch(images, labels, skipped, errors)
