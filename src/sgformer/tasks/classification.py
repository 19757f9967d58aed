"""Image classification: timm data and transforms, the paper's ImageNet recipes, top-1/top-5.

``ClassificationTask`` is what ``sgformer train`` trains through ``sgformer.trainer.fit``;
``validate_checkpoint`` and ``predict`` serve ``sgformer validate`` and ``sgformer predict``.

Everything that timm already does is timm's: datasets and readers, transforms, Mixup/CutMix,
``create_optimizer_v2``, ``create_scheduler_v2`` (per-iteration warm-up and cosine) and losses.
Accuracy comes from torchmetrics, which also reduces it over ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from timm.data import ImageDataset, Mixup, create_dataset, create_transform, resolve_data_config
from timm.data.readers.reader_image_in_tar import ReaderImageInTar
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .. import config
from ..checkpoint import Run, as_run, check_task, load_weights, read_checkpoint
from ..model import MIN_INPUT_SIZE, create_model
from ..runtime import Distributed, progress_bar, reduce_sum, setup_distributed, unwrap_model
from ..trainer import (
    Batch,
    Plan,
    Task,
    TrainConfig,
    create_optimizer,
    eval_loader,
    fit,
    fmt,
    train_loader,
)
from . import IMAGE_EXTENSIONS, collect_images

_logger = logging.getLogger(__name__)

TASK = "classification"
VAL_SPLIT_NAMES = ("val", "validation")


# ---------------------------------------------------------------------------------------------
# Settings: defaults and help text once (the flags of `sgformer train` are generated from
# them), then the paper's recipes.


@dataclass
class ClassificationConfig(TrainConfig):
    """``sgformer train``: flags as timm's train.py. Defaults are for fine-tuning or training
    on one's own data; ``--recipe`` applies one of ``RECIPES``."""

    data_dir: str | None = config.option(
        None, "dataset root with train/ and val/ (or validation/) class folders", resume=True
    )
    dataset: str = config.option(
        "", "timm dataset specifier: folder (default), tar, hfds/NAME, wds/NAME"
    )
    train_split: str = config.option("train", "training split")
    val_split: str = config.option("validation", "validation split (val also accepted)")
    recipe: str | None = config.option(
        None, "paper presets: sgformer_s, sgformer_m, sgformer_b, finetune_384, shapes_demo"
    )
    model: str = config.option("sgformer_s", "model name")
    pretrained: bool = config.option(False, "start from pretrained weights")
    pretrained_path: str | None = config.option(
        None, "file with the pretrained weights (nothing is downloaded)"
    )
    initial_checkpoint: str | None = config.option(
        None, "weights to start from (published, bare or ours)"
    )
    num_classes: int | None = config.option(
        None, "classes (default: the number of class folders)", type=int
    )
    img_size: int | None = config.option(
        None, "training and eval image size (default: the model's, 224)", type=int
    )
    batch_size: int = config.option(128, "batch size per process", short="-b")
    opt: str = config.option("adamw", "optimizer")
    lr: float = config.option(1e-3, "learning rate")
    weight_decay: float = config.option(0.05, "weight decay")
    sched: str = config.option("cosine", "lr schedule (per iteration)")
    epochs: int = config.option(100, "epochs", resume=True)
    warmup_epochs: int = config.option(5, "linear warm-up epochs")
    warmup_lr: float = config.option(1e-6, "lr at the start of warm-up")
    min_lr: float = config.option(1e-5, "lr at the end of the cosine")
    scale: tuple[float, float] = config.option(
        (0.08, 1.0), "random-resized-crop area range", nargs=2
    )
    ratio: tuple[float, float] = config.option(
        (3 / 4, 4 / 3), "random-resized-crop aspect range", nargs=2
    )
    hflip: float = config.option(0.5, "horizontal flip probability")
    color_jitter: float = config.option(0.4, "colour jitter strength")
    aa: str = config.option("none", "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    reprob: float = config.option(0.0, "random erasing probability")
    mixup: float = config.option(0.0, "mixup alpha (0: off)")
    cutmix: float = config.option(0.0, "cutmix alpha (0: off)")
    smoothing: float = config.option(0.1, "label smoothing")
    drop_path: float = config.option(0.1, "stochastic depth rate")
    grad_checkpointing: bool = config.option(False, "save activation memory")
    channels_last: bool = config.option(
        False, "model and images channels-last (faster convolutions on a GPU)", resume=True
    )
    output: str = config.option(
        "runs/train", "run folder (last.pth, best.pth, summary.csv, curves.png, args.yaml)",
        resume=True,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Paper recipes (docs/design.md, "Training recipes"): the one place these numbers live.
# Learning rates are for a global batch of PAPER_GLOBAL_BATCH; `train` scales them linearly to
# the global batch actually used unless --lr is given.
PAPER_GLOBAL_BATCH = 1024
_IMAGENET_RECIPE = {
    "epochs": 300,
    "img_size": 224,
    "batch_size": 128,  # per process: 8 GPUs x 128 = 1024
    "opt": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.05,
    "sched": "cosine",
    "warmup_epochs": 20,
    "warmup_lr": 1e-6,
    "min_lr": 1e-5,
    "aa": "rand-m9-mstd0.5-inc1",
    "mixup": 0.8,
    "cutmix": 1.0,
    "smoothing": 0.1,
    "reprob": 0.25,
    "model_ema": True,
    "model_ema_decay": 0.99992,
    "amp": True,
}
RECIPES: dict[str, dict[str, Any]] = {
    "sgformer_s": {**_IMAGENET_RECIPE, "model": "sgformer_s", "drop_path": 0.1},
    "sgformer_m": {**_IMAGENET_RECIPE, "model": "sgformer_m", "drop_path": 0.2},
    "sgformer_b": {**_IMAGENET_RECIPE, "model": "sgformer_b", "drop_path": 0.4},
    # 384 fine-tune from the 224 weights; pass --model and --initial-checkpoint.
    "finetune_384": {
        **_IMAGENET_RECIPE,
        "epochs": 30,
        "img_size": 384,
        "batch_size": 64,  # 16 GPUs x 64 = 1024 (the paper gives the total only)
        "lr": 5e-6,
        "weight_decay": 1e-8,
        "drop_path": 0.4,
        "warmup_epochs": 0,  # not stated in the paper; fine-tuning at a tiny lr needs none
        "min_lr": 5e-7,
    },
    # Not the paper's: `make demo`, sgformer_nano from scratch on the generated 64 px shapes,
    # sized for a 2-core CPU. Its lr is absolute (no scaling to the global batch).
    # Many images for a few epochs, not few images for many: on 2000 images sgformer_nano fitted
    # the training set and stopped near 87 % held-out after 40 epochs; 8000 x 8 reaches over 90 %
    # in less time (docs/training.md).
    "shapes_demo": {
        "model": "sgformer_nano",
        "epochs": 8,
        "img_size": 64,
        "batch_size": 32,
        "opt": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.05,
        "sched": "cosine",
        "warmup_epochs": 1,
        "warmup_lr": 1e-6,
        "min_lr": 1e-5,
        # Light crops only: a crop that cuts part of a shape off (an arrow without its head)
        # teaches a wrong label; shapes are already at random places and sizes.
        "scale": (0.85, 1.0),
        "ratio": (0.9, 1.1),
        "color_jitter": 0.1,
        "aa": "none",
        "smoothing": 0.1,
        "drop_path": 0.0,
        # Loading in the training process: on 2 cores a loader process preempts one of the two
        # compute threads, and the step waits for it (docs/training.md, "make demo").
        "workers": 0,
    },
}
RECIPE_LR_SCALED = {"lr", "warmup_lr", "min_lr"}
ABSOLUTE_LR_RECIPES = {"shapes_demo"}


config.check_presets(ClassificationConfig, RECIPES)


# ---------------------------------------------------------------------------------------------
# The task.


class ClassificationTask(Task):
    """Cross-entropy (label smoothing, Mixup/CutMix) on folder, tar or timm datasets; one
    evaluation per epoch; the best checkpoint by top-1."""

    name = TASK
    config = ClassificationConfig
    presets = RECIPES
    preset_flag = "recipe"
    best_metric = "top1"
    ema_metrics = ("top1", "top5")
    summary_fields = (
        "epoch",
        "train_loss",
        "val_loss",
        "top1",
        "top5",
        "ema_top1",
        "ema_top5",
        "lr",
        "images_per_s",
        "train_skipped",
        "val_skipped",
    )
    curve_metrics = ("top1", "top5", "ema_top1")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        check_img_size(args.img_size)

    @classmethod
    def settings(cls, given: dict[str, Any]) -> tuple[argparse.Namespace, Run | None]:
        args, resumed = super().settings(given)
        if resumed is None:
            # The recipe's learning rates are for PAPER_GLOBAL_BATCH; scaled once in __init__
            # (to the global batch of the run) unless --lr is given; a resumed run reads the
            # scaled values.
            args.scale_recipe_lr = (
                args.recipe is not None
                and args.recipe not in ABSOLUTE_LR_RECIPES
                and given.get("lr") is None
            )
        if args.data_dir is None:
            raise ValueError("--data-dir is required: a folder with train/ and val/ class folders")
        return args, resumed

    def __init__(self, args: argparse.Namespace, dist_info: Distributed, resumed: Run | None):
        super().__init__(args, dist_info, resumed)
        # Data first: a wrong folder should fail before a model is built.
        train_set, self.class_names = build_dataset(args, args.train_split, is_training=True)
        class_map = {c: i for i, c in enumerate(self.class_names)}
        val_set, _ = build_dataset(args, args.val_split, is_training=False, class_map=class_map)
        self.num_images = len(train_set)
        num_classes = len(self.class_names)
        if args.num_classes is not None and args.num_classes != num_classes:
            raise ValueError(
                f"--num-classes {args.num_classes} disagrees with the {num_classes} class "
                f"folders in {args.data_dir}/{args.train_split}; drop the flag or fix the folders"
            )
        args.num_classes = num_classes

        self.model_name = args.model
        self.model_kwargs = model_kwargs_for(args.model, num_classes, args.img_size, args.drop_path)
        overlay = {"file": args.pretrained_path} if args.pretrained_path else None
        model = create_model(
            args.model,
            pretrained=bool(args.pretrained or args.pretrained_path),
            pretrained_cfg_overlay=overlay,
            **self.model_kwargs,
        )
        if args.img_size is None:
            args.img_size = model.pretrained_cfg["input_size"][-1]
        if args.initial_checkpoint and resumed is None:
            load_weights(model, args.initial_checkpoint)
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.memory_format = torch.channels_last if args.channels_last else torch.preserve_format
        self.model = model.to(dist_info.device, memory_format=self.memory_format)

        global_batch = args.batch_size * dist_info.world_size
        if getattr(args, "scale_recipe_lr", False) and global_batch != PAPER_GLOBAL_BATCH:
            for key in RECIPE_LR_SCALED:
                setattr(args, key, getattr(args, key) * global_batch / PAPER_GLOBAL_BATCH)
            _logger.info("recipe lr scaled to global batch %d: lr %.3g", global_batch, args.lr)
        args.scale_recipe_lr = False  # scaled once; a resumed run reads the scaled values

        self.train_loader = make_loader(
            train_set, train_transform(model, args), args, dist_info, is_training=True
        )
        if len(self.train_loader) == 0:
            raise ValueError(
                f"{len(train_set)} training images make no full batch of {global_batch} "
                f"(-b {args.batch_size} x {dist_info.world_size} processes); lower -b"
            )
        self.val_loader = make_loader(
            val_set, eval_transform(model, args.img_size, None), args, dist_info, is_training=False
        )
        per_pass = len(self.train_loader)
        self.plan = Plan(per_pass, args.epochs * per_pass, per_pass, in_epochs=True)
        self.mixup = None
        if args.mixup > 0 or args.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=args.mixup,
                cutmix_alpha=args.cutmix,
                label_smoothing=args.smoothing,
                num_classes=num_classes,
            )
            self.loss_fn: nn.Module = SoftTargetCrossEntropy()
            self.min_batch = 2  # Mixup pairs samples
        elif args.smoothing > 0:
            self.loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
        else:
            self.loss_fn = nn.CrossEntropyLoss()

    def create_optimizer(self) -> torch.optim.Optimizer:
        return create_optimizer(self.model, self.args.opt, self.args.lr, self.args.weight_decay)

    def create_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        args = self.args
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=args.sched,
            num_epochs=args.epochs,
            warmup_epochs=args.warmup_epochs,
            warmup_lr=args.warmup_lr,
            min_lr=args.min_lr,
            step_on_epochs=False,
            updates_per_epoch=self.plan.iters_per_pass,
        )
        return scheduler

    def train_step(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        device = self.dist_info.device
        images = batch.inputs.to(device, memory_format=self.memory_format)
        targets = batch.targets.to(device)
        if self.mixup is not None:
            if len(images) % 2:  # Mixup pairs samples; odd only after skipped images
                images, targets = images[:-1], targets[:-1]
            images, targets = self.mixup(images, targets)
        return {"loss": self.loss_fn(model(images), targets)}

    def evaluate(
        self, model: nn.Module, precision: Callable[[], Any], desc: str = "val"
    ) -> dict[str, Any]:
        return validate(
            model,
            self.val_loader,
            self.args.num_classes,
            dist_info=self.dist_info,
            precision=precision,
            desc=desc,
            memory_format=self.memory_format,
        )

    def checkpoint_data(self) -> dict[str, Any]:
        return {"class_names": self.class_names, "num_classes": self.args.num_classes}

    def describe(self) -> str:
        world = self.dist_info.world_size
        return (
            f"training {self.model_name} ({self.args.num_classes} classes) on {self.num_images} "
            f"images, {world} processes, global batch {self.args.batch_size * world}, "
            f"{self.args.epochs} epochs"
        )

    def report(self, row: dict[str, Any]) -> str:
        return (
            f"train loss {fmt(row['train_loss'])}  val loss {row['val_loss']:.4f}  "
            f"top-1 {row['top1']:.2f}  top-5 {row['top5']:.2f}"
        )


def train(given: dict[str, Any]) -> dict[str, Any]:
    """``sgformer train``: train (or resume) a classifier; returns the last evaluation's row."""
    return fit(ClassificationTask, given)


# ---------------------------------------------------------------------------------------------
# Data: timm datasets, readers and transforms; unreadable files are skipped and counted.


def _split_names(root: str | Path, split: str) -> tuple[Path, tuple[str, ...]]:
    """The data root, checked to exist, and the names ``split`` may go by in it
    (``val`` and ``validation`` stand for each other)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    return root, VAL_SPLIT_NAMES if split in VAL_SPLIT_NAMES else (split,)


def find_split_dir(root: str | Path, split: str) -> Path:
    """``ROOT/split`` (``val`` and ``validation`` stand for each other)."""
    root, names = _split_names(root, split)
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise ValueError(
        f"no {' or '.join(repr(n) for n in names)} split in {root}: expected "
        f"{root}/{names[0]}/<class>/<image> (one folder per class)"
    )


def find_split_tar(root: str | Path, split: str) -> Path:
    """``ROOT/split.tar`` (members ``<class>/<image>``) or ``ROOT/split/`` of ``<class>.tar``."""
    root, names = _split_names(root, split)
    for name in names:
        if (root / f"{name}.tar").is_file():
            return root / f"{name}.tar"
        if (root / name).is_dir() and any((root / name).glob("*.tar")):
            return root / name
    raise ValueError(
        f"no {' or '.join(repr(n) for n in names)} split in {root} for --dataset tar: expected "
        f"{root}/{names[0]}.tar holding <class>/<image>, or {root}/{names[0]}/<class>.tar"
    )


def _has_image(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*") if p.is_file())


def folder_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names of an ImageFolder split; every class must hold an image."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{split_dir} has no class folders: expected {split_dir}/<class>/<image>")
    empty = [c for c in classes if not _has_image(split_dir / c)]
    if empty:
        raise ValueError(
            f"class folder(s) with no images in {split_dir}: {', '.join(empty)}; add images or "
            "remove the folder"
        )
    return classes


class SkipUnreadable(Dataset):
    """A timm ``ImageDataset`` whose unreadable images come back as ``None`` (with their
    file name) instead of being replaced by the next image, so that they can be counted."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset
        dataset._max_retries = 1  # timm would silently substitute the next sample

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any] | tuple[None, str]:
        try:
            return self.dataset[index]
        except RuntimeError:  # timm's "Failed to load 1 consecutive samples"
            return None, str(self.dataset.filename(index))


def collate_skipping(samples: list[tuple[Any, Any]]) -> Batch:
    """Stack the readable samples; name the others."""
    good = [s for s in samples if s[0] is not None]
    skipped = [s[1] for s in samples if s[0] is None]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images = torch.stack([s[0] for s in good])  # B, 3, H, W
    targets = torch.as_tensor([s[1] for s in good], dtype=torch.long)
    return Batch(images, targets, skipped)


def build_dataset(
    args: argparse.Namespace,
    split: str,
    *,
    is_training: bool,
    class_map: dict[str, int] | None = None,
) -> tuple[Dataset, list[str]]:
    """A timm dataset for ``split`` (folder by default; tar, ``hfds/``, ``wds/`` passed to timm)
    and its class names. Folder splits are checked first so that mistakes read clearly."""
    if args.dataset in ("", "folder"):
        split_dir = find_split_dir(args.data_dir, split)
        classes = folder_classes(split_dir)
        if class_map is not None:
            unknown = [c for c in classes if c not in class_map]
            if unknown:
                raise ValueError(
                    f"{split_dir} has classes the model was not trained on: {', '.join(unknown)}"
                )
        else:
            class_map = {c: i for i, c in enumerate(classes)}
        dataset = ImageDataset(str(split_dir), class_map=class_map)
    elif args.dataset == "tar":
        # timm's create_dataset reads a tar only when the root is one tar file, for every split;
        # its tar reader also takes a folder of per-class tars. Either, per split:
        split_path = find_split_tar(args.data_dir, split)
        reader = ReaderImageInTar(str(split_path), class_map=class_map or "")
        class_map = reader.class_name_to_idx  # the training split's classes name the outputs
        dataset = ImageDataset(str(split_path), reader=reader)
    else:
        dataset = create_dataset(
            args.dataset,
            root=args.data_dir,
            split=split,
            is_training=is_training,
            class_map=class_map or "",
            batch_size=args.batch_size,
            seed=args.seed,
        )
    if len(dataset) == 0:
        raise ValueError(f"the {split!r} split of {args.data_dir} holds no images")
    class_to_idx = getattr(getattr(dataset, "reader", None), "class_to_idx", None) or class_map
    names = (
        [n for n, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])] if class_to_idx else []
    )
    return dataset, names


def make_loader(
    dataset: Dataset,
    transform: Any,
    args: argparse.Namespace,
    dist_info: Distributed,
    *,
    is_training: bool,
    batch_size: int | None = None,
) -> DataLoader:
    """Classification batches: unreadable images skipped and counted; the last incomplete
    training batch dropped (Mixup/CutMix pair samples within a batch)."""
    dataset.transform = transform
    batch_size = batch_size or args.batch_size
    if isinstance(dataset, IterableDataset):  # wds/hfids readers shard and shuffle themselves
        return DataLoader(
            dataset, batch_size=batch_size, num_workers=args.workers, collate_fn=collate_pairs
        )
    make = train_loader if is_training else eval_loader
    extra = {"seed": args.seed} if is_training else {}
    return make(
        SkipUnreadable(dataset),
        batch_size=batch_size,
        workers=args.workers,
        dist_info=dist_info,
        collate_fn=collate_skipping,
        **extra,
    )


def collate_pairs(samples: list[tuple[Any, Any]]) -> Batch:
    """Batches of iterable datasets (which do their own reading)."""
    images, targets = torch.utils.data.default_collate(samples)
    return Batch(images, targets)


def eval_data_config(model: nn.Module, img_size: int | None, crop_pct: float | None) -> dict:
    """The model's pretrained-cfg eval settings (bicubic, crop 0.9 for SG-Former), overridden."""
    overrides: dict[str, Any] = {}
    if img_size is not None:
        overrides["input_size"] = (3, img_size, img_size)
    if crop_pct is not None:
        overrides["crop_pct"] = crop_pct
    return resolve_data_config(overrides, model=unwrap_model(model))


def eval_transform(model: nn.Module, img_size: int | None, crop_pct: float | None) -> Any:
    return create_transform(**eval_data_config(model, img_size, crop_pct), is_training=False)


def train_transform(model: nn.Module, args: argparse.Namespace) -> Any:
    config = resolve_data_config({"input_size": (3, args.img_size, args.img_size)}, model=model)
    return create_transform(
        config["input_size"],
        is_training=True,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        color_jitter=args.color_jitter,
        auto_augment=None if args.aa in (None, "none", "") else args.aa,
        interpolation="bicubic",
        mean=config["mean"],
        std=config["std"],
        re_prob=args.reprob,
        re_mode="pixel",
    )


def check_img_size(img_size: int | None) -> None:
    if img_size is not None and img_size < MIN_INPUT_SIZE:
        raise ValueError(
            f"--img-size {img_size} is too small: SG-Former needs at least {MIN_INPUT_SIZE} pixels "
            "(stride 32 to stage 4)"
        )


# ---------------------------------------------------------------------------------------------
# Models from names and checkpoints.


def model_kwargs_for(name: str, num_classes: int, img_size: int | None, drop_path: float) -> dict:
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": drop_path}
    if name.startswith("sgformer") and img_size is not None:
        kwargs["img_size"] = img_size  # sizes stage 4's position table; any input still runs
    return kwargs


def classifier_from_checkpoint(
    path: str | Path, model_name: str | None = None, use_ema: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a checkpoint holds. Our training checkpoints name their model and
    classes; published or bare weights need ``model_name`` (classes from the classifier)."""
    checkpoint = read_checkpoint(path)
    run = as_run(checkpoint, path)
    if run is not None:
        check_task(run, TASK)
        name = run.model_name
        if model_name is not None and model_name != name:
            raise ValueError(
                f"{path} is a checkpoint of {name}, not {model_name}; pass --model {name}"
            )
        model = create_model(name, **run.model_kwargs)
        model.load_state_dict(run.weights(use_ema))
        info = {
            "model_name": name,
            "class_names": run.data.get("class_names") or [],
            "img_size": run.model_kwargs.get("img_size"),
        }
        return model, info
    if model_name is None:
        raise ValueError(f"{path} holds bare weights: say which model they are with --model")
    weights = checkpoint
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(weights.get(key), dict):
            weights = weights[key]
            break
    head = next((v for k, v in weights.items() if k.endswith("head.weight")), None)
    num_classes = head.shape[0] if head is not None and head.ndim == 2 else 1000
    model = create_model(model_name, num_classes=num_classes)
    load_weights(model, path, use_ema=False)
    return model, {"model_name": model_name, "class_names": [], "img_size": None}


def class_names_for(info: dict[str, Any], num_classes: int) -> list[str]:
    """Training-folder names from our checkpoints, ImageNet-1K names for 1000-class weights."""
    if info.get("class_names"):
        return list(info["class_names"])
    if num_classes == 1000:
        imagenet = timm.data.ImageNetInfo()
        return [imagenet.index_to_description(i) for i in range(num_classes)]
    return [str(i) for i in range(num_classes)]


# ---------------------------------------------------------------------------------------------
# Evaluation and prediction.


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    *,
    dist_info: Distributed,
    precision: Callable[[], Any] = contextlib.nullcontext,
    desc: str = "val",
    memory_format: torch.memory_format = torch.preserve_format,
) -> dict[str, float]:
    """Top-1, top-5 (percent), mean cross-entropy, images/s and unreadable images skipped,
    over every rank's shard; ``precision()`` is the autocast context."""
    from torchmetrics import MeanMetric
    from torchmetrics.classification import MulticlassAccuracy

    device = dist_info.device
    model.eval()
    top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro").to(device)
    top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro").to(device)
    mean_loss = MeanMetric().to(device)
    seen, skipped = 0, []
    start = time.perf_counter()
    bar = progress_bar(len(loader), desc, dist_info.is_main)
    for batch in loader:
        skipped += batch.skipped
        if len(batch) == 0:
            continue
        images = batch.inputs.to(device, memory_format=memory_format)
        targets = batch.targets.to(device)
        with precision():
            logits = model(images).float()
        mean_loss.update(nn.functional.cross_entropy(logits, targets, reduction="none"))
        top1.update(logits, targets)
        top5.update(logits, targets)
        seen += len(images)
        bar.update()
    bar.close()
    elapsed = time.perf_counter() - start
    seen_total, skipped_total = reduce_sum([seen, len(skipped)], dist_info)
    for name in skipped:
        _logger.warning("skipped unreadable image %s", name)
    if seen_total == 0:
        raise ValueError("no readable images in the validation split")
    return {
        "loss": mean_loss.compute().item(),
        "top1": 100.0 * top1.compute().item(),
        "top5": 100.0 * top5.compute().item(),
        "images": int(seen_total),
        "images_per_s": seen_total / elapsed,
        "skipped": int(skipped_total),
    }


def validate_checkpoint(
    data_dir: str | Path,
    checkpoint: str | Path,
    *,
    model_name: str | None = None,
    split: str = "validation",
    img_size: int | None = None,
    crop_pct: float | None = None,
    use_ema: bool = False,
    batch_size: int = 64,
    workers: int = 2,
    dataset: str = "",
    device: str | None = None,
    results_file: str | Path | None = None,
) -> dict[str, Any]:
    """``sgformer validate``: top-1/top-5/loss of a checkpoint on a split, optionally as JSON."""
    check_img_size(img_size)
    dist_info = setup_distributed(device)
    model, info = classifier_from_checkpoint(checkpoint, model_name, use_ema)
    model.to(dist_info.device)
    args = argparse.Namespace(
        dataset=dataset, data_dir=data_dir, batch_size=batch_size, seed=0, workers=workers
    )
    class_map = None
    names = info["class_names"]
    if names:
        class_map = {c: i for i, c in enumerate(names)}
    val_set, found = build_dataset(args, split, is_training=False, class_map=class_map)
    num_classes = model.num_classes
    if not names and len(found) != num_classes:
        raise ValueError(
            f"{data_dir}/{split} has {len(found)} classes but the model predicts {num_classes}"
        )
    data_config = eval_data_config(model, img_size or info["img_size"], crop_pct)
    transform = create_transform(**data_config, is_training=False)
    loader = make_loader(val_set, transform, args, dist_info, is_training=False)
    metrics = validate(model, loader, num_classes, dist_info=dist_info)
    result = {
        "model": info["model_name"],
        "checkpoint": str(checkpoint),
        "split": split,
        "img_size": data_config["input_size"][-1],
        "crop_pct": data_config["crop_pct"],
        "interpolation": data_config["interpolation"],
        "use_ema": use_ema,
        **metrics,
    }
    if results_file is not None and dist_info.is_main:
        Path(results_file).write_text(json.dumps(result, indent=2) + "\n")
    return result


@torch.no_grad()
def predict(
    inputs: Iterable[str | Path],
    checkpoint: str | Path,
    *,
    model_name: str | None = None,
    topk: int = 5,
    img_size: int | None = None,
    use_ema: bool = False,
    device: str | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Top-k classes for each image; returns (predictions, unreadable files skipped)."""
    check_img_size(img_size)
    run_device = setup_distributed(device).device
    model, info = classifier_from_checkpoint(checkpoint, model_name, use_ema)
    model.to(run_device).eval()
    names = class_names_for(info, model.num_classes)
    transform = eval_transform(model, img_size or info["img_size"], None)
    k = min(topk, model.num_classes)
    predictions, skipped = [], []
    for path in collect_images(inputs):
        try:
            with Image.open(path) as image:
                tensor = transform(image.convert("RGB")).unsqueeze(0)
        except (OSError, ValueError) as err:
            _logger.warning("skipped unreadable image %s: %s", path, err)
            skipped.append(str(path))
            continue
        probs = model(tensor.to(run_device)).float().softmax(-1)[0]
        values, indices = probs.topk(k)
        predictions.append(
            {
                "image": str(path),
                "topk": [
                    {"class": names[i], "index": int(i), "prob": float(p)}
                    for p, i in zip(values.tolist(), indices.tolist(), strict=True)
                ],
            }
        )
    return predictions, skipped
