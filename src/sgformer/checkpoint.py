"""Checkpoint files: one format for every run, atomic writes, loads that never run code.

A run checkpoint (``last.pth``/``best.pth`` of ``sgformer train``, ``detect train`` and
``segment train``) is one dict::

    {"format_version", "task", "model_name", "model_kwargs", "args", "state", "history",
     "best", "data"}

``state`` holds what a resume restores (``model``, ``model_ema``, ``optimizer``, ``scheduler``,
``scaler``, ``epoch``, ``iteration``, the last ``metrics``); ``data`` what the outputs mean
(``class_names``, COCO ``category_ids``, ``num_classes``). Files written before the format had
a version (``LEGACY_FORMAT``: classification without ``task``, segmentation recognised by its
``iteration`` and ``decoder``) load through the same ``load_run``.

Every torch file is read with ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .model import check_checkpoint_file, checkpoint_filter_fn

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
LEGACY_FORMAT = 1  # the three per-task schemas of before, with no "format_version" key
LAST_CHECKPOINT = "last.pth"
BEST_CHECKPOINT = "best.pth"
# The command family that writes and reads each task's checkpoints.
TASK_COMMANDS = {
    "classification": "sgformer train / validate / predict",
    "detection": "sgformer detect train / val / predict",
    "segmentation": "sgformer segment train / val / predict",
}
STATE_KEYS = ("model", "model_ema", "optimizer", "scheduler", "scaler", "epoch", "iteration")
DATA_KEYS = ("class_names", "category_ids", "num_classes")
UNSAFE_PICKLE = "Weights only load failed"  # how torch.load(weights_only=True) says no


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous complete one, if any, is untouched."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a ``.pth``/``.pt`` (torch.save) or ``.safetensors`` file onto the CPU.

    Raises:
        FileNotFoundError, ValueError: with what was wrong, for a missing or non-checkpoint
        file, or one whose pickle asks for anything but tensors and plain containers.
    """
    check_checkpoint_file(path)
    if str(path).endswith(".safetensors"):
        return load_file(str(path))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged or unsafe files
        if isinstance(err, pickle.UnpicklingError) and UNSAFE_PICKLE in str(err):
            raise ValueError(
                f"cannot read checkpoint {path}: it holds objects other than tensors and plain "
                "containers, which could run code when loaded; refused (weights_only=True)"
            ) from err
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"{path} holds a {type(checkpoint).__name__}, not a state dict or a training "
            "checkpoint dict"
        )
    return checkpoint


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` to a temp file beside ``path``, then rename it over ``path``.

    A kill, a full disk or a folder that cannot be written never leaves a broken ``path``,
    only the previous complete file. Raises ``CheckpointWriteError`` (one line) saying so.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with tmp.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as err:
        kept = (
            f"the last complete checkpoint {path} is intact"
            if path.is_file()
            else "no earlier checkpoint exists there"
        )
        why = "the disk is full" if err.errno == errno.ENOSPC else err.strerror or str(err)
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {why}; {kept}") from err


def plain(value: Any) -> Any:
    """A value as YAML/JSON/``weights_only``-safe plain data (tuples as lists, paths as str)."""
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """A run's resolved arguments as a checkpoint (and ``args.yaml``) holds them."""
    return {k: plain(v) for k, v in vars(args).items()}


@dataclass
class Run:
    """A training run as its checkpoint holds it (see the module docstring)."""

    task: str
    model_name: str
    model_kwargs: dict[str, Any]
    args: dict[str, Any]
    state: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    path: Path | None = None  # where it was read from; not written

    def to_dict(self) -> dict[str, Any]:
        """The dict ``save_checkpoint`` writes, always in the current format."""
        return {
            "format_version": FORMAT_VERSION,
            "task": self.task,
            "model_name": self.model_name,
            "model_kwargs": self.model_kwargs,
            "args": self.args,
            "state": self.state,
            "history": self.history,
            "best": self.best,
            "data": self.data,
        }

    def weights(self, use_ema: bool = False) -> dict[str, torch.Tensor]:
        """The model's state dict, or its EMA's (``ValueError`` when the run kept none)."""
        if use_ema:
            if self.state.get("model_ema") is None:
                raise ValueError(f"{self.path} has no EMA weights (trained without --model-ema)")
            return self.state["model_ema"]
        return self.state["model"]


def save_run(folder: Path, run: Run, is_best: bool) -> None:
    """``last.pth`` of a run folder, and ``best.pth`` too when ``is_best``."""
    checkpoint = run.to_dict()
    save_checkpoint(folder / LAST_CHECKPOINT, checkpoint)
    if is_best:
        save_checkpoint(folder / BEST_CHECKPOINT, checkpoint)


def _legacy_task(checkpoint: dict[str, Any]) -> str:
    if checkpoint.get("task"):
        return checkpoint["task"]
    kwargs = checkpoint.get("model_kwargs") or {}
    return "segmentation" if "iteration" in checkpoint and "decoder" in kwargs else "classification"


def as_run(checkpoint: dict[str, Any], path: str | Path | None = None) -> Run | None:
    """The ``Run`` a checkpoint dict of this project holds (any format), or None for weights
    that are no run of ours (published files, bare state dicts)."""
    path = Path(path) if path is not None else None
    if "format_version" in checkpoint:
        version = checkpoint["format_version"]
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{path} has checkpoint format {version}; this sgformer reads up to "
                f"{FORMAT_VERSION}: update sgformer"
            )
        fields = ("task", "model_name", "model_kwargs", "args", "state", "history", "best")
        return Run(
            **{k: checkpoint[k] for k in fields},
            data=checkpoint.get("data") or {},
            format_version=version,
            path=path,
        )
    if "model" not in checkpoint or "model_name" not in checkpoint:
        return None
    state = {key: checkpoint.get(key) for key in STATE_KEYS}
    state["metrics"] = checkpoint.get("metrics")
    return Run(
        task=_legacy_task(checkpoint),
        model_name=checkpoint["model_name"],
        model_kwargs=dict(checkpoint.get("model_kwargs") or {}),
        args=dict(checkpoint.get("args") or {}),
        state=state,
        history=list(checkpoint.get("history") or []),
        best=dict(checkpoint.get("best") or {}),
        data={key: checkpoint[key] for key in DATA_KEYS if key in checkpoint},
        format_version=LEGACY_FORMAT,
        path=path,
    )


def run_file(path: str | Path) -> Path:
    """``path`` itself, or the ``last.pth`` of a run folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / LAST_CHECKPOINT).is_file():
            raise FileNotFoundError(f"no {LAST_CHECKPOINT} in {path}: nothing to resume from")
        return path / LAST_CHECKPOINT
    return path


def check_task(run: Run, task: str) -> None:
    """One-line ``ValueError`` naming the checkpoint's task when it is not ``task``."""
    if run.task != task:
        raise ValueError(
            f"{run.path} is a {run.task} checkpoint of {run.model_name}, not a {task} one; "
            f"use it with {TASK_COMMANDS.get(run.task, run.task)}"
        )


def load_run(path: str | Path, task: str | None = None) -> Run:
    """The run a checkpoint file (or a run folder's ``last.pth``) holds, in the current format.

    Raises ``ValueError`` for weights that are no training run, and, when ``task`` is given,
    for a run of another task (one line naming it and its commands).
    """
    path = run_file(path)
    run = as_run(read_checkpoint(path), path)
    if run is None:
        raise ValueError(
            f"{path} holds model weights, not a training checkpoint (no 'model'/'model_name'); "
            "use --initial-checkpoint for weights"
        )
    if task is not None:
        check_task(run, task)
    return run


# ---------------------------------------------------------------------------------------------
# Weights into models: classifiers, and the backbones of detection and segmentation models.


def _weights_in(checkpoint: dict[str, Any], path: str | Path, use_ema: bool = False) -> dict:
    """The state dict a published file, bare state dict or our classification run holds."""
    run = as_run(checkpoint, path)
    if run is None:
        return checkpoint
    check_task(run, "classification")
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


def weights_source(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What ``checkpoint_filter_fn`` unwraps: the run's ``state`` (EMA preferred there, as in
    published files) for our current format, the dict itself for any other file."""
    return checkpoint["state"] if "format_version" in checkpoint else checkpoint
