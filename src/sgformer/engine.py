"""Training, validation and prediction for image classification, and the shared run helpers.

One loop read top to bottom (``train_one_epoch``, ``validate``) and a short driver (``train``).
Detection and segmentation reuse the training helpers of the first half: the optimiser step
with clipping and the non-finite loss guard. Distributed setup, seeding and AMP live in
``sgformer.runtime``, checkpoint files in ``sgformer.checkpoint``.

Everything that timm already does is timm's: datasets and readers, transforms, Mixup/CutMix,
``create_optimizer_v2``, ``create_scheduler_v2`` (per-iteration warm-up and cosine), losses and
``ModelEmaV3``. Accuracy comes from torchmetrics, which also reduces it over ranks.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
import yaml
from PIL import Image
from timm.data import ImageDataset, Mixup, create_dataset, create_transform, resolve_data_config
from timm.data.readers.reader_image_in_tar import ReaderImageInTar
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from .checkpoint import (
    LAST_CHECKPOINT,
    Run,
    as_run,
    check_task,
    load_run,
    plain,
    plain_args,
    read_checkpoint,
    save_run,
)
from .model import MIN_INPUT_SIZE, checkpoint_filter_fn, create_model
from .runtime import (
    Distributed,
    ScalarLog,
    amp_settings,
    autocast,
    check_ranks_in_sync,
    compile_model,
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

TASK = "classification"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
VAL_SPLIT_NAMES = ("val", "validation")

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
        # compute threads, and the step waits for it (149 against 125 images/s measured).
        "workers": 0,
    },
}
RECIPE_LR_SCALED = {"lr", "warmup_lr", "min_lr"}
ABSOLUTE_LR_RECIPES = {"shapes_demo"}

# Defaults without a recipe: fine-tuning or training on one's own data (timm train.py habits).
TRAIN_DEFAULTS: dict[str, Any] = {
    "dataset": "",
    "train_split": "train",
    "val_split": "validation",
    "model": "sgformer_s",
    "pretrained": False,
    "pretrained_path": None,
    "initial_checkpoint": None,
    "resume": None,
    "num_classes": None,
    "img_size": None,  # the model's pretrained cfg (224)
    "batch_size": 128,
    "opt": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.05,
    "sched": "cosine",
    "epochs": 100,
    "warmup_epochs": 5,
    "warmup_lr": 1e-6,
    "min_lr": 1e-5,
    "clip_grad": None,
    "scale": (0.08, 1.0),
    "ratio": (3 / 4, 4 / 3),
    "hflip": 0.5,
    "color_jitter": 0.4,
    "aa": "none",
    "reprob": 0.0,
    "mixup": 0.0,
    "cutmix": 0.0,
    "smoothing": 0.1,
    "drop_path": 0.1,
    "model_ema": False,
    "model_ema_decay": 0.9998,
    "amp": False,
    "amp_dtype": None,  # float16 on CUDA, bfloat16 on CPU
    "grad_checkpointing": False,
    "channels_last": False,
    "compile": None,
    "workers": min(4, os.cpu_count() or 1),
    "seed": 42,
    "output": "runs/train",
    "log_interval": 50,
    "log": "csv",
    "device": None,
    "data_dir": None,
    "recipe": None,
}
# On --resume these come from the command line; everything else from the checkpoint.
# channels_last and compile change the memory layout and kernels only (and the last bits).
RESUME_OVERRIDABLE = {
    "epochs",
    "output",
    "workers",
    "log_interval",
    "log",
    "device",
    "data_dir",
    "channels_last",
    "compile",
}


def resolve_train_args(given: dict[str, Any]) -> argparse.Namespace:
    """Explicit flags (not None) win over the recipe, which wins over ``TRAIN_DEFAULTS``."""
    recipe_name = given.get("recipe")
    if recipe_name is not None and recipe_name not in RECIPES:
        raise ValueError(f"unknown recipe {recipe_name!r}; choose from {', '.join(RECIPES)}")
    merged = dict(TRAIN_DEFAULTS)
    recipe = RECIPES.get(recipe_name, {}) if recipe_name else {}
    merged.update(recipe)
    explicit = {k: v for k, v in given.items() if v is not None}
    merged.update(explicit)
    merged["lr_explicit"] = "lr" in explicit
    merged["recipe_lr_scaling"] = bool(recipe) and recipe_name not in ABSOLUTE_LR_RECIPES
    for key in ("scale", "ratio"):
        merged[key] = tuple(float(v) for v in merged[key])
    return argparse.Namespace(**merged)


# ---------------------------------------------------------------------------------------------
# Run helpers shared with detection and segmentation.


# timm optimizer names whose torch class has one fused kernel for all parameters (CPU and CUDA):
# the default per-tensor loop was about 10 % of sgformer_nano's training step on a 2-core CPU.
FUSED_OPTIMIZERS = {"adam", "adamw"}


def create_optimizer(model: nn.Module, opt: str, lr: float, weight_decay: float):
    """timm's ``create_optimizer_v2`` (no decay on norms, biases, ``no_weight_decay()``), fused
    where torch has a fused kernel for it."""
    fused = {"fused": True} if opt.lower() in FUSED_OPTIMIZERS else {}
    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, **fused)


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: NativeScaler | None,
    clip_grad: float | None,
    parameters: Iterable[nn.Parameter],
) -> None:
    """Backward, optional gradient-norm clipping, step (through the loss scaler under fp16)."""
    if scaler is not None:
        scaler(loss, optimizer, clip_grad=clip_grad, parameters=parameters)
        return
    loss.backward()
    if clip_grad is not None:
        dispatch_clip_grad(parameters, clip_grad, mode="norm")
    optimizer.step()


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; training stops and the last checkpoint is kept."""


def check_finite_loss(
    loss: torch.Tensor, dist_info: Distributed, where: str, last_checkpoint: Path | None
) -> None:
    """Stop every rank together when any rank's loss is NaN/Inf, saying where it happened."""
    bad = (~torch.isfinite(loss.detach())).float()
    if dist_info.enabled:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() > 0:
        kept = (
            f"the last good checkpoint is {last_checkpoint}"
            if last_checkpoint is not None and last_checkpoint.is_file()
            else "no checkpoint was written yet"
        )
        raise NonFiniteLossError(
            f"loss is {loss.item()} at {where}; stopped (lower --lr, set --clip-grad or turn off "
            f"--amp); {kept}"
        )


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: NativeScaler | None,
    ema: ModelEmaV3 | None = None,
    **progress: Any,
) -> dict[str, Any]:
    """A run checkpoint's ``state``: what ``restore_training_state`` restores, plus
    ``progress`` (epoch and/or iteration, the last metrics)."""
    return {
        "model": model.state_dict(),
        "model_ema": ema.module.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        **progress,
    }


def restore_training_state(
    run: Run,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: NativeScaler | None,
) -> None:
    """Load what every trainer's checkpoint holds: model, optimizer, scheduler, fp16 scaler."""
    model.load_state_dict(run.state["model"])
    optimizer.load_state_dict(run.state["optimizer"])
    scheduler.load_state_dict(run.state["scheduler"])
    if scaler is not None and run.state.get("scaler"):
        scaler.load_state_dict(run.state["scaler"])


def check_not_finished(done: int, total: int, unit: str, flag: str) -> None:
    """A resumed run must have steps left: ``done`` of ``total`` ``unit`` (set by ``flag``)."""
    if done >= total:
        raise ValueError(f"the checkpoint already finished {done} {unit}; pass {flag} above that")


# ---------------------------------------------------------------------------------------------
# Data: timm datasets, readers and transforms; corrupt files are skipped and counted.


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


@dataclass
class Batch:
    images: torch.Tensor  # B, 3, H, W
    targets: torch.Tensor  # B
    skipped: list[str]  # files that could not be read


def collate_skipping(samples: list[tuple[Any, Any]]) -> Batch:
    """Stack the readable samples; name the others."""
    good = [s for s in samples if s[0] is not None]
    skipped = [s[1] for s in samples if s[0] is None]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images = torch.stack([s[0] for s in good])
    targets = torch.as_tensor([s[1] for s in good], dtype=torch.long)
    return Batch(images, targets, skipped)


class ShardSampler(torch.utils.data.Sampler[int]):
    """Every ``world_size``-th index from ``rank``, in order, without padding: evaluation over
    ranks sees each image exactly once (``DistributedSampler`` repeats some to even out)."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


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


def make_sampler(
    dataset: Dataset, dist_info: Distributed, is_training: bool, seed: int, drop_last: bool = True
) -> torch.utils.data.Sampler[int]:
    """Training: a seeded, shuffled ``DistributedSampler`` (also for one rank, so one process
    and many see the same permutation). Evaluation: in-order shards, each item once."""
    if is_training:
        return DistributedSampler(
            dataset,
            dist_info.world_size,
            dist_info.rank,
            shuffle=True,
            seed=seed,
            drop_last=drop_last,
        )
    return ShardSampler(len(dataset), dist_info.rank, dist_info.world_size)


def sharded_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    workers: int,
    dist_info: Distributed,
    is_training: bool,
    seed: int,
    collate_fn: Callable[[list[Any]], Any],
    drop_last: bool = True,
    persistent_workers: bool = False,
) -> DataLoader:
    """This rank's batches of a map-style dataset (``make_sampler``); every task's loader.

    ``drop_last`` drops the incomplete last batch of training (and the sampler's uneven tail
    over ranks); evaluation always sees every item once.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=make_sampler(dataset, dist_info, is_training, seed, drop_last=drop_last),
        num_workers=workers,
        collate_fn=collate_fn,
        drop_last=is_training and drop_last,
        pin_memory=dist_info.device.type == "cuda",
        persistent_workers=persistent_workers and workers > 0,
    )


def make_loader(
    dataset: Dataset,
    transform: Any,
    *,
    batch_size: int,
    workers: int,
    dist_info: Distributed,
    is_training: bool,
    seed: int,
) -> DataLoader:
    """Classification batches: unreadable images skipped and counted; the last incomplete
    training batch dropped (Mixup/CutMix pair samples within a batch)."""
    dataset.transform = transform
    if isinstance(dataset, IterableDataset):  # wds/hfids readers shard and shuffle themselves
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    return sharded_loader(
        SkipUnreadable(dataset),
        batch_size=batch_size,
        workers=workers,
        dist_info=dist_info,
        is_training=is_training,
        seed=seed,
        collate_fn=collate_skipping,
    )


def _batches(loader: DataLoader) -> Iterator[Batch]:
    for batch in loader:
        if isinstance(batch, Batch):
            yield batch
        else:  # iterable datasets use the default collate
            yield Batch(batch[0], batch[1], [])


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


def _weights_in(checkpoint: dict[str, Any], path: str | Path, use_ema: bool = False) -> dict:
    """The state dict a published file, bare state dict or our classification run holds."""
    run = as_run(checkpoint, path)
    if run is None:
        return checkpoint
    check_task(run, TASK)
    return run.weights(use_ema)


def load_weights(model: nn.Module, path: str | Path, use_ema: bool = False) -> None:
    """Load a published file, bare state dict, or our training checkpoint into ``model``."""
    state = _weights_in(read_checkpoint(path), path, use_ema)
    if hasattr(model, "pos_embed_grid") or "stem.conv1.weight" in model.state_dict():
        state = checkpoint_filter_fn(state, model)
    result = model.load_state_dict(state, strict=False)
    head_only = {"head.weight", "head.bias"}
    if result.unexpected_keys or set(result.missing_keys) - head_only:
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Classification weights (published, bare or ours) into the SG-Former of a dense model.

    The classifier is dropped and ``pos_embed`` resampled (``checkpoint_filter_fn``); every
    other tensor must fit, else ``ValueError`` names what is missing or left over. Detection
    and segmentation checkpoints are refused: they resume with ``--resume``/``--checkpoint``.
    ``load_weights`` does not serve here: a feature backbone has no head to leave unfilled.
    """
    checkpoint = read_checkpoint(path)
    run = as_run(checkpoint, path)
    if run is not None and run.task != "classification":
        raise ValueError(
            f"{path} is a {run.task} checkpoint, not classification weights; use --resume or "
            "--checkpoint for it, --backbone-checkpoint for a classifier's"
        )
    state = checkpoint_filter_fn(checkpoint if run is None else run.weights(), backbone)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    result = backbone.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit the {type(backbone).__name__} backbone: missing "
            f"{result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}; pass the "
            "classification checkpoint of the same --model"
        )
    _logger.info("backbone weights loaded from %s", path)


def model_from_checkpoint(
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
# The loop.


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    epoch: int,
    scheduler: Any,
    mixup: Mixup | None,
    amp: bool,
    amp_dtype: torch.dtype,
    scaler: NativeScaler | None,
    clip_grad: float | None,
    ema: ModelEmaV3 | None,
    dist_info: Distributed,
    log_interval: int,
    last_checkpoint: Path | None = None,
    memory_format: torch.memory_format = torch.preserve_format,
) -> dict[str, float]:
    """One pass over ``loader``; returns loss (mean over all ranks' samples), lr, images/s and
    the number of unreadable images skipped. Images go to the device in ``memory_format``."""
    model.train()
    device = dist_info.device
    updates_per_epoch = len(loader)
    loss_sum, seen, skipped = 0.0, 0, []
    start = time.perf_counter()
    bar = progress_bar(updates_per_epoch, f"train {epoch}", dist_info.is_main)
    for step, batch in enumerate(_batches(loader)):
        skipped += batch.skipped
        images = batch.images.to(device, memory_format=memory_format)
        targets = batch.targets.to(device)
        if mixup is not None and len(images) % 2:  # Mixup pairs samples; only after skips
            images, targets = images[:-1], targets[:-1]
        if len(images) == 0:
            continue
        if mixup is not None:
            images, soft_targets = mixup(images, targets)
        else:
            soft_targets = targets
        with autocast(device, amp, amp_dtype):
            loss = loss_fn(model(images), soft_targets)
        num_updates = epoch * updates_per_epoch + step + 1
        check_finite_loss(
            loss, dist_info, f"epoch {epoch} step {step} (update {num_updates})", last_checkpoint
        )
        optimizer.zero_grad(set_to_none=True)
        optimizer_step(loss, optimizer, scaler, clip_grad, model.parameters())
        if ema is not None:
            ema.update(unwrap_model(model), step=num_updates)
        scheduler.step_update(num_updates=num_updates)

        loss_sum += loss.item() * len(images)
        seen += len(images)
        lr = optimizer.param_groups[0]["lr"]
        rate = seen * dist_info.world_size / (time.perf_counter() - start)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
        if bar.disable and log_interval and (step + 1) % log_interval == 0:
            _logger.info(
                "epoch %d step %d/%d  loss %.4f  lr %.3g  %.1f img/s",
                epoch + 1,
                step + 1,
                updates_per_epoch,
                loss.item(),
                lr,
                rate,
            )
    bar.close()
    elapsed = time.perf_counter() - start
    loss_total, seen_total, skipped_total = reduce_sum([loss_sum, seen, len(skipped)], dist_info)
    for name in skipped:
        _logger.warning("skipped unreadable image %s", name)
    return {
        "train_loss": loss_total / max(seen_total, 1),
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_s": seen_total / elapsed,
        "train_skipped": int(skipped_total),
    }


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    *,
    dist_info: Distributed,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.bfloat16,
    desc: str = "val",
    memory_format: torch.memory_format = torch.preserve_format,
) -> dict[str, float]:
    """Top-1, top-5 (percent), mean cross-entropy and images/s over every rank's shard."""
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
    for batch in _batches(loader):
        skipped += batch.skipped
        if len(batch.images) == 0:
            continue
        images = batch.images.to(device, memory_format=memory_format)
        targets = batch.targets.to(device)
        with autocast(device, amp, amp_dtype):
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


# ---------------------------------------------------------------------------------------------
# Driver.

SUMMARY_FIELDS = (
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


def write_summary_csv(output: Path, history: list[dict[str, Any]], fields: Sequence[str]) -> None:
    """Rewrite ``output/summary.csv`` (columns ``fields``) from the run's history.

    The history is kept in the checkpoint, so a resumed run never duplicates or loses a row.
    The file is written beside and then renamed, so a run killed meanwhile leaves the old one.
    """
    tmp = output / ".summary.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k, "") for k in fields})
    os.replace(tmp, output / "summary.csv")


def write_summary(output: Path, history: list[dict[str, Any]]) -> None:
    """The classification run's ``summary.csv``, then its curves."""
    write_summary_csv(output, history, SUMMARY_FIELDS)
    plot_curves(history, output / "curves.png")


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [r["top1"] for r in history], "o-", label="top-1")
    ax_acc.plot(epochs, [r["top5"] for r in history], "o-", label="top-5")
    if any(r.get("ema_top1") not in (None, "") for r in history):
        ax_acc.plot(epochs, [r.get("ema_top1") for r in history], "o--", label="EMA top-1")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy", ylim=(0, 100))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def resume_args(
    given: dict[str, Any],
    overridable: set[str],
    preset_key: str,
    task: str,
    defaults: dict[str, Any],
) -> tuple[argparse.Namespace, Run]:
    """Arguments of a resumed run: the checkpoint's, except the ``overridable`` flags given
    again; other given flags that differ are reported as ignored. Also for detection and
    segmentation (their preset flag is ``preset_key``, never re-applied)."""
    run = load_run(given["resume"], task)
    args = argparse.Namespace(**{**defaults, **run.args})  # flags newer than the checkpoint
    ignored = []
    for key, value in given.items():
        if value is None or key in ("resume", preset_key):
            continue
        if key in overridable:
            setattr(args, key, value)
        elif plain(value) != plain(getattr(args, key, None)):
            ignored.append(key)
    if ignored:
        _logger.warning("resuming: the checkpoint's values are used for %s", ", ".join(ignored))
    if given.get("output") is None:
        resume = Path(given["resume"])
        args.output = str(resume if resume.is_dir() else resume.parent)
    args.resume = given["resume"]
    return args, run


def write_args(output: Path, args: argparse.Namespace) -> None:
    """``args.yaml``: the run's resolved arguments."""
    output.mkdir(parents=True, exist_ok=True)
    with (output / "args.yaml").open("w") as f:
        yaml.safe_dump(plain_args(args), f, sort_keys=True)


def train(given: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) a classifier as ``sgformer train`` describes; returns the final row.

    ``given`` maps flag names to values, None where the flag was not given.
    """
    resumed: Run | None = None
    if given.get("resume"):
        args, resumed = resume_args(given, RESUME_OVERRIDABLE, "recipe", TASK, TRAIN_DEFAULTS)
    else:
        args = resolve_train_args(given)
    if args.data_dir is None:
        raise ValueError("--data-dir is required: a folder with train/ and val/ class folders")
    check_img_size(args.img_size)
    dist_info = setup_distributed(args.device)
    output = Path(args.output)
    last_path = output / LAST_CHECKPOINT
    if resumed is None and last_path.exists():
        raise ValueError(
            f"{output} already holds a run ({LAST_CHECKPOINT}); pass --resume {output} to "
            "continue it or choose another --output"
        )

    # Data first: a wrong folder should fail before a model is built.
    train_set, class_names = build_dataset(args, args.train_split, is_training=True)
    val_set, _ = build_dataset(
        args, args.val_split, is_training=False, class_map={c: i for i, c in enumerate(class_names)}
    )
    num_classes = len(class_names)
    if args.num_classes is not None and args.num_classes != num_classes:
        raise ValueError(
            f"--num-classes {args.num_classes} disagrees with the {num_classes} class folders in "
            f"{args.data_dir}/{args.train_split}; drop the flag or fix the folders"
        )
    args.num_classes = num_classes

    seed_everything(args.seed)  # same initial weights on every rank (DDP also broadcasts)
    model_kwargs = model_kwargs_for(args.model, num_classes, args.img_size, args.drop_path)
    pretrained_cfg_overlay = {"file": args.pretrained_path} if args.pretrained_path else None
    model = create_model(
        args.model,
        pretrained=bool(args.pretrained or args.pretrained_path),
        pretrained_cfg_overlay=pretrained_cfg_overlay,
        **model_kwargs,
    )
    if args.img_size is None:
        args.img_size = model.pretrained_cfg["input_size"][-1]
    if args.initial_checkpoint and resumed is None:
        load_weights(model, args.initial_checkpoint)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    # Runs saved before the flag existed have no channels_last.
    channels_last = getattr(args, "channels_last", False)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    model.to(dist_info.device, memory_format=memory_format)

    global_batch = args.batch_size * dist_info.world_size
    if args.recipe_lr_scaling and not args.lr_explicit and global_batch != PAPER_GLOBAL_BATCH:
        scale = global_batch / PAPER_GLOBAL_BATCH
        for key in RECIPE_LR_SCALED:
            setattr(args, key, getattr(args, key) * scale)
        _logger.info("recipe lr scaled to global batch %d: lr %.3g", global_batch, args.lr)
        args.recipe_lr_scaling = False  # scaled once; a resumed run reads the scaled values

    optimizer = create_optimizer(model, args.opt, args.lr, args.weight_decay)
    amp_dtype = amp_settings(args.amp, args.amp_dtype, dist_info.device)
    scaler = make_scaler(args.amp, amp_dtype, dist_info.device)
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None

    train_loader = make_loader(
        train_set,
        train_transform(model, args),
        batch_size=args.batch_size,
        workers=args.workers,
        dist_info=dist_info,
        is_training=True,
        seed=args.seed,
    )
    if len(train_loader) == 0:
        raise ValueError(
            f"{len(train_set)} training images make no full batch of {global_batch} "
            f"(-b {args.batch_size} x {dist_info.world_size} processes); lower -b"
        )
    val_loader = make_loader(
        val_set,
        eval_transform(model, args.img_size, None),
        batch_size=args.batch_size,
        workers=args.workers,
        dist_info=dist_info,
        is_training=False,
        seed=args.seed,
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=args.sched,
        num_epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr,
        min_lr=args.min_lr,
        step_on_epochs=False,
        updates_per_epoch=len(train_loader),
    )
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            label_smoothing=args.smoothing,
            num_classes=num_classes,
        )
        loss_fn: nn.Module = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()

    start_epoch, history, best = 0, [], {"top1": -1.0, "epoch": -1}
    if resumed is not None:
        restore_training_state(resumed, model, optimizer, scheduler, scaler)
        if ema is not None:
            ema.module.load_state_dict(resumed.state["model_ema"])
        start_epoch, history, best = resumed.state["epoch"], resumed.history, resumed.best
        _logger.info("resumed from %s at epoch %d", args.resume, start_epoch)
    check_not_finished(start_epoch, args.epochs, "epochs", "--epochs")

    # Only the training step is compiled: evaluation and EMA use the eager model, and the
    # checkpoint its parameters (which the compiled module shares). Runs saved before the flag
    # existed have no compile.
    train_model = compile_model(wrap_distributed(model, dist_info), getattr(args, "compile", None))
    scalars = ScalarLog(output, args.log, enabled=dist_info.is_main)
    if dist_info.is_main:
        write_args(output, args)
        _logger.info(
            "training %s (%d classes) on %d images, %d processes, global batch %d, %d epochs",
            args.model,
            num_classes,
            len(train_set),
            dist_info.world_size,
            global_batch,
            args.epochs,
        )

    row: dict[str, Any] = {}
    for epoch in range(start_epoch, args.epochs):
        seed_everything(epoch_seed(args.seed, epoch, dist_info.rank))
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)  # the permutation depends on the epoch only
        row = {"epoch": epoch + 1}
        row |= train_one_epoch(
            train_model,
            train_loader,
            optimizer,
            loss_fn,
            epoch=epoch,
            scheduler=scheduler,
            mixup=mixup,
            amp=args.amp,
            amp_dtype=amp_dtype,
            scaler=scaler,
            clip_grad=args.clip_grad,
            ema=ema,
            dist_info=dist_info,
            log_interval=args.log_interval,
            last_checkpoint=last_path,
            memory_format=memory_format,
        )
        scheduler.step(epoch + 1)
        check_ranks_in_sync(model, dist_info)
        metrics = validate(
            model,
            val_loader,
            num_classes,
            dist_info=dist_info,
            amp=args.amp,
            amp_dtype=amp_dtype,
            memory_format=memory_format,
        )
        row |= {
            "val_loss": metrics["loss"],
            "top1": metrics["top1"],
            "top5": metrics["top5"],
            "val_skipped": metrics["skipped"],
        }
        if ema is not None:
            ema_metrics = validate(
                ema.module,
                val_loader,
                num_classes,
                dist_info=dist_info,
                amp=args.amp,
                amp_dtype=amp_dtype,
                desc="val ema",
                memory_format=memory_format,
            )
            row |= {"ema_top1": ema_metrics["top1"], "ema_top5": ema_metrics["top5"]}
        history.append(row)
        is_best = row["top1"] > best["top1"]
        if is_best:
            best = {"top1": row["top1"], "epoch": epoch + 1}
        if dist_info.is_main:
            state = training_state(
                model, optimizer, scheduler, scaler, ema, epoch=epoch + 1, metrics=row
            )
            data = {"class_names": class_names, "num_classes": num_classes}
            run = Run(TASK, args.model, model_kwargs, plain_args(args), state, history, best, data)
            save_run(output, run, is_best)
            write_summary(output, history)
            scalars.write(row, epoch + 1)
        skipped = row["train_skipped"] + row["val_skipped"]
        _logger.info(
            "epoch %d/%d  train loss %.4f  val loss %.4f  top-1 %.2f  top-5 %.2f  lr %.3g  "
            "%.1f img/s%s",
            epoch + 1,
            args.epochs,
            row["train_loss"],
            row["val_loss"],
            row["top1"],
            row["top5"],
            row["lr"],
            row["images_per_s"],
            f"  skipped {skipped} unreadable images" if skipped else "",
        )
    scalars.close()
    if dist_info.enabled:
        dist.barrier()
    return {**row, "best_top1": best["top1"], "best_epoch": best["epoch"], "output": str(output)}


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
    model, info = model_from_checkpoint(checkpoint, model_name, use_ema)
    model.to(dist_info.device)
    args = argparse.Namespace(dataset=dataset, data_dir=data_dir, batch_size=batch_size, seed=0)
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
    config = eval_data_config(model, img_size or info["img_size"], crop_pct)
    loader = make_loader(
        val_set,
        create_transform(**config, is_training=False),
        batch_size=batch_size,
        workers=workers,
        dist_info=dist_info,
        is_training=False,
        seed=0,
    )
    metrics = validate(model, loader, num_classes, dist_info=dist_info)
    result = {
        "model": info["model_name"],
        "checkpoint": str(checkpoint),
        "split": split,
        "img_size": config["input_size"][-1],
        "crop_pct": config["crop_pct"],
        "interpolation": config["interpolation"],
        "use_ema": use_ema,
        **metrics,
    }
    if results_file is not None and dist_info.is_main:
        Path(results_file).write_text(json.dumps(result, indent=2) + "\n")
    return result


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
    model, info = model_from_checkpoint(checkpoint, model_name, use_ema)
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
