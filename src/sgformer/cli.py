"""Command line: ``sgformer <command>``; each command is one library call."""

import argparse
import sys

import sgformer  # noqa: F401  (registers the models with timm)


def _demo(args: argparse.Namespace) -> int:
    from .summary import model_summary

    print(model_summary(args.model))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    result = convert_checkpoint(args.src, args.dst, args.model)
    print(f"wrote {result['path']}: {result['model']}, {result['num_params']:,} parameters")
    print(f"sha256 {result['sha256']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgformer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="print a model summary (params, GMACs, shapes)")
    demo.add_argument("--model", default="sgformer_s")
    demo.set_defaults(run=_demo)

    convert = commands.add_parser(
        "convert", help="published checkpoint -> verified .safetensors with metadata"
    )
    convert.add_argument("src", help="checkpoint file (.pth/.pt/.safetensors)")
    convert.add_argument("dst", help="output .safetensors file")
    convert.add_argument("--model", required=True, help="sgformer_s, sgformer_m, sgformer_b, ...")
    convert.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status. Bad input prints one line, exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        print(f"sgformer {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
