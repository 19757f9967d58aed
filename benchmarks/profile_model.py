"""Where the time goes: torch.profiler tables of one model's inference and training step.

    python benchmarks/profile_model.py --model sgformer_s --threads 2 --output docs/profile

prints, per mode, the operators by self CPU time (CUDA time on a GPU) and the page faults of
the profiled step and, with ``--output``, writes each table to a text file. docs/profile.md
quotes them.

The profiler's own records change what the allocator hands out, so a profiled step can fault
where an unprofiled one does not (85 thousand faults against none for sgformer_s inference,
2026-11-26), and memory-bound operators then look several times slower than they run.
``--keep-freed-memory`` (as in ``sgformer benchmark``) takes the faults out of the profile.
"""

import argparse
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import sgformer  # noqa: F401  (registers the models with timm)
from sgformer.benchmark import minor_page_faults, retain_freed_memory

ROW_LIMIT = 25


def profile_step(model_name: str, mode: str, img_size: int, batch_size: int, device: str) -> str:
    """Operator table of one warmed-up inference forward or training step."""
    model = timm.create_model(model_name).to(device).train(mode == "train")
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    target = torch.randint(0, 1000, (batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)  # as sgformer train

    def step() -> None:
        if mode == "infer":
            with torch.inference_mode():
                model(x)
            return
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sgformer_s")
    parser.add_argument("--mode", nargs="+", choices=("infer", "train"), default=["infer", "train"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("-b", "--batch-size", type=int, default=16)
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="no page faults for fresh memory"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not retain_freed_memory():
        print("--keep-freed-memory needs glibc's mallopt; profiling without it")
    for mode in args.mode:
        batch = args.train_batch_size if mode == "train" else args.batch_size
        table = profile_step(args.model, mode, args.img_size, batch, args.device)
        title = f"{args.model} {mode}, batch {batch}, {args.img_size} px, {args.device}"
        print(f"{title}\n{table}")
        if args.output:
            args.output.mkdir(parents=True, exist_ok=True)
            (args.output / f"{args.model}_{mode}.txt").write_text(f"{title}\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
