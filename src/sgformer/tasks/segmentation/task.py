"""Semantic segmentation on SG-Former: settings, the training task, val and predict.

``SegmentationTask`` is what ``sgformer segment train`` trains through
``sgformer.trainer.fit``; ``validate_checkpoint`` and ``predict`` serve ``segment val`` and
``segment predict``. The model is in ``model.py``, data in ``data.py``, inference and metrics
in ``inference.py``.

The paper's ADE20K numbers (Semantic FPN 80k, UperNet 160k; docs/design.md, "Training
recipes") came from OpenMMLab configs that were never released. This package rebuilds that
pipeline from maintained parts: segmentation-models-pytorch decoders on the ``tu-sgformer_*``
timm encoder, torchvision functional ops for the augmentation, torchmetrics for IoU and pixel
accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ... import config
from ...checkpoint import Run, load_backbone_weights, load_run
from ...runtime import Distributed, setup_distributed
from ...trainer import Batch, Plan, Task, TrainConfig, create_optimizer, eval_loader, fit, fmt
from ...trainer import train_loader as make_train_loader
from .. import collect_images
from .data import (
    IGNORE_INDEX,
    SCALE_RANGE,
    SegmentationDataset,
    TrainTransform,
    collate_samples,
    eval_transform,
    find_pairs,
    normalize_image,
)
from .inference import MS_RATIOS, evaluate, infer
from .model import AUX_WEIGHT, DECODERS, PAD_DIVISOR, SegmentationModel, build_segmentation_model

_logger = logging.getLogger(__name__)

TASK = "segmentation"
MIN_BATCHNORM_BATCH = 2  # BatchNorm in training needs two samples (PPM cells are 1 x 1)
WARMUP_RATIO = 1e-6  # mmseg linear warm-up starts at lr x 1e-6
PALETTE_SEED = 20230802
OVERLAY_OPACITY = 0.5
PAPER_GLOBAL_BATCH = 16


# ---------------------------------------------------------------------------------------------
# Settings: defaults and help once (the flags of `segment train` are generated from them), then
# the schedules. Batch sizes are per process (-b), as timm's train.py.


@dataclass
class SegmentationConfig(TrainConfig):
    """``sgformer segment train``; the schedule defaults to shapes without --data-root, else to
    upernet_160k or fpn_80k by --decoder."""

    data_root: str | None = config.option(
        None, "ADE20K layout: images/{training,validation}, annotations/..."
    )
    schedule: str | None = config.option(
        None, "presets: upernet_160k, fpn_80k, shapes (default by data and decoder)"
    )
    train_split: str = config.option("training", "training split folder")
    val_split: str = config.option("validation", "validation split folder")
    model: str = config.option("sgformer_s", "backbone")
    decoder: str = config.option("upernet", "decoder head", choices=DECODERS)
    num_classes: int | None = config.option(
        None, "classes (ADE20K 150; shapes 9 with background)", type=int
    )
    ignore_index: int = config.option(IGNORE_INDEX, "label value ignored in loss and metrics")
    reduce_zero_label: bool = config.option(
        True,
        "label 0 -> ignore, others -1 (on for ADE20K; --no-reduce-zero-label if 0 is a class)",
        negatable=True,
    )
    backbone_checkpoint: str | None = config.option(
        None, "classification weights for the SG-Former encoder"
    )
    iters: int = config.option(160_000, "training iterations", resume=True)
    batch_size: int = config.option(2, "batch size per process (paper: 16 in total)", short="-b")
    lr: float = config.option(6e-5, "AdamW learning rate")
    weight_decay: float = config.option(0.01, "AdamW weight decay")
    warmup_iters: int = config.option(1500, "linear warm-up iterations")
    power: float = config.option(1.0, "poly decay power (1: linear decay)")
    min_lr: float = config.option(0.0, "lr at the end of the decay")
    crop_size: int = config.option(512, "square training crop")
    base_size: int = config.option(512, "short side before random rescale, as (4x, 1x)")
    scale_range: tuple[float, float] = config.option(SCALE_RANGE, "random rescale range", nargs=2)
    decoder_channels: int = config.option(256, "decoder width")
    aux_head: bool = config.option(False, "auxiliary FCN head (loss weight 0.4)", negatable=True)
    drop_path: float = config.option(0.1, "backbone stochastic depth rate")
    mode: str = config.option("whole", "inference during validation", choices=("whole", "slide"))
    val_interval: int = config.option(
        16_000, "iterations between evaluations and checkpoints", resume=True
    )
    seed: int = config.option(0, "random seed")
    output: str = config.option(
        "runs/segment", "run folder (last.pth, best.pth, summary.csv, args.yaml)", resume=True
    )


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


config.check_presets(SegmentationConfig, SCHEDULES)


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
    from ...data import DEFAULT_ROOT, write_shapes_dataset

    # The built-in data folder is the project's: a dataset of other defaults (an older version)
    # is rewritten; one with these defaults is kept as it is.
    summary = write_shapes_dataset(DEFAULT_ROOT, force=True)
    return Path(summary["dense"]), ["background", *summary["classes"]]


def _infer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"base_size": args.base_size, "mode": args.mode, "crop_size": args.crop_size}


# ---------------------------------------------------------------------------------------------
# The task.


class SegmentationTask(Task):
    """Pixel cross-entropy (plus 0.4 x the auxiliary head's); mIoU every ``val_interval``
    iterations and at the end; the best checkpoint by mIoU."""

    name = TASK
    config = SegmentationConfig
    presets = SCHEDULES
    preset_flag = "schedule"
    best_metric = "mIoU"
    ema_metrics = ("mIoU",)
    summary_fields = (
        "iteration",
        "train_loss",
        "lr",
        "mIoU",
        "aAcc",
        "ema_mIoU",
        "iters_per_s",
        "train_skipped",
        "val_skipped",
    )
    curve_metrics = ("mIoU", "aAcc", "ema_mIoU")
    units = ("iterations", "--iters")

    @classmethod
    def preset_for(cls, given: dict[str, Any]) -> str:
        if given.get("schedule") is not None:
            return given["schedule"]
        if given.get("data_root") is None:
            return "shapes"
        decoder = given.get("decoder") or SegmentationConfig.decoder
        return "upernet_160k" if decoder == "upernet" else "fpn_80k"

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if args.decoder not in DECODERS:
            raise ValueError(
                f"--decoder must be one of {', '.join(DECODERS)}, got {args.decoder!r}"
            )
        if args.mode not in ("whole", "slide"):
            raise ValueError(f"--mode must be whole or slide, got {args.mode!r}")
        for key in ("iters", "batch_size", "crop_size", "base_size", "val_interval"):
            if getattr(args, key) < 1:
                raise ValueError(
                    f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}"
                )
        if args.warmup_iters < 0:
            raise ValueError(f"--warmup-iters must be >= 0, got {args.warmup_iters}")
        if args.crop_size < PAD_DIVISOR:
            raise ValueError(f"--crop-size {args.crop_size} is below the minimum {PAD_DIVISOR}")
        if args.num_classes is None:
            raise ValueError("--num-classes is required with this --schedule")

    def __init__(self, args: argparse.Namespace, dist_info: Distributed, resumed: Run | None):
        super().__init__(args, dist_info, resumed)
        # Data first: a wrong folder should fail before a model is built.
        data_root, self.class_names = _data_setup(args)
        if resumed is not None:
            self.class_names = resumed.data.get("class_names")
        args.data_root = str(data_root)
        label_kwargs = {
            "num_classes": args.num_classes,
            "ignore_index": args.ignore_index,
            "reduce_zero_label": args.reduce_zero_label,
        }
        train_pairs, train_unpaired = find_pairs(data_root, args.train_split)
        val_pairs, val_unpaired = find_pairs(data_root, args.val_split)
        self.unpaired = train_unpaired + val_unpaired
        train_set = SegmentationDataset(
            train_pairs,
            TrainTransform(args.crop_size, args.base_size, args.scale_range, args.ignore_index),
            **label_kwargs,
        )
        val_set = SegmentationDataset(val_pairs, eval_transform, **label_kwargs)
        self.num_images = len(train_set)
        global_batch = args.batch_size * dist_info.world_size
        if len(train_set) < global_batch:
            raise ValueError(
                f"{len(train_set)} training images make no full batch of {global_batch} "
                f"(-b {args.batch_size} x {dist_info.world_size} processes); lower -b"
            )

        self.model_name = args.model
        self.model_kwargs = {
            "decoder": args.decoder,
            "num_classes": args.num_classes,
            "decoder_channels": args.decoder_channels,
            "aux_head": args.aux_head,
            "drop_path_rate": args.drop_path,
            "img_size": args.crop_size,
        }
        model: nn.Module = build_segmentation_model(args.model, **self.model_kwargs)
        if args.backbone_checkpoint and resumed is None:
            load_backbone_weights(model.backbone, args.backbone_checkpoint)
        if dist_info.enabled and dist_info.device.type == "cuda":
            # Batch 2 per GPU: the heads' BatchNorm sees all ranks' samples (mmseg's SyncBN).
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(dist_info.device)
        self.loss_fn = nn.CrossEntropyLoss(ignore_index=args.ignore_index)
        # A batch that unreadable files left with one image makes no step: the heads'
        # BatchNorm cannot train on a single sample.
        self.min_batch = min(MIN_BATCHNORM_BATCH, args.batch_size)
        self.train_loader = make_train_loader(
            train_set,
            batch_size=args.batch_size,
            workers=args.workers,
            dist_info=dist_info,
            seed=args.seed,
            collate_fn=collate_samples,
        )
        self.val_loader = eval_loader(
            val_set, batch_size=1, workers=args.workers, dist_info=dist_info,
            collate_fn=collate_samples,
        )  # fmt: skip
        self.plan = Plan(len(self.train_loader), args.iters, args.val_interval, in_epochs=False)
        if args.schedule != "shapes" and global_batch != PAPER_GLOBAL_BATCH and dist_info.is_main:
            _logger.warning(
                "global batch %d differs from the paper's %d; the lr is not rescaled",
                global_batch,
                PAPER_GLOBAL_BATCH,
            )

    def create_optimizer(self) -> torch.optim.Optimizer:
        return create_optimizer(self.model, "adamw", self.args.lr, self.args.weight_decay)

    def create_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        args = self.args
        min_ratio = args.min_lr / args.lr
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda it: lr_factor(it, args.iters, args.warmup_iters, args.power, min_ratio),
        )

    def train_step(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        device = self.dist_info.device
        images, labels = batch.inputs.to(device), batch.targets.to(device)
        logits, aux = model(images)
        loss = self.loss_fn(logits.float(), labels)
        if aux is not None:
            loss = loss + AUX_WEIGHT * self.loss_fn(aux.float(), labels)
        return {"loss": loss}

    def evaluate(
        self, model: nn.Module, precision: Callable[[], Any], desc: str = "val"
    ) -> dict[str, Any]:
        return evaluate(
            model,
            self.val_loader,
            num_classes=self.args.num_classes,
            ignore_index=self.args.ignore_index,
            dist_info=self.dist_info,
            class_names=self.class_names,
            infer_kwargs=_infer_kwargs(self.args),
            precision=precision,
            desc=desc,
        )

    def checkpoint_data(self) -> dict[str, Any]:
        return {"class_names": self.class_names, "num_classes": self.args.num_classes}

    def describe(self) -> str:
        args, world = self.args, self.dist_info.world_size
        return (
            f"training {args.model} + {args.decoder} ({args.num_classes} classes, schedule "
            f"{args.schedule}) on {self.num_images} images ({self.unpaired} unpaired files "
            f"skipped), {world} processes, global batch {args.batch_size * world}, "
            f"{args.iters} iterations"
        )

    def report(self, row: dict[str, Any]) -> str:
        return (
            f"train loss {fmt(row['train_loss'])}  mIoU {100 * row['mIoU']:.2f}  aAcc "
            f"{100 * row['aAcc']:.2f}  {row['iters_per_s']:.2f} it/s"
        )


def train(given: dict[str, Any]) -> dict[str, Any]:
    """``sgformer segment train``: train (or resume) a segmentation model; returns the last
    evaluation's row."""
    return fit(SegmentationTask, given)


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


def validate_checkpoint(
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
    loader = eval_loader(
        dataset, batch_size=1, workers=workers, dist_info=dist_info, collate_fn=collate_samples
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


def predict(
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
