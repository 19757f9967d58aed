"""Does the training code learn real images it has never seen? scikit-learn's handwritten digits.

Writes the 1,797 8 x 8 digit scans that scikit-learn ships as an ImageFolder tree (a seeded,
stratified 80/20 split, upsampled to 32 x 32 so the stride-32 model sees a 1 x 1 stage 4), then
trains ``sgformer_nano`` from scratch through the ``sgformer train`` command and prints the
held-out top-1. Needs ``pip install scikit-learn`` (not a project dependency).

    .venv/bin/python benchmarks/real_images.py --output runs/digits
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sgformer.cli import main

SIDE = 32
VAL_FRACTION = 0.2


def write_digits(root: Path, seed: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        num_val = round(len(indices) * VAL_FRACTION)
        for split, chosen in (("validation", indices[:num_val]), ("train", indices[num_val:])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)  # values are 0..16
                image = Image.fromarray(pixels).resize((SIDE, SIDE), Image.BICUBIC)
                image.save(folder / f"{i:04d}.png")


def run(output: Path, epochs: int, seed: int) -> dict:
    data = output / "data"
    if not data.exists():
        write_digits(data, seed)
    start = time.perf_counter()
    argv = [
        "train", "--data-dir", str(data), "--model", "sgformer_nano", "--img-size", str(SIDE),
        "-b", "32", "--epochs", str(epochs), "--warmup-epochs", "2", "--lr", "2e-3",
        "--scale", "0.7", "1", "--hflip", "0", "--color-jitter", "0", "--drop-path", "0.05",
        "--workers", "2", "--seed", str(seed), "--output", str(output / "run"),
    ]  # fmt: skip
    status = main(argv)
    if status:
        raise SystemExit(status)
    minutes = (time.perf_counter() - start) / 60
    result_file = output / "val.json"
    main([
        "validate", "--data-dir", str(data), "--checkpoint", str(output / "run" / "best.pth"),
        "--results-file", str(result_file),
    ])  # fmt: skip
    result = json.loads(result_file.read_text())
    result["train_minutes"] = round(minutes, 1)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/digits"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run(args.output, args.epochs, args.seed)
    print(
        f"digits: top-1 {result['top1']:.2f} % on {result['images']} held-out images after "
        f"{args.epochs} epochs ({result['train_minutes']} min)"
    )
