"""Where the time goes: torch.profiler tables of one model's inference and training step.

    python benchmarks/profile_model.py --model sgformer_s --threads 2 --output docs/profile

prints, per mode, the operators by self CPU time (CUDA time on a GPU) and the page faults of
the profiled step and, with ``--output``, writes each table to a text file. docs/profile.md
quotes them.

``--kernels`` (CPU) prints another table instead: every aten call of one step timed where it
runs, and again right after on the same inputs (best of three, caches and threads warm),
summed per operator, those that lose most in the step first. The second total is what the
step's kernels cost without what happens between them (Python, dispatch, autograd, data gone
cold since it was written), so two models can be compared kernel for kernel; docs/profile.md,
"Kernel for kernel", quotes it.

The profiler's own records change what the allocator hands out, so a profiled step can fault
where an unprofiled one does not (85 thousand faults against none for sgformer_s inference,
2026-11-26), and memory-bound operators then look several times slower than they run.
``--keep-freed-memory`` (as in ``sgformer benchmark``) takes the faults out of the profile.
"""

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import sgformer  # noqa: F401  (registers the models with timm)
from sgformer.benchmark import (
    AMP_DTYPES,
    device_problem,
    make_step,
    minor_page_faults,
    retain_freed_memory,
)

ROW_LIMIT = 25


def build_step(
    model_name: str,
    mode: str,
    img_size: int,
    batch_size: int,
    device: str,
    amp: str | None = None,
) -> Callable[[], None]:
    """The step ``sgformer benchmark`` times: an inference forward or a training step
    (cross-entropy, backward, fused AdamW), on random images, under ``amp`` autocast."""
    model = timm.create_model(model_name).to(device).train(mode == "train")
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    return make_step(model, mode, x, amp)


def profile_step(
    model_name: str, mode: str, img_size: int, batch_size: int, device: str, amp: str | None
) -> str:
    """Operator table of one warmed-up inference forward or training step."""
    step = build_step(model_name, mode, img_size, batch_size, device, amp)
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    faults = minor_page_faults()
    with profile(activities=activities) as prof:
        step()
    if faults is not None:
        faults = minor_page_faults() - faults
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=ROW_LIMIT)
    return f"{table}\nminor page faults in the profiled step: {faults}"


KERNEL_REPEATS = 3  # timings of each call alone; the best is kept


class _KernelTimer(TorchDispatchMode):
    """Times every aten call where it runs, then again alone on the same inputs.

    A call that writes into an input (``add_``, the fused AdamW) is repeated on copies of what
    it writes (taken after the call, outside the timed region), so the step itself is not
    changed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.times: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # n, step, alone

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        written = {
            i
            for i, arg in enumerate(func._schema.arguments)
            if arg.alias_info is not None and arg.alias_info.is_write
        }
        start = time.perf_counter()
        out = func(*args, **kwargs)
        in_step = time.perf_counter() - start
        alone = float("inf")
        for _ in range(KERNEL_REPEATS):
            inputs = [_copy(a) if i in written else a for i, a in enumerate(args)]
            start = time.perf_counter()
            func(*inputs, **kwargs)
            alone = min(alone, time.perf_counter() - start)
        entry = self.times[func._schema.name.removeprefix("aten::")]
        entry[0] += 1
        entry[1] += in_step
        entry[2] += alone
        return out


def _copy(arg):
    """A copy of a tensor argument, or of each tensor of a list argument."""
    if isinstance(arg, torch.Tensor):
        return arg.clone()
    if isinstance(arg, list | tuple):
        return type(arg)(_copy(a) for a in arg)
    return arg


def kernel_table(model_name: str, mode: str, img_size: int, batch_size: int) -> str:
    """Each aten call of one CPU step timed in the step and alone, summed per operator."""
    step = build_step(model_name, mode, img_size, batch_size, "cpu")
    for _ in range(2):
        step()
    plain = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        plain.append(time.perf_counter() - start)
    timer = _KernelTimer()
    with timer:
        step()
    rows = sorted(timer.times.items(), key=lambda kv: kv[1][2] - kv[1][1])
    total = [sum(v[i] for v in timer.times.values()) for i in range(3)]
    lines = [
        f"{'operator':52s} {'calls':>6s} {'in step ms':>11s} {'alone ms':>9s}",
        *(
            f"{name[:52]:52s} {n:6d} {t_step * 1e3:11.1f} {t_alone * 1e3:9.1f}"
            for name, (n, t_step, t_alone) in rows[:ROW_LIMIT]
        ),
        f"{'all operators':52s} {total[0]:6d} {total[1] * 1e3:11.1f} {total[2] * 1e3:9.1f}",
        f"step without the timer (median of 5): {sorted(plain)[2] * 1e3:.1f} ms",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sgformer_s")
    parser.add_argument("--mode", nargs="+", choices=("infer", "train"), default=["infer", "train"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("-b", "--batch-size", type=int, default=16)
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), help="autocast dtype (default fp32)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="no page faults for fresh memory"
    )
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="time each aten call in the step and alone (CPU), instead of torch.profiler",
    )
    args = parser.parse_args(argv)
    if problem := device_problem(args.device):
        parser.error(f"--device: {problem}")
    if args.kernels and (args.device != "cpu" or args.amp):
        parser.error("--kernels times float32 CPU calls; drop --device and --amp")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not retain_freed_memory():
        print("--keep-freed-memory needs glibc's mallopt; profiling without it")
    for mode in args.mode:
        batch = args.train_batch_size if mode == "train" else args.batch_size
        if args.kernels:
            table = kernel_table(args.model, mode, args.img_size, batch)
        else:
            table = profile_step(args.model, mode, args.img_size, batch, args.device, args.amp)
        precision = args.amp or "fp32"
        title = (
            f"{args.model} {mode}, batch {batch}, {args.img_size} px, {args.device}, {precision}"
        )
        print(f"{title}\n{table}")
        if args.output:
            args.output.mkdir(parents=True, exist_ok=True)
            (args.output / f"{args.model}_{mode}.txt").write_text(f"{title}\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
