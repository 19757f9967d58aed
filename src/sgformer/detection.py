"""Object detection and instance segmentation: SG-Former + FPN + torchvision Mask R-CNN.

The backbone is wrapped as torchvision's ``backbone_utils`` does: a body returning an ordered
dict of maps (SG-Former ``features_only``, strides 4-32), a ``FeaturePyramidNetwork`` with a
max-pool level, and an ``out_channels`` attribute. ``MaskRCNN`` (``FasterRCNN`` without masks)
does the rest, including resizing (short side, long-side cap, multi-scale choices) and
normalisation. COCO data and AP live in ``coco.py``.

The paper's COCO setups (docs/design.md, "Training recipes") are the ``1x`` and ``3x`` presets of
``SCHEDULES``; ``shapes`` trains ``sgformer_nano`` on the synthetic scenes of ``data.py`` on a
CPU. The loop reuses the run helpers of ``runtime.py`` (distributed setup, seeding, AMP),
``checkpoint.py`` (the run format) and ``engine.py`` (the optimiser step, the non-finite loss
guard).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import (
    LAST_CHECKPOINT,
    Run,
    load_run,
    plain,
    plain_args,
    save_run,
)
from .coco import (
    IOU_TYPES,
    MASK_THRESHOLD,
    CocoInstances,
    collate_detection,
    evaluate_coco,
    to_coco_results,
)
from .engine import (
    check_finite_loss,
    check_not_finished,
    collect_images,
    load_backbone_weights,
    optimizer_step,
    restore_training_state,
    resume_args,
    sharded_loader,
    training_state,
    write_args,
    write_summary_csv,
)
from .model import create_model
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
    unwrap_model,
    wrap_distributed,
)

_logger = logging.getLogger(__name__)

TASK = "detection"
FPN_LEVELS = ("0", "1", "2", "3")  # strides 4-32; LastLevelMaxPool adds "pool" (stride 64)
# torchvision's defaults: one anchor size per FPN level, three aspect ratios.
COCO_ANCHOR_SIZES = (32, 64, 128, 256, 512)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
BOX_ROI_SIZE, MASK_ROI_SIZE = 7, 14  # MultiScaleRoIAlign output sides (torchvision)

# ---------------------------------------------------------------------------------------------
# Presets: the one place these numbers live. Explicit flags win over the schedule, which wins
# over DETECT_DEFAULTS.
DETECT_DEFAULTS: dict[str, Any] = {
    "model": "sgformer_s",
    "backbone_checkpoint": None,
    "mask": True,
    "epochs": 12,
    "batch_size": 2,  # per process; the paper: 8 GPUs x 2 = 16
    "lr": 1e-4,  # for a total batch of 16 (not rescaled)
    "weight_decay": 0.05,
    "backbone_lr_mult": 1.0,
    "lr_steps": (8, 11),
    "lr_gamma": 0.1,
    "warmup_iters": 500,
    "warmup_factor": 1e-3,
    "clip_grad": None,
    "frozen_stages": -1,  # -1: train everything; 0: freeze the stem; n: stem + stages 0..n-1
    "drop_path": 0.2,  # not stated in the paper; the value of Swin/CSWin-T Mask R-CNN configs
    "short_side": (800,),
    "max_size": 1333,
    "hflip": 0.5,
    "out_channels": 256,
    "anchor_sizes": COCO_ANCHOR_SIZES,
    "box_head_dim": 1024,
    "mask_head_dim": 256,
    "rpn_pre_nms_train": 2000,
    "rpn_post_nms_train": 2000,
    "rpn_pre_nms_test": 1000,
    "rpn_post_nms_test": 1000,
    "rpn_batch_size": 256,
    "box_batch_size": 512,
    "detections_per_img": 100,  # COCO AP counts the best 100 per image
    "amp": False,
    "amp_dtype": None,
    "workers": min(4, os.cpu_count() or 1),
    "seed": 42,
    "output": "runs/detect",
    "log_interval": 50,
    "log": "csv",
    "eval_interval": 1,
    "time_limit": None,  # minutes of training (wall clock) after which the run stops
    "device": None,
    "data_root": None,
    "ann_file": None,
    "val_data_root": None,
    "val_ann_file": None,
    "schedule": None,
}
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
# On --resume these come from the command line; everything else from the checkpoint.
RESUME_OVERRIDABLE = {
    "epochs",
    "output",
    "workers",
    "log_interval",
    "log",
    "eval_interval",
    "device",
    "time_limit",
}
SUMMARY_FIELDS = (
    "epoch",
    "iteration",
    "loss",
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
    "train_skipped",
    "val_skipped",
)


# ---------------------------------------------------------------------------------------------
# Model.


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


class StepWithWarmup:
    """lr factor per iteration: linear warm-up from ``warmup_factor``, then x``gamma`` at each
    epoch in ``steps`` (mmdetection's step policy, which the paper's setups use)."""

    def __init__(
        self,
        iters_per_epoch: int,
        steps: tuple[int, ...],
        gamma: float,
        warmup_iters: int,
        warmup_factor: float,
    ) -> None:
        self.iters_per_epoch = iters_per_epoch
        self.steps = tuple(steps)
        self.gamma = gamma
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor

    def __call__(self, iteration: int) -> float:
        epoch = iteration // self.iters_per_epoch
        factor = self.gamma ** sum(epoch >= s for s in self.steps)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


# ---------------------------------------------------------------------------------------------
# Arguments and data.


def resolve_detect_args(given: dict[str, Any]) -> argparse.Namespace:
    """Explicit flags (not None) win over the schedule, which wins over ``DETECT_DEFAULTS``.
    With no data arguments the schedule defaults to ``shapes``, otherwise to ``1x``."""
    data_keys = ("data_root", "ann_file", "val_data_root", "val_ann_file")
    no_data = all(given.get(k) is None for k in data_keys)
    name = given.get("schedule") or ("shapes" if no_data else "1x")
    if name not in SCHEDULES:
        raise ValueError(f"unknown --schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    merged = {**DETECT_DEFAULTS, **SCHEDULES[name]}
    merged.update({k: v for k, v in given.items() if v is not None})
    merged["schedule"] = name
    for key in ("short_side", "anchor_sizes", "lr_steps"):
        merged[key] = tuple(int(v) for v in merged[key])
    if not no_data and (merged["data_root"] is None or merged["ann_file"] is None):
        raise ValueError("give --data-root and --ann-file together (or no data flags: shapes)")
    if not no_data and merged["val_ann_file"] is None:
        raise ValueError("--val-ann-file is required with --ann-file (COCO AP each epoch)")
    if merged["batch_size"] < 1 or merged["epochs"] < 1:
        raise ValueError(
            f"-b and --epochs must be >= 1, got {merged['batch_size']}, {merged['epochs']}"
        )
    return argparse.Namespace(**merged)


def shapes_paths() -> dict[str, str]:
    """Write (or reuse) the synthetic shapes data; its dense split as detection arguments."""
    from .data import DEFAULT_ROOT, write_shapes_dataset

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


def _to_device(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


# ---------------------------------------------------------------------------------------------
# The loop.


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    epoch: int,
    start_iteration: int,
    amp: bool,
    amp_dtype: torch.dtype,
    scaler: Any,
    clip_grad: float | None,
    dist_info: Distributed,
    log_interval: int,
    last_checkpoint: Path | None,
    deadline: float | None = None,
) -> dict[str, Any]:
    """One pass over ``loader``; returns each Mask R-CNN loss and their sum (means over all
    ranks' iterations), lr, images/s, unreadable images skipped, the iteration reached, and
    ``time_limited`` when it stopped early at ``deadline`` (``time.monotonic()`` seconds)."""
    model.train()
    device = dist_info.device
    sums: dict[str, float] = {}
    steps, seen, skipped = 0, 0, 0
    iteration = start_iteration
    time_limited = False
    start = time.perf_counter()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bar = progress_bar(len(loader), f"train {epoch}", dist_info.is_main)
    for step, (images, targets, bad) in enumerate(loader):
        skipped += len(bad)
        for name in bad:
            _logger.warning("skipped unreadable image %s", name)
        if not images:
            continue
        images = [img.to(device, non_blocking=True) for img in images]
        with autocast(device, amp, amp_dtype):
            losses = model(images, _to_device(targets, device))
        loss = sum(losses.values())
        iteration += 1
        check_finite_loss(
            loss, dist_info, f"epoch {epoch} step {step} (iteration {iteration})", last_checkpoint
        )
        optimizer.zero_grad(set_to_none=True)
        optimizer_step(loss, optimizer, scaler, clip_grad, params)
        scheduler.step()
        if deadline is not None and _past(deadline, dist_info):
            time_limited = True
        for name, value in {"loss": loss, **losses}.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        steps += 1
        seen += len(images)
        lr = optimizer.param_groups[-1]["lr"]
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        if bar.disable and log_interval and (step + 1) % log_interval == 0:
            _logger.info(
                "epoch %d step %d/%d  loss %.4f  lr %.3g",
                epoch + 1,
                step + 1,
                len(loader),
                loss.item(),
                lr,
            )
        if time_limited:
            break
    bar.close()
    elapsed = time.perf_counter() - start
    names = sorted(sums)
    totals = reduce_sum([sums[n] for n in names] + [steps, seen, skipped], dist_info)
    total_steps, total_seen, total_skipped = totals[len(names) :]
    row: dict[str, Any] = {n: v / max(total_steps, 1) for n, v in zip(names, totals, strict=False)}
    return row | {
        "lr": optimizer.param_groups[-1]["lr"],
        "images_per_s": total_seen / elapsed,
        "train_skipped": int(total_skipped),
        "iteration": iteration,
        "time_limited": time_limited,
    }


def _past(deadline: float, dist_info: Distributed) -> bool:
    """Whether any rank is past ``deadline``: all ranks stop at the same iteration."""
    return reduce_sum([float(time.monotonic() > deadline)], dist_info)[0] > 0


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    loader: DataLoader,
    category_ids: list[int],
    *,
    dist_info: Distributed,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.bfloat16,
) -> tuple[list[dict[str, Any]], list[int], int]:
    """COCO results of every rank's shard, gathered on all ranks: (results, image ids, skipped)."""
    model.eval()
    device = dist_info.device
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    skipped = 0
    bar = progress_bar(len(loader), "val", dist_info.is_main)
    for images, targets, bad in loader:
        skipped += len(bad)
        for name in bad:
            _logger.warning("skipped unreadable image %s", name)
        if images:
            with autocast(device, amp, amp_dtype):
                outputs = model([img.to(device) for img in images])
            for output, target in zip(outputs, targets, strict=True):
                results += to_coco_results(output, target["image_id"], category_ids)
                image_ids.append(target["image_id"])
        bar.update()
    bar.close()
    if dist_info.enabled:
        gathered: list[Any] = [None] * dist_info.world_size
        dist.all_gather_object(gathered, (results, image_ids, skipped))
        results = [r for part in gathered for r in part[0]]
        image_ids = [i for part in gathered for i in part[1]]
        skipped = sum(part[2] for part in gathered)
    return results, image_ids, skipped


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    dataset: CocoInstances,
    *,
    mask: bool,
    dist_info: Distributed,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.bfloat16,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """COCO box (and mask) AP of ``model`` on ``dataset``; returns (metrics, results)."""
    start = time.perf_counter()
    results, image_ids, skipped = predict_dataset(
        model, loader, dataset.category_ids, dist_info=dist_info, amp=amp, amp_dtype=amp_dtype
    )
    if not image_ids:
        raise ValueError(f"no readable images in {dataset.data_root} to evaluate")
    iou_types = IOU_TYPES if mask else ("bbox",)
    metrics = evaluate_coco(dataset.coco, results, iou_types=iou_types, image_ids=image_ids)
    metrics |= {
        "images": len(image_ids),
        "val_skipped": skipped + dataset.stats.missing_images,
        "eval_s": time.perf_counter() - start,
    }
    return metrics, results


# ---------------------------------------------------------------------------------------------
# Driver.


def _resume_args(given: dict[str, Any]) -> tuple[argparse.Namespace, Run]:
    """Arguments of a resumed run: the checkpoint's, with the few a restart may change."""
    args, run = resume_args(given, RESUME_OVERRIDABLE, "schedule", TASK, DETECT_DEFAULTS)
    for key in ("short_side", "anchor_sizes", "lr_steps"):
        setattr(args, key, tuple(getattr(args, key)))
    args.time_limit = given.get("time_limit")  # a limit is for one session, not the run
    return args, run


def train_detector(given: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) Mask R-CNN on SG-Former as ``sgformer detect train`` describes.

    ``given`` maps flag names to values, None where a flag was not given. Returns the last
    epoch's row with ``best_bbox_AP``, ``best_epoch`` and ``output``.
    """
    resumed: Run | None = None
    if given.get("resume"):
        args, resumed = _resume_args(given)
    else:
        args = resolve_detect_args(given)
        if args.data_root is None:
            vars(args).update(shapes_paths())
    args.val_data_root = args.val_data_root or args.data_root
    dist_info = setup_distributed(args.device)
    output = Path(args.output)
    last_path = output / LAST_CHECKPOINT

    # Data first: a wrong path or file should fail before a model is built.
    train_set = CocoInstances(args.data_root, args.ann_file, with_masks=args.mask, hflip=args.hflip)
    # Evaluation reads the ground truth from the annotation file: no masks to decode.
    val_set = CocoInstances(args.val_data_root, args.val_ann_file, with_masks=False)
    if val_set.category_ids != train_set.category_ids:
        raise ValueError(
            f"{args.val_ann_file} has category ids {val_set.category_ids}, {args.ann_file} has "
            f"{train_set.category_ids}; both must list the same categories"
        )
    seed_everything(args.seed)
    model_kwargs = {k: plain(getattr(args, k)) for k in ARCH_KEYS}
    model = build_detector(
        args.model,
        len(train_set.category_ids),
        backbone_checkpoint=None if resumed else args.backbone_checkpoint,
        **model_kwargs,
    )
    model.to(dist_info.device)
    train_loader = sharded_loader(
        train_set,
        batch_size=args.batch_size,
        workers=args.workers,
        dist_info=dist_info,
        is_training=True,
        seed=args.seed,
        collate_fn=collate_detection,
        drop_last=False,
    )
    val_loader = sharded_loader(
        val_set,
        batch_size=args.batch_size,
        workers=args.workers,
        dist_info=dist_info,
        is_training=False,
        seed=args.seed,
        collate_fn=collate_detection,
        drop_last=False,
    )
    optimizer = torch.optim.AdamW(
        param_groups(model, args.lr, args.weight_decay, args.backbone_lr_mult),
        lr=args.lr,
        fused=True,  # one kernel for all parameters, as engine.create_optimizer
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        StepWithWarmup(
            len(train_loader), args.lr_steps, args.lr_gamma, args.warmup_iters, args.warmup_factor
        ),
    )
    amp_dtype = amp_settings(args.amp, args.amp_dtype, dist_info.device)
    scaler = make_scaler(args.amp, amp_dtype, dist_info.device)

    start_epoch, iteration, history = 0, 0, []
    best: dict[str, Any] = {"bbox_AP": -1.0, "epoch": -1}
    if resumed is not None:
        restore_training_state(resumed, model, optimizer, scheduler, scaler)
        start_epoch, iteration = resumed.state["epoch"], resumed.state["iteration"]
        history, best = resumed.history, resumed.best
        _logger.info(
            "resumed from %s at epoch %d (iteration %d)", args.resume, start_epoch, iteration
        )
    check_not_finished(start_epoch, args.epochs, "epochs", "--epochs")

    train_model = wrap_distributed(model, dist_info)
    scalars = ScalarLog(output, args.log, enabled=dist_info.is_main)
    if dist_info.is_main:
        write_args(output, args)
        _logger.info(
            "training %s %s on %s (%d classes, %d images; %s), %d processes x batch %d, "
            "%d epochs of %d iterations",
            "Mask R-CNN" if args.mask else "Faster R-CNN",
            args.model,
            args.ann_file,
            len(train_set.category_ids),
            len(train_set),
            ", ".join(f"{k} {v}" for k, v in train_set.stats.as_dict().items() if v),
            dist_info.world_size,
            args.batch_size,
            args.epochs,
            len(train_loader),
        )

    row: dict[str, Any] = {}
    # A time-limited run stops mid-epoch, then evaluates and saves as if the epoch had ended.
    deadline = time.monotonic() + 60 * args.time_limit if args.time_limit else None
    for epoch in range(start_epoch, args.epochs):
        seed_everything(epoch_seed(args.seed, epoch, dist_info.rank))
        train_loader.sampler.set_epoch(epoch)
        row = {"epoch": epoch + 1}
        row |= train_one_epoch(
            train_model,
            train_loader,
            optimizer,
            scheduler,
            epoch=epoch,
            start_iteration=iteration,
            amp=args.amp,
            amp_dtype=amp_dtype,
            scaler=scaler,
            clip_grad=args.clip_grad,
            dist_info=dist_info,
            log_interval=args.log_interval,
            last_checkpoint=last_path,
            deadline=deadline,
        )
        iteration = row["iteration"]
        last_epoch = row["time_limited"] or epoch + 1 == args.epochs
        if (epoch + 1) % args.eval_interval == 0 or last_epoch:
            metrics, _ = evaluate(
                model,
                val_loader,
                val_set,
                mask=args.mask,
                dist_info=dist_info,
                amp=args.amp,
                amp_dtype=amp_dtype,
            )
            row |= metrics
        history.append(row)
        is_best = "bbox_AP" in row and (row["bbox_AP"] or 0.0) > best["bbox_AP"]
        if is_best:
            best = {"bbox_AP": row["bbox_AP"], "epoch": epoch + 1}
        if dist_info.is_main:
            state = training_state(
                model,
                optimizer,
                scheduler,
                scaler,
                epoch=epoch + 1,
                iteration=iteration,
                metrics=row,
            )
            data = {
                "num_classes": len(train_set.category_ids),
                "category_ids": train_set.category_ids,
                "class_names": train_set.class_names,
            }
            run = Run(TASK, args.model, model_kwargs, plain_args(args), state, history, best, data)
            save_run(output, run, is_best)
            write_summary_csv(output, history, SUMMARY_FIELDS)
            scalars.write(row, epoch + 1)
        _logger.info(
            "epoch %d/%d  loss %.4f  lr %.3g  %.1f img/s  bbox AP %s AP50 %s  segm AP %s",
            epoch + 1,
            args.epochs,
            row["loss"],
            row["lr"],
            row["images_per_s"],
            _fmt(row.get("bbox_AP")),
            _fmt(row.get("bbox_AP50")),
            _fmt(row.get("segm_AP")),
        )
        if row["time_limited"]:
            _logger.info(
                "--time-limit of %g minutes reached at iteration %d", args.time_limit, iteration
            )
            break
    scalars.close()
    if dist_info.enabled:
        dist.barrier()
    return {
        **row,
        "best_bbox_AP": best["bbox_AP"],
        "best_epoch": best["epoch"],
        "output": str(output),
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def detector_from_checkpoint(path: str | Path) -> tuple[nn.Module, Run]:
    """The detector a ``detect train`` checkpoint holds, and its run."""
    run = load_run(path, TASK)
    model = build_detector(run.model_name, run.data["num_classes"], **run.model_kwargs)
    model.load_state_dict(run.weights())
    return model, run


def evaluate_checkpoint(
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
    loader = sharded_loader(
        dataset,
        batch_size=batch_size,
        workers=workers,
        dist_info=dist_info,
        is_training=False,
        seed=0,
        collate_fn=collate_detection,
        drop_last=False,
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
def predict_images(
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
