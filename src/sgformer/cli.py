"""Command line: ``sgformer <command>``; each command is one library call."""

import argparse
import inspect
import logging
import os
import sys

import sgformer  # noqa: F401  (registers the models with timm)

from .config import add_flags

DEVICE_HELP = "cpu or cuda (default: cuda when available)"  # every command that runs a model


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


def _data_shapes(args: argparse.Namespace) -> int:
    import time

    from .data import write_shapes_dataset

    start = time.perf_counter()
    summary = write_shapes_dataset(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        img_size=args.img_size,
        num_dense_train=args.num_dense_train,
        num_dense_val=args.num_dense_val,
        dense_img_size=args.dense_img_size,
        seed=args.seed,
        force=args.force,
        workers=args.workers,
    )
    counts, instances = summary["counts"], summary["num_instances"]
    if summary["skipped"]:
        print(f"{summary['root']}: complete shapes dataset with these arguments, nothing to do")
        return 0
    print(
        f"wrote {summary['root']} in {time.perf_counter() - start:.1f}s: "
        f"{counts['train']} train / {counts['val']} val images ({args.img_size} px, "
        f"{len(summary['classes'])} classes), {counts['dense_training']} / "
        f"{counts['dense_validation']} dense scenes ({args.dense_img_size} px, "
        f"{instances['training']} / {instances['validation']} instances)"
    )
    return 0


def _given(args: argparse.Namespace) -> dict[str, object]:
    """The flags of a train command (None where not given), without the command's own keys."""
    skip = {"command", "run", "detect_command", "segment_command"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def _train(args: argparse.Namespace) -> int:
    from .tasks.classification import train

    result = train(_given(args))
    best = result["best"]
    print(
        f"finished {result['epoch']} epochs: top-1 {result['top1']:.2f} %, best "
        f"{best['top1']:.2f} % (epoch {best.get('epoch')}); outputs in {result['output']}"
    )
    return 0


def _validate(args: argparse.Namespace) -> int:
    from .tasks.classification import validate_checkpoint

    result = validate_checkpoint(
        args.data_dir,
        args.checkpoint,
        model_name=args.model,
        split=args.split,
        img_size=args.img_size,
        crop_pct=args.crop_pct,
        use_ema=args.use_ema,
        batch_size=args.batch_size,
        workers=args.workers,
        dataset=args.dataset,
        device=args.device,
        results_file=args.results_file,
    )
    print(
        f"{result['model']} on {result['images']} images at {result['img_size']} px: "
        f"top-1 {result['top1']:.2f} %  top-5 {result['top5']:.2f} %  loss {result['loss']:.4f}  "
        f"{result['images_per_s']:.1f} img/s"
        + (f"  ({result['skipped']} unreadable images skipped)" if result["skipped"] else "")
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    import json

    from .tasks.classification import predict

    predictions, skipped = predict(
        args.inputs,
        args.checkpoint,
        model_name=args.model,
        topk=args.topk,
        img_size=args.img_size,
        use_ema=args.use_ema,
        device=args.device,
    )
    if args.json:
        print(json.dumps({"predictions": predictions, "skipped": skipped}, indent=2))
    else:
        for item in predictions:
            top = ", ".join(f"{t['class']} {100 * t['prob']:.1f} %" for t in item["topk"])
            print(f"{item['image']}: {top}")
        if skipped:
            print(f"skipped {len(skipped)} unreadable images", file=sys.stderr)
    return 0 if predictions else 2


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    """Flags as timm's train.py, generated from ClassificationConfig (defaults and help there;
    --recipe presets in RECIPES)."""
    from .tasks.classification import ClassificationConfig

    train = commands.add_parser(
        "train", help="train or fine-tune a classifier (timm train.py flags, paper recipes)"
    )
    add_flags(train, ClassificationConfig)
    train.set_defaults(run=_train)


def _add_eval_parsers(commands: argparse._SubParsersAction) -> None:
    validate = commands.add_parser("validate", help="top-1/top-5/loss of a checkpoint on a split")
    validate.add_argument("--data-dir", required=True, help="dataset root")
    validate.add_argument("--split", default="validation", help="split folder (val/validation)")
    validate.add_argument("--dataset", default="", help="timm dataset specifier (default folder)")
    validate.add_argument("--model", help="model name (read from our checkpoints)")
    validate.add_argument("--checkpoint", required=True, help="training checkpoint or weights")
    validate.add_argument("--img-size", type=int, help="eval image size (default: the model's)")
    validate.add_argument("--crop-pct", type=float, help="centre crop fraction (default 0.9)")
    validate.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights")
    validate.add_argument("-b", "--batch-size", type=int, default=64)
    validate.add_argument("--workers", type=int, default=2)
    validate.add_argument("--device", help=DEVICE_HELP)
    validate.add_argument("--results-file", help="write the metrics to this JSON file")
    validate.set_defaults(run=_validate)

    predict = commands.add_parser("predict", help="top-k classes of images")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    predict.add_argument("--model", help="model name (read from our checkpoints)")
    predict.add_argument("--checkpoint", required=True, help="training checkpoint or weights")
    predict.add_argument("--topk", type=int, default=5)
    predict.add_argument("--img-size", type=int, help="eval image size (default: the model's)")
    predict.add_argument("--use-ema", action="store_true", help="use the EMA weights")
    predict.add_argument("--device", help=DEVICE_HELP)
    predict.add_argument("--json", action="store_true", help="print JSON instead of lines")
    predict.set_defaults(run=_predict)


def _significance(args: argparse.Namespace) -> int:
    from .visualize import save_significance

    result = save_significance(
        args.images,
        model_name=args.model,
        checkpoint=args.checkpoint,
        output=args.output,
        img_size=args.img_size,
        blocks=args.blocks,
        parts=args.parts,
        fmt=args.format,
        use_ema=args.use_ema,
        report=lambda line: print(line, file=sys.stderr),
    )
    skipped = len(result["skipped"])
    print(
        f"wrote {len(result['written'])} {args.format} file(s) to {args.output}"
        + (f"; skipped {skipped} unreadable file(s)" if skipped else "")
    )
    return 0


def _detect_train(args: argparse.Namespace) -> int:
    from .tasks.detection import train

    result = train(_given(args))
    ap, best = result.get("bbox_AP50"), result["best"]
    print(
        f"finished {result['epoch']} epochs: bbox AP {result.get('bbox_AP') or 0.0:.3f}, "
        f"AP50 {ap if ap is None else f'{ap:.3f}'}, best AP {max(best['bbox_AP'], 0.0):.3f} "
        f"(epoch {best.get('epoch')}); outputs in {result['output']}"
    )
    return 0


def _detect_val(args: argparse.Namespace) -> int:
    from .tasks.detection import validate_checkpoint

    metrics = validate_checkpoint(
        args.checkpoint,
        args.data_root,
        args.ann_file,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        results_file=args.results_file,
        predictions_file=args.predictions_file,
    )
    print(f"{metrics['images']} images ({metrics['skipped']} skipped) from {args.checkpoint}")
    for iou_type in ("bbox", "segm"):
        names = [k for k in metrics if k.startswith(f"{iou_type}_")]
        if names:
            print(
                f"{iou_type}: "
                + "  ".join(
                    f"{k.split('_', 1)[1]} {'n/a' if metrics[k] is None else f'{metrics[k]:.3f}'}"
                    for k in names
                )
            )
    return 0


def _detect_predict(args: argparse.Namespace) -> int:
    from .tasks.detection import predict

    result = predict(
        args.inputs,
        args.checkpoint,
        args.output,
        score_threshold=args.score_threshold,
        device=args.device,
    )
    print(
        f"{result['detections']} detections (score >= {args.score_threshold}) in "
        f"{result['images']} images; wrote {result['output']}/predictions.json and drawings"
        + (f"; skipped {len(result['skipped'])} unreadable files" if result["skipped"] else "")
    )
    return 0 if result["images"] else 2


def _add_detect_parsers(commands: argparse._SubParsersAction) -> None:
    """``sgformer detect train|val|predict``; the train flags are generated from
    DetectionConfig (defaults and help there; --schedule presets in SCHEDULES)."""
    detect = commands.add_parser(
        "detect", help="Mask R-CNN / Faster R-CNN on SG-Former + FPN (docs/detection.md)"
    )
    from .tasks.detection import DetectionConfig

    tasks = detect.add_subparsers(dest="detect_command", required=True)
    train = tasks.add_parser("train", help="train or resume (no data flags: synthetic shapes)")
    add_flags(train, DetectionConfig)
    train.set_defaults(run=_detect_train)

    val = tasks.add_parser("val", help="COCO box and mask AP of a checkpoint")
    val.add_argument("--checkpoint", required=True, help="detect train checkpoint or run folder")
    val.add_argument("--data-root", help="image folder (default: shapes validation scenes)")
    val.add_argument("--ann-file", help="COCO instances JSON of those images")
    val.add_argument("-b", "--batch-size", type=int, default=2)
    val.add_argument("--workers", type=int, default=2)
    val.add_argument("--device", help=DEVICE_HELP)
    val.add_argument("--results-file", help="write bbox_AP, bbox_AP50, ..., segm_* as JSON")
    val.add_argument("--predictions-file", help="write the detections as COCO results JSON")
    val.set_defaults(run=_detect_val)

    predict = tasks.add_parser("predict", help="detect objects; COCO results JSON and drawings")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    predict.add_argument("--checkpoint", required=True, help="detect train checkpoint or folder")
    predict.add_argument("--output", default="detections", help="output folder")
    predict.add_argument("--score-threshold", type=float, default=0.5, help="drawn if above")
    predict.add_argument("--device", help=DEVICE_HELP)
    predict.set_defaults(run=_detect_predict)


def _segment_train(args: argparse.Namespace) -> int:
    from .tasks.segmentation import train

    result = train(_given(args))
    best = result["best"]
    print(
        f"finished {result['iteration']} iterations: mIoU {100 * result['mIoU']:.2f} %, aAcc "
        f"{100 * result['aAcc']:.2f} %, best mIoU {100 * best['mIoU']:.2f} % (iteration "
        f"{best['iteration']}); outputs in {result['output']}"
    )
    return 0


def _segment_val(args: argparse.Namespace) -> int:
    from .tasks.segmentation import format_iou_table, validate_checkpoint

    result = validate_checkpoint(
        args.checkpoint,
        data_root=args.data_root,
        split=args.split,
        mode=args.mode,
        crop_size=args.crop_size,
        stride=args.stride,
        ms=args.ms,
        flip=args.flip,
        workers=args.workers,
        device=args.device,
        results_file=args.results_file,
    )
    print(format_iou_table(result))
    print(
        f"{result['model']} + {result['decoder']} on {result['images']} images ({result['mode']}"
        f"{', multi-scale' if args.ms else ''}{', flip' if result['flip'] else ''}): mIoU "
        f"{100 * result['mIoU']:.2f} %  aAcc {100 * result['aAcc']:.2f} %"
        + (f"  ({result['skipped']} unreadable images skipped)" if result["skipped"] else "")
    )
    return 0


def _segment_predict(args: argparse.Namespace) -> int:
    from .tasks.segmentation import predict

    result = predict(
        args.inputs,
        args.checkpoint,
        output=args.output,
        mode=args.mode,
        crop_size=args.crop_size,
        stride=args.stride,
        ms=args.ms,
        flip=args.flip,
        opacity=args.opacity,
        device=args.device,
    )
    skipped = len(result["skipped"])
    print(
        f"wrote {len(result['written'])} masks and overlays to {args.output}"
        + (f"; skipped {skipped} unreadable file(s)" if skipped else "")
    )
    return 0 if result["written"] else 2


def _add_segment_parsers(commands: argparse._SubParsersAction) -> None:
    """``segment train|val|predict``; the train flags are generated from SegmentationConfig
    (defaults and help there; --schedule presets in SCHEDULES)."""
    segment = commands.add_parser(
        "segment", help="semantic segmentation: UperNet / Semantic FPN on SG-Former (ADE20K)"
    )
    from .tasks.segmentation import SegmentationConfig

    actions = segment.add_subparsers(dest="segment_command", required=True)
    train = actions.add_parser(
        "train", help="train (no --data-root: sgformer_nano on the built-in shapes scenes)"
    )
    add_flags(train, SegmentationConfig)
    train.set_defaults(run=_segment_train)

    def add_test_flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--checkpoint", required=True, help="a segment train checkpoint")
        parser.add_argument("--mode", choices=("whole", "slide"), help="default: training's")
        parser.add_argument("--crop-size", type=int, help="sliding window (default: training's)")
        parser.add_argument("--stride", type=int, help="sliding stride (default 2/3 crop)")
        parser.add_argument(
            "--ms", action="store_true", help="multi-scale 0.5-1.75 + flip test (mmseg aug_test)"
        )
        parser.add_argument(
            "--flip", action=argparse.BooleanOptionalAction, help="flip test (default: with --ms)"
        )
        parser.add_argument("--device", help=DEVICE_HELP)

    val = actions.add_parser("val", help="mIoU, aAcc and per-class IoU of a checkpoint")
    add_test_flags(val)
    val.add_argument("--data-root", help="default: the training run's")
    val.add_argument("--split", help="split folder (default: the training run's validation)")
    val.add_argument("--workers", type=int, default=2)
    val.add_argument("--results-file", help="write mIoU, aAcc, per-class IoU to this JSON")
    val.set_defaults(run=_segment_val)

    predict = actions.add_parser("predict", help="colour-coded masks and overlays of images")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    add_test_flags(predict)
    predict.add_argument("--output", default="segment_predictions", help="output folder")
    predict.add_argument("--opacity", type=float, default=0.5, help="overlay opacity (0-1)")
    predict.set_defaults(run=_segment_predict)


def _benchmark(args: argparse.Namespace) -> int:
    from .benchmark import benchmark_options, benchmark_report, report_text

    report = benchmark_report(args.models, **benchmark_options(args))
    print(report_text(report))
    return 0 if any(row["img_per_s"] for row in report["rows"]) else 2


def _export(args: argparse.Namespace) -> int:
    from .export import export_model

    result = export_model(
        args.model,
        args.out,
        fmt=args.format,
        checkpoint=args.checkpoint,
        img_size=args.img_size,
        dynamic=args.dynamic,
    )
    for check in result["checks"]:
        print(
            f"checked {check['runtime']} at {check['shape']}: max rel. error {check['error']:.1e}"
        )
    print(f"wrote {result['path']} ({result['format']}): takes {result['accepts']}")
    return 0


def _add_deploy_parsers(commands: argparse._SubParsersAction) -> None:
    from .benchmark import add_benchmark_arguments

    bench = commands.add_parser(
        "benchmark", help="images/s, latency, GMACs and peak memory, models side by side"
    )
    bench.add_argument("--models", nargs="+", default=["sgformer_s"], help="timm model names")
    add_benchmark_arguments(bench)
    bench.set_defaults(run=_benchmark)

    export = commands.add_parser(
        "export", help="ONNX / TorchScript / ExportedProgram file, checked against PyTorch"
    )
    export.add_argument("out", help="output file")
    export.add_argument("--model", required=True, help="sgformer_s, sgformer_m, sgformer_b, ...")
    export.add_argument("--checkpoint", help="weights (.pth/.pt/.safetensors); default random")
    export.add_argument(
        "--format", choices=("onnx", "torchscript", "exported-program"), default="onnx"
    )
    export.add_argument("--img-size", type=int, default=224, help="example input side")
    export.add_argument(
        "--dynamic",
        action="store_true",
        help="dynamic height and width (128-4096 px; onnx and exported-program): one graph "
        "for every size, checked at two",
    )
    export.set_defaults(run=_export)


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

    data = commands.add_parser("data", help="write synthetic datasets")
    datasets = data.add_subparsers(dest="dataset", required=True)
    shapes = datasets.add_parser(
        "shapes",
        help="deterministic salient-shapes dataset: ImageFolder, COCO instances, label PNGs",
    )
    shapes.add_argument("out", help="output directory (missing, empty, or a previous run)")
    # Defaults are write_shapes_dataset's, so the CLI and the dense trainers agree on them.
    from .data import write_shapes_dataset

    default = {
        name: parameter.default
        for name, parameter in inspect.signature(write_shapes_dataset).parameters.items()
    }
    for flag, what in (
        ("num_train", "classification train images"),
        ("num_val", "classification val images"),
        ("img_size", "classification image side"),
        ("num_dense_train", "dense training scenes"),
        ("num_dense_val", "dense validation scenes"),
        ("dense_img_size", "dense scene side"),
        ("seed", "numpy SeedSequence entropy"),
    ):
        shapes.add_argument(
            "--" + flag.replace("_", "-"),
            type=int,
            default=default[flag],
            help=f"{what} (default {default[flag]})",
        )
    shapes.add_argument(
        "--force",
        action="store_true",
        help="overwrite OUT if it holds other data (an identical complete dataset is kept)",
    )
    shapes.add_argument(
        "--workers", type=int, help="processes that render images (default: one per CPU core)"
    )
    shapes.set_defaults(run=_data_shapes)

    _add_train_parser(commands)
    _add_eval_parsers(commands)
    _add_detect_parsers(commands)
    _add_segment_parsers(commands)
    _add_deploy_parsers(commands)

    significance = commands.add_parser(
        "significance",
        help="draw significance maps and token allocation over images (docs/significance.md)",
    )
    significance.add_argument(
        "images", nargs="*", metavar="IMAGE", help="image files (default: scikit-image photos)"
    )
    significance.add_argument(
        "--model", help="model name; optional if the checkpoint names its model"
    )
    significance.add_argument("--checkpoint", help="weights (.pth/.pt/.safetensors)")
    significance.add_argument(
        "--use-ema", action="store_true", help="load the checkpoint's EMA weights"
    )
    significance.add_argument(
        "--img-size", type=int, help="short side in px, aspect kept (default: the model's)"
    )
    significance.add_argument("--output", default="significance", help="output directory")
    significance.add_argument(
        "--blocks", default="all", help="hybrid blocks to draw: all, or indices such as 0,2"
    )
    significance.add_argument(
        "--parts", action="store_true", help="also draw the global and local parts"
    )
    significance.add_argument(
        "--format", choices=("png", "npy"), default="png", help="figures, or .npz arrays"
    )
    significance.set_defaults(run=_significance)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status. Bad input prints one line, exit status 2."""
    args = build_parser().parse_args(argv)
    # Library code logs; the command line shows INFO on stderr (rank 0 only under torchrun).
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        print(f"sgformer {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
