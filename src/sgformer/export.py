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
# PyTorch: the golden tolerance of the test suite.
CHECK_TOLERANCE = 1e-4
EXAMPLE_BATCH = 2
MAX_BATCH = 1024
DYNAMIC_SIZE_UNSUPPORTED = (
    "dynamic height and width are not supported yet: the token reallocation's bucket bounds "
    "and run counts and the window and reduction padding are integers computed from H and W "
    "in Python, so torch.export must reason symbolically about every one of them (it did not "
    "finish in 15 minutes); export one graph per input size (the batch stays dynamic)"
)


def load_for_export(model: str, checkpoint: str | Path | None = None) -> nn.Module:
    """``model`` in eval mode, with ``checkpoint`` loaded through timm (and our filter)."""
    if checkpoint is None:
        return create_model(model).eval()
    overlay = {"file": str(checkpoint)}
    return create_model(model, pretrained=True, pretrained_cfg_overlay=overlay).eval()


def _check_sizes(img_size: int) -> list[tuple[int, int, int, int]]:
    """Input shapes the exported graph is checked at: two batch sizes at the example size."""
    return [(EXAMPLE_BATCH, 3, img_size, img_size), (EXAMPLE_BATCH + 1, 3, img_size, img_size)]


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def _dynamic_shapes() -> dict[str, dict[int, Any]]:
    from torch.export import Dim

    return {"x": {0: Dim("batch", min=1, max=MAX_BATCH)}}


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Any:
    import onnxruntime

    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamic_shapes=_dynamic_shapes(),
        dynamo=True,
        external_data=False,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x.numpy()})[0]


def _export_program(model: nn.Module, example: torch.Tensor, path: Path) -> Any:
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes())
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    return lambda x: loaded(x).detach().numpy()


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Any:
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

    The batch dimension is dynamic; height and width are fixed at ``img_size`` (``dynamic``
    is refused, see ``DYNAMIC_SIZE_UNSUPPORTED``). The written graph is run at two batch sizes
    and must give eager PyTorch's logits within ``tolerance`` relative error.

    Args:
        model: a model name (built by timm, ``checkpoint`` loaded) or a module.
        out: output file.
        fmt: ``onnx`` (torch.export-based exporter; onnxruntime checks it), ``torchscript``
            (``torch.jit.trace``) or ``exported-program`` (``torch.export.save``).
        img_size: side of the example input.

    Returns:
        ``{"path", "format", "checks": [{"runtime", "shape", "error"}]}``.

    Raises:
        ValueError: unknown format, image side below the minimum, ``dynamic``, or a check
            that fails.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    if img_size < MIN_INPUT_SIZE:
        raise ValueError(f"img_size must be at least {MIN_INPUT_SIZE}, got {img_size}")
    if dynamic:
        raise ValueError(DYNAMIC_SIZE_UNSUPPORTED)
    module = load_for_export(model, checkpoint) if isinstance(model, str) else model.eval()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(EXAMPLE_BATCH, 3, img_size, img_size)
    run = _EXPORTERS[fmt](module, example, path)
    checks = []
    generator = torch.Generator().manual_seed(0)
    for shape in _check_sizes(img_size):
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = module(x).numpy()
        error = _relative_error(run(x), expected)
        checks.append({"runtime": _RUNTIMES[fmt], "shape": shape, "error": error})
        if not error <= tolerance:
            raise ValueError(
                f"{fmt} graph differs from PyTorch at input {shape}: relative error {error:.2e} "
                f"> {tolerance:.0e}"
            )
    name = model if isinstance(model, str) else type(model).__name__
    _logger.info("exported %s to %s (%s)", name, path, fmt)
    return {"path": path, "format": fmt, "checks": checks}


_RUNTIMES = {
    "onnx": "onnxruntime",
    "torchscript": "torch.jit",
    "exported-program": "torch.export",
}
