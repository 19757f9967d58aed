"""Cost and speed of models: multiply-accumulates (as fvcore counts them for the paper tables),
images/s, latency and peak memory measured side by side (docs/BENCHMARKS.md)."""

import argparse
import csv
import ctypes
import gc
import logging
import math
import os
import platform
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_flop_count

from .layers.fused import ONEDNN_CONV, ONEDNN_LINEAR
from .model import MIN_INPUT_SIZE
from .runtime import COMPILE_MODES

_logger = logging.getLogger(__name__)

# fvcore charges an affine LayerNorm/GroupNorm 5 operations per input element; the published
# GMACs (docs/design.md "Variants") include them, so we do too.
NORM_MACS_PER_ELEMENT = 5


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _onednn_linear_flops(input_shape, weight_shape, *args, **kwargs) -> int:
    return 2 * math.prod(input_shape[:-1]) * weight_shape[0] * weight_shape[1]


def _onednn_conv_flops(input_shape, weight_shape, *args, out_shape, **kwargs) -> int:
    return conv_flop_count(input_shape, weight_shape, out_shape, transposed=False)


# flop_counter has no formula for the CPU kernels that scaled_dot_product_attention and the
# model's float32 inference linears and convolutions (layers.linear, layers.conv2d_gelu) run.
_EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops
}
if ONEDNN_LINEAR is not None:
    _EXTRA_FORMULAS[ONEDNN_LINEAR] = _onednn_linear_flops
if ONEDNN_CONV is not None:
    _EXTRA_FORMULAS[ONEDNN_CONV] = _onednn_conv_flops


# timm's names for a model's list of stages: ``stages`` in most models, ``layers`` in Swin.
STAGE_LISTS = ("stages", "layers")


def model_part(module_name: str) -> str:
    """The top-level part of a model that a submodule belongs to, a stage list split by
    stage: ``stages.2.blocks.0.mlp`` -> ``stages.2``, ``stem.conv1`` -> ``stem``."""
    parts = module_name.split(".")
    return ".".join(parts[:2]) if parts[0] in STAGE_LISTS else parts[0]


def is_model_part(module_name: str) -> bool:
    """Whether a submodule is itself a top-level part (``stem``, ``stages.2``), not inside
    one, nor the root (``""``) or a whole stage list."""
    return model_part(module_name) == module_name and module_name not in ("", *STAGE_LISTS)


@torch.no_grad()
def count_macs(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Multiply-accumulates of one forward pass of ``model`` on ``x``.

    Matrix products, convolutions and attention come from ``torch.utils.flop_counter``
    (FLOPs halved); LayerNorm/GroupNorm add ``NORM_MACS_PER_ELEMENT`` per input element.

    Returns:
        ``{"total": int, "by_module": {name: int}}`` per top-level part of the model, its
        stage lists (``STAGE_LISTS``) split by stage: ``stem``, ``stages.0``, ..., ``head``
        (Swin-T: ``patch_embed``, ``layers.0``, ...).
    """
    norm_macs: dict[str, int] = defaultdict(int)
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):

            def hook(_module: nn.Module, args: tuple, _out: Any, name: str = name) -> None:
                norm_macs[name] += args[0].numel() * NORM_MACS_PER_ELEMENT

            hooks.append(module.register_forward_hook(hook))
    try:
        with FlopCounterMode(display=False, depth=3, custom_mapping=_EXTRA_FORMULAS) as counter:
            model(x)
    finally:
        for handle in hooks:
            handle.remove()

    by_module: dict[str, int] = defaultdict(int)
    root = type(model).__name__
    for name, ops in counter.get_flop_counts().items():
        # Counts nest (a module's include its children's): take each part's own total once,
        # not a stage list's (a called ``nn.Sequential``) nor the root's.
        owner, _, module_name = name.partition(".")
        if owner == root and is_model_part(module_name):
            by_module[module_name] += sum(ops.values()) // 2
    for name, macs in norm_macs.items():
        by_module[model_part(name)] += macs
    total = counter.get_total_flops() // 2 + sum(norm_macs.values())
    return {"total": total, "by_module": dict(by_module)}


# Operators that only relabel memory: the view ops, plus the view-like ones whose schema does not
# say so (``_unsafe_view`` is a reshape's view under autograd).
_VIEW_LIKE_OPERATORS = frozenset({"_unsafe_view", "detach", "alias", "lift_fresh"})


def _copied(func: Any, args: tuple, out: Any) -> bool:
    """Whether a view-annotated call (``reshape``, ``contiguous``; seen undecomposed in
    inference mode) copied instead: its output does not share its input's memory."""
    if not func.is_view or not isinstance(out, torch.Tensor) or not args:
        return False
    source = args[0]
    return (
        isinstance(source, torch.Tensor)
        and out.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()
    )


class _OperatorCounter(TorchDispatchMode):
    """Counts aten calls that run a kernel (views excluded) and the bytes their outputs hold."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.bytes_written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if (not func.is_view and name not in _VIEW_LIKE_OPERATORS) or _copied(func, args, out):
            self.calls[name] += 1
            self.bytes_written += sum(
                t.nbytes for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
            )
        return out


def count_operators(model: nn.Module, x: torch.Tensor, mode: str) -> dict[str, Any]:
    """Operator calls and bytes written by one inference forward (``infer``, under
    ``torch.inference_mode``) or one training forward and backward (``train``: cross-entropy
    on random labels, model in train mode; no optimiser step) of ``model`` on ``x``.

    Each aten call is a kernel launch on a GPU and a dispatch plus a pass over memory on a CPU.
    Counts do not depend on timing, so a test can hold them to a ceiling. A warm-up step runs
    first, so one-off work (lazy buffers, first-call caches) is not counted.

    Returns:
        ``{"calls": int, "bytes": int, "by_operator": {aten name: calls}}``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model.train(mode == "train")
    num_classes = getattr(model, "num_classes", 1000) or 1000
    target = torch.randint(0, num_classes, (x.shape[0],), device=x.device)

    def step() -> None:
        if mode == "infer":
            with torch.inference_mode():
                model(x)
            return
        F.cross_entropy(model(x), target).backward()
        model.zero_grad(set_to_none=True)

    step()
    counter = _OperatorCounter()
    with counter:
        step()
    return {
        "calls": sum(counter.calls.values()),
        "bytes": counter.bytes_written,
        "by_operator": dict(counter.calls.most_common()),
    }


MODES = ("infer", "train")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RSS_SAMPLE_SECONDS = 0.002  # how often the memory probe reads the resident set size
CSV_COLUMNS = (
    "model",
    "mode",
    "img_size",
    "batch_size",
    "device",
    "machine",
    "precision",
    "compiled",
    "channels_last",
    "threads",
    "keep_freed_memory",
    "params_m",
    "gmacs",
    "img_per_s",
    "ms_per_img",
    "vs_baseline",
    "peak_mem_mb",
    "faults_per_step",
    "error",
)


def _rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def minor_page_faults() -> int | None:
    """Minor page faults of this process so far (``getrusage``); None where it is not counted.

    A fault is the kernel mapping and zero-filling one fresh page on first touch; glibc serves
    large blocks with fresh pages (a fresh ``mmap``, or heap it trimmed), so a step that
    allocates them pays about a microsecond per 4 KiB page on this machine (docs/profile.md).
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 2**30


def _glibc() -> ctypes.CDLL | None:
    """The process's glibc, None where the C library is another one."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory in this process instead of returning it to the OS.

    Blocks up to 1 GiB then come from the heap, and freed heap is not trimmed, so once the heap
    has grown to hold a step (in the warm-up: a freed block split by small ones can make it grow
    a few times), a step reuses pages that are already mapped instead of faulting fresh ones:
    what is left to time is the computation, the same for every model. It lasts for the whole
    process (a benchmark run; no library call should do this), and resident memory stays at its
    high-water mark.

    Returns:
        False where the C library is not glibc (nothing changed).
    """
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)
        and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)
    )


def _release_free_memory() -> None:
    """Hand freed heap back to the OS so an RSS delta measures the next step, not old garbage."""
    gc.collect()
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class _PeakRss:
    """Samples the resident set size on a thread; ``peak`` is the largest rise seen (bytes)."""

    def __enter__(self) -> "_PeakRss":
        _release_free_memory()
        self.base = self.peak_rss = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            self.peak_rss = max(self.peak_rss, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, _rss_bytes())

    @property
    def peak(self) -> int:
        return self.peak_rss - self.base


def _one_line(err: BaseException) -> str:
    """A single line that says what went wrong, out-of-memory spelled out."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    lowered = str(err).lower()
    if isinstance(err, torch.OutOfMemoryError) or any(
        s in lowered for s in ("out of memory", "can't allocate memory", "cannot allocate memory")
    ):
        return f"out of memory ({text[:120]})"
    return f"{type(err).__name__}: {text[:200]}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp_autocast(device_type: str, amp: str | None) -> torch.autocast:
    """Autocast to ``amp`` (a key of ``AMP_DTYPES``) on ``device_type``; off for None."""
    return torch.autocast(device_type, dtype=AMP_DTYPES.get(amp), enabled=amp is not None)


def make_step(
    model: nn.Module,
    mode: str,
    x: torch.Tensor,
    amp: str | None = None,
) -> Callable[[], None]:
    """One timed unit: an inference forward, or a training step (forward, loss, backward,
    fused AdamW update); also what ``benchmarks/profile_model.py`` profiles."""
    device = x.device
    autocast = partial(amp_autocast, device.type, amp)
    if mode == "infer":

        def infer() -> None:
            with torch.inference_mode(), autocast():
                model(x)
            _synchronize(device)

        return infer

    num_classes = getattr(model, "num_classes", 1000) or 1000
    target = torch.randint(0, num_classes, (x.shape[0],), device=device)
    # The fused kernel, as `sgformer train` uses (engine.create_optimizer): the per-tensor loop
    # of the default AdamW costs sgformer_s's 669 tensors 78 ms a step on this CPU, fused 19.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)

    def train() -> None:
        with autocast():
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)

    return train


def _peak_memory(step: Callable[[], None], device: torch.device) -> int:
    """Bytes a step needs beyond what is held before it (CUDA: max allocated)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device) - before
    with _PeakRss() as probe:
        step()
    return probe.peak


def _row(name: str, mode: str, size: int, batch: int, settings: dict, **values: Any) -> dict:
    row = dict.fromkeys(CSV_COLUMNS)
    row.update(model=name, mode=mode, img_size=size, batch_size=batch, error="", **settings)
    row.update(values)
    return row


def run_benchmark(
    models: Sequence[str],
    img_sizes: Sequence[int] = (224,),
    batch_size: int = 16,
    train_batch_size: int | None = None,
    modes: Sequence[str] = ("infer",),
    device: str = "cpu",
    amp: str | None = None,
    compile: bool | str = False,
    channels_last: bool = False,
    threads: int | None = None,
    keep_freed_memory: bool = False,
    warmup: int = 2,
    repeats: int = 5,
    factories: Mapping[str, Callable[[], nn.Module]] | None = None,
    memory: bool = True,
) -> list[dict[str, Any]]:
    """Throughput, latency, cost and peak memory of models measured side by side.

    For each (image size, mode) every model is warmed up, then the repeats go round the models
    in turn, so load from other processes hits all of them alike; images/s is the batch over the
    median step time. A model or setting that fails gives a row whose ``error`` says why in one
    line; the other rows are still measured.

    Args:
        models: timm model names (``sgformer_*`` included) or keys of ``factories``.
        img_sizes: square input sides.
        batch_size: inference batch; ``train_batch_size`` (default the same) for training.
        modes: ``infer`` (forward under inference mode) and/or ``train`` (forward, cross
            entropy, backward, AdamW step).
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        amp: None (float32), ``bf16`` or ``fp16`` autocast.
        compile: wrap each model in ``torch.compile``; a string is its ``mode``
            (``reduce-overhead``: CUDA graphs; ``max-autotune`` ...), True the default mode.
        channels_last: models and inputs in channels-last memory format.
        threads: ``torch.set_num_threads`` for the run.
        keep_freed_memory: :func:`retain_freed_memory` first, so no model's steps pay page
            faults for fresh memory (the rest of the process keeps the setting).
        factories: extra models built by callables (e.g. the published implementation).
        memory: also measure peak memory (one more step per model).

    Returns:
        One dict per (model, mode, size) with the keys of ``CSV_COLUMNS``; ``vs_baseline`` is
        images/s relative to the first model measured in the same (mode, size).
    """
    factories = dict(factories or {})
    bad_modes = [m for m in modes if m not in MODES]
    if bad_modes:
        raise ValueError(f"modes must be among {MODES}, got {bad_modes}")
    if threads is not None:
        torch.set_num_threads(threads)
    if keep_freed_memory and not retain_freed_memory():
        _logger.warning("--keep-freed-memory needs glibc's mallopt; measuring without it")
        keep_freed_memory = False
    device_error = device_problem(device)
    settings = {
        "device": device,
        "machine": "" if device_error else machine_name(device),
        "precision": amp or "fp32",
        "compiled": ("default" if compile is True else compile) or False,
        "channels_last": channels_last,
        "threads": torch.get_num_threads(),
        "keep_freed_memory": keep_freed_memory,
    }
    if not device_error and torch.device(device).type == "cuda":
        # As timm's benchmark.py: cuDNN times its algorithms for each new shape (in warm-up).
        torch.backends.cudnn.benchmark = True
    built: dict[str, nn.Module | str] = {}
    rows = []
    for mode in modes:
        batch = (train_batch_size or batch_size) if mode == "train" else batch_size
        for size in img_sizes:
            config_rows = []
            runners: dict[str, Callable[[], None]] = {}
            for name in models:
                problem = device_error or _size_problem(size)
                if not problem and name not in built:
                    built[name] = _build(name, factories, device, channels_last)
                model = built.get(name)
                if not problem and isinstance(model, str):
                    problem = model
                row = _row(name, mode, size, batch, settings, error=problem or "")
                config_rows.append(row)
                if problem:
                    continue
                row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
                row["gmacs"] = _gmacs(model, size, device)
                try:
                    runners[name] = _prepare(
                        model, mode, size, batch, device, amp, compile, channels_last, warmup
                    )
                except Exception as err:  # any failure becomes a row, not a crash
                    row["error"] = _one_line(err)
            times = _interleaved_times(runners, repeats, config_rows)
            for row in config_rows:
                name = row["model"]
                if name in times:
                    seconds = statistics.median(t for t, _ in times[name])
                    row["img_per_s"] = round(batch / seconds, 2)
                    row["ms_per_img"] = round(1000 * seconds / batch, 2)
                    faults = [f for _, f in times[name] if f is not None]
                    row["faults_per_step"] = round(statistics.median(faults)) if faults else None
                    if memory:
                        row["peak_mem_mb"] = round(
                            _peak_memory(runners[name], torch.device(device)) / 2**20, 1
                        )
            measured = [r for r in config_rows if r["img_per_s"]]
            for row in measured:
                row["vs_baseline"] = round(row["img_per_s"] / measured[0]["img_per_s"], 3)
            rows += config_rows
            runners.clear()
            _release_free_memory()
    return rows


def _cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``, else ``platform.processor``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(device: str) -> str:
    """The hardware a run measures, for its table: a GPU's name, or the CPU's model, cores and
    vector units (``AMD EPYC, 2 cores, AVX512 BF16``). Ratios between models move with the
    units: a matrix unit such as AMX speeds bfloat16 products up several times, so runs on
    machines of one name but other units are not comparable."""
    kind = torch.device(device)
    if kind.type == "cuda":
        try:
            return torch.cuda.get_device_name(kind)
        except (AssertionError, RuntimeError):  # no such device: its rows say why
            return device
    if kind.type != "cpu":
        return kind.type
    units = [torch.backends.cpu.get_cpu_capability()]  # the widest vector ISA torch uses
    for name, check in (("BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported")):
        if getattr(torch.cpu, check, lambda: False)():
            units.append(name)
    return f"{_cpu_model()}, {os.cpu_count()} cores, {' '.join(units)}"


def device_problem(device: str) -> str | None:
    """A one-line reason ``device`` cannot run here, None where it can."""
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        return _one_line(err)
    if kind == "cuda" and not torch.cuda.is_available():
        return f"device {device!r} requested but no CUDA GPU is available (torch.cuda)"
    return None


def _size_problem(size: int) -> str | None:
    if size < MIN_INPUT_SIZE:
        return f"image size {size} is below the smallest side {MIN_INPUT_SIZE}"
    return None


def _build(
    name: str, factories: Mapping[str, Callable[[], nn.Module]], device: str, channels_last: bool
) -> nn.Module | str:
    """The model on ``device``, or a one-line reason it could not be built."""
    if name not in factories and name.split(".")[0] not in timm.list_models():
        return f"unknown model {name!r} (not a timm model name)"
    try:
        model = factories[name]() if name in factories else timm.create_model(name)
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    except Exception as err:  # reported in the row
        return _one_line(err)
    return model


def _gmacs(model: nn.Module, size: int, device: str) -> float | None:
    """Multiply-accumulates of one image (count_macs), None where the counter fails."""
    try:
        x = torch.randn(1, 3, size, size, device=device)
        return round(count_macs(model.eval(), x)["total"] / 1e9, 2)
    except Exception as err:  # reported in the row
        _logger.info("no GMACs for %s at %d: %s", type(model).__name__, size, _one_line(err))
        return None


def _prepare(
    model: nn.Module,
    mode: str,
    size: int,
    batch: int,
    device: str,
    amp: str | None,
    compile: bool | str,
    channels_last: bool,
    warmup: int,
) -> Callable[[], None]:
    """The step function of one model, warmed up (compiled, caches filled)."""
    model.train(mode == "train")
    compile_mode = None if compile is True else compile  # None: torch.compile's default
    runnable = torch.compile(model, mode=compile_mode) if compile else model
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    step = make_step(runnable, mode, x, amp)
    for _ in range(max(1, warmup)):
        step()
    return step


def _interleaved_times(
    runners: dict[str, Callable[[], None]], repeats: int, rows: list[dict]
) -> dict[str, list[tuple[float, int | None]]]:
    """(seconds, minor page faults) per step of each model, the models taking turns within
    every repeat."""
    times: dict[str, list[tuple[float, int | None]]] = {name: [] for name in runners}
    failed: set[str] = set()
    for _ in range(repeats):
        for name, step in runners.items():
            if name in failed:
                continue
            faults = minor_page_faults()
            start = time.perf_counter()
            try:
                step()
            except Exception as err:  # reported in the row
                failed.add(name)
                next(r for r in rows if r["model"] == name)["error"] = _one_line(err)
                continue
            seconds = time.perf_counter() - start
            if faults is not None:
                faults = minor_page_faults() - faults
            times[name].append((seconds, faults))
    return {name: t for name, t in times.items() if name not in failed and t}


def speed_ratios(
    rows: Sequence[dict[str, Any]], model: str | None = None, peers: Sequence[str] | None = None
) -> list[str]:
    """One line per mode and size: ``model``'s images/s (default the first row's model) over
    that of every other model of the run, or of those in ``peers``.

    ``infer 224px: sgformer_s = 1.60x published_sgformer_s, 1.23x swin_tiny_patch4_window7_224``;
    models whose row failed are left out, and a group whose ``model`` failed gets no line.
    """
    groups: dict[tuple[str, int], dict[str, float]] = {}
    for row in rows:
        if row.get("img_per_s"):
            key = (row["mode"], row["img_size"])
            groups.setdefault(key, {})[row["model"]] = row["img_per_s"]
    if model is None:
        model = rows[0]["model"] if rows else None
    lines = []
    for (mode, size), speeds in groups.items():
        others = [n for n in speeds if n != model and (peers is None or n in peers)]
        if model not in speeds or not others:
            continue
        ratios = ", ".join(f"{speeds[model] / speeds[n]:.2f}x {n}" for n in others)
        lines.append(f"{mode} {size}px: {model} = {ratios}")
    return lines


def report_text(report: dict[str, Any], ratios: Sequence[str] | None = None) -> str:
    """What the benchmark commands print: table, speed ratios (default the first model's over
    the others, :func:`speed_ratios`), files written."""
    if ratios is None:
        ratios = speed_ratios(report["rows"])
    files = [f"wrote {path}" for path in report["files"]]
    machines = sorted({row["machine"] for row in report["rows"] if row.get("machine")})
    header = [f"machine: {machine}" for machine in machines]
    return "\n".join([*header, report["table"], *ratios, *files])


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width text table of benchmark rows (errors in the last column)."""
    columns = (
        ("model", "model"),
        ("mode", "mode"),
        ("img_size", "size"),
        ("batch_size", "batch"),
        ("params_m", "params M"),
        ("gmacs", "GMACs"),
        ("img_per_s", "img/s"),
        ("ms_per_img", "ms/img"),
        ("vs_baseline", "x first"),
        ("peak_mem_mb", "peak MB"),
        ("faults_per_step", "faults/step"),
    )
    cells = [[h for _, h in columns]]
    for row in rows:
        cells.append(["" if row.get(k) is None else str(row[k]) for k, _ in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = []
    for row, line in zip([None, *rows], cells, strict=True):
        text = "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        if row is not None and row.get("error"):
            text = "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line[:4], widths[:4], strict=True))
            )
            text += f"  error: {row['error']}"
        lines.append(text.rstrip())
    return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot(rows: Sequence[dict[str, Any]], output_dir: str | Path) -> list[Path]:
    """Images/s against image size per model and mode, and images/s against GMACs (the paper's
    throughput-versus-cost chart) at the first size; PNG files in ``output_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    measured = [r for r in rows if r.get("img_per_s")]
    files = []
    modes = sorted({r["mode"] for r in measured})
    if not modes:
        return files
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for name in dict.fromkeys(r["model"] for r in measured):
            points = sorted(
                (r["img_size"], r["img_per_s"])
                for r in measured
                if r["model"] == name and r["mode"] == mode
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=name)
        ax.set(xlabel="image side (px)", ylabel="images / s", title=f"{mode}", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(output_dir / "throughput_vs_size.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    first = measured[0]
    chart = [
        r for r in measured if r["img_size"] == first["img_size"] and r["mode"] == first["mode"]
    ]
    chart = [r for r in chart if r.get("gmacs")]
    if chart:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in chart:
            ax.scatter(r["gmacs"], r["img_per_s"], s=40)
            ax.annotate(
                r["model"],
                (r["gmacs"], r["img_per_s"]),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
        ax.set(
            xlabel="GMACs per image",
            ylabel="images / s",
            title=f"{first['mode']} at {first['img_size']} px, batch {first['batch_size']}",
        )
        ax.grid(alpha=0.3)
        fig.tight_layout()
        files.append(output_dir / "throughput_vs_gmacs.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return files


def benchmark_report(
    models: Sequence[str], output: str | Path | None = None, **kwargs: Any
) -> dict[str, Any]:
    """:func:`run_benchmark`, its text table, and (with ``output``) ``benchmark.csv`` and the
    plots written into that folder. Returns ``{"rows", "table", "files"}``."""
    rows = run_benchmark(models, **kwargs)
    files = []
    if output is not None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        files.append(write_csv(rows, output / "benchmark.csv"))
        files += plot(rows, output)
    return {"rows": rows, "table": format_table(rows), "files": files}


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """The measurement options of ``sgformer benchmark``, which the benchmark scripts share."""
    parser.add_argument("--img-size", nargs="+", type=int, default=[224], help="square sides")
    parser.add_argument("-b", "--batch-size", type=int, default=16, help="inference batch")
    parser.add_argument("--train-batch-size", type=int, help="training batch (default -b)")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=["infer"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), help="autocast dtype (default fp32)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        choices=COMPILE_MODES,
        metavar="MODE",
        help="torch.compile each model; optionally its mode: " + ", ".join(COMPILE_MODES),
    )
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="keep freed memory in the process (glibc), so that no step pays page faults for "
        "fresh memory: steadier ratios of the computation alone",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model")
    parser.add_argument("--output", help="folder for benchmark.csv and the PNG plots")


def benchmark_options(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`benchmark_report` keywords from the options of :func:`add_benchmark_arguments`."""
    return {
        "output": args.output,
        "img_sizes": args.img_size,
        "batch_size": args.batch_size,
        "train_batch_size": args.train_batch_size,
        "modes": args.mode,
        "device": args.device,
        "amp": args.amp,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "threads": args.threads,
        "keep_freed_memory": args.keep_freed_memory,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
