"""Where and how a run executes: processes (torchrun, DDP), seeds, AMP, progress bars.

Shared by the three tasks' training, validation and prediction; nothing here knows a task.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import NativeScaler
from torch import nn
from tqdm import tqdm

_logger = logging.getLogger(__name__)

LOG_FORMATS = ("csv", "tensorboard")  # summary.csv always; TensorBoard scalars beside it
TENSORBOARD_DIR = "tensorboard"


@dataclass(frozen=True)
class Distributed:
    """Where this process runs: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> Distributed:
    """Join the process group torchrun describes in the environment (NCCL on GPU, gloo on CPU).

    A plain ``python -m sgformer`` run (no ``WORLD_SIZE``) is a world of one.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA GPU is available; use --device cpu")
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        run_device = torch.device("cuda", local_rank)
    else:
        run_device = torch.device("cpu")
    return Distributed(rank, world_size, local_rank, run_device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch: the only place the run's randomness is seeded."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed for one epoch on one rank: every epoch starts from a state known from its number
    alone, so a run resumed at an epoch boundary repeats the uninterrupted run exactly."""
    return seed + 1_000_003 * (epoch + 1) + 7919 * rank


def rng_state() -> dict[str, Any]:
    """This process's random generators (Python, NumPy, torch CPU and CUDA) as plain data
    that a ``weights_only`` checkpoint holds."""
    version, python_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(python_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved."""
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def amp_settings(enabled: bool, dtype_name: str | None, device: torch.device) -> torch.dtype:
    """The autocast dtype: float16 on CUDA and bfloat16 on CPU unless ``dtype_name`` says."""
    if dtype_name is None:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if dtype_name not in ("float16", "bfloat16"):
        raise ValueError(f"--amp-dtype must be float16 or bfloat16, got {dtype_name!r}")
    return getattr(torch, dtype_name)


def autocast(
    device: torch.device, enabled: bool, dtype: torch.dtype
) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def make_scaler(enabled: bool, dtype: torch.dtype, device: torch.device) -> NativeScaler | None:
    """A loss scaler for float16 autocast only (bfloat16 has float32's range)."""
    if enabled and dtype == torch.float16:
        return NativeScaler(device=device.type)
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def reduce_sum(values: list[float], dist_info: Distributed) -> list[float]:
    """Sum per-rank numbers over all ranks (float64 on the CPU group or the device)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=dist_info.device)
    if dist_info.enabled:
        dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(value: Any, dist_info: Distributed) -> list[Any]:
    """``value`` of every rank, in rank order (a list of one without torchrun)."""
    if not dist_info.enabled:
        return [value]
    gathered: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def check_ranks_in_sync(model: nn.Module, dist_info: Distributed) -> None:
    """Fail loudly if DDP let parameters drift apart between ranks (it never should)."""
    if not dist_info.enabled:
        return
    with torch.no_grad():
        checksum = sum(p.double().sum() for p in unwrap_model(model).parameters())
    sums = [torch.zeros_like(checksum) for _ in range(dist_info.world_size)]
    dist.all_gather(sums, checksum)
    values = [s.item() for s in sums]
    if max(values) != min(values):
        raise RuntimeError(f"parameters differ between ranks: checksums {values}")
    _logger.info("parameters identical on all %d ranks (checksum %.10g)", len(values), values[0])


def progress_bar(total: int | None, desc: str, enabled: bool) -> tqdm:
    """A tqdm bar on stderr when it is a terminal; off otherwise (logs carry a line per epoch)."""
    return tqdm(
        total=total,
        desc=desc,
        file=sys.stderr,
        disable=not (enabled and sys.stderr.isatty()),
        leave=False,
        dynamic_ncols=True,
    )


# torch.compile's modes; ``reduce-overhead`` replays CUDA graphs, which pays where the host
# launching kernels is the limit (sgformer's eager training step on a GPU, docs/BENCHMARKS.md).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_model(model: nn.Module, mode: str | None) -> nn.Module:
    """``torch.compile(model)`` in ``mode`` (one of ``COMPILE_MODES``); ``model`` for None."""
    if mode is None:
        return model
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    return torch.compile(model, mode=None if mode == "default" else mode)


def wrap_distributed(model: nn.Module, dist_info: Distributed) -> nn.Module:
    """``model`` in DistributedDataParallel when several processes train, else itself."""
    if not dist_info.enabled:
        return model
    device_ids = [dist_info.local_rank] if dist_info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


class ScalarLog:
    """TensorBoard scalars beside ``summary.csv`` (``--log tensorboard``), in
    ``OUTPUT/tensorboard``: one point per number of each logged row. A no-op otherwise."""

    def __init__(self, output: Path, log: str, enabled: bool = True):
        if log not in LOG_FORMATS:
            raise ValueError(f"--log must be one of {', '.join(LOG_FORMATS)}, got {log!r}")
        self.writer = None
        if log == "tensorboard" and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError(
                    "--log tensorboard needs the tensorboard package: "
                    "pip install 'sgformer[tensorboard]'"
                ) from err
            self.writer = SummaryWriter(log_dir=str(Path(output) / TENSORBOARD_DIR))

    def write(self, row: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
