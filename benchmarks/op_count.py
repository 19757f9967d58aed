"""Operator calls and bytes written per inference forward and per training step, side by side.

    python benchmarks/op_count.py                      # sgformer_s and Swin-T, batch 2 at 224
    python benchmarks/op_count.py --models sgformer_s swin_small_patch4_window7_224 --top 15

Counts aten calls that run a kernel (views excluded; ``sgformer.benchmark.count_operators``):
an inference forward under ``torch.inference_mode``, and a training step's forward and backward
(cross-entropy, no optimiser step). Every call is a kernel launch on a GPU and a dispatch plus a
memory pass on a CPU, so the count says how fragmented a computation is, independent of the
machine and of timing noise. Ratios are against the second model given (Swin-T by default).
"""

import argparse
import sys

import timm
import torch

import sgformer  # noqa: F401  (registers the models with timm)
from sgformer.benchmark import MODES, count_operators

DEFAULT_MODELS = ("sgformer_s", "swin_tiny_patch4_window7_224")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("-b", "--batch-size", type=int, default=2)
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--top", type=int, default=0, help="also list the N most called operators")
    args = parser.parse_args(argv)
    if len(args.models) < 2:
        parser.error("give at least two models: the first is compared with the second")
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    counts = {}
    for name in args.models:
        model = timm.create_model(name)
        for mode in args.mode:
            counts[name, mode] = count_operators(model, x, mode)
    peer = args.models[1]
    print(f"batch {args.batch_size} at {args.img_size} px, float32, torch {torch.__version__}")
    header = ("model", "mode", "calls", "x peer", "MiB written", "x peer")
    print("{:34s} {:5s} {:>6s} {:>7s} {:>12s} {:>7s}".format(*header))
    for (name, mode), c in counts.items():
        ref = counts[peer, mode]
        print(
            f"{name:34s} {mode:5s} {c['calls']:6d} {c['calls'] / ref['calls']:7.2f} "
            f"{c['bytes'] / 2**20:12.1f} {c['bytes'] / ref['bytes']:7.2f}"
        )
        if args.top:
            top = list(c["by_operator"].items())[: args.top]
            print("    " + ", ".join(f"{op} {n}" for op, n in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
