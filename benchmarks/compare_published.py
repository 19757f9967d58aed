"""SG-Former against the authors' published implementation and its peers, side by side.

The published model file is not part of this project; give its path:

    python benchmarks/compare_published.py --published-code /path/to/sgformer.py \
        --threads 2 --mode infer train -b 16 --train-batch-size 8 --repeats 7 \
        --output benchmarks/results/cpu

``--variants sgformer_s sgformer_m sgformer_b`` runs each variant beside its published model
(the peers once) and prints each variant's ratios over its published model and the peers.

The file is imported as it is (its folder goes on sys.path for its own imports, ``np.float`` is
restored for its numpy use, and its ``@register_model`` is made a no-op so that it does not
replace this package's timm entries). Its models are built with the published configuration of
each variant (docs/design.md "Variants") and random weights: speed does not depend on the
values. The measurement options are those of ``sgformer benchmark``.
"""

import argparse
import importlib.util
import sys
from functools import partial
from pathlib import Path
from unittest import mock

from torch import nn

import sgformer  # noqa: F401  (registers the models with timm)
from sgformer.benchmark import (
    add_benchmark_arguments,
    benchmark_options,
    benchmark_report,
    report_text,
    speed_ratios,
)
from sgformer.model import BLOCK_NORM_EPS, VARIANTS

PEERS = ("swin_tiny_patch4_window7_224", "pvt_v2_b2", "convnext_tiny")
PUBLISHED_SR_RATIOS = [8, 4, 2, 1]


def load_published(path: Path, variant: str) -> nn.Module:
    """The published implementation's model for ``variant``, from its file at ``path``."""
    import numpy as np

    if not hasattr(np, "float"):
        np.float = float  # the published file uses the alias numpy removed in 1.24
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("sgformer_published", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    with mock.patch("timm.models.registry.register_model", lambda fn: fn):
        spec.loader.exec_module(module)
    config = VARIANTS[variant]
    return module.SGFormer(
        embed_dims=list(config["embed_dims"]),
        num_heads=list(config["num_heads"]),
        depths=list(config["depths"]),
        mlp_ratios=[4, 4, 4, 4],
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=BLOCK_NORM_EPS),
        sr_ratios=PUBLISHED_SR_RATIOS,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--published-code", type=Path, required=True, help="published sgformer.py")
    parser.add_argument(
        "--variants", nargs="+", default=["sgformer_s"], choices=sorted(VARIANTS), metavar="V"
    )
    parser.add_argument("--peers", nargs="*", default=list(PEERS))
    add_benchmark_arguments(parser)
    args = parser.parse_args(argv)
    if not args.published_code.is_file():
        parser.error(f"--published-code: no such file {args.published_code}")

    published = {variant: f"published_{variant}" for variant in args.variants}
    factories = {
        name: partial(load_published, args.published_code, variant)
        for variant, name in published.items()
    }
    models = [name for pair in published.items() for name in pair]  # each beside its published
    report = benchmark_report(
        [*models, *args.peers], factories=factories, **benchmark_options(args)
    )
    ratios = [
        line
        for variant, name in published.items()
        for line in speed_ratios(report["rows"], variant, [name, *args.peers])
    ]
    print(report_text(report, ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
