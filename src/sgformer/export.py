"""Deployable graphs of a model: ONNX, TorchScript, ExportedProgram, each checked against eager
PyTorch before it is reported written (docs/BENCHMARKS.md, "Export")."""

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .model import MIN_INPUT_SIZE, create_model

_logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "torchscript", "exported-program")
# Largest relative error (max |a - b| / max |b|) an exported graph may show against eager
# PyTorch. onnxruntime's kernels round differently in the last bits, and the significance sort
# turns that into another order of nearly tied tokens: a randomly initialised sgformer_s at
# 224 px differs by 1.3e-4 to 2.5e-4 at its stages (by 4e-6 when built with the
# content-independent ``uniform`` significance, which sorts nothing). An export fault shows as
# 1e-2 and more (the legacy TorchScript-based exporter's graph: 0.1).
CHECK_TOLERANCE = 1e-3
EXAMPLE_BATCH = 2
MAX_BATCH = 1024
# Height and width a graph exported with dynamic sizes accepts. Below about 113 px a side,
# some counts in the model become 1 (window rows of the third stage, merged runs of a bucket),
# and torch.export specialises a size of 1 away from the others, so the graph starts at 128.
DYNAMIC_SIZE_RANGE = (128, 4096)
# Dynamic-size graphs are checked at the example size and at one other size, this much larger
# (or smaller, near the top of the range) in height and in width: a different padding of the
# windows and reductions and a non-square grid.
DYNAMIC_CHECK_OFFSETS = (40, 8)


def load_for_export(model: str, checkpoint: str | Path | None = None) -> nn.Module:
    """``model`` in eval mode, with ``checkpoint`` loaded through timm (and our filter)."""
    if checkpoint is None:
        return create_model(model).eval()
    overlay = {"file": str(checkpoint)}
    return create_model(model, pretrained=True, pretrained_cfg_overlay=overlay).eval()


def _check_sizes(img_size: int, dynamic: bool) -> list[tuple[int, int, int, int]]:
    """Input shapes the exported graph is checked at: two batch sizes, at the example size or
    (``dynamic``) at the example size and another height and width."""
    if not dynamic:
        return [(EXAMPLE_BATCH, 3, img_size, img_size), (EXAMPLE_BATCH + 1, 3, img_size, img_size)]
    high = DYNAMIC_SIZE_RANGE[1]
    height, width = (
        img_size + d if img_size + d <= high else img_size - d for d in DYNAMIC_CHECK_OFFSETS
    )
    return [(EXAMPLE_BATCH, 3, img_size, img_size), (EXAMPLE_BATCH + 1, 3, height, width)]


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def _dynamic_shapes(dynamic: bool) -> dict[str, dict[int, Any]]:
    from torch.export import Dim

    shapes = {0: Dim("batch", min=1, max=MAX_BATCH)}
    if dynamic:
        low, high = DYNAMIC_SIZE_RANGE
        shapes |= {2: Dim("height", min=low, max=high), 3: Dim("width", min=low, max=high)}
    return {"x": shapes}


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool) -> Any:
    import onnxruntime

    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamic_shapes=_dynamic_shapes(dynamic),
        dynamo=True,
        external_data=False,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x.numpy()})[0]


def _export_program(model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool) -> Any:
    # As the ONNX exporter does by default: facts about sizes that hold for every size but that
    # the symbolic solver cannot prove (a padded side divides by its window count) become
    # checks in the graph rather than failing the export.
    program = torch.export.export(
        model,
        (example,),
        dynamic_shapes=_dynamic_shapes(dynamic),
        prefer_deferred_runtime_asserts_over_guards=True,
    )
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    return lambda x: loaded(x).detach().numpy()


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool) -> Any:
    # Traced with autograd on, so the graph holds the out-of-place sums and runs in any mode
    # (under no_grad the model writes sums into views, which autograd forbids in a graph).
    traced = torch.jit.trace(model, (example,), check_trace=False)
    traced.save(str(path))
    loaded = torch.jit.load(str(path))
    return lambda x: loaded(x).detach().numpy()


_EXPORTERS = {
    "onnx": _export_onnx,
    "torchscript": _export_torchscript,
    "exported-program": _export_program,
}


def export_model(
    model: str | nn.Module,
    out: str | Path,
    fmt: str = "onnx",
    checkpoint: str | Path | None = None,
    img_size: int = 224,
    dynamic: bool = False,
    tolerance: float = CHECK_TOLERANCE,
) -> dict[str, Any]:
    """Export ``model`` and check the file's outputs against eager PyTorch.

    The batch dimension is dynamic; height and width are fixed at ``img_size``, or with
    ``dynamic`` free within ``DYNAMIC_SIZE_RANGE`` (onnx and exported-program). The written
    graph is run at two input shapes (two batch sizes; with ``dynamic`` also two image sizes)
    and must give eager PyTorch's logits within ``tolerance`` relative error.

    Args:
        model: a model name (built by timm, ``checkpoint`` loaded) or a module.
        out: output file.
        fmt: ``onnx`` (torch.export-based exporter; onnxruntime checks it), ``torchscript``
            (``torch.jit.trace``) or ``exported-program`` (``torch.export.save``).
        img_size: side of the example input.

    Returns:
        ``{"path", "format", "checks": [{"runtime", "shape", "error"}], "accepts"}``, the
        last a line saying which input shapes the graph takes.

    Raises:
        ValueError: unknown format, image side below the minimum (or, with ``dynamic``,
            outside ``DYNAMIC_SIZE_RANGE``), ``dynamic`` with torchscript, or a check that fails.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    if img_size < MIN_INPUT_SIZE:
        raise ValueError(f"img_size must be at least {MIN_INPUT_SIZE}, got {img_size}")
    if dynamic and fmt == "torchscript":
        raise ValueError(
            "torchscript graphs cannot take dynamic height and width: torch.jit.trace records "
            "the shape arithmetic as constants; use --format onnx or exported-program"
        )
    low, high = DYNAMIC_SIZE_RANGE
    if dynamic and not low <= img_size <= high:
        raise ValueError(
            f"with dynamic height and width the example side must be within {low}-{high} px "
            f"(the sizes the graph will accept), got {img_size}"
        )
    module = load_for_export(model, checkpoint) if isinstance(model, str) else model.eval()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(EXAMPLE_BATCH, 3, img_size, img_size)
    run = _EXPORTERS[fmt](module, example, path, dynamic)
    checks = []
    generator = torch.Generator().manual_seed(0)
    for shape in _check_sizes(img_size, dynamic):
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = module(x).numpy()
        error = _relative_error(run(x), expected)
        checks.append({"runtime": _RUNTIMES[fmt], "shape": shape, "error": error})
        if not error <= tolerance:
            raise ValueError(
                f"{fmt} graph differs from PyTorch at input {shape}: relative error {error:.2e} "
                f"> {tolerance:.0e}; {path} is left for inspection, do not deploy it"
            )
    name = model if isinstance(model, str) else type(model).__name__
    _logger.info("exported %s to %s (%s)", name, path, fmt)
    size = f"H, W from {low} to {high} px" if dynamic else f"H = W = {img_size}"
    accepts = f"(B, 3, H, W) input, B from 1 to {MAX_BATCH}, {size}"
    return {"path": path, "format": fmt, "checks": checks, "accepts": accepts}


_RUNTIMES = {
    "onnx": "onnxruntime",
    "torchscript": "torch.jit",
    "exported-program": "torch.export",
}
