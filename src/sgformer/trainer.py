"""The one training loop. Classification, detection and segmentation each train through ``fit``.

A ``Task`` supplies what differs: its settings (a config dataclass and presets), data, model,
optimiser and schedule, ``train_step(model, batch) -> losses`` and ``evaluate(model) ->
metrics`` with the metric that picks the best checkpoint. ``fit`` owns the rest, the same for
every task: processes (torchrun, DDP), AMP and its loss scaler, gradient clipping, EMA, the
non-finite-loss stop, the time limit, the evaluation interval, progress bars and logs,
``summary.csv`` and ``curves.png``, ``last.pth``/``best.pth`` and exact resume.

The loop counts iterations: one iteration is one batch drawn from the training data, so the
data position is the iteration number, and a run resumed from any checkpoint (also one written
in the middle of a pass over the data) continues with the very batches, augmentations and
random draws of the uninterrupted run. What makes that hold:

- each pass over the data is shuffled by its number alone (``DistributedSampler.set_epoch``),
  and ``TrainSampler`` starts a pass at any batch;
- every training sample's augmentation draws from a seed of its own (pass, index), whichever
  loader process reads it (``SeededSamples``);
- the checkpoint stores every rank's random number generators, restored on resume.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from timm.scheduler.scheduler import Scheduler as TimmScheduler
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import config
from .checkpoint import LAST_CHECKPOINT, Run, load_run, plain_args, save_run
from .runtime import (
    COMPILE_MODES,
    LOG_FORMATS,
    Distributed,
    ScalarLog,
    amp_settings,
    autocast,
    check_ranks_in_sync,
    compile_model,
    epoch_seed,
    gather_objects,
    make_scaler,
    progress_bar,
    reduce_sum,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_distributed,
    unwrap_model,
    wrap_distributed,
)

_logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of every training command; each task's config adds its own fields."""

    resume: str | None = config.option(None, "run folder or checkpoint to continue exactly")
    output: str = config.option("runs/train", "run folder for checkpoints and logs", resume=True)
    amp: bool = config.option(False, "mixed precision (autocast)")
    amp_dtype: str | None = config.option(
        None, "float16 or bfloat16 (default float16 on CUDA, bfloat16 on CPU)"
    )
    clip_grad: float | None = config.option(
        None, "clip the gradient norm to this value (default off)", type=float
    )
    model_ema: bool = config.option(False, "keep an EMA of the weights, evaluated beside them")
    model_ema_decay: float = config.option(0.9998, "EMA decay")
    compile: str | None = config.option(
        None,
        "torch.compile the training step; optionally its mode: "
        + ", ".join(COMPILE_MODES)
        + " (reduce-overhead: CUDA graphs, for a fixed image size on a GPU)",
        nargs="?",
        const="default",
        choices=COMPILE_MODES,
        metavar="MODE",
        resume=True,
    )
    workers: int = config.option(
        min(4, os.cpu_count() or 1), "data loading processes per training process", resume=True
    )
    seed: int = config.option(42, "random seed")
    log_interval: int = config.option(
        50, "iterations between log lines without a terminal", resume=True
    )
    log: str = config.option(
        "csv",
        "csv (summary.csv) or tensorboard (also scalars in OUTPUT/tensorboard)",
        choices=LOG_FORMATS,
        resume=True,
    )
    time_limit: float | None = config.option(
        None,
        "minutes of training after which the run evaluates, checkpoints and stops",
        type=float,
        resume=True,
    )
    device: str | None = config.option(
        None, "cpu or cuda (default: cuda when available)", resume=True
    )


@dataclass(frozen=True)
class Plan:
    """How long a run is and when it evaluates, in iterations (batches drawn)."""

    iters_per_pass: int  # batches in one pass over this rank's training data
    total: int  # iterations of the whole run
    eval_every: int  # iterations between evaluations
    in_epochs: bool  # the task's settings count epochs (rows carry an ``epoch`` column)
    checkpoint_every: int = 0  # iterations between checkpoints (and rows); 0: at evaluations

    def __post_init__(self) -> None:
        if self.checkpoint_every == 0:
            object.__setattr__(self, "checkpoint_every", self.eval_every)

    def epoch(self, iteration: int) -> int | float:
        """Passes done at ``iteration``: whole at a pass boundary, else to three decimals."""
        whole, rest = divmod(iteration, self.iters_per_pass)
        return whole if rest == 0 else round(iteration / self.iters_per_pass, 3)


@dataclass
class Batch:
    """What every task's collate function returns: the readable samples, and the rest named."""

    inputs: Any  # images: a (B, 3, H, W) tensor, or a list of (3, H_i, W_i) of any sizes
    targets: Any  # labels (B), label maps (B, H, W) or a list of detection target dicts
    skipped: list[str] = field(default_factory=list)  # files that could not be read
    errors: list[str] = field(default_factory=list)  # bad data: raised in the main process

    def __len__(self) -> int:
        return len(self.inputs)

    def check(self) -> None:
        """Raise the first data error (a one-line ValueError, whichever process read it)."""
        if self.errors:
            raise ValueError(self.errors[0])


class Task:
    """What a task supplies to ``fit``. Subclasses set the class attributes and build data,
    model and plan in ``__init__`` (data first: a wrong path fails before a model is built)."""

    name: str  # the checkpoint's task
    config: type  # a dataclass of TrainConfig's fields and the task's own
    presets: dict[str, dict[str, Any]] = {}
    preset_flag = "preset"  # the flag that names a preset (--recipe, --schedule)
    best_metric: str  # higher is better; picks best.pth
    ema_metrics: tuple[str, ...] = ()  # evaluation metrics also reported for the EMA weights
    summary_fields: tuple[str, ...]  # summary.csv columns
    curve_metrics: tuple[str, ...]  # plotted beside the losses in curves.png (0..1 or %)
    min_batch = 1  # fewer readable samples than this in a batch: no step
    units = ("epochs", "--epochs")  # how "finished" is said, and the flag that extends a run

    # Settings.
    @classmethod
    def preset_for(cls, given: dict[str, Any]) -> str | None:
        return given.get(cls.preset_flag)

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        """Raise ``ValueError`` for settings that cannot work together."""

    @classmethod
    def settings(cls, given: dict[str, Any]) -> tuple[argparse.Namespace, Run | None]:
        """The run's settings from the flags given (None: not given), and the run resumed."""
        if given.get("resume"):
            run = load_run(given["resume"], cls.name)
            args = config.resume(cls.config, run.args, given, ignore=(cls.preset_flag,))
            if given.get("output") is None:
                resume = Path(given["resume"])
                args.output = str(resume if resume.is_dir() else resume.parent)
            args.resume = given["resume"]
            args.time_limit = given.get("time_limit")  # a limit is for one session, not the run
            return args, run
        preset = cls.preset_for(given)
        if preset is not None and preset not in cls.presets:
            raise ValueError(
                f"unknown --{cls.preset_flag} {preset!r}; choose from {', '.join(cls.presets)}"
            )
        args = config.resolve(cls.config, given, cls.presets, preset)
        setattr(args, cls.preset_flag, preset)
        cls.check_args(args)
        return args, None

    # The run.
    def __init__(self, args: argparse.Namespace, dist_info: Distributed, resumed: Run | None):
        self.args, self.dist_info, self.resumed = args, dist_info, resumed
        self.model: nn.Module
        self.train_loader: DataLoader
        self.plan: Plan
        self.model_name: str
        self.model_kwargs: dict[str, Any]

    def create_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def create_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """A timm scheduler (stepped with ``step_update``) or a torch one (``step``), per
        iteration."""
        raise NotImplementedError

    def train_step(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Forward and loss (under the run's autocast): ``{"loss": total, **parts}``."""
        raise NotImplementedError

    def evaluate(
        self, model: nn.Module, precision: Callable[[], Any], desc: str = "val"
    ) -> dict[str, Any]:
        """Metrics over every rank's validation shard; ``skipped`` counts unreadable images.
        ``precision()`` is the run's autocast context."""
        raise NotImplementedError

    def checkpoint_data(self) -> dict[str, Any]:
        """What the outputs mean (class names, category ids), for the checkpoint's ``data``."""
        return {}

    def describe(self) -> str:
        """The log line that opens a run."""
        return f"training {self.model_name}"

    def report(self, row: dict[str, Any]) -> str:
        """The log line of one evaluation."""
        return f"train loss {fmt(row['train_loss'])}  {self.best_metric} {row[self.best_metric]}"


# ---------------------------------------------------------------------------------------------
# Data: a training pass that starts anywhere, with augmentations seeded per sample.


def sample_seed(seed: int, pass_index: int, index: int) -> int:
    """The seed of one training sample's augmentation in one pass."""
    return (epoch_seed(seed, pass_index, 0) * 10_000_019 + index) % 2**63


class TrainSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """This rank's shuffled indices of one pass (``DistributedSampler``'s, also for one rank,
    so one process and many see the same permutation), from a given batch on, each paired
    with its sample's seed (``SeededSamples``)."""

    def __init__(self, dataset: Dataset, dist_info: Distributed, seed: int, drop_last: bool):
        self.shuffled = DistributedSampler(
            dataset,
            dist_info.world_size,
            dist_info.rank,
            shuffle=True,
            seed=seed,
            drop_last=drop_last,
        )
        self.seed, self.pass_index, self.start = seed, 0, 0

    def set_position(self, pass_index: int, start: int) -> None:
        """Iterate pass ``pass_index`` from its ``start``-th sample."""
        self.shuffled.set_epoch(pass_index)
        self.pass_index, self.start = pass_index, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in list(self.shuffled)[self.start :]:
            yield sample_seed(self.seed, self.pass_index, index), index

    def __len__(self) -> int:
        return len(self.shuffled) - self.start


class SeededSamples(Dataset):
    """``dataset[index]`` with Python, NumPy and torch seeded by the sample's own seed, so its
    random augmentation does not depend on which process reads it or what it read before.
    The caller's generators are left as they were (they drive dropout, Mixup, ...)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        seed, index = key
        saved = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(saved[0])
                np.random.set_state(saved[1])


class ShardSampler(torch.utils.data.Sampler[int]):
    """Every ``world_size``-th index from ``rank``, in order, without padding: evaluation over
    ranks sees each item exactly once (``DistributedSampler`` repeats some to even out)."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    workers: int,
    dist_info: Distributed,
    seed: int,
    collate_fn: Callable[[list[Any]], Batch],
    drop_last: bool = True,
) -> DataLoader:
    """This rank's training batches of a map-style dataset (``TrainSampler``, seeded samples).

    ``drop_last`` drops the incomplete last batch (and the sampler's uneven tail over ranks).
    """
    return DataLoader(
        SeededSamples(dataset),
        batch_size=batch_size,
        sampler=TrainSampler(dataset, dist_info, seed, drop_last),
        num_workers=workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
        pin_memory=dist_info.device.type == "cuda",
        persistent_workers=workers > 0,  # many passes; the sampler changes, not the workers
    )


def eval_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    workers: int,
    dist_info: Distributed,
    collate_fn: Callable[[list[Any]], Batch],
) -> DataLoader:
    """This rank's in-order shard of an evaluation dataset, every item once over all ranks."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), dist_info.rank, dist_info.world_size),
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=dist_info.device.type == "cuda",
    )


def _training_batches(
    loader: DataLoader,
    start: int,
    plan: Plan,
    seed: int,
    dist_info: Distributed,
    rng: list[dict[str, Any]] | None,
) -> Iterator[Batch]:
    """Batches from iteration ``start`` on, pass after pass. A pass started afresh seeds the
    generators from its number alone; one resumed in its middle restores the generators the
    checkpoint saved (``rng``: one state per rank) once its loader iterator exists."""
    pass_index, offset = divmod(start, plan.iters_per_pass)
    sampler = loader.sampler if isinstance(loader.sampler, TrainSampler) else None
    while True:
        if sampler is not None:
            sampler.set_position(pass_index, offset * (loader.batch_size or 1))
        if offset == 0 or rng is None:
            seed_everything(epoch_seed(seed, pass_index, dist_info.rank))
        batches = iter(loader)  # draws the loader's base seed from the generators
        if offset and rng is not None and len(rng) == dist_info.world_size:
            set_rng_state(rng[dist_info.rank])
        elif offset and rng is not None:
            _logger.warning(
                "the checkpoint holds random states of %d processes, this run has %d: the "
                "rest of the pass draws other random numbers than the uninterrupted run",
                len(rng),
                dist_info.world_size,
            )
        rng = None
        yield from batches
        pass_index, offset = pass_index + 1, 0


# ---------------------------------------------------------------------------------------------
# Steps.


# timm optimizer names whose torch class has one fused kernel for all parameters (CPU and CUDA),
# which the per-tensor loop of the default is not (docs/training.md, "make demo").
FUSED_OPTIMIZERS = {"adam", "adamw"}


def create_optimizer(
    model_or_groups: nn.Module | list[dict[str, Any]], opt: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` (no decay on norms, biases, ``no_weight_decay()``, or the
    parameter groups given), fused where torch has a fused kernel for it."""
    from timm.optim import create_optimizer_v2

    fused = {"fused": True} if opt.lower() in FUSED_OPTIMIZERS else {}
    return create_optimizer_v2(model_or_groups, opt=opt, lr=lr, weight_decay=weight_decay, **fused)


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: NativeScaler | None,
    clip_grad: float | None,
    parameters: Iterable[nn.Parameter],
) -> None:
    """Backward, optional gradient-norm clipping, step (through the loss scaler under fp16)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler(loss, optimizer, clip_grad=clip_grad, parameters=parameters)
        return
    loss.backward()
    if clip_grad is not None:
        dispatch_clip_grad(parameters, clip_grad, mode="norm")
    optimizer.step()


def step_scheduler(scheduler: Any, iteration: int) -> None:
    """Set the lr for iteration ``iteration`` (timm schedulers by number, torch's by one)."""
    if isinstance(scheduler, TimmScheduler):
        scheduler.step_update(num_updates=iteration)
    else:
        scheduler.step()


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; training stops and the last checkpoint is kept."""


def check_finite_loss(
    loss: torch.Tensor, dist_info: Distributed, where: str, last_checkpoint: Path
) -> None:
    """Stop every rank together when any rank's loss is NaN/Inf, saying where it happened."""
    bad = (~torch.isfinite(loss.detach())).float()
    if dist_info.enabled:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() > 0:
        kept = (
            f"the last good checkpoint is {last_checkpoint}"
            if last_checkpoint.is_file()
            else "no checkpoint was written yet"
        )
        raise NonFiniteLossError(
            f"loss is {loss.item()} at {where}; stopped (lower --lr, set --clip-grad or turn off "
            f"--amp); {kept}"
        )


def _any_rank(flags: list[bool], dist_info: Distributed) -> list[bool]:
    """Each flag true on any rank: every rank takes the same branch (DDP steps together)."""
    if not dist_info.enabled:
        return flags
    return [v > 0 for v in reduce_sum([float(f) for f in flags], dist_info)]


@dataclass
class _Window:
    """Training numbers since the last evaluation."""

    sums: dict[str, float] = field(default_factory=dict)  # loss parts x samples
    samples: int = 0
    steps: int = 0
    skipped: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, losses: dict[str, torch.Tensor], samples: int) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value.detach()) * samples
        self.samples += samples
        self.steps += 1

    def row(self, dist_info: Distributed) -> dict[str, Any]:
        """Sample-weighted mean losses over all ranks (``loss`` as ``train_loss``), speed and
        unreadable images skipped."""
        elapsed = time.perf_counter() - self.start
        names = sorted(self.sums)
        totals = reduce_sum(
            [self.sums[n] for n in names] + [self.samples, self.steps, self.skipped], dist_info
        )
        samples, steps, skipped = totals[len(names) :]
        means = {
            ("train_loss" if n == "loss" else n): v / samples
            for n, v in zip(names, totals, strict=False)
            if samples
        }
        return (
            {"train_loss": None}
            | means
            | {
                "images_per_s": samples / elapsed,
                "iters_per_s": steps / dist_info.world_size / elapsed,
                "train_skipped": int(skipped),
            }
        )


# Evaluation metrics renamed in a run's rows (the training side has its own loss and speed).
_VAL_NAMES = {"loss": "val_loss", "skipped": "val_skipped", "images_per_s": "val_images_per_s"}


def fmt(value: float | None, spec: str = ".4f") -> str:
    """A number for a log line; ``n/a`` for None (no step, or no such metric yet)."""
    return "n/a" if value is None else format(value, spec)


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        _VAL_NAMES.get(k, k): v
        for k, v in metrics.items()
        if v is None or isinstance(v, int | float | str)
    }


# ---------------------------------------------------------------------------------------------
# The loop.


def fit(task_type: type[Task], given: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume, ``given["resume"]``) a run of ``task_type``; returns the last row with
    ``best`` ({metric, iteration[, epoch]}) and ``output``.

    ``given`` maps flag names to values, None where a flag was not given.
    """
    args, resumed = task_type.settings(given)
    dist_info = setup_distributed(args.device)
    output = Path(args.output)
    last_path = output / LAST_CHECKPOINT
    if resumed is None and last_path.exists():
        raise ValueError(
            f"{output} already holds a run ({LAST_CHECKPOINT}); pass --resume {output} to "
            "continue it or choose another --output"
        )
    seed_everything(args.seed)  # same initial weights on every rank (DDP also broadcasts)
    task = task_type(args, dist_info, resumed)
    model, plan, metric = task.model, task.plan, task.best_metric
    optimizer = task.create_optimizer()
    scheduler = task.create_scheduler(optimizer)
    amp_dtype = amp_settings(args.amp, args.amp_dtype, dist_info.device)
    scaler = make_scaler(args.amp, amp_dtype, dist_info.device)
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None

    iteration, history, best = 0, [], {metric: -math.inf, "iteration": -1}
    rng = None
    if resumed is not None:
        iteration, rng = _restore(resumed, plan, model, optimizer, scheduler, scaler, ema)
        history, best = resumed.history, {**best, **resumed.best}
        _logger.info("resumed from %s at iteration %d", args.resume, iteration)
    unit, flag = task.units
    done = plan.epoch(iteration) if plan.in_epochs else iteration
    if iteration >= plan.total:
        raise ValueError(f"the checkpoint already finished {done} {unit}; pass {flag} above that")

    # Only the training step is compiled: evaluation and EMA use the eager model, and the
    # checkpoint its parameters (which the compiled module shares).
    train_model = compile_model(wrap_distributed(model, dist_info), args.compile)
    scalars = ScalarLog(output, args.log, enabled=dist_info.is_main)
    if dist_info.is_main:
        write_args(output, args)
        _logger.info(task.describe())

    def precision() -> Any:
        return autocast(dist_info.device, args.amp, amp_dtype)

    params = [p for group in optimizer.param_groups for p in group["params"]]
    deadline = time.monotonic() + 60 * args.time_limit if args.time_limit else None
    window, row = _Window(), {}
    bar = progress_bar(plan.total - iteration, "train", dist_info.is_main)
    train_model.train()
    batches = _training_batches(task.train_loader, iteration, plan, args.seed, dist_info, rng)
    for batch in batches:
        # Bad data stops every rank; a batch that unreadable files left too small makes no
        # step on any rank (DDP's ranks step together).
        bad_data, too_small = _any_rank(
            [bool(batch.errors), len(batch) < task.min_batch], dist_info
        )
        if bad_data:
            batch.check()
            raise ValueError("another process met bad data in its batch (see its error)")
        window.skipped += len(batch.skipped)
        for name in batch.skipped:
            _logger.warning("skipped unreadable image %s", name)
        if not too_small:
            with precision():
                losses = task.train_step(train_model, batch)
            where = f"iteration {iteration + 1}"
            if plan.in_epochs:
                epoch, step = divmod(iteration, plan.iters_per_pass)
                where += f" (epoch {epoch + 1}, batch {step + 1})"
            check_finite_loss(losses["loss"], dist_info, where, last_path)
            optimizer_step(losses["loss"], optimizer, scaler, args.clip_grad, params)
            if ema is not None:
                ema.update(unwrap_model(model), step=iteration + 1)
            window.add(losses, len(batch))
        iteration += 1
        step_scheduler(scheduler, iteration)
        lr = optimizer.param_groups[0]["lr"]
        bar.update()
        if not too_small:
            bar.set_postfix(loss=f"{losses['loss'].item():.4f}", lr=f"{lr:.2e}")
            if bar.disable and args.log_interval and iteration % args.log_interval == 0:
                _logger.info(
                    "iteration %d/%d  loss %.4f  lr %.3g",
                    iteration,
                    plan.total,
                    losses["loss"].item(),
                    lr,
                )
        out_of_time = (
            deadline is not None and _any_rank([time.monotonic() > deadline], dist_info)[0]
        )
        finished = iteration >= plan.total or out_of_time
        if iteration % plan.checkpoint_every and not finished:
            continue
        if out_of_time and iteration < plan.total:
            _logger.warning(
                "--time-limit of %g minutes reached at iteration %d of %d; evaluating, "
                "checkpointing and stopping",
                args.time_limit,
                iteration,
                plan.total,
            )

        # Evaluate (at the evaluation interval and at the end), checkpoint, report.
        row = {"epoch": plan.epoch(iteration)} if plan.in_epochs else {}
        row |= {"iteration": iteration, **window.row(dist_info), "lr": lr}
        check_ranks_in_sync(model, dist_info)
        metrics = {}
        if iteration % plan.eval_every == 0 or finished:
            metrics = task.evaluate(model, precision)
        row |= _scalars(metrics)
        if ema is not None and metrics:
            ema_metrics = task.evaluate(ema.module, precision, desc="val ema")
            row |= {f"ema_{k}": ema_metrics[k] for k in task.ema_metrics}
        history.append(row)
        is_best = row.get(metric) is not None and row[metric] > best[metric]
        if is_best:
            best = {metric: row[metric], "iteration": iteration}
            if plan.in_epochs:
                best["epoch"] = row["epoch"]
        rng_states = gather_objects(rng_state(), dist_info)  # every rank's, after evaluating
        if dist_info.is_main:
            state = training_state(model, optimizer, scheduler, scaler, ema)
            state |= {"iteration": iteration, "metrics": {**metrics, **row}, "rng": rng_states}
            if plan.in_epochs:
                state["epoch"] = row["epoch"]
            run = Run(
                task.name,
                task.model_name,
                task.model_kwargs,
                plain_args(args),
                state,
                history,
                best,
                task.checkpoint_data(),
            )
            save_run(output, run, is_best)
            write_summary_csv(output, history, task.summary_fields)
            plot_curves(history, output / "curves.png", plan, task.curve_metrics)
            scalars.write(row, iteration)
        progress = (
            f"epoch {row['epoch']}/{plan.total // plan.iters_per_pass}" if plan.in_epochs else ""
        )
        skipped = row["train_skipped"] + (row.get("val_skipped") or 0)
        _logger.info(
            "%siteration %d/%d  %s  lr %.3g  %.1f img/s%s",
            f"{progress}  " if progress else "",
            iteration,
            plan.total,
            task.report(row),
            row["lr"],
            row["images_per_s"],
            f"  skipped {skipped} unreadable images" if skipped else "",
        )
        if finished:
            break
        window = _Window()
        train_model.train()
    bar.close()
    scalars.close()
    if dist_info.enabled:
        dist.barrier()
    return {**row, "best": best, "output": str(output)}


def _restore(
    run: Run,
    plan: Plan,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: NativeScaler | None,
    ema: ModelEmaV3 | None,
) -> tuple[int, list[dict[str, Any]] | None]:
    """Load a run's training state; returns the iteration it reached and its random states.

    Checkpoints of before the one trainer counted epochs (classification, detection) or
    optimiser updates (segmentation); an epoch is a pass of ``plan.iters_per_pass`` batches.
    """
    state = run.state
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if state.get("model_ema") is None:
            raise ValueError(f"{run.path} holds no EMA weights to resume --model-ema with")
        ema.module.load_state_dict(state["model_ema"])
    if "rng" not in state and state.get("epoch") is not None:
        return int(state["epoch"]) * plan.iters_per_pass, None
    return int(state["iteration"]), state.get("rng")


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: NativeScaler | None,
    ema: ModelEmaV3 | None = None,
) -> dict[str, Any]:
    """What a resume restores of the model and its optimisation (``_restore``)."""
    return {
        "model": model.state_dict(),
        "model_ema": ema.module.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


# ---------------------------------------------------------------------------------------------
# Run folder: args.yaml, summary.csv, curves.png.


def write_args(output: Path, args: argparse.Namespace) -> None:
    """``args.yaml``: the run's resolved arguments."""
    output.mkdir(parents=True, exist_ok=True)
    with (output / "args.yaml").open("w") as f:
        yaml.safe_dump(plain_args(args), f, sort_keys=True)


def write_summary_csv(output: Path, history: list[dict[str, Any]], fields: tuple[str, ...]) -> None:
    """Rewrite ``output/summary.csv`` (columns ``fields``) from the run's history.

    The history is kept in the checkpoint, so a resumed run never duplicates or loses a row.
    The file is written beside and then renamed, so a run killed meanwhile leaves the old one.
    """
    tmp = output / ".summary.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})
    os.replace(tmp, output / "summary.csv")


def plot_curves(history: list[dict[str, Any]], path: Path, plan: Plan, metrics: tuple[str, ...]):
    """Training (and validation) loss, and the task's metrics, per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_name = "epoch" if plan.in_epochs else "iteration"
    xs = [row.get(x_name, row.get("iteration")) for row in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        if any(row.get(key) is not None for row in history):
            ax_loss.plot(xs, [row.get(key) for row in history], "o-", label=label)
    ax_loss.set(xlabel=x_name, ylabel="loss", title="loss")
    for key in metrics:
        values = [row.get(key) for row in history]
        if any(v is not None for v in values):
            ax_metric.plot(xs, [math.nan if v is None else v for v in values], "o-", label=key)
    ax_metric.set(xlabel=x_name, title="validation")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
