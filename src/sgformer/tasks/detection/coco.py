"""COCO instances for detection: a checked dataset, results in COCO format, and COCO AP.

Annotation files are read with pycocotools after a structural check, so that a file that is not
COCO instances fails with a message that says what is missing. Bad annotations are handled as
the issue asks, and every case is counted in ``CocoInstances.stats``:

- boxes are clipped to their image; a box left with no area (zero-size, or wholly outside the
  image) is dropped from training targets (``dropped_boxes``);
- images listed in the file but missing on disk are skipped (``missing_images``), and are left
  out of the evaluation too, so they never count as misses;
- crowd regions (``iscrowd=1``) are no training targets (COCO's own convention) but stay in the
  ground truth, where COCOeval ignores detections on them.

Category ids (1..90 with gaps in COCO 2017) become contiguous labels 1..K for torchvision, label
0 being the background; ``category_ids[label - 1]`` maps back.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ...trainer import Batch

_logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("images", "annotations", "categories")
REQUIRED_IMAGE_KEYS = ("id", "file_name")
REQUIRED_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
MASK_THRESHOLD = 0.5  # Mask R-CNN mask probabilities -> binary masks (torchvision, Detectron2)
# COCOeval.stats order for iouType bbox/segm (pycocotools cocoeval.py summarize()).
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


@dataclass
class LoadStats:
    """What was dropped or skipped while reading an annotation file."""

    images: int = 0
    annotations: int = 0
    missing_images: int = 0
    dropped_boxes: int = 0
    clipped_boxes: int = 0
    crowd: int = 0
    missing_files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {
            "images": self.images,
            "annotations": self.annotations,
            "missing_images": self.missing_images,
            "dropped_boxes": self.dropped_boxes,
            "clipped_boxes": self.clipped_boxes,
            "crowd": self.crowd,
        }


def check_coco_json(data: Any, path: str | Path) -> None:
    """Raise ``ValueError`` unless ``data`` has the structure of a COCO instances file."""
    hint = (
        "expected a COCO instances file: a JSON object with 'images', 'annotations' and "
        "'categories' lists (e.g. annotations/instances_train2017.json)"
    )
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not COCO: the top level is {type(data).__name__}; {hint}")
    missing = [k for k in REQUIRED_KEYS if not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(f"{path} is not COCO: no {', '.join(missing)} list; {hint}")
    if not data["categories"]:
        raise ValueError(f"{path} has no categories; {hint}")
    for kind, items, keys in (
        ("image", data["images"], REQUIRED_IMAGE_KEYS),
        ("annotation", data["annotations"], REQUIRED_ANNOTATION_KEYS),
    ):
        for item in items:
            lacking = [k for k in keys if not isinstance(item, dict) or k not in item]
            if lacking:
                raise ValueError(f"{path}: {kind} entry {item!r:.120} has no {', '.join(lacking)}")
    category_ids = {c.get("id") for c in data["categories"] if isinstance(c, dict)}
    for ann in data["annotations"]:
        if ann["category_id"] not in category_ids:
            raise ValueError(
                f"{path}: annotation {ann['id']} has category_id {ann['category_id']}, which is "
                f"not among the categories {sorted(category_ids)}"
            )
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise ValueError(
                f"{path}: annotation {ann['id']} has bbox {bbox!r}; expected [x, y, width, height]"
            )


def load_coco(path: str | Path) -> Any:
    """A pycocotools ``COCO`` index of a checked instances file."""
    from pycocotools.coco import COCO

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not JSON ({err}); expected a COCO instances file") from err
    check_coco_json(data, path)
    data.setdefault("info", {})
    data.setdefault("licenses", [])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def clip_box(bbox: list[float], width: int, height: int) -> tuple[list[float], bool]:
    """COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` clipped to the image, and whether it was."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return [x1, y1, x2, y2], [x1, y1, x2, y2] != [x, y, x + w, y + h]


class CocoInstances(Dataset):
    """Images and Mask R-CNN targets of a COCO instances file.

    Item ``i`` is ``(image, target)``: image (3, H, W) float in [0, 1]; target with ``boxes``
    (N, 4) xyxy float, ``labels`` (N,) int64 in 1..K, ``masks`` (N, H, W) uint8 when
    ``with_masks``, and ``image_id``. Unreadable images give ``(None, file name)``.
    """

    def __init__(
        self,
        data_root: str | Path,
        ann_file: str | Path,
        *,
        with_masks: bool = True,
        hflip: float = 0.0,
        coco: Any = None,
    ) -> None:
        self.data_root = Path(data_root)
        if not self.data_root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.data_root}")
        self.ann_file = Path(ann_file)
        self.coco = coco if coco is not None else load_coco(ann_file)
        self.with_masks = with_masks
        self.hflip = hflip
        categories = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in categories]
        self.class_names = [str(c.get("name", c["id"])) for c in categories]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.stats = LoadStats(annotations=len(self.coco.dataset["annotations"]))
        self.image_ids: list[int] = []
        for image_id in sorted(self.coco.imgs):
            if (self.data_root / self.coco.imgs[image_id]["file_name"]).is_file():
                self.image_ids.append(image_id)
            else:
                self.stats.missing_images += 1
                self.stats.missing_files.append(self.coco.imgs[image_id]["file_name"])
        self.stats.images = len(self.image_ids)
        self._annotations = {i: self._clean(i) for i in self.image_ids}
        if self.stats.missing_images:
            _logger.warning(
                "%s: %d of %d listed images are missing in %s and skipped (first: %s)",
                self.ann_file,
                self.stats.missing_images,
                len(self.coco.imgs),
                self.data_root,
                self.stats.missing_files[0],
            )
        if self.stats.dropped_boxes:
            _logger.warning(
                "%s: dropped %d boxes with no area inside their image",
                self.ann_file,
                self.stats.dropped_boxes,
            )
        if not self.image_ids:
            raise ValueError(
                f"none of the {len(self.coco.imgs)} images of {self.ann_file} is in "
                f"{self.data_root}; check --data-root"
            )

    def _clean(self, image_id: int) -> list[tuple[dict[str, Any], list[float]]]:
        """Training annotations of one image with clipped xyxy boxes; counts what is dropped."""
        info = self.coco.imgs[image_id]
        width, height = info.get("width"), info.get("height")
        kept = []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                self.stats.crowd += 1
                continue
            if width is None or height is None:
                box, clipped = clip_box(ann["bbox"], 10**9, 10**9)  # clipped once the image loads
            else:
                box, clipped = clip_box(ann["bbox"], width, height)
            if box[2] <= box[0] or box[3] <= box[1]:
                self.stats.dropped_boxes += 1
                continue
            self.stats.clipped_boxes += int(clipped)
            kept.append((ann, box))
        return kept

    def __len__(self) -> int:
        return len(self.image_ids)

    def file_name(self, index: int) -> str:
        return self.coco.imgs[self.image_ids[index]]["file_name"]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]] | tuple[None, str]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.data_root / info["file_name"]
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"))
        except OSError as err:
            _logger.warning("skipped unreadable image %s: %s", path, err)
            return None, str(path)
        height, width = array.shape[:2]
        if (info.get("width", width), info.get("height", height)) != (width, height):
            raise ValueError(
                f"{path} is {width} x {height} but {self.ann_file} says "
                f"{info.get('width')} x {info.get('height')}; fix the file or the annotation"
            )
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0  # 3, H, W
        annotations = self._annotations[image_id]
        boxes = torch.tensor([b for _, b in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)  # N, 4
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        target: dict[str, Any] = {
            "boxes": boxes,
            "labels": torch.tensor(
                [self.label_of[a["category_id"]] for a, _ in annotations], dtype=torch.int64
            ),
            "image_id": image_id,
        }
        if self.with_masks:
            masks = [self._mask(a, height, width) for a, _ in annotations]
            target["masks"] = (
                torch.from_numpy(np.stack(masks))
                if masks
                else torch.zeros(0, height, width, dtype=torch.uint8)
            )  # N, H, W
        if self.hflip > 0 and torch.rand(()) < self.hflip:
            image = image.flip(-1)
            target["boxes"] = torch.stack(
                [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
            )  # N, 4
            if self.with_masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target

    def _mask(self, ann: dict[str, Any], height: int, width: int) -> np.ndarray:
        """(H, W) uint8 mask of a polygon or RLE segmentation; the box if there is none."""
        from pycocotools import mask as mask_utils

        segmentation = ann.get("segmentation")
        if not segmentation:
            x, y, w, h = ann["bbox"]
            mask = np.zeros((height, width), dtype=np.uint8)
            mask[
                max(int(y), 0) : max(int(np.ceil(y + h)), 0),
                max(int(x), 0) : max(int(np.ceil(x + w)), 0),
            ] = 1
            return mask
        if isinstance(segmentation, list):  # polygons
            rles = mask_utils.frPyObjects(segmentation, height, width)
            rle = mask_utils.merge(rles)
        elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        return mask_utils.decode(rle).astype(np.uint8)


def collate_detection(samples: list[tuple[Any, Any]]) -> Batch:
    """Lists of (3, H_i, W_i) images and their targets (sizes differ); unreadable files named."""
    good = [s for s in samples if s[0] is not None]
    skipped = [s[1] for s in samples if s[0] is None]
    return Batch([s[0] for s in good], [s[1] for s in good], skipped)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool/uint8 mask -> COCO compressed RLE with a str ``counts`` (JSON-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def to_coco_results(
    output: dict[str, torch.Tensor], image_id: int, category_ids: list[int]
) -> list[dict[str, Any]]:
    """One image's torchvision detections -> COCO results entries.

    Args:
        output: ``boxes`` (N, 4) xyxy in original pixels, ``labels`` (N,) in 1..K, ``scores``
            (N,), optional ``masks`` (N, 1, H, W) probabilities.
    """
    boxes = output["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)  # N, 4
    labels = output["labels"].tolist()
    scores = output["scores"].tolist()
    masks = None
    if "masks" in output:
        masks = (output["masks"][:, 0] >= MASK_THRESHOLD).cpu().numpy()  # N, H, W
    results = []
    for i, (box, label, score) in enumerate(zip(xywh.tolist(), labels, scores, strict=True)):
        entry = {
            "image_id": int(image_id),
            "category_id": int(category_ids[label - 1]),
            "bbox": [round(v, 2) for v in box],
            "score": round(float(score), 5),
        }
        if masks is not None:
            entry["segmentation"] = encode_mask(masks[i])
        results.append(entry)
    return results


def evaluate_coco(
    coco_gt: Any,
    results: list[dict[str, Any]],
    *,
    iou_types: tuple[str, ...] = IOU_TYPES,
    image_ids: list[int] | None = None,
) -> dict[str, float | None]:
    """COCO AP of ``results`` against ``coco_gt`` with pycocotools' COCOeval.

    Args:
        coco_gt: a pycocotools ``COCO`` (``load_coco``).
        results: COCO results entries (``image_id``, ``category_id``, ``bbox`` xywh, ``score``,
            ``segmentation`` RLE for segm).
        iou_types: ``bbox`` and/or ``segm``.
        image_ids: evaluate these images only (default all of ``coco_gt``); images that could
            not be read are left out here, so they do not count as misses.

    Returns:
        ``{f"{iou_type}_{name}"}`` for name in AP, AP50, AP75, APs, APm, APl: fractions in
        [0, 1]; None where COCOeval has no ground truth to measure (e.g. no large objects).
    """
    from pycocotools.cocoeval import COCOeval

    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou type must be one of {IOU_TYPES}, got {iou_type!r}")
    metrics: dict[str, float | None] = {}
    for iou_type in iou_types:
        usable = [r for r in results if iou_type != "segm" or "segmentation" in r]
        if not usable:  # COCO.loadRes rejects an empty list: nothing detected scores 0
            stats = [0.0] * len(COCO_STAT_NAMES)
        else:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
                coco_dt = coco_gt.loadRes([dict(r) for r in usable])
                evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
                if image_ids is not None:
                    evaluator.params.imgIds = sorted(image_ids)
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
            stats = evaluator.stats[: len(COCO_STAT_NAMES)].tolist()
        for name, value in zip(COCO_STAT_NAMES, stats, strict=True):
            metrics[f"{iou_type}_{name}"] = None if value < 0 else float(value)
    return metrics
