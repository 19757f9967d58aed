"""One compiled graph for many image sizes: torch.compile(model, dynamic=True), size after size.

    python benchmarks/dynamic_compile.py --model sgformer_nano --backend inductor --threads 2

For each input shape, in order: seconds for the call (the first one compiles), the relative
error against eager PyTorch (max |a - b| / max |b|) and how many graphs dynamo has compiled so
far. The first shape is not square: from a square one torch assumes H == W ("duck sizing") and
recompiles at the first non-square input, whatever the model does.
"""

import argparse
import sys
import time

import timm
import torch
from torch._dynamo.utils import counters

import sgformer  # noqa: F401  (registers the models with timm)

DEFAULT_SHAPES = ["2x160x128", "2x224x224", "2x264x200", "3x130x400"]


def _shape(text: str) -> tuple[int, int, int, int]:
    batch, height, width = (int(part) for part in text.split("x"))
    return batch, 3, height, width


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sgformer_nano")
    parser.add_argument("--backend", default="inductor", help="inductor, aot_eager, eager")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxHxW, in order")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend=args.backend)
    print("shape | seconds | relative error | graphs compiled")
    for text in args.shapes:
        x = torch.randn(_shape(text))
        with torch.no_grad():
            start = time.perf_counter()
            out = compiled(x)
            seconds = time.perf_counter() - start
            expected = model(x)
        error = ((out - expected).abs().max() / expected.abs().max()).item()
        graphs = counters["stats"]["unique_graphs"]
        print(f"{text} | {seconds:.1f} | {error:.1e} | {graphs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
