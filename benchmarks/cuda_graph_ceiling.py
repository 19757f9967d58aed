"""How much of a GPU inference step is the host launching kernels.

    python benchmarks/cuda_graph_ceiling.py --models sgformer_s swin_tiny_patch4_window7_224 \
        --published-code /path/to/sgformer.py -b 256 --amp bf16

times each model's eager inference step (the one ``sgformer benchmark`` times) and the same
forward captured once in a CUDA graph and replayed: a replay launches no kernel from Python, so
its time is what the GPU itself needs. An eager step much slower than its replay is bound by
the host (Python, dispatch, kernel launches), not by the GPU. Median of ``--repeats`` steps,
models taking turns. CUDA only.
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import timm
import torch
from torch import nn

import sgformer  # noqa: F401  (registers the models with timm)
from sgformer.benchmark import AMP_DTYPES, amp_autocast, make_step

sys.path.insert(0, str(Path(__file__).parent))
from compare_published import load_published  # noqa: E402


def graph_replay(model: nn.Module, x: torch.Tensor, amp: str | None) -> Callable[[], None]:
    """The inference forward captured in a CUDA graph; calling it replays the graph."""
    autocast = partial(amp_autocast, "cuda", amp)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode(), autocast():
        for _ in range(3):  # capture needs warmed-up kernels and workspaces
            model(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode(), autocast():
        model(x)

    def replay() -> None:
        graph.replay()
        torch.cuda.synchronize()

    return replay


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sgformer_s"])
    parser.add_argument("--published-code", type=Path, help="also the published sgformer_s")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("-b", "--batch-size", type=int, default=256)
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), help="autocast dtype (default fp32)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (torch.cuda.is_available() is False)")

    builders = {name: partial(timm.create_model, name) for name in args.models}
    if args.published_code:
        builders["published_sgformer_s"] = partial(
            load_published, args.published_code, "sgformer_s"
        )
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device="cuda")
    steps: dict[str, dict[str, Callable[[], None]]] = {}
    for name, build in builders.items():
        model = build().cuda().eval()
        steps[name] = {"eager": make_step(model, "infer", x, args.amp)}
        try:
            steps[name]["graph"] = graph_replay(model, x, args.amp)
        except Exception as err:  # printed in the table
            print(f"{name}: no CUDA graph: {type(err).__name__}: {str(err).splitlines()[0]}")
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats + 3):  # the first three are warm-up
        for name, kinds in steps.items():
            for kind, step in kinds.items():
                start = time.perf_counter()
                step()
                times.setdefault((name, kind), []).append(time.perf_counter() - start)
    print(f"inference, batch {args.batch_size}, {args.img_size} px, {args.amp or 'fp32'}")
    print(f"{'model':30s} {'eager ms':>9s} {'graph ms':>9s} {'eager/graph':>11s}")
    for name, kinds in steps.items():
        eager = statistics.median(times[name, "eager"][3:]) * 1e3
        graph = statistics.median(times[name, "graph"][3:]) * 1e3 if "graph" in kinds else None
        ratio = f"{eager / graph:.2f}" if graph else "-"
        print(f"{name:30s} {eager:9.1f} {graph or float('nan'):9.1f} {ratio:>11s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
