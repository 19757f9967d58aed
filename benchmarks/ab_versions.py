"""A/B of two versions of the model in one process: the installed ``sgformer`` against a
baseline source tree, with the same weights, steps alternating between the two.

    git worktree add /tmp/base 516bf46
    python benchmarks/ab_versions.py /tmp/base/src --mode infer --pairs 12
    python benchmarks/ab_versions.py /tmp/base/src --mode infer --amp bf16

On a shared machine the speed drifts by 10 % and more between runs, and two processes run
one after the other see different machines; alternating steps in one process see the same
one. The baseline package is copied under another name (``sgformer_baseline``), so both
versions import side by side; both must hold the same parameter names. A step is what
`sgformer benchmark` times (``sgformer.benchmark.make_step``: an inference forward, or
forward, loss, backward and fused AdamW update). Prints each version's
median and best step time and the baseline's time over ours per pair (above 1: ours is
faster), the figure docs/BENCHMARKS.md quotes.
"""

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import sgformer.model
from sgformer.benchmark import AMP_DTYPES, make_step


def load_baseline(src: Path):  # noqa: ANN201  (a module)
    """``sgformer.model`` of the source tree ``src`` (the folder holding ``sgformer/``)."""
    package = src / "sgformer"
    if not (package / "model.py").is_file():
        raise SystemExit(f"no sgformer/model.py under {src}: give the baseline's src folder")
    root = Path(tempfile.mkdtemp(prefix="sgformer_ab_"))
    shutil.copytree(package, root / "sgformer_baseline")
    sys.path.insert(0, str(root))
    return importlib.import_module("sgformer_baseline.model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline_src", type=Path, help="the baseline's src folder")
    parser.add_argument("--model", default="sgformer_s", help="a name in model.VARIANTS")
    parser.add_argument("--mode", choices=("infer", "train"), default="infer")
    parser.add_argument("-b", "--batch-size", type=int, help="default 16 infer, 8 train")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), help="autocast dtype")
    parser.add_argument("--pairs", type=int, default=12, help="alternating step pairs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    baseline = load_baseline(args.baseline_src)
    torch.manual_seed(0)
    ours = sgformer.model.SGFormer(**sgformer.model.VARIANTS[args.model])
    theirs = baseline.SGFormer(**baseline.VARIANTS[args.model])
    theirs.load_state_dict(ours.state_dict())
    batch = args.batch_size or (16 if args.mode == "infer" else 8)
    x = torch.randn(batch, 3, 224, 224)
    steps = {}  # the units `sgformer benchmark` times
    for name, model in (("baseline", theirs), ("ours", ours)):
        model.train(args.mode == "train")
        steps[name] = make_step(model, args.mode, x, args.amp)
    times = {name: [] for name in steps}
    for i in range(args.pairs + 1):  # the first pair warms up and is dropped
        order = ("baseline", "ours") if i % 2 == 0 else ("ours", "baseline")
        for name in order:
            start = time.perf_counter()
            steps[name]()
            if i:
                times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(
            f"{name:8s} {args.mode} median {1000 * statistics.median(values):.0f} ms, "
            f"best {1000 * min(values):.0f} ms"
        )
    ratios = [a / b for a, b in zip(times["baseline"], times["ours"], strict=True)]
    print(
        f"baseline time / ours, per pair: median {statistics.median(ratios):.3f} "
        f"({sum(r >= 1 for r in ratios)} of {len(ratios)} at or above 1)"
    )


if __name__ == "__main__":
    main()
