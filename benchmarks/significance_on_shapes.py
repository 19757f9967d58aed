"""Does a trained model's significance map pick out the object? Measured on held-out shapes.

For each held-out classification image of a shapes dataset (``sgformer data shapes``), the shape's
mask is rendered again from the generator (same seed and index; the script checks that the image
comes out byte-identical to the file) and compared, per hybrid-scale block, with the model's
significance map and token allocation on that stage's grid. A token counts as "shape" when at
least half of its pixels are shape, as "background" when none are. Printed per block:

- ratio: mean significance of shape tokens over that of background tokens (median over images),
  also for the global and the local part alone;
- higher: images where shape tokens are, on average, more significant than background tokens;
- finest: tokens in the most significant bucket (the least merged), among shape tokens and
  among background tokens.

``--full-windows`` leaves out the tokens of partial local windows (at 64 px the 16 x 16 and
8 x 8 grids end in windows of 2 and 1 tokens). Run it on the demo checkpoint and on the same
model with random weights for comparison:

    .venv/bin/python benchmarks/significance_on_shapes.py --checkpoint runs/demo/best.pth
    .venv/bin/python benchmarks/significance_on_shapes.py --model sgformer_nano
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sgformer.data import SHAPE_CLASSES, SHAPE_EDGE_MARGIN, _rng, render_scene
from sgformer.model import create_model
from sgformer.tasks.classification import classifier_from_checkpoint
from sgformer.visualize import prepare_image


def shape_mask(metadata: dict, index: int, path: Path) -> np.ndarray:
    """Re-render held-out image ``index`` and return its (H, W) bool mask."""
    size = metadata["img_size"]
    image, [(_, mask)] = render_scene(
        _rng(metadata["seed"], "val", index),
        size,
        1,
        class_indices=[index % len(SHAPE_CLASSES)],
        edge_margin=SHAPE_EDGE_MARGIN,
    )
    if not np.array_equal(image, np.asarray(Image.open(path).convert("RGB"))):
        raise SystemExit(f"{path} is not what this generator renders: regenerate the dataset")
    return mask


def measure(
    model: torch.nn.Module, root: Path, count: int, full_windows: bool = False
) -> dict[str, dict[str, float]]:
    metadata = json.loads((root / "dataset.json").read_text())
    size = metadata["img_size"]
    per_block: dict[str, dict[str, list[float]]] = {}
    for index in range(min(count, metadata["counts"]["val"])):
        name = SHAPE_CLASSES[index % len(SHAPE_CLASSES)]
        path = root / "val" / name / f"val_{index:05d}.png"
        mask = torch.from_numpy(shape_mask(metadata, index, path)).float()[None, None]
        x, _ = prepare_image(model, Image.open(path), size)  # 1, 3, size, size
        with torch.no_grad():
            blocks = model.forward_significance(x, return_parts=True)
        for block in blocks:
            significance = block["significance"][0]  # H_i, W_i
            allocation = block["allocation"][0]
            h, w = significance.shape
            cover = F.adaptive_avg_pool2d(mask, (h, w))[0, 0]  # shape fraction of each token
            shape, background = cover >= 0.5, cover == 0
            if full_windows:
                # Leave out the tokens of partial local windows (grid sides that are not a
                # multiple of the window): fewer tokens share the attention there, which
                # inflates their local significance whatever the image shows.
                window = model.stages[block["stage"]].blocks[block["block"]].attn.window_size
                inside = torch.zeros_like(shape)
                inside[: h // window * window, : w // window * window] = True
                shape, background = shape & inside, background & inside
            if not shape.any() or not background.any():
                continue
            finest = allocation == min(block["group_sizes"])
            key = f"stages[{block['stage']}].blocks[{block['block']}] {h}x{w}"
            stats = per_block.setdefault(
                key,
                {"ratio": [], "global": [], "local": [], "finest_shape": [], "finest_bg": []},
            )
            for part, values in (
                ("ratio", block["significance"]),
                ("global", block["global"]),
                ("local", block["local"]),
            ):
                if values is not None:
                    ratio = values[0][shape].mean() / values[0][background].mean().clamp_min(1e-12)
                    stats[part].append(ratio.item())
            stats["finest_shape"].append(finest[shape].float().mean().item())
            stats["finest_bg"].append(finest[background].float().mean().item())
    return {
        key: {
            "images": len(s["ratio"]),
            "ratio_median": float(np.median(s["ratio"])),
            "global_median": float(np.median(s["global"])) if s["global"] else float("nan"),
            "local_median": float(np.median(s["local"])) if s["local"] else float("nan"),
            "higher": float(np.mean(np.array(s["ratio"]) > 1)),
            "finest_shape": float(np.mean(s["finest_shape"])),
            "finest_background": float(np.mean(s["finest_bg"])),
        }
        for key, s in per_block.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data/shapes", type=Path)
    parser.add_argument("--checkpoint", help="trained checkpoint; random weights without it")
    parser.add_argument("--model", default="sgformer_nano", help="model for random weights")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="random weights' seed")
    parser.add_argument(
        "--full-windows", action="store_true", help="only tokens of full local windows"
    )
    args = parser.parse_args()
    if args.checkpoint:
        model, _ = classifier_from_checkpoint(args.checkpoint)
    else:
        torch.manual_seed(args.seed)
        model = create_model(args.model, num_classes=len(SHAPE_CLASSES))
    model.eval()
    results = measure(model, args.data_dir, args.num_images, args.full_windows)
    print(
        f"{args.checkpoint or 'random ' + args.model} on {args.data_dir}/val"
        + (", tokens of full local windows only" if args.full_windows else "")
    )
    print(
        "| block | images | ratio (median) | global part | local part | higher "
        "| finest: shape | finest: background |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        print(
            f"| {key} | {r['images']} | {r['ratio_median']:.2f} | {r['global_median']:.2f} "
            f"| {r['local_median']:.2f} | {100 * r['higher']:.0f} % "
            f"| {100 * r['finest_shape']:.0f} % | {100 * r['finest_background']:.0f} % |"
        )


if __name__ == "__main__":
    main()
