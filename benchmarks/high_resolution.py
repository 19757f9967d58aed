"""Cost against image size: images/s and peak memory of SG-Former and Swin-T, batch 1.

    python benchmarks/high_resolution.py --threads 2 --output benchmarks/results/highres

Swin-T is rebuilt for each size (timm pads its windows); sizes only SG-Former is run at (such
as 1600, to show it fits in memory) go in ``--ours-only``.
"""

import argparse
import sys
from pathlib import Path

import timm

import sgformer  # noqa: F401  (registers the models with timm)
from sgformer.benchmark import format_table, plot, run_benchmark, write_csv

SWIN = "swin_tiny_patch4_window7_224"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sgformer_s")
    parser.add_argument("--peer", default=SWIN)
    parser.add_argument("--img-size", nargs="+", type=int, default=[224, 384, 512, 768, 1024])
    parser.add_argument("--ours-only", nargs="*", type=int, default=[1600])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    rows = []
    for size in [*args.img_size, *args.ours_only]:
        models = [args.model] if size in args.ours_only else [args.model, args.peer]
        rows += run_benchmark(
            models,
            img_sizes=[size],
            batch_size=1,
            device=args.device,
            threads=args.threads,
            warmup=1,
            repeats=args.repeats,
            factories={args.peer: lambda size=size: timm.create_model(args.peer, img_size=size)},
        )
        print(format_table(rows[-len(models) :]).splitlines()[-1], flush=True)
    print(format_table(rows))
    for size in args.img_size:
        same = {r["model"]: r for r in rows if r["img_size"] == size and r["img_per_s"]}
        if len(same) == 2:
            ours, peer = same[args.model], same[args.peer]
            speed = ours["img_per_s"] / peer["img_per_s"]
            memory = ours["peak_mem_mb"] / max(peer["peak_mem_mb"], 1e-9)
            print(f"{size}px: speed {speed:.2f}x, peak memory {memory:.2f}x {args.peer}")
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        print(f"wrote {write_csv(rows, args.output / 'high_resolution.csv')}")
        for path in plot(rows, args.output):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
