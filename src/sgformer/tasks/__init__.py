"""The three tasks that train through ``sgformer.trainer.fit``, one module or package each:

- ``classification``: ImageNet-style folders (timm data, recipes of the paper), top-1/top-5;
- ``detection``: Mask R-CNN / Faster R-CNN on SG-Former + FPN, COCO instances and AP;
- ``segmentation``: UperNet / Semantic FPN on SG-Former, ADE20K-layout data, mIoU.

Each holds its config and presets, data, model, ``Task`` and the ``validate_checkpoint`` and
``predict`` of its commands. What they share about image files lives here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def collect_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in named folders."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif item.exists():
            files.append(item)
        else:
            raise FileNotFoundError(f"no such image or folder: {item}")
    return files
