"""Where inference time goes by stage, and how fast each stage computes: GMAC/s per part.

    python benchmarks/stage_efficiency.py --threads 2 --keep-freed-memory

For each model, the time of every top-level part (stem, each stage, head; Swin-T's
``patch_embed`` and ``layers.i``) in one inference forward, from forward hooks (summed over
the calls of a part), beside the part's multiply-adds (``sgformer.benchmark.count_macs``).
The forwards take turns over the models, so load from other processes hits all of them alike;
each part's time is its median over the repeats. A part's GMAC/s tells whether it is slow
because it computes much or because it computes slowly; "between parts" is the rest of the
forward (SG-Former: the position table).
"""

import argparse
import statistics
import sys
import time
from collections import defaultdict
from typing import NamedTuple

import timm
import torch
from torch import nn

import sgformer  # noqa: F401  (registers the models with timm)
from sgformer.benchmark import count_macs, is_model_part, retain_freed_memory

DEFAULT_MODELS = ("sgformer_s", "swin_tiny_patch4_window7_224")
WARMUP = 2  # forwards per model before the timed ones


def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    """Top-level parts in call order, named as ``count_macs`` names them."""
    return {name: module for name, module in model.named_modules() if is_model_part(name)}


class PartTimer:
    """Sums the wall time of each part's forward calls and counts them (a part's calls do not
    nest)."""

    def __init__(self, parts: dict[str, nn.Module]) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._started: dict[str, float] = {}
        self.handles = []
        for name, module in parts.items():
            self.handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self.handles.append(module.register_forward_hook(self._post_hook(name)))

    def _pre_hook(self, name: str):
        def hook(_module, _args):
            self._started[name] = time.perf_counter()

        return hook

    def _post_hook(self, name: str):
        def hook(_module, _args, _out):
            self.seconds[name] += time.perf_counter() - self._started.pop(name)
            self.calls[name] += 1

        return hook

    def clear(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class PartRow(NamedTuple):
    part: str
    gmacs: float  # per image
    ms: float  # per batch, median over the repeats
    calls: int  # forward calls of the part in one model forward


def measure(
    models: list[str], img_size: int, batch_size: int, repeats: int
) -> dict[str, list[PartRow]]:
    """Per model: a row per part, then "between parts" and the whole "forward"."""
    x = torch.randn(batch_size, 3, img_size, img_size)
    built = {name: timm.create_model(name).eval() for name in models}
    macs = {name: count_macs(model, x[:1])["by_module"] for name, model in built.items()}
    timers = {name: PartTimer(model_parts(model)) for name, model in built.items()}
    times: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in models}
    with torch.inference_mode():
        for repeat in range(WARMUP + repeats):
            for name, model in built.items():
                timer = timers[name]
                timer.clear()
                start = time.perf_counter()
                model(x)
                total = time.perf_counter() - start
                if repeat < WARMUP:
                    continue
                for part, seconds in timer.seconds.items():
                    times[name][part].append(seconds)
                times[name]["between parts"].append(total - sum(timer.seconds.values()))
                times[name]["forward"].append(total)
    results = {}
    for name in models:
        timer = timers[name]
        timer.remove()
        total_macs = sum(macs[name].values())
        results[name] = [
            PartRow(
                part,
                (total_macs if part == "forward" else macs[name].get(part, 0)) / 1e9,
                1e3 * statistics.median(seconds),
                timer.calls.get(part, 0),
            )
            for part, seconds in times[name].items()
        ]
    return results


def format_rows(name: str, rows: list[PartRow], batch_size: int) -> str:
    """A model's table: part, calls, GMACs per image, ms per batch, share, GMAC/s."""
    forward_ms = rows[-1].ms
    lines = [
        name,
        f"{'part':<16}{'calls':>6}{'GMAC/img':>10}{'ms':>10}{'share':>8}{'GMAC/s':>9}",
    ]
    for row in rows:
        rate = f"{row.gmacs * batch_size / row.ms * 1e3:9.1f}" if row.gmacs else ""
        calls = str(row.calls) if row.calls else ""
        lines.append(
            f"{row.part:<16}{calls:>6}{row.gmacs:10.3f}{row.ms:10.1f}"
            f"{row.ms / forward_ms:8.1%}{rate}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("-b", "--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int)
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="no page faults for fresh memory"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not retain_freed_memory():
        print("--keep-freed-memory needs glibc's mallopt; measuring without it")
    results = measure(args.models, args.img_size, args.batch_size, args.repeats)
    print(
        f"inference, batch {args.batch_size}, {args.img_size} px, "
        f"{torch.get_num_threads()} threads, float32, median of {args.repeats}"
    )
    for name, rows in results.items():
        print("\n" + format_rows(name, rows, args.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
