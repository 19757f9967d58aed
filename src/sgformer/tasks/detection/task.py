"""Object detection and instance segmentation: Mask R-CNN on SG-Former + FPN, COCO AP.

``DetectionTask`` is what ``sgformer detect train`` trains through ``sgformer.trainer.fit``;
``validate_checkpoint`` and ``predict`` serve ``detect val`` and ``detect predict``. The
model is in ``model.py``, COCO data and AP in ``coco.py``.

The paper's COCO setups (docs/design.md, "Training recipes") are the ``1x`` and ``3x`` presets of
``SCHEDULES``; ``shapes`` trains ``sgformer_nano`` on the synthetic scenes of ``data.py`` on a
CPU. The lr schedule is timm's multi-step one with a linear warm-up in iterations (mmdetection's
step policy, which the paper's setups use).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.scheduler import MultiStepLRScheduler
from torch import nn
from torch.utils.data import DataLoader

from ... import config
from ...checkpoint import Run, load_run, plain
from ...runtime import Distributed, gather_objects, progress_bar, setup_distributed
from ...trainer import Batch, Plan, Task, TrainConfig, eval_loader, fit, fmt, train_loader
from .. import collect_images
from .coco import (
    IOU_TYPES,
    MASK_THRESHOLD,
    CocoInstances,
    collate_detection,
    evaluate_coco,
    to_coco_results,
)
from .model import COCO_ANCHOR_SIZES, build_detector, param_groups

_logger = logging.getLogger(__name__)

TASK = "detection"


# ---------------------------------------------------------------------------------------------
# Settings: defaults and help once (the flags of `detect train` are generated from them), then
# the presets. Without data flags the schedule is ``shapes``, otherwise ``1x``.


@dataclass
class DetectionConfig(TrainConfig):
    """``sgformer detect train``."""

    data_root: str | None = config.option(None, "training image folder (e.g. coco/train2017)")
    ann_file: str | None = config.option(None, "training COCO instances JSON")
    val_data_root: str | None = config.option(
        None, "validation image folder (default: --data-root)"
    )
    val_ann_file: str | None = config.option(None, "validation COCO instances JSON")
    schedule: str | None = config.option(
        None, "presets: 1x, 3x (paper COCO setups), shapes (CPU demo; default without data)"
    )
    model: str = config.option("sgformer_s", "backbone")
    backbone_checkpoint: str | None = config.option(
        None, "ImageNet weights for the backbone (published or ours)"
    )
    mask: bool = config.option(True, "Faster R-CNN (no mask head)", flag="--no-mask")
    epochs: int = config.option(12, "epochs", resume=True)
    batch_size: int = config.option(2, "images per process (paper: 8 GPUs x 2)", short="-b")
    lr: float = config.option(1e-4, "AdamW learning rate, for a total batch of 16 (not rescaled)")
    weight_decay: float = config.option(0.05, "weight decay")
    backbone_lr_mult: float = config.option(1.0, "backbone lr multiplier")
    lr_steps: tuple[int, ...] = config.option((8, 11), "epochs after which lr x gamma", nargs="+")
    lr_gamma: float = config.option(0.1, "lr factor at each of --lr-steps")
    warmup_iters: int = config.option(500, "linear warm-up iterations")
    warmup_factor: float = config.option(1e-3, "lr factor at the start of warm-up")
    frozen_stages: int = config.option(-1, "-1 none, 0 the stem, n the stem + first n stages")
    # Not stated in the paper; the value of Swin/CSWin-T Mask R-CNN configs.
    drop_path: float = config.option(0.2, "backbone stochastic depth rate")
    short_side: tuple[int, ...] = config.option(
        (800,), "short side(s); several: one drawn per image", nargs="+"
    )
    max_size: int = config.option(1333, "longest side cap")
    hflip: float = config.option(0.5, "horizontal flip probability")
    out_channels: int = config.option(256, "FPN channels")
    anchor_sizes: tuple[int, ...] = config.option(
        COCO_ANCHOR_SIZES, "anchor size per FPN level", nargs=5
    )
    box_head_dim: int = config.option(1024, "box head width")
    mask_head_dim: int = config.option(256, "mask head width")
    rpn_pre_nms_train: int = config.option(2000, "RPN proposals before NMS, training")
    rpn_post_nms_train: int = config.option(2000, "RPN proposals after NMS, training")
    rpn_pre_nms_test: int = config.option(1000, "RPN proposals before NMS, evaluation")
    rpn_post_nms_test: int = config.option(1000, "RPN proposals after NMS, evaluation")
    rpn_batch_size: int = config.option(256, "RPN anchors sampled per image")
    box_batch_size: int = config.option(512, "RoIs sampled per image")
    detections_per_img: int = config.option(100, "detections kept per image (COCO AP: 100)")
    eval_interval: int = config.option(1, "epochs between COCO evaluations", resume=True)
    output: str = config.option(
        "runs/detect", "run folder (last.pth, best.pth, summary.csv, args.yaml)", resume=True
    )


SCHEDULES: dict[str, dict[str, Any]] = {
    # Mask R-CNN 1x: 12 epochs, single scale 800 / 1333, lr x0.1 after epochs 8 and 11.
    "1x": {"epochs": 12, "lr_steps": (8, 11), "short_side": (800,), "max_size": 1333},
    # 3x: 36 epochs, short side drawn per image from 480..800 (step 32), steps at 27 and 33.
    "3x": {
        "epochs": 36,
        "lr_steps": (27, 33),
        "short_side": tuple(range(480, 801, 32)),
        "max_size": 1333,
    },
    # CPU demo on the 128 px synthetic scenes (shapes 25-64 px across): small model, anchors
    # matched to the objects, few proposals, light heads. Two epochs of the 2000 scenes take
    # about 7 minutes on a 2-core CPU (docs/detection.md); start from `make demo`'s classifier
    # with --backbone-checkpoint runs/demo/best.pth, as the paper starts from ImageNet weights.
    "shapes": {
        "model": "sgformer_nano",
        "epochs": 2,
        "batch_size": 2,
        "lr": 1e-3,
        "weight_decay": 0.05,
        "lr_steps": (1,),
        "eval_interval": 1,
        "warmup_iters": 50,
        "clip_grad": 5.0,
        "drop_path": 0.0,
        "short_side": (128,),
        "max_size": 128,
        "out_channels": 64,
        "anchor_sizes": (16, 32, 48, 64, 96),
        "box_head_dim": 256,
        "mask_head_dim": 32,
        "rpn_pre_nms_train": 300,
        "rpn_post_nms_train": 150,
        "rpn_pre_nms_test": 150,
        "rpn_post_nms_test": 75,
        "rpn_batch_size": 128,
        "box_batch_size": 64,
        "detections_per_img": 20,
        "workers": 0,
        "log_interval": 20,
        "output": "runs/detect_shapes",
    },
}
# Stored as the checkpoint's model_kwargs: everything build_detector needs.
ARCH_KEYS = (
    "mask",
    "frozen_stages",
    "drop_path",
    "short_side",
    "max_size",
    "out_channels",
    "anchor_sizes",
    "box_head_dim",
    "mask_head_dim",
    "rpn_pre_nms_train",
    "rpn_post_nms_train",
    "rpn_pre_nms_test",
    "rpn_post_nms_test",
    "rpn_batch_size",
    "box_batch_size",
    "detections_per_img",
)
DATA_KEYS = ("data_root", "ann_file", "val_data_root", "val_ann_file")
config.check_presets(DetectionConfig, SCHEDULES)


def shapes_paths() -> dict[str, str]:
    """Write (or reuse) the synthetic shapes data; its dense split as detection arguments."""
    from ...data import DEFAULT_ROOT, write_shapes_dataset

    # The built-in data folder is the project's: a dataset of other defaults (an older version)
    # is rewritten; one with these defaults is kept as it is.
    summary = write_shapes_dataset(DEFAULT_ROOT, force=True)
    dense = Path(summary["dense"])
    return {
        "data_root": str(dense / "images" / "training"),
        "ann_file": str(dense / "instances_training.json"),
        "val_data_root": str(dense / "images" / "validation"),
        "val_ann_file": str(dense / "instances_validation.json"),
    }


def step_scheduler(
    optimizer: torch.optim.Optimizer,
    iters_per_epoch: int,
    steps: tuple[int, ...],
    gamma: float,
    warmup_iters: int,
    warmup_factor: float,
) -> MultiStepLRScheduler:
    """Per iteration: linear warm-up from ``lr x warmup_factor``, then ``x gamma`` after each
    epoch in ``steps`` (counted from the start, warm-up included)."""
    return MultiStepLRScheduler(
        optimizer,
        # timm counts a milestone one update early (it compares ``t + 1``); one later, the lr
        # drops after the last update of epoch ``s``, as mmdetection's step policy.
        decay_t=[s * iters_per_epoch + 1 for s in steps],
        decay_rate=gamma,
        warmup_t=warmup_iters,
        warmup_lr_init=optimizer.param_groups[0]["lr"] * warmup_factor,
        warmup_prefix=False,
        t_in_epochs=False,
    )


def _to_device(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


# ---------------------------------------------------------------------------------------------
# The task.


class DetectionTask(Task):
    """The sum of Mask R-CNN's losses; COCO box (and mask) AP every ``eval_interval`` epochs
    and at the end; the best checkpoint by box AP."""

    name = TASK
    config = DetectionConfig
    presets = SCHEDULES
    preset_flag = "schedule"
    best_metric = "bbox_AP"
    ema_metrics = ("bbox_AP",)
    summary_fields = (
        "epoch",
        "iteration",
        "train_loss",
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
        "lr",
        "images_per_s",
        "bbox_AP",
        "bbox_AP50",
        "bbox_AP75",
        "segm_AP",
        "segm_AP50",
        "ema_bbox_AP",
        "train_skipped",
        "val_skipped",
    )
    curve_metrics = ("bbox_AP", "bbox_AP50", "segm_AP")

    @classmethod
    def preset_for(cls, given: dict[str, Any]) -> str:
        no_data = all(given.get(k) is None for k in DATA_KEYS)
        return given.get("schedule") or ("shapes" if no_data else "1x")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if all(getattr(args, k) is None for k in DATA_KEYS):
            return  # the shapes scenes, written when the run starts
        if args.data_root is None or args.ann_file is None:
            raise ValueError("give --data-root and --ann-file together (or no data flags: shapes)")
        if args.val_ann_file is None:
            raise ValueError("--val-ann-file is required with --ann-file (COCO AP each epoch)")
        if args.batch_size < 1 or args.epochs < 1:
            raise ValueError(f"-b and --epochs must be >= 1, got {args.batch_size}, {args.epochs}")

    def __init__(self, args: argparse.Namespace, dist_info: Distributed, resumed: Run | None):
        super().__init__(args, dist_info, resumed)
        if all(getattr(args, k) is None for k in DATA_KEYS):
            vars(args).update(shapes_paths())
        args.val_data_root = args.val_data_root or args.data_root
        # Data first: a wrong path or file should fail before a model is built.
        train_set = CocoInstances(
            args.data_root, args.ann_file, with_masks=args.mask, hflip=args.hflip
        )
        # Evaluation reads the ground truth from the annotation file: no masks to decode.
        self.val_set = CocoInstances(args.val_data_root, args.val_ann_file, with_masks=False)
        if self.val_set.category_ids != train_set.category_ids:
            raise ValueError(
                f"{args.val_ann_file} has category ids {self.val_set.category_ids}, "
                f"{args.ann_file} has {train_set.category_ids}; both must list the same "
                "categories"
            )
        self.train_set = train_set
        self.model_name = args.model
        self.model_kwargs = {k: plain(getattr(args, k)) for k in ARCH_KEYS}
        self.model = build_detector(
            args.model,
            len(train_set.category_ids),
            backbone_checkpoint=None if resumed else args.backbone_checkpoint,
            **self.model_kwargs,
        ).to(dist_info.device)
        self.train_loader = train_loader(
            train_set,
            batch_size=args.batch_size,
            workers=args.workers,
            dist_info=dist_info,
            seed=args.seed,
            collate_fn=collate_detection,
            drop_last=False,
        )
        self.val_loader = eval_loader(
            self.val_set,
            batch_size=args.batch_size,
            workers=args.workers,
            dist_info=dist_info,
            collate_fn=collate_detection,
        )
        per_pass = len(self.train_loader)
        # A checkpoint every epoch; COCO evaluation (slow) every eval_interval epochs.
        self.plan = Plan(
            per_pass,
            total=args.epochs * per_pass,
            eval_every=args.eval_interval * per_pass,
            in_epochs=True,
            checkpoint_every=per_pass,
        )

    def create_optimizer(self) -> torch.optim.Optimizer:
        args = self.args
        groups = param_groups(self.model, args.lr, args.weight_decay, args.backbone_lr_mult)
        return torch.optim.AdamW(groups, lr=args.lr, fused=True)  # one kernel for all

    def create_scheduler(self, optimizer: torch.optim.Optimizer) -> MultiStepLRScheduler:
        args = self.args
        return step_scheduler(
            optimizer,
            self.plan.iters_per_pass,
            args.lr_steps,
            args.lr_gamma,
            args.warmup_iters,
            args.warmup_factor,
        )

    def train_step(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        device = self.dist_info.device
        images = [image.to(device, non_blocking=True) for image in batch.inputs]
        losses = model(images, _to_device(batch.targets, device))
        return {"loss": sum(losses.values()), **losses}

    def evaluate(
        self, model: nn.Module, precision: Callable[[], Any], desc: str = "val"
    ) -> dict[str, Any]:
        metrics, _ = evaluate(
            model,
            self.val_loader,
            self.val_set,
            mask=self.args.mask,
            dist_info=self.dist_info,
            precision=precision,
            desc=desc,
        )
        return metrics

    def checkpoint_data(self) -> dict[str, Any]:
        return {
            "num_classes": len(self.train_set.category_ids),
            "category_ids": self.train_set.category_ids,
            "class_names": self.train_set.class_names,
        }

    def describe(self) -> str:
        args, stats = self.args, self.train_set.stats.as_dict()
        return (
            f"training {'Mask R-CNN' if args.mask else 'Faster R-CNN'} {args.model} on "
            f"{args.ann_file} ({len(self.train_set.category_ids)} classes, "
            f"{len(self.train_set)} images; {', '.join(f'{k} {v}' for k, v in stats.items() if v)}"
            f"), {self.dist_info.world_size} processes x batch {args.batch_size}, "
            f"{args.epochs} epochs of {self.plan.iters_per_pass} iterations"
        )

    def report(self, row: dict[str, Any]) -> str:
        return (
            f"loss {fmt(row['train_loss'])}  bbox AP {fmt(row.get('bbox_AP'), '.3f')} AP50 "
            f"{fmt(row.get('bbox_AP50'), '.3f')}  segm AP {fmt(row.get('segm_AP'), '.3f')}"
        )


def train(given: dict[str, Any]) -> dict[str, Any]:
    """``sgformer detect train``: train (or resume) a detector; returns the last row."""
    return fit(DetectionTask, given)


# ---------------------------------------------------------------------------------------------
# Evaluation and prediction.


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    loader: DataLoader,
    category_ids: list[int],
    *,
    dist_info: Distributed,
    precision: Callable[[], Any],
    desc: str = "val",
) -> tuple[list[dict[str, Any]], list[int], int]:
    """COCO results of every rank's shard, gathered on all ranks: (results, image ids, skipped)."""
    model.eval()
    device = dist_info.device
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    skipped = 0
    bar = progress_bar(len(loader), desc, dist_info.is_main)
    for batch in loader:
        skipped += len(batch.skipped)
        for name in batch.skipped:
            _logger.warning("skipped unreadable image %s", name)
        if len(batch):
            with precision():
                outputs = model([image.to(device) for image in batch.inputs])
            for output, target in zip(outputs, batch.targets, strict=True):
                results += to_coco_results(output, target["image_id"], category_ids)
                image_ids.append(target["image_id"])
        bar.update()
    bar.close()
    parts = gather_objects((results, image_ids, skipped), dist_info)
    results = [r for part in parts for r in part[0]]
    image_ids = [i for part in parts for i in part[1]]
    return results, image_ids, sum(part[2] for part in parts)


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    dataset: CocoInstances,
    *,
    mask: bool,
    dist_info: Distributed,
    precision: Callable[[], Any] = contextlib.nullcontext,
    desc: str = "val",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """COCO box (and mask) AP of ``model`` on ``dataset``, the images scored and the
    unreadable or missing ones skipped; returns (metrics, results)."""
    start = time.perf_counter()
    results, image_ids, skipped = predict_dataset(
        model, loader, dataset.category_ids, dist_info=dist_info, precision=precision, desc=desc
    )
    if not image_ids:
        raise ValueError(f"no readable images in {dataset.data_root} to evaluate")
    iou_types = IOU_TYPES if mask else ("bbox",)
    metrics = evaluate_coco(dataset.coco, results, iou_types=iou_types, image_ids=image_ids)
    metrics |= {
        "images": len(image_ids),
        "skipped": skipped + dataset.stats.missing_images,
        "eval_s": time.perf_counter() - start,
    }
    return metrics, results


def detector_from_checkpoint(path: str | Path) -> tuple[nn.Module, Run]:
    """The detector a ``detect train`` checkpoint holds, and its run."""
    run = load_run(path, TASK)
    model = build_detector(run.model_name, run.data["num_classes"], **run.model_kwargs)
    model.load_state_dict(run.weights())
    return model, run


def validate_checkpoint(
    checkpoint: str | Path,
    data_root: str | Path | None = None,
    ann_file: str | Path | None = None,
    *,
    batch_size: int = 2,
    workers: int = 2,
    device: str | None = None,
    results_file: str | Path | None = None,
    predictions_file: str | Path | None = None,
) -> dict[str, Any]:
    """``sgformer detect val``: COCO box and mask AP of a checkpoint (the shapes validation
    split without data arguments). Writes the metrics (fractions) to ``results_file`` and the
    detections in COCO results format to ``predictions_file`` when given."""
    if (data_root is None) != (ann_file is None):
        raise ValueError("give --data-root and --ann-file together (or neither: shapes)")
    dist_info = setup_distributed(device)
    model, run = detector_from_checkpoint(checkpoint)
    if data_root is None:
        paths = shapes_paths()
        data_root, ann_file = paths["val_data_root"], paths["val_ann_file"]
    model.to(dist_info.device)
    mask = run.model_kwargs["mask"]
    dataset = CocoInstances(data_root, ann_file, with_masks=False)
    if dataset.category_ids != run.data["category_ids"]:
        raise ValueError(
            f"{ann_file} has category ids {dataset.category_ids}, the checkpoint was trained on "
            f"{run.data['category_ids']}"
        )
    loader = eval_loader(
        dataset,
        batch_size=batch_size,
        workers=workers,
        dist_info=dist_info,
        collate_fn=collate_detection,
    )
    metrics, results = evaluate(model, loader, dataset, mask=mask, dist_info=dist_info)
    metrics = {"checkpoint": str(checkpoint), "ann_file": str(ann_file), **metrics}
    if dist_info.is_main:
        if results_file is not None:
            Path(results_file).write_text(json.dumps(metrics, indent=2) + "\n")
        if predictions_file is not None:
            Path(predictions_file).write_text(json.dumps(results) + "\n")
    return metrics


@torch.no_grad()
def predict(
    inputs: list[str | Path],
    checkpoint: str | Path,
    output: str | Path = "detections",
    *,
    score_threshold: float = 0.5,
    device: str | None = None,
) -> dict[str, Any]:
    """Detect objects in images; writes ``OUTPUT/predictions.json`` (COCO results, with
    ``file_name``; ``image_id`` numbers the images from 1) and one drawn PNG per image (boxes,
    masks, labels, scores above ``score_threshold``). Unreadable files are skipped, counted."""
    from PIL import Image

    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"--score-threshold must be in [0, 1], got {score_threshold}")
    run_device = setup_distributed(device).device
    model, run = detector_from_checkpoint(checkpoint)
    model.to(run_device).eval()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    drawn: list[str] = []
    for image_id, path in enumerate(collect_images(inputs), start=1):
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB")).copy()
        except OSError as err:
            _logger.warning("skipped unreadable image %s: %s", path, err)
            skipped.append(str(path))
            continue
        image = torch.from_numpy(array).permute(2, 0, 1)  # 3, H, W uint8
        detections = model([image.float().div(255).to(run_device)])[0]
        entries = to_coco_results(detections, image_id, run.data["category_ids"])
        for entry in entries:
            entry["file_name"] = str(path)
        results += entries
        target = output / f"{path.stem}.png"
        if target.name in drawn:
            target = output / f"{path.stem}_{image_id}.png"
        draw_detections(image, detections, run.data["class_names"], score_threshold).save(target)
        drawn.append(target.name)
    (output / "predictions.json").write_text(json.dumps(results) + "\n")
    return {
        "images": len(drawn),
        "detections": sum(r["score"] >= score_threshold for r in results),
        "skipped": skipped,
        "output": str(output),
    }


def draw_detections(
    image: torch.Tensor,
    detections: dict[str, torch.Tensor],
    class_names: list[str],
    score_threshold: float,
) -> Any:
    """(3, H, W) uint8 image with masks, boxes and ``name score`` labels drawn -> PIL image."""
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    keep = detections["scores"] >= score_threshold
    boxes = detections["boxes"][keep].cpu()
    labels = detections["labels"][keep].tolist()
    scores = detections["scores"][keep].tolist()
    palette = [tuple(int(c) for c in np.random.default_rng(i).integers(64, 256, 3)) for i in labels]
    if "masks" in detections and keep.any():
        masks = detections["masks"][keep][:, 0].cpu() >= MASK_THRESHOLD  # N, H, W
        image = draw_segmentation_masks(image, masks, alpha=0.45, colors=palette)
    if len(boxes):
        text = [f"{class_names[i - 1]} {s:.2f}" for i, s in zip(labels, scores, strict=True)]
        image = draw_bounding_boxes(
            image, boxes, text, colors=palette, width=max(1, math.ceil(image.shape[-1] / 256))
        )
    return Image.fromarray(image.permute(1, 2, 0).numpy())  # H, W, 3
