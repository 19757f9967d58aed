"""Significance maps and token reallocation drawn over images (``docs/significance.md``).

Everything the drawings show comes from ``SGFormer.forward_significance(x, return_parts=True)``:
the map each hybrid-scale block measured (and its global and local parts) and the merge group
size every token fell into when the next block reallocated them. This module only loads
images and checkpoints, crops the maps to the image and draws them.

matplotlib and scikit-image (extra ``viz``) are imported only inside the functions using them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import resolve_data_config
from timm.data.transforms import str_to_pil_interp
from torch import nn

from .model import MIN_INPUT_SIZE, create_model

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "SAMPLE_IMAGES",
    "draw_significance",
    "load_model",
    "npz_arrays",
    "plot_significance",
    "prepare_image",
    "resized_size",
    "sample_images",
    "save_significance",
    "significance_data",
    "to_rgb",
    "upsample_to_image",
]

_logger = logging.getLogger(__name__)

# Photographs shipped inside scikit-image (no download): name -> skimage.data function.
SAMPLE_IMAGES = {"astronaut": "astronaut", "coffee": "coffee", "cat": "chelsea", "rocket": "rocket"}
# The long side is capped at this many times the short side's target, so a panorama does not
# make the stage-1 global attention (N x N / 64 scores) run out of memory.
MAX_ASPECT = 4
RGBA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
# Bucket colours, finest merge (most tokens kept) first: red = tokens spent, blue = merged away.
ALLOCATION_COLOURS = ("#d7301f", "#fdae61", "#2c7bb6")
OVERLAY_ALPHA = 0.55
HEATMAP_CMAP = "inferno"
PANEL_INCHES = 2.6
RANDOM_WEIGHTS_NOTE = (
    "note: no checkpoint given, so {model} has random weights and its significance maps are "
    "meaningless; pass --checkpoint with the model `make demo` trains (runs/demo/) or with "
    "published weights (https://github.com/OliverRensu/SG-Former)"
)


# ----- inputs -----
def _uint8(array: np.ndarray) -> np.ndarray:
    """Any numeric image array -> uint8: floats are taken as [0, 1], wide integers rescaled."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        return (np.clip(np.nan_to_num(array), 0.0, 1.0) * 255).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        top = 255 if array.max(initial=0) <= 255 else np.iinfo(array.dtype).max
        return (np.clip(array, 0, None).astype(np.float64) * (255 / top)).round().astype(np.uint8)
    raise ValueError(f"expected a numeric image array, got dtype {array.dtype}")


def _to_pil(image: str | Path | Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            opened.load()  # decode now: a truncated file fails here, not later
            return ImageOps.exif_transpose(opened)
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
            raise ValueError(
                f"expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), got "
                f"{image.shape}; move channels last"
            )
        return Image.fromarray(np.ascontiguousarray(_uint8(image)))
    raise TypeError(f"expected an image path, PIL image or numpy array, got {type(image).__name__}")


def to_rgb(image: str | Path | Image.Image | np.ndarray) -> np.ndarray:
    """An image file, PIL image or array -> (H, W, 3) uint8 RGB.

    Grey is repeated over the channels; transparency (RGBA, LA, palette) is composited on white;
    16-bit and float grey images are stretched to their own min-max range.
    """
    pil = _to_pil(image)
    if pil.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(pil, dtype=np.float64)
        low, high = values.min(), values.max()
        pil = Image.fromarray(_uint8((values - low) / max(high - low, 1e-12)))
    if pil.mode in ("RGBA", "LA", "PA") or (pil.mode == "P" and "transparency" in pil.info):
        background = Image.new("RGBA", pil.size, RGBA_BACKGROUND + (255,))
        pil = Image.alpha_composite(background, pil.convert("RGBA"))
    return np.asarray(pil.convert("RGB"))


def resized_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(H, W) with the short side at ``short_side`` and the long side at most
    ``MAX_ASPECT * short_side``; ValueError if the short side then falls below the model's
    ``MIN_INPUT_SIZE``."""
    h, w = size
    scale = min(short_side / min(h, w), MAX_ASPECT * short_side / max(h, w))
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if min(new_h, new_w) < MIN_INPUT_SIZE:
        raise ValueError(
            f"image of {h} x {w} px is too elongated: resized to {new_h} x {new_w}, the short "
            f"side must be at least {MIN_INPUT_SIZE} px (long side capped at {MAX_ASPECT} x "
            f"{short_side})"
        )
    return new_h, new_w


def prepare_image(
    model: nn.Module, image: str | Path | Image.Image | np.ndarray, img_size: int | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """Resize so the short side is ``img_size`` (aspect kept, no crop) and normalise.

    Args:
        model: gives mean, std and interpolation (its pretrained cfg) and the default size.
        image: file, PIL image or array (grey, RGB or RGBA; see :func:`to_rgb`).
        img_size: short side in pixels; default: the model cfg's input size. The long side is
            capped at ``MAX_ASPECT * img_size``.

    Returns:
        ((1, 3, H, W) float tensor on the model's device, (H, W, 3) uint8 resized image).
    """
    cfg = resolve_data_config({}, model=model)
    rgb = to_rgb(image)
    new_h, new_w = resized_size(rgb.shape[:2], img_size or cfg["input_size"][-1])
    interpolation = str_to_pil_interp(cfg.get("interpolation", "bicubic"))
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), interpolation))
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255  # 3, H, W
    x = ((x - mean) / std).unsqueeze(0)  # 1, 3, H, W
    param = next(model.parameters())
    return x.to(device=param.device, dtype=param.dtype), resized


def sample_images() -> dict[str, np.ndarray]:
    """The photographs of :data:`SAMPLE_IMAGES`, from scikit-image's bundled data."""
    import skimage.data

    return {name: getattr(skimage.data, func)() for name, func in SAMPLE_IMAGES.items()}


# ----- model -----
def load_model(
    model_name: str | None = None, checkpoint: str | Path | None = None, use_ema: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a model in eval mode, with a checkpoint's weights if one is given.

    Checkpoints load through ``tasks.classification.classifier_from_checkpoint``: a training
    checkpoint names its model (``model_name`` may then be None and must otherwise agree) and
    classes; published files and bare state dicts need ``model_name``. ``use_ema`` loads a training
    checkpoint's EMA weights.

    Returns:
        (model, info) with info keys ``model_name``, ``img_size`` (the checkpoint's, or None)
        and ``class_names`` (the checkpoint's, ImageNet's for 1000 classes, else indices;
        None without a checkpoint or classifier).
    """
    if checkpoint is None:
        if model_name is None:
            raise ValueError("give a model name (--model) or a checkpoint that names its model")
        return create_model(model_name).eval(), {
            "model_name": model_name,
            "img_size": None,
            "class_names": None,
        }
    from .tasks.classification import class_names_for, classifier_from_checkpoint

    model, info = classifier_from_checkpoint(checkpoint, model_name, use_ema=use_ema)
    num_classes = getattr(model, "num_classes", 0)
    return model.eval(), {
        "model_name": info["model_name"],
        "img_size": info.get("img_size"),
        "class_names": class_names_for(info, num_classes) if num_classes else None,
    }


# ----- maps -----
def _parse_blocks(blocks: str | Sequence[int] | None) -> list[int] | None:
    if blocks is None or (isinstance(blocks, str) and blocks.strip() == "all"):
        return None
    if isinstance(blocks, str):
        try:
            blocks = [int(b) for b in blocks.split(",") if b.strip()]
        except ValueError:
            raise ValueError(
                f"blocks must be 'all' or comma-separated indices such as 0,2, got {blocks!r}"
            ) from None
    blocks = list(blocks)
    if not blocks or any(b < 0 for b in blocks):
        raise ValueError(f"blocks must be non-negative indices of hybrid blocks, got {blocks}")
    return list(dict.fromkeys(blocks))


def upsample_to_image(grid_map: torch.Tensor, stride: int, size: tuple[int, int]) -> np.ndarray:
    """(H_i, W_i) map -> (H, W): bilinear by the stage stride, then the part past the image
    (the last row and column of tokens overhang it when H, W are not multiples) cut off."""
    H_i, W_i = grid_map.shape
    up = F.interpolate(
        grid_map.float()[None, None], size=(H_i * stride, W_i * stride), mode="bilinear"
    )  # 1, 1, H_i*s, W_i*s
    return up[0, 0, : size[0], : size[1]].cpu().numpy()


def _numpy(batch_map: torch.Tensor | None) -> np.ndarray | None:
    """(1, H_i, W_i) map of the batch's only image -> (H_i, W_i) float32 (None stays None)."""
    return None if batch_map is None else batch_map[0].float().cpu().numpy()


@torch.no_grad()
def significance_data(
    model: nn.Module,
    image: str | Path | Image.Image | np.ndarray,
    img_size: int | None = None,
    blocks: str | Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run ``model.forward_significance(x, return_parts=True)`` on one image.

    Args:
        blocks: positions in the list of hybrid-scale blocks (0 = the model's first), or
            None / ``"all"``.
        class_names: if given, the top-1 prediction is added.

    Returns:
        ``image`` ((H, W, 3) uint8, the resized input), ``prediction`` ((name, probability)
        or None) and ``blocks``: one dict per selected hybrid block with ``index``, ``stage``,
        ``block``, ``grid`` (H_i, W_i), ``stride``, ``significance``/``global``/``local``
        ((H_i, W_i) float32; a part is None if the model lacks that scale), ``overlay`` ((H, W)
        significance upsampled and cropped to the image), ``allocation`` ((H_i, W_i) int64
        group size of each token), ``group_sizes`` and ``merged_tokens`` (the model's, per
        bucket, least significant first), and ``tokens_per_bucket``/``merged_per_bucket``
        (counted from ``allocation``: what the drawing shows).
    """
    selected = _parse_blocks(blocks)
    x, resized = prepare_image(model, image, img_size)
    was_training = model.training
    model.eval()
    try:
        maps = model.forward_significance(x, return_parts=True)
        logits = model(x) if class_names is not None else None
    finally:
        model.train(was_training)
    if selected is not None and max(selected) >= len(maps):
        raise ValueError(
            f"blocks {selected} out of range: the model has {len(maps)} hybrid-scale blocks "
            f"(0-{len(maps) - 1})"
        )
    size = resized.shape[:2]
    out_blocks = []
    for index, found in enumerate(maps):
        if selected is not None and index not in selected:
            continue
        stride = model.feature_info[found["stage"]]["reduction"]
        significance = found["significance"][0]  # H_i, W_i
        H_i, W_i = significance.shape
        assert (H_i, W_i) == (math.ceil(size[0] / stride), math.ceil(size[1] / stride)), (
            f"stage grid {H_i} x {W_i} does not cover the {size} image at stride {stride}"
        )
        allocation = found["allocation"][0].cpu().numpy()
        tokens = [int((allocation == g).sum()) for g in found["group_sizes"]]
        out_blocks.append(
            {
                "index": index,
                "stage": found["stage"],
                "block": found["block"],
                "grid": (H_i, W_i),
                "stride": stride,
                "significance": _numpy(found["significance"]),
                "global": _numpy(found["global"]),
                "local": _numpy(found["local"]),
                "overlay": upsample_to_image(significance, stride, size),
                "allocation": allocation,
                "group_sizes": list(found["group_sizes"]),
                "merged_tokens": list(found["merged_tokens"]),
                "tokens_per_bucket": tokens,
                "merged_per_bucket": [
                    -(-n // g) for n, g in zip(tokens, found["group_sizes"], strict=True)
                ],
            }
        )
    if selected is not None:
        out_blocks.sort(key=lambda b: selected.index(b["index"]))
    prediction = None
    if logits is not None:
        probs = logits.float().softmax(-1)[0]
        top = int(probs.argmax())
        name = class_names[top] if top < len(class_names) else str(top)
        prediction = (name, float(probs[top]))
    return {"image": resized, "prediction": prediction, "blocks": out_blocks}


# ----- drawing -----
def _title(block: dict[str, Any], what: str) -> str:
    H_i, W_i = block["grid"]
    return f"stages[{block['stage']}].blocks[{block['block']}] {what}\n{H_i}x{W_i} tokens"


def _heatmap(fig: Figure, ax: Any, image: np.ndarray, values: np.ndarray, title: str) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    norm = Normalize(vmin=float(values.min()), vmax=float(values.max()))
    ax.imshow(image)
    ax.imshow(values, cmap=HEATMAP_CMAP, norm=norm, alpha=OVERLAY_ALPHA)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()
    colorbar = fig.colorbar(ScalarMappable(norm=norm, cmap=HEATMAP_CMAP), ax=ax, shrink=0.8)
    colorbar.ax.tick_params(labelsize=6)


def _allocation_panel(fig: Figure, ax: Any, image: np.ndarray, block: dict[str, Any]) -> None:
    """Tokens coloured by the merge group size of their bucket (nearest, at the stage stride);
    the discrete colour bar is the legend: group size, tokens in the bucket -> merged tokens."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap

    finest_first = sorted(block["group_sizes"])
    # Two buckets (sr = 2) take the two ends of the palette: finest red, coarsest blue.
    picks = np.linspace(0, len(ALLOCATION_COLOURS) - 1, len(finest_first)).round().astype(int)
    cmap = ListedColormap([ALLOCATION_COLOURS[i] for i in picks])
    norm = BoundaryNorm(np.arange(len(finest_first) + 1) - 0.5, len(finest_first))
    rank = np.searchsorted(finest_first, block["allocation"])  # H_i, W_i colour index
    stride, (H, W) = block["stride"], image.shape[:2]
    rank = rank.repeat(stride, axis=0).repeat(stride, axis=1)[:H, :W]  # H, W
    ax.imshow(image.mean(axis=-1), cmap="gray")
    ax.imshow(rank, cmap=cmap, norm=norm, alpha=OVERLAY_ALPHA, interpolation="nearest")
    counts = dict(zip(block["group_sizes"], block["tokens_per_bucket"], strict=True))
    merged = dict(zip(block["group_sizes"], block["merged_per_bucket"], strict=True))
    merged_sum = " + ".join(str(merged[g]) for g in finest_first)
    ax.set_title(
        _title(block, "allocation") + f", merged {merged_sum} = {sum(merged.values())}",
        fontsize=8,
    )
    ax.set_axis_off()
    legend = fig.colorbar(
        ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.8, ticks=range(len(finest_first))
    )
    legend.ax.set_yticklabels([f"g={g}\n{counts[g]}->{merged[g]}" for g in finest_first])
    legend.ax.tick_params(labelsize=6)


def draw_significance(data: dict[str, Any], parts: bool = False, dpi: int = 100) -> Figure:
    """Draw what :func:`significance_data` returned; the figure keeps it as ``sgformer_data``.

    Layout: the input on the left; one row per hybrid block with the significance map (and
    with ``parts`` its global and local parts) over the image, each with a colour bar, and
    the token allocation coloured by merge group size, finest first, with a legend.
    """
    from matplotlib.figure import Figure

    image, blocks = data["image"], data["blocks"]
    H, W = image.shape[:2]
    parts_shown = ("global", "local") if parts else ()
    n_cols = 2 + len(parts_shown) + 1
    n_rows = max(1, len(blocks))
    aspect = H / W
    fig = Figure(
        figsize=(n_cols * PANEL_INCHES + 1.5, n_rows * PANEL_INCHES * aspect + 0.6 * n_rows + 0.3),
        dpi=dpi,
        layout="constrained",
    )
    grid = fig.add_gridspec(n_rows, n_cols, width_ratios=[1] * (n_cols - 1) + [1.1])
    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(image)
    ax.set_anchor("N")
    title = f"input {H}x{W}"
    if data.get("prediction") is not None:
        title += "\npredicted {} ({:.0%})".format(*data["prediction"])
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()
    for row, block in enumerate(blocks):
        _heatmap(
            fig,
            fig.add_subplot(grid[row, 1]),
            image,
            block["overlay"],
            _title(block, "significance"),
        )
        for col, part in enumerate(parts_shown, start=2):
            panel = fig.add_subplot(grid[row, col])
            if block[part] is None:
                panel.set_title(f"no {part} part", fontsize=8)
                panel.set_axis_off()
                continue
            upsampled = upsample_to_image(torch.from_numpy(block[part]), block["stride"], (H, W))
            _heatmap(fig, panel, image, upsampled, _title(block, part))
        _allocation_panel(fig, fig.add_subplot(grid[row, n_cols - 1]), image, block)
    fig.sgformer_data = data
    return fig


def plot_significance(
    model: nn.Module,
    image: str | Path | Image.Image | np.ndarray,
    img_size: int | None = None,
    blocks: str | Sequence[int] | None = None,
    parts: bool = False,
    class_names: Sequence[str] | None = None,
    dpi: int = 100,
) -> Figure:
    """Significance maps and token allocation of every hybrid-scale block over ``image``.

    A model with random weights (no checkpoint loaded) gives meaningless maps: load trained
    weights first (:func:`load_model` with a checkpoint).

    Args:
        model: an SG-Former (any variant); run in eval mode, its mode is restored after.
        image: file, PIL image or array; grey, RGB or RGBA (composited on white).
        img_size: short side the image is resized to (aspect kept); default the model cfg's.
        blocks: positions in the list of hybrid blocks, e.g. ``[0, 2]`` or ``"0,2"``; all
            by default.
        parts: also draw the global and local parts of each map.
        class_names: if given, the input's title shows the top-1 prediction.

    Returns:
        A matplotlib Figure (no pyplot state); ``fig.sgformer_data`` holds the drawn arrays
        (see :func:`significance_data`).
    """
    data = significance_data(model, image, img_size, blocks, class_names)
    return draw_significance(data, parts=parts, dpi=dpi)


# ----- files -----
def npz_arrays(data: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays ``--format npy`` writes; keys are listed in docs/significance.md."""
    arrays = {"image": data["image"]}
    for block in data["blocks"]:
        prefix = f"stage{block['stage']}_block{block['block']}"
        arrays[f"{prefix}_significance"] = block["significance"]
        arrays[f"{prefix}_allocation"] = block["allocation"]
        arrays[f"{prefix}_group_sizes"] = np.asarray(block["group_sizes"], dtype=np.int64)
        arrays[f"{prefix}_merged_tokens"] = np.asarray(block["merged_tokens"], dtype=np.int64)
        arrays[f"{prefix}_stride"] = np.asarray(block["stride"], dtype=np.int64)
        for part in ("global", "local"):
            if block[part] is not None:
                arrays[f"{prefix}_{part}"] = block[part]
    return arrays


def _unique_path(directory: Path, stem: str, suffix: str, taken: set[Path]) -> Path:
    path, n = directory / f"{stem}{suffix}", 1
    while path in taken:
        path, n = directory / f"{stem}_{n}{suffix}", n + 1
    taken.add(path)
    return path


def save_significance(
    images: Iterable[str | Path] = (),
    model_name: str | None = None,
    checkpoint: str | Path | None = None,
    output: str | Path = "significance",
    img_size: int | None = None,
    blocks: str | Sequence[int] | None = None,
    parts: bool = False,
    fmt: str = "png",
    use_ema: bool = False,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write one figure (``png``) or one ``.npz`` (``npy``) per image into ``output``.

    With no images, the scikit-image sample photographs are used. Files that cannot be read
    are reported and skipped. ``report`` receives notes and skipped files (default: this
    module's logger), e.g. that a model without a checkpoint has random weights.

    Returns:
        ``written`` (paths), ``skipped`` ((image, reason) pairs), ``random_weights``, ``model``.

    Raises:
        ValueError: bad arguments, a checkpoint that does not fit, or no image readable.
    """
    if fmt not in ("png", "npy"):
        raise ValueError(f"format must be 'png' or 'npy', got {fmt!r}")
    if img_size is not None and img_size < MIN_INPUT_SIZE:
        raise ValueError(f"img_size must be at least {MIN_INPUT_SIZE} px, got {img_size}")
    report = report or _logger.warning
    _parse_blocks(blocks)  # fail on a bad selection before loading anything
    model, info = load_model(model_name, checkpoint, use_ema)
    if checkpoint is None:
        report(RANDOM_WEIGHTS_NOTE.format(model=info["model_name"]))
    images = list(images)
    sources: Iterable[tuple[str, Any]] = (
        ((Path(p).stem, p) for p in images) if images else sample_images().items()
    )
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped, taken = [], [], set()
    size = img_size or info["img_size"] or resolve_data_config({}, model=model)["input_size"][-1]
    for stem, source in sources:
        try:
            rgb = to_rgb(source)
            resized_size(rgb.shape[:2], size)
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            skipped.append((str(source), str(err)))
            report(f"skipping {source}: {err}")
            continue
        data = significance_data(model, rgb, size, blocks, info["class_names"])
        if fmt == "npy":
            path = _unique_path(out_dir, f"{stem}_significance", ".npz", taken)
            np.savez_compressed(path, **npz_arrays(data))
        else:
            path = _unique_path(out_dir, f"{stem}_significance", ".png", taken)
            draw_significance(data, parts=parts).savefig(path)
        written.append(str(path))
    if not written:
        raise ValueError(
            f"no image could be read ({len(skipped)} skipped): "
            + "; ".join(f"{src} ({why})" for src, why in skipped)
        )
    return {
        "written": written,
        "skipped": skipped,
        "random_weights": checkpoint is None,
        "model": info["model_name"],
    }
